"""A run's record does not depend on how often it was interrupted: metrics.jsonl and TensorBoard
after a stop and resume, SIGKILL at chosen moments (benchmarks/chaos.py), two runs on one
workdir, and broken files in the workdir."""

import importlib.util
import json
import logging
import os
import pathlib
import re
import signal
import struct
import subprocess
import sys
import time
import types

import chex
import jax
import pytest
from tensorboardX import event_file_writer
from tensorboardX.proto import event_pb2

from train import loop
from train.config import load_config
from train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 30
TIMING = "train/steps_per_second"  # the one value no two runs share


def config_every_5():
    """The tiny MLP with a report every 5 steps, a checkpoint every 10, dropout on."""
    config = load_config(REPO / "configs" / "mlp.py:tiny")
    config.data.train_split = "train[:1024]"
    config.data.eval_split = "test[:256]"
    config.model.dropout_rate = 0.1
    config.train.update(num_steps=NUM_STEPS, log_every=5, eval_every=15, checkpoint_every=10)
    config.train.steps_per_call = 1
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    state, _ = loop.train_and_evaluate(config_every_5(), workdir)
    return workdir, jax.device_get(state.params)


def without_timing(reports: list[dict]) -> list[dict]:
    return [{k: v for k, v in report.items() if k != TIMING} for report in reports]


def event_steps(workdir: pathlib.Path) -> list[tuple[int, str]]:
    """(step, tag) of every scalar in the run's TensorBoard event files, in order."""
    found = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, position = path.read_bytes(), 0
        while position + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[position : position + 8])
            event = event_pb2.Event.FromString(data[position + 12 : position + 12 + length])
            found += [(event.step, value.tag) for value in event.summary.value]
            position += 16 + length
    return found


def stop_after(step: int, workdir: pathlib.Path, monkeypatch) -> None:
    """Runs `config_every_5()` in `workdir` until a SIGTERM after step `step`."""
    add = loop.ReportWindow.add
    calls = []

    def signal_after(window, step_sums, num_steps):  # the host side of each step
        calls.append(num_steps)
        if sum(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the loop sees it after the step
        return add(window, step_sums, num_steps)

    with monkeypatch.context() as patch:
        patch.setattr(loop.ReportWindow, "add", signal_after)
        stopped, _ = loop.train_and_evaluate(config_every_5(), workdir)
    assert int(stopped.step) == step


@pytest.mark.parametrize("step", [7, 10])  # not a report step; a checkpoint step
def test_stop_and_resume_log_what_an_uninterrupted_run_logs(step, reference, tmp_path, monkeypatch):
    stop_after(step, tmp_path, monkeypatch)
    # The stop wrote no row of its own: only the reports an uninterrupted run has by then.
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [s for s in (5, 10) if s <= step]
    resumed, _ = loop.train_and_evaluate(config_every_5(), tmp_path)

    workdir, params = reference
    chex.assert_trees_all_equal(jax.device_get(resumed.params), params)
    want = without_timing(read_metrics(workdir / "metrics.jsonl"))
    got = without_timing(read_metrics(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in got] == [5, 10, 15, 20, 25, 30]
    assert got == want  # every value bitwise, row for row
    assert event_steps(tmp_path) == event_steps(workdir)  # TensorBoard: no step twice


def test_a_resume_within_the_second_of_its_stop_keeps_the_stopped_runs_events(
    reference, tmp_path, monkeypatch
):
    # Event files are named by the second they were opened in: freeze the clock tensorboardX's
    # writer reads, and only that one (the loop's own timing keeps the real clock).
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1234567890.5))
    stop_after(10, tmp_path, monkeypatch)
    loop.train_and_evaluate(config_every_5(), tmp_path)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    workdir, _ = reference
    assert event_steps(tmp_path) == event_steps(workdir)


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", REPO / "benchmarks" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    return chaos


