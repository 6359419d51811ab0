"""A run's record does not depend on how often it was interrupted: metrics.jsonl and TensorBoard
after a stop and resume, SIGKILL at chosen moments (benchmarks/chaos.py), two runs on one
workdir, and broken files in the workdir."""

import importlib.util
import json
import logging
import os
import pathlib
import signal
import struct
import subprocess
import types

import chex
import jax
import pytest
from commands import start_train
from tensorboardX import event_file_writer

from train import loop, metrics
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


def event_scalars(workdir: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """(step, tag, value) of every scalar in the run's TensorBoard event files, in order. The value
    is its float32's bits in hex, so that comparisons are bitwise; None for TIMING."""
    return [
        (step, tag, None if tag == TIMING else bits(value))
        for step, tag, value in metrics.read_events(workdir / "tensorboard")
    ]


def bits(value: float) -> str:
    return struct.pack("<f", value).hex()


def stop_after(step: int, workdir: pathlib.Path) -> None:
    """Runs `config_every_5()` in `workdir` until a SIGTERM after step `step`."""

    def signal_after(moment, at_step):  # after each call's steps, before the loop asks to stop
        if moment == "step" and at_step == step:
            signal.raise_signal(signal.SIGTERM)  # a real signal, taken before this returns

    stopped, _ = loop.train_and_evaluate(config_every_5(), workdir, on_event=signal_after)
    assert int(stopped.step) == step


@pytest.mark.parametrize("step", [7, 10])  # not a report step; a checkpoint step
def test_stop_and_resume_log_what_an_uninterrupted_run_logs(step, reference, tmp_path):
    stop_after(step, tmp_path)
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
    assert event_scalars(tmp_path) == event_scalars(workdir)  # TensorBoard: the same, bitwise


def test_the_tensorboard_comparison_sees_values_not_only_steps(reference, tmp_path):
    config = config_every_5()
    config.seed = 1
    loop.train_and_evaluate(config, tmp_path)
    workdir, _ = reference
    mine, theirs = event_scalars(tmp_path), event_scalars(workdir)
    assert [(step, tag) for step, tag, _ in mine] == [(step, tag) for step, tag, _ in theirs]
    assert mine != theirs


def test_a_resume_within_the_second_of_its_stop_keeps_the_stopped_runs_events(
    reference, tmp_path, monkeypatch
):
    # Event files are named by the second they were opened in: freeze the clock tensorboardX's
    # writer reads, and only that one (the loop's own timing keeps the real clock).
    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1234567890.5))
    stop_after(10, tmp_path)
    loop.train_and_evaluate(config_every_5(), tmp_path)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    workdir, _ = reference
    assert event_scalars(tmp_path) == event_scalars(workdir)


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos", REPO / "benchmarks" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    return chaos


def test_three_sigkills_at_chosen_moments_change_nothing(tmp_path, capsys):
    # The run kills itself just after a report (step 15, between checkpoints), just after the
    # async save of step 20 started, and after the call of steps 31-35, restarted each time.
    chaos = load_chaos()
    moments = ["report:15", "save:20", "step:35"]
    status = chaos.main(
        [
            "--config=configs/mlp.py:tiny",
            f"--at={','.join(moments)}",
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
    assert summary["moments"] == moments  # every kill landed, at its moment
    assert (status, summary["differences"]) == (0, 0)
    assert event_scalars(tmp_path / "killed") == event_scalars(tmp_path / "reference")
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
    assert event_scalars(other) != event_scalars(tmp_path / "reference")


def cli(workdir, *overrides, signal_at=None):
    """The command line on `workdir`; `signal_at` sets its test hook (`commands.start_train`)."""
    return start_train(
        "--config=configs/mlp.py:tiny", f"--workdir={workdir}", "--config.train.steps_per_call=1",
        *overrides, signal_at=signal_at,
    )  # fmt: skip


def finish(process, returncode=0):
    """Waits for `process` to end (the timeout is only a safety net); returns its stderr."""
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == returncode, stderr[-2000:]
    return stderr


def test_a_second_run_on_the_same_workdir_stops_at_once_and_harms_nothing(tmp_path):
    # The first run pauses itself (SIGSTOP) just after its report of step 10, holding the
    # workdir; the test waits for that pause, runs the second, then lets the first go on to a
    # SIGTERM of its own after step 20.
    first = cli(tmp_path, "--config.train.num_steps=100", "--config.train.log_every=10",
                "--config.train.checkpoint_every=100",
                signal_at="SIGSTOP@report:10;SIGTERM@step:20")  # fmt: skip
    _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once it is paused (or gone)
    assert os.WIFSTOPPED(status), first.communicate()
    stderr = finish(cli(tmp_path, "--config.train.num_steps=100"), returncode=2)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    assert f"is in use by another run (pid {first.pid} on " in errors[0]
    first.send_signal(signal.SIGCONT)
    stderr = finish(first)  # the refusal did not touch it: it goes on and stops as asked
    assert "Stopped by SIGTERM after step 20;" in stderr
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [10, 20]  # every report once, none from the second
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"20"}
    # A killed run's lock goes with it: the next run on the workdir starts. (It kills itself
    # after step 1, with its workdir locked.)
    finish(cli(tmp_path / "killed", signal_at="SIGKILL@step:1"), returncode=-signal.SIGKILL)
    assert "pid " in (tmp_path / "killed" / ".lock").read_text()
    finish(cli(tmp_path / "killed", "--config.train.num_steps=20"))


def test_a_half_written_last_line_of_metrics_jsonl_is_dropped_on_resume(reference, tmp_path):
    stop_after(20, tmp_path)
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
    stderr = finish(cli(blocker / "run", "--config.train.num_steps=5"), returncode=2)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    assert f"Cannot write to workdir {blocker / 'run'}" in errors[0]
    assert "pass a --workdir you can write to" in errors[0]
