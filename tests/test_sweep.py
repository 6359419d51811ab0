"""python -m train.sweep: a seeded random sweep of the tiny MLP's learning rate (the same trials
again, in parallel or one by one), a sweep stopped during its third trial and resumed, failed
trials recorded; the space syntax, the draws, the metric summary and the pruning rule by hand."""

import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from train import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 40
# Every trial: 40 steps in calls of 10, a report every 10, evaluation and a checkpoint every 20.
SHORT = [
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.train.steps_per_call=10",
    "--config.train.log_every=10",
    "--config.train.eval_every=20",
    "--config.train.checkpoint_every=20",
    "--config.data.train_split=train[:1024]",
    "--config.data.eval_split=test[:256]",
    "--config.train.compile_cache_dir=",  # off: the same compile time in every run
    "--config.model.dropout_rate=0.1",  # dropout on: resumed trials must draw the same masks
]
LEARNING_RATE = "optimizer.learning_rate=loguniform(0.01,0.3)"
TIMING = "train/steps_per_second"  # the one value no two runs share


def sweep_command(workdir: pathlib.Path, *more: str) -> list[str]:
    """A seeded random sweep of 4 trials over the tiny MLP's learning rate."""
    return [
        sys.executable,
        "-m",
        "train.sweep",
        "--config=configs/mlp.py:tiny",
        f"--workdir={workdir}",
        f"--param={LEARNING_RATE}",
        "--trials=4",
        "--seed=7",
        *SHORT,
        *more,
    ]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def read_lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "sweep.jsonl").read_text().splitlines()]


def read_until(process: subprocess.Popen, text: str) -> None:
    """Reads `process`'s stdout (unbuffered: one byte at a time, so what follows stays for
    `communicate`) until a line holds `text`."""
    watchdog = threading.Timer(600, process.kill)  # a safety net only: a hung process ends
    watchdog.start()
    try:
        for line in iter(process.stdout.readline, b""):
            if text in line.decode(errors="replace"):
                return
    finally:
        watchdog.cancel()
    pytest.fail(f"no {text!r} in the output of {process.args}: {process.communicate()}")