def test_three_sigkills_at_chosen_moments_change_nothing(tmp_path, capsys):
    # A kill at a random time, one as a checkpoint is being written, one just after a report.
    chaos = load_chaos()
    status = chaos.main(
        [
            "--config=configs/mlp.py:tiny",
            "--kills=3",
            f"--workdir={tmp_path}",
            "--config.data.train_split=train[:1024]",
            "--config.train.num_steps=60",
            "--config.train.log_every=5",
            "--config.train.checkpoint_every=10",
            "--config.train.eval_every=30",
            "--config.train.steps_per_call=5",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["moments"] == {"random": 1, "checkpoint": 1, "report": 1}
    assert (status, summary["differences"]) == (0, 0)
    # And the comparison can fail: another seed's run differs.
    other = tmp_path / "other"
    subprocess.run(
        [*chaos.command("configs/mlp.py:tiny", other, ["--config.seed=1",
         "--config.data.train_split=train[:1024]", "--config.train.num_steps=60",
         "--config.train.log_every=5", "--config.train.checkpoint_every=10",
         "--config.train.eval_every=30", "--config.train.steps_per_call=5"])],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    assert chaos.differences(tmp_path / "reference", other)


def cli(workdir, *overrides):
    return subprocess.Popen(
        [sys.executable, "-m", "train", "--config=configs/mlp.py:tiny", f"--workdir={workdir}",
         "--config.train.steps_per_call=1", *overrides],
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_a_second_run_on_the_same_workdir_stops_at_once_and_harms_nothing(tmp_path):
    # The first run is far longer than the test: SIGTERM ends it once the second has been
    # refused, so no machine is fast enough to finish it before the second one starts.
    first = cli(tmp_path, "--config.train.num_steps=1000000", "--config.train.log_every=10",
                "--config.train.checkpoint_every=1000000")  # fmt: skip
    deadline = time.monotonic() + 120
    while not (tmp_path / "metrics.jsonl").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second = cli(tmp_path, "--config.train.num_steps=1000000", "--config.train.log_every=10")
    _, stderr = second.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and len(errors) == 1, stderr[-2000:]
    assert f"is in use by another run (pid {first.pid} on " in errors[0]
    assert first.poll() is None  # the refusal did not touch the first run
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    stopped = re.search(r"Stopped by SIGTERM after step (\d+)", stderr)
    assert stopped, stderr[-2000:]
    last = int(stopped.group(1))
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(10, last + 1, 10))  # every report once, none from the second
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {str(last)}
    # A killed run's lock goes with it: the next run on the workdir starts.
    killed = cli(tmp_path / "killed", "--config.train.num_steps=1000000")
    while not (tmp_path / "killed" / ".lock").exists():
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    again = cli(tmp_path / "killed", "--config.train.num_steps=20")
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-2000:]


def test_a_half_written_last_line_of_metrics_jsonl_is_dropped_on_resume(
    reference, tmp_path, monkeypatch
):
    stop_after(20, tmp_path, monkeypatch)
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 25, "train/lo')  # what a kill during a write leaves
    loop.train_and_evaluate(config_every_5(), tmp_path)
    workdir, _ = reference
    want = without_timing(read_metrics(workdir / "metrics.jsonl"))
    assert without_timing(read_metrics(tmp_path / "metrics.jsonl")) == want


def test_a_broken_line_inside_metrics_jsonl_is_one_line_naming_it(tmp_path):
    config = config_every_5()
    config.train.num_steps = 10
    loop.train_and_evaluate(config, tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(ValueError, match=r"Line 1 of .*metrics.jsonl is not JSON") as error:
        loop.train_and_evaluate(config_every_5(), tmp_path)
    assert "\n" not in str(error.value)
    assert "10" in {p.name for p in (tmp_path / "checkpoints").iterdir()}  # kept


@pytest.mark.parametrize("content", ["", '{"model": {"na'], ids=["empty", "truncated"])
def test_an_unreadable_config_json_is_rewritten_and_the_run_resumes(content, tmp_path, caplog):
    config = config_every_5()
    config.train.num_steps = 10
    loop.train_and_evaluate(config, tmp_path)
    (tmp_path / "config.json").write_text(content)
    caplog.set_level(logging.INFO)
    state, _ = loop.train_and_evaluate(config_every_5(), tmp_path)
    assert int(state.step) == NUM_STEPS
    assert any("Resumed from checkpoint step 10" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["num_steps"] == NUM_STEPS


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    process = cli(blocker / "run", "--config.train.num_steps=5")
    _, stderr = process.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert process.returncode == 2 and len(errors) == 1, stderr[-2000:]
    assert f"Cannot write to workdir {blocker / 'run'}" in errors[0]
    assert "pass a --workdir you can write to" in errors[0]
