"""End to end: each tiny config trained by the loop, the command line, and resuming a run."""

import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from commands import xla_flags

from train import loop, process
from train.config import load_config
from train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "transformer"])
def test_tiny_config_trains_end_to_end(name, tmp_path):
    config = load_config(CONFIGS / f"{name}.py:tiny")
    _, final = loop.train_and_evaluate(config, tmp_path)

    reports = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r["step"] for r in reports]
    assert steps == [50, 100, 150, 200]
    for report in reports:
        assert all(math.isfinite(v) for v in report.values()), report
    evals = [r for r in reports if "eval/loss" in r]
    assert [r["step"] for r in evals] == [100, 200]
    assert 0.0 <= evals[-1]["eval/accuracy"] <= 1.0
    assert reports[-1]["train/loss"] < reports[0]["train/loss"]  # it learned something
    assert final["eval/loss"] == evals[-1]["eval/loss"]

    assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "100",
        "200",
    ]
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    if name == "transformer":
        text = (tmp_path / "samples.txt").read_text()
        samples = re.split(r"--- sample \d+ ---\n", text)[1:]
        assert len(samples) == config.train.sample_lines
        assert all(len(s) == config.train.sample_length + 1 for s in samples)  # + the newline


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_split_in_device_memory_trains_like_host_batches(name, tmp_path):
    # data.on_device gathers each batch inside the step from the split held on the devices; the
    # batches, and so the run, must be those of the host pipeline. 4 devices (conftest): the
    # gathered rows are laid out over the mesh like host batches.
    config = load_config(CONFIGS / f"{name}.py:tiny")
    config.train.num_steps, config.train.log_every = 12, 3
    config.train.eval_every = config.train.checkpoint_every = 12
    runs = {}
    for on_device in (True, False):
        config.data.on_device = on_device
        state, _ = loop.train_and_evaluate(config, tmp_path / str(on_device))
        losses = [
            r["train/loss"] for r in read_metrics(tmp_path / str(on_device) / "metrics.jsonl")
        ]
        runs[on_device] = (losses, jax.device_get(state.params))
    assert len(runs[True][0]) == 4 and len(set(runs[True][0])) == 4
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-6)
    chex.assert_trees_all_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-6)


def test_calls_of_several_steps_stop_at_every_report_and_save():
    config = load_config(CONFIGS / "mlp.py:tiny").train
    config.steps_per_call, config.num_steps = 4, 30
    config.log_every, config.checkpoint_every = 10, 20
    calls, step = [], 0
    while step < config.num_steps:
        calls.append(loop.steps_in_call(step, config))
        step += calls[-1]
    # By hand: 4-step calls start at multiples of 4 and may end at, not pass, steps 10, 20 and 30.
    # Steps 8-11 would pass 10 (8, 9, 10, 11 run alone); 28-31 would pass 30 (28, 29 alone).
    assert calls == [4, 4, 1, 1, 1, 1, 4, 4, 4, 4, 1, 1]
    config.steps_per_call = 1
    assert {loop.steps_in_call(step, config) for step in range(30)} == {1}


def test_steps_per_call_that_does_not_divide_the_log_interval_is_warned_about(tmp_path, caplog):
    config = load_config(CONFIGS / "mlp.py:tiny")  # 25 steps per call
    config.train.num_steps = config.train.log_every = config.train.checkpoint_every = 10
    with caplog.at_level(logging.WARNING):
        state, _ = loop.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 10  # ten calls of one step
    warnings = [r.getMessage() for r in caplog.records if "steps_per_call" in r.getMessage()]
    want = "steps_per_call=25 does not divide train.log_every=10 and train.checkpoint_every=10"
    assert len(warnings) == 1 and want in warnings[0], warnings


def test_calls_of_several_steps_train_like_one_step_per_call(tmp_path):
    # The tiny MLP's 25 steps per call against 1 on 4 devices (conftest): under jit with its split
    # in device memory (the indices are stacked and laid out over the mesh per step), and under
    # pmap with stacked host batches. Reports at 50 and 100; steps 101-110 run one per call.
    config = load_config(CONFIGS / "mlp.py:tiny")
    config.train.num_steps = 110
    assert config.train.steps_per_call == 25 and config.data.on_device
    runs = {}
    for parallelism, per_call in [("jit", 1), ("jit", 25), ("pmap", 25)]:
        config.train.parallelism, config.train.steps_per_call = parallelism, per_call
        workdir = tmp_path / f"{parallelism}{per_call}"
        state, _ = loop.train_and_evaluate(config, workdir)
        runs[parallelism, per_call] = (
            read_metrics(workdir / "metrics.jsonl"),
            jax.device_get(state.params),
        )
    reference_reports, reference_params = runs.pop(("jit", 1))
    for run, (reports, params) in runs.items():
        assert [r["step"] for r in reports] == [50, 100, 110], run
        for a, b in zip(reports, reference_reports, strict=True):
            assert a["step"] == b["step"]
            np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-6, err_msg=run)
        if run[0] == "jit":  # the same program, called differently: bitwise
            chex.assert_trees_all_equal(params, reference_params)
            assert [r.get("eval/loss") for r in reports] == [
                r.get("eval/loss") for r in reference_reports
            ]
        else:  # pmap's all-reduce sums in another order than jit's
            chex.assert_trees_all_close(params, reference_params, rtol=1e-5, atol=1e-6)