def without(lines: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in line.items() if k != key} for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted sweep, two trials at a time."""
    workdir = tmp_path_factory.mktemp("sweep") / "reference"
    result = run(sweep_command(workdir, "--parallel=2"))
    assert result.returncode == 0, result.stderr
    return workdir, result.stdout


def test_seeded_random_sweep_of_four_trials(reference):
    workdir, stdout = reference
    lines = read_lines(workdir)
    drawn = sweep.draw_trials(
        [sweep.parse_param(LEARNING_RATE)], seed=7, num_trials=4, grid=False, grid_points=3
    )
    rates = [float(trial["optimizer.learning_rate"]) for trial in drawn]
    assert len(set(rates)) == 4 and all(0.01 <= rate <= 0.3 for rate in rates)
    assert [line["trial"] for line in lines] == [0, 1, 2, 3]
    assert [line["overrides"] for line in lines] == [
        {"optimizer.learning_rate": rate} for rate in rates
    ]
    for line, rate in zip(lines, rates, strict=True):
        assert line["status"] == "done" and line["reason"] is None
        assert line["steps"] == NUM_STEPS and line["metric"] == "eval/accuracy"
        # 10 classes: chance is 0.1; 40 steps of SGD at these rates get well above it.
        assert 0.5 < line["final"] <= line["best"] <= 1.0
        assert math.isfinite(line["wall_s"]) and line["wall_s"] > 0
        config = json.loads((workdir / line["workdir"] / "config.json").read_text())
        assert config["optimizer"]["learning_rate"] == rate  # the trial's override, exactly
        assert config["train"]["num_steps"] == NUM_STEPS  # the sweep's override
        reports = sweep.read_reports(workdir / line["workdir"])
        assert [r["step"] for r in reports] == [10, 20, 30, 40]
        assert line["final"] == reports[-1]["eval/accuracy"]
    for name in ("sweep_curves.png", "sweep_params.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The winner has the highest final accuracy (the first trial among equals), and its
    # command line trains it again.
    best = max(lines, key=lambda line: (line["final"], -line["trial"]))
    rate = best["overrides"]["optimizer.learning_rate"]
    retrain = "Retrain it: python " + shlex.join(
        [
            "-m",
            "train",
            "--config=configs/mlp.py:tiny",
            f"--workdir={workdir}/winner",
            *SHORT,
            f"--config.optimizer.learning_rate={rate}",
        ]
    )
    assert "'--config.data.train_split=train[:1024]'" in retrain  # quoted for the shell
    assert retrain in stdout.splitlines()
    assert f"Best: trial-{best['trial']:03d}," in stdout

    # The same command again: the same trials, all kept, nothing run.
    before = (workdir / "sweep.jsonl").read_text()
    again = run(sweep_command(workdir))
    assert again.returncode == 0, again.stderr
    assert "4 trials (random search, seed 7)" in again.stdout
    assert "0 to run, 4 finished before" in again.stdout
    assert (workdir / "sweep.jsonl").read_text() == before
    assert retrain in again.stdout.splitlines()


def test_stopped_sweep_resumes_to_the_trials_of_an_uninterrupted_one(reference, tmp_path):
    reference_dir, _ = reference
    workdir = tmp_path / "stopped"
    # Trial 2 sends SIGTERM to the sweep after its step 10 (train/__main__.py's test hook, which
    # every trial inherits and only trial-002 acts on), as a scheduler stopping the sweep then
    # would, and waits for the sweep to pass the stop on: it stops after step 10 on any machine.
    env = dict(os.environ, JAXMODELS_TEST_SIGNAL="SIGTERM@step:10,workdir=trial-002,to=parent")
    process = subprocess.Popen(
        sweep_command(workdir), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        bufsize=0,
    )  # fmt: skip
    read_until(process, "Sweep of 4 trials")  # printed once the sweep holds its lock
    process.send_signal(signal.SIGSTOP)  # paused, it holds the lock while a second sweep starts
    _, status = os.waitpid(process.pid, os.WUNTRACED)  # returns once it is paused
    assert os.WIFSTOPPED(status)
    second = run(sweep_command(workdir))  # a second sweep on the same directory is refused
    assert second.returncode == 2
    assert second.stderr.startswith(f"error: {workdir} is in use by another sweep (pid ")
    assert len(second.stderr.splitlines()) == 1
    process.send_signal(signal.SIGCONT)
    stdout, stderr = (out.decode() for out in process.communicate(timeout=900))  # a safety net
    assert process.returncode == 0, stderr
    assert stdout.splitlines()[-1] == (
        "Stopped by SIGTERM: 2 of 4 trials done, 2 to run or resume (stopped trials keep their "
        "checkpoints). Run the same command to resume."
    )
    stopped = read_lines(workdir)
    assert [line["status"] for line in stopped] == ["done", "done", "stopped"]
    assert stopped[2]["steps"] == 10  # stopped after the call that was running
    checkpoints = [p.name for p in (workdir / "trial-002" / "checkpoints").iterdir()]
    assert "10" in checkpoints

    result = run(sweep_command(workdir, "--parallel=2"))  # not a setting of the trials
    assert result.returncode == 0, result.stderr
    assert "2 to run, 2 finished before" in result.stdout
    resumed = read_lines(workdir)
    assert without(resumed, "wall_s") == without(read_lines(reference_dir), "wall_s")
    for line in resumed:  # row for row the reports of the uninterrupted trials
        mine = sweep.read_reports(workdir / line["workdir"])
        theirs = sweep.read_reports(reference_dir / line["workdir"])
        assert without(mine, TIMING) == without(theirs, TIMING)
    record = json.loads((workdir / "trial-002" / sweep.RECORD).read_text())
    assert record["attempts"] == 2
    log = (workdir / "trial-002" / sweep.LOG).read_text()
    assert f"Resumed from checkpoint step {stopped[2]['steps']}" in log


def test_failed_trials_are_recorded_and_the_others_finish(tmp_path):
    workdir = tmp_path / "grid"
    command = [
        sys.executable,
        "-m",
        "train.sweep",
        "--config=configs/mlp.py:tiny",
        f"--workdir={workdir}",
        "--param=optimizer.learning_rate=choice(0.05,abc,1e9)",
        "--grid",
        "--parallel=3",
        *SHORT,
    ]
    result = run(command)
    assert result.returncode == 0, result.stderr
    lines = read_lines(workdir)
    assert [line["overrides"]["optimizer.learning_rate"] for line in lines] == [0.05, "abc", 1e9]
    assert [line["status"] for line in lines] == ["done", "failed", "failed"]
    assert lines[0]["steps"] == NUM_STEPS and 0.5 < lines[0]["final"] <= 1.0
    assert lines[1]["reason"] == (
        "flag --config.optimizer.learning_rate=abc: could not convert string to float: 'abc'"
    )
    assert lines[1]["steps"] == 0
    # Diverged at once: the first report (steps 1-10) is not finite.
    assert lines[2]["reason"].startswith("train/loss is nan in steps 1-10;")
    assert "Best: trial-000," in result.stdout
    # The same command again keeps the failed trials as they are.
    again = run(command)
    assert again.returncode == 0 and "0 to run, 3 finished before" in again.stdout
    assert read_lines(workdir) == lines


def test_a_resume_with_other_settings_is_refused(tmp_path):
    workdir = tmp_path / "sweep"
    workdir.mkdir()
    sweep.check_spec(sweep.build_sweep(*sweep.parse_args(sweep_command(workdir)[3:])))
    command = sweep_command(workdir)
    other = "optimizer.learning_rate=loguniform(0.01,0.5)"
    command[command.index(f"--param={LEARNING_RATE}")] = f"--param={other}"
    result = run(command)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"error: {workdir} holds a sweep with other settings (params=['{LEARNING_RATE}']); "
        "repeat its command (--trials may change) or pass another --workdir.\n"
    )
    assert run([*command, "--param=model.dropout_rate=choice(0.1,0.2)"]).stderr == (
        "error: model.dropout_rate is set by --param and by --config.model.dropout_rate=0.1; "
        "pass one.\n"
    )


def test_a_resume_after_the_config_file_changed_is_refused(tmp_path):
    config = tmp_path / "mlp.py"
    config.write_text((REPO / "configs" / "mlp.py").read_text())
    args, extras = sweep.parse_args(
        [f"--config={config}:tiny", f"--workdir={tmp_path / 'sweep'}", f"--param={LEARNING_RATE}"]
    )
    (tmp_path / "sweep").mkdir()
    sweep.check_spec(sweep.build_sweep(args, extras))
    sweep.check_spec(sweep.build_sweep(args, extras))  # unchanged: fine
    text = config.read_text()
    config.write_text(text.replace("config.data.batch_size = 64", "config.data.batch_size = 32"))
    with pytest.raises(ValueError) as error:
        sweep.check_spec(sweep.build_sweep(args, extras))
    assert str(error.value) == (
        f"{config}:tiny has changed since the sweep in {tmp_path / 'sweep'} began "
        "(data.batch_size: 64 then, 32 now); restore it or pass another --workdir."
    )


# --- By hand, no training -----------------------------------------------------------------------


def test_spaces_are_parsed():
    param = sweep.parse_param("config.model.hidden_sizes=choice((64,), (128,128), 'a,b', adam)")
    assert param.field == "model.hidden_sizes"
    assert param.args == ("(64,)", "(128,128)", "a,b", "adam")  # quotes dropped
    assert sweep.parse_param("seed=int(0, 3)").args == (0, 3)
    assert sweep.parse_param("x.y=loguniform(1e-4,1e-2)").args == (1e-4, 1e-2)
    assert [sweep.json_value(t) for t in ("0.1", "(64,)", "adam", "True")] == [
        0.1,
        [64],
        "adam",
        True,
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("learning_rate", "write FIELD=loguniform(a,b)"),
        ("a.b=normal(0,1)", "unknown space 'normal'"),
        ("a.b=uniform(1)", "uniform() takes two bounds"),
        ("a.b=uniform(2,1)", "needs finite bounds with low < high"),
        ("a.b=loguniform(0,1)", "loguniform() needs 0 < low"),
        ("a.b=int(0.5,2)", "the bounds of int() must be integers"),
        ("a.b=choice(1,,2)", "choice() needs values, none of them empty"),
    ],
)
def test_bad_spaces_are_one_line_errors(spec, message):
    with pytest.raises(ValueError) as error:
        sweep.parse_param(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_random_draws_are_seeded_per_trial():
    params = [
        sweep.parse_param("optimizer.learning_rate=loguniform(1e-4,1e-2)"),
        sweep.parse_param("model.dropout_rate=choice(0.0,0.1,0.2)"),
        sweep.parse_param("seed=int(0,3)"),
    ]
    five = sweep.draw_trials(params, seed=0, num_trials=5, grid=False, grid_points=3)
    three = sweep.draw_trials(params, seed=0, num_trials=3, grid=False, grid_points=3)
    assert three == five[:3]  # more trials only add trials
    rng = np.random.default_rng([0, 4])  # trial 4, its fields in order
    rate = math.exp(rng.uniform(math.log(1e-4), math.log(1e-2)))
    dropout = ("0.0", "0.1", "0.2")[int(rng.integers(3))]
    assert five[4] == {
        "optimizer.learning_rate": repr(float(f"{rate:.3g}")),
        "model.dropout_rate": dropout,
        "seed": str(int(rng.integers(0, 4))),
    }
    other = sweep.draw_trials(params, seed=1, num_trials=5, grid=False, grid_points=3)
    assert other != five


def test_grid_is_every_combination():
    params = [
        sweep.parse_param("optimizer.learning_rate=loguniform(1e-4,1e-2)"),
        sweep.parse_param("optimizer.name=choice(sgd,adam)"),
    ]
    trials = sweep.draw_trials(params, seed=0, num_trials=0, grid=True, grid_points=3)
    assert [tuple(t.values()) for t in trials] == [
        ("0.0001", "sgd"),
        ("0.0001", "adam"),
        ("0.001", "sgd"),
        ("0.001", "adam"),
        ("0.01", "sgd"),
        ("0.01", "adam"),
    ]
    assert sweep.grid_values(sweep.parse_param("a=int(2,4)"), 3) == ["2", "3", "4"]
    assert sweep.grid_values(sweep.parse_param("a=uniform(0,1)"), 5) == [
        "0.0",
        "0.25",
        "0.5",
        "0.75",
        "1.0",
    ]


def test_metric_summary_by_hand():
    reports = [
        {"step": 10, "train/loss": 1.0},
        {"step": 20, "eval/accuracy": 0.5},
        {"step": 30, "eval/accuracy": 0.7},
        {"step": 40, "eval/accuracy": 0.7},
        {"step": 50, "eval/accuracy": 0.6},
    ]
    assert sweep.metric_summary(reports, "eval/accuracy", "max") == {
        "best": 0.7,
        "best_step": 30,  # the first of equals
        "final": 0.6,
        "steps": 50,
    }
    assert sweep.metric_summary(reports, "eval/accuracy", "min")["best_step"] == 20
    reports.append({"step": 60, "eval/accuracy": float("nan")})
    assert sweep.metric_summary(reports, "eval/accuracy", "max")["final"] is None
    assert sweep.metric_summary([], "eval/accuracy", "max") == {
        "best": None,
        "best_step": None,
        "final": None,
        "steps": 0,
    }


def test_median_rule_prunes_below_the_finished_trials():
    def curve(*values):
        return [{"step": 10 * (i + 1), "eval/accuracy": v} for i, v in enumerate(values)]

    finished = [curve(0.5, 0.8, 0.9), curve(0.6, 0.85, 0.9), curve(0.7, 0.9, 0.95)]
    reason = sweep.prune_reason(curve(0.3, 0.55), finished, "eval/accuracy", "max", 30)
    assert reason == (
        "eval/accuracy 0.55 by step 20, worse than the median 0.85 of 3 finished trials there"
    )
    assert sweep.prune_reason(curve(0.3, 0.86), finished, "eval/accuracy", "max", 30) is None
    assert sweep.prune_reason(curve(0.3), finished[:2], "eval/accuracy", "max", 30) is None  # 2 < 3
    last = curve(0.1, 0.1, 0.1)
    assert sweep.prune_reason(last, finished, "eval/accuracy", "max", 30) is None  # the last eval
    losses = [[{"step": 10, "eval/loss": v}] for v in (1.0, 2.0, 3.0)]
    assert sweep.prune_reason([{"step": 10, "eval/loss": 2.5}], losses, "eval/loss", "min", 30)


def test_failure_reason_is_the_trials_own_error_line():
    bar = "\r 25%|##5       | 10/40 [00:06<00:19,  1.51step/s]"
    output = (
        f"I1202 loop.py] Devices: 4{bar}error: train/loss is nan in steps 1-10; lower it.{bar}\n"
    )
    assert sweep.failure_reason(output, 1) == "train/loss is nan in steps 1-10; lower it."
    assert (
        sweep.failure_reason("Traceback ...\nKeyError: 'x'\n", 1) == "exit status 1: KeyError: 'x'"
    )
    assert sweep.failure_reason("", -9) == "killed by SIGKILL"