def test_resume_continues_exactly(tmp_path):
    """A run restarted from its step-100 checkpoint ends bitwise equal to the uninterrupted run
    (25 steps per call, as configs/mlp.py sets)."""
    config = load_config(CONFIGS / "mlp.py:tiny")
    config.model.dropout_rate = 0.1  # the resumed run must also draw the same dropout masks
    whole, _ = loop.train_and_evaluate(config, tmp_path / "whole")

    part = tmp_path / "part"
    loop.train_and_evaluate(config, part)
    # Throw away the final checkpoint so the next run restores step 100 and redoes 101-200,
    # with the data iterator, the dropout key and the optimizer state taken from the checkpoint.
    shutil.rmtree(part / "checkpoints" / "200")
    resumed, _ = loop.train_and_evaluate(config, part)

    assert int(resumed.step) == 200
    chex.assert_trees_all_equal(jax.device_get(whole.params), jax.device_get(resumed.params))
    whole_reports = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    part_reports = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in part_reports] == [50, 100, 150, 200]  # 150 and 200 not doubled
    for a, b in zip(whole_reports, part_reports, strict=True):
        assert a["train/loss"] == b["train/loss"], (a, b)


def run_tiny_transformer(workdir: pathlib.Path, *overrides: str) -> tuple[list[dict], str]:
    """`python -m train` on the tiny Transformer for 20 steps, on JAX's one CPU device unless
    `overrides` ask for more; (the reports in metrics.jsonl, stderr)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config=configs/transformer.py:tiny",
            f"--workdir={workdir}",
            "--config.train.num_steps=20",
            "--config.train.log_every=10",
            "--config.train.eval_every=20",
            "--config.train.checkpoint_every=20",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(workdir / "metrics.jsonl"), result.stderr


def test_command_line_runs_with_overrides_on_one_and_two_cpu_devices(tmp_path):
    reports, log = run_tiny_transformer(tmp_path / "one")
    assert [r["step"] for r in reports] == [10, 20]
    assert np.isfinite(reports[-1]["eval/loss"])
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["train"]["num_steps"] == 20
    assert "it/s" in log or "step/s" in log  # the progress bar
    assert "Devices: 1 x cpu over 1 process(es); mesh {'data': 1, 'fsdp': 1, 'tensor': 1}." in log
    # It restarted itself once with its process settings (train/process.py), where it has any.
    wanted = process.environment(load_config(CONFIGS / "transformer.py:tiny").train)
    assert log.count("Restarting once with") == int(bool(wanted)), log[-3000:]

    # train.cpu_devices (train/process.py): the batch split over two CPU devices trains on
    # real tiny Shakespeare as on one, up to round-off.
    two, log = run_tiny_transformer(tmp_path / "two", "--config.train.cpu_devices=2")
    assert "Devices: 2 x cpu over 1 process(es); mesh {'data': 2, 'fsdp': 1, 'tensor': 1}." in log
    assert [r["step"] for r in two] == [10, 20]
    for key in ("train/loss", "eval/loss"):
        a, b = [r[key] for r in reports if key in r], [r[key] for r in two if key in r]
        np.testing.assert_allclose(b, a, rtol=1e-5)


def test_a_profiled_run_leaves_a_trace_in_its_workdir(tmp_path):
    config = load_config(CONFIGS / "mlp.py:tiny")
    config.train.update(num_steps=6, log_every=3, eval_every=6, checkpoint_every=6)
    config.train.update(steps_per_call=1, profile_steps=2, profile_first_step=3)
    loop.train_and_evaluate(config, tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    # Off by default: no trace.
    config.train.profile_steps = 0
    loop.train_and_evaluate(config, tmp_path / "off")
    assert not (tmp_path / "off" / "profile").exists()


def test_a_profile_inside_a_call_of_many_steps_traces_that_call(tmp_path):
    # configs/mlp.py runs 25 steps per call, and the README's example asks for steps 20-24: they
    # lie inside the call of steps 1-25, which the trace must span (it used to start only when
    # the first step asked for began a call, so this recorded nothing).
    config = load_config(CONFIGS / "mlp.py:tiny")
    assert config.train.steps_per_call == 25
    config.train.update(num_steps=50, log_every=25, eval_every=50, checkpoint_every=50)
    config.train.update(profile_steps=5, profile_first_step=20)
    loop.train_and_evaluate(config, tmp_path)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1
    # The compiled call of 25 steps ran inside the trace: its program's name is recorded.
    assert b"train_steps" in traces[0].read_bytes()
