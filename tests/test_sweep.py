"""python -m train.sweep: two workers share one optuna study of the tiny MLP's learning rate and
run exactly its 3 trials; a sweep stopped by SIGTERM, then a worker SIGKILLed, leave their trial to
a later worker that resumes it from its checkpoint to the uninterrupted trial's reports; seeded
TPE proposes the same first trials again; failed trials are recorded; the space syntax, the
metric summary and the median pruner fed from metrics.jsonl by hand."""

import atexit
import contextlib
import json
import math
import os
import pathlib
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import optuna
import pytest

from train import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 20
# The trials' compiled steps, shared: each trial after the first loads them instead of compiling.
CACHE = tempfile.mkdtemp(prefix="jaxmodels-sweep-xla-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
# Every trial: 20 steps in calls of 5, a report every 5, evaluation and a checkpoint every 10.
SHORT = [
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.train.steps_per_call=5",
    "--config.train.log_every=5",
    "--config.train.eval_every=10",
    "--config.train.checkpoint_every=10",
    "--config.data.train_split=train[:512]",
    "--config.data.eval_split=test[:256]",
    f"--config.train.compile_cache_dir={CACHE}",
    "--config.model.dropout_rate=0.1",  # dropout on: resumed trials must draw the same masks
]
LEARNING_RATE = "optimizer.learning_rate=loguniform(0.03,0.3)"
TIMING = "train/steps_per_second"  # the one value no two runs share


def sweep_command(workdir: pathlib.Path, *more: str) -> list[str]:
    """A TPE sweep of 3 trials over the tiny MLP's learning rate, seed 7."""
    return [
        sys.executable,
        "-m",
        "train.sweep",
        "--config=configs/mlp.py:tiny",
        f"--workdir={workdir}",
        f"--param={LEARNING_RATE}",
        "--trials=3",
        "--seed=7",
        *SHORT,
        *more,
    ]


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)


def read_lines(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "sweep.jsonl").read_text().splitlines()]


def read_until(process: subprocess.Popen, text: str) -> str:
    """Reads `process`'s stdout (unbuffered) until a line holds `text`; returns that line."""
    watchdog = threading.Timer(600, process.kill)  # a safety net only: a hung process ends
    watchdog.start()
    try:
        for line in iter(process.stdout.readline, b""):
            if text in line.decode(errors="replace"):
                return line.decode(errors="replace")
    finally:
        watchdog.cancel()
    pytest.fail(f"no {text!r} in the output of {process.args}: {process.communicate()}")


def without(lines: list[dict], key: str) -> list[dict]:
    return [{k: v for k, v in line.items() if k != key} for line in lines]


def start(command: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    )


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = (out.decode() for out in process.communicate(timeout=900))  # a safety net
    assert process.returncode == 0, stderr
    return stdout


def load(workdir: pathlib.Path, *more: str) -> tuple[sweep.Sweep, optuna.Study]:
    """The sweep and study of `workdir`, as the command line opens them."""
    args, extras = sweep.parse_args(sweep_command(workdir, *more)[3:])
    the_sweep = sweep.build_sweep(args, extras)
    return the_sweep, sweep.open_study(the_sweep, args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two workers started at once on one study of 3 trials."""
    workdir = tmp_path_factory.mktemp("sweep") / "reference"
    workers = [start(sweep_command(workdir)) for _ in range(2)]
    return workdir, [finish(worker) for worker in workers]


def test_two_workers_run_exactly_the_three_trials_of_one_study(reference):
    workdir, outputs = reference
    started = [line for out in outputs for line in out.splitlines() if " started (pid " in line]
    assert sorted(line.split()[0] for line in started) == [f"trial-00{k}" for k in range(3)]
    lines = read_lines(workdir)
    the_sweep, study = load(workdir)
    assert lines == sweep.study_lines(the_sweep, study)  # written from the study
    # Each slot tried once (a trial that two workers began past the 3rd at once is given up).
    assert [len(tries) for tries in sweep.attempts(study).values()] == [1, 1, 1]
    rates = [line["overrides"]["optimizer.learning_rate"] for line in lines]
    assert len(set(rates)) == 3 and all(0.03 <= rate <= 0.3 for rate in rates)
    assert [line["trial"] for line in lines] == [0, 1, 2]
    for line, rate in zip(lines, rates, strict=True):
        assert line["status"] == "done" and line["reason"] is None
        assert line["steps"] == NUM_STEPS and line["metric"] == "eval/accuracy"
        # 10 classes: chance is 0.1; 20 steps of SGD at these rates get well above it.
        assert 0.4 < line["final"] <= line["best"] <= 1.0
        assert math.isfinite(line["wall_s"]) and line["wall_s"] > 0
        config = json.loads((workdir / line["workdir"] / "config.json").read_text())
        assert config["optimizer"]["learning_rate"] == rate  # the trial's value, exactly
        assert config["train"]["num_steps"] == NUM_STEPS  # the sweep's override
        reports = sweep.read_reports(workdir / line["workdir"])
        assert [r["step"] for r in reports] == [5, 10, 15, 20]
        assert line["final"] == reports[-1]["eval/accuracy"]
    for name in ("sweep_curves.png", "sweep_params.png"):
        assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in workdir.glob(".sweep*")) == []  # no temporary file left

    # The winner has the highest final accuracy (the first trial among equals), and its
    # command line trains it again; both workers print it.
    best = max(lines, key=lambda line: (line["final"], -line["trial"]))
    rate = best["overrides"]["optimizer.learning_rate"]
    retrain = "Retrain it: python " + shlex.join(
        [
            "-m",
            "train",
            "--config=configs/mlp.py:tiny",
            f"--workdir={workdir}/winner",
            *SHORT,
            f"--config.optimizer.learning_rate={rate!r}",
        ]
    )
    assert "'--config.data.train_split=train[:512]'" in retrain  # quoted for the shell
    for out in outputs:
        assert retrain in out.splitlines() and f"Best: trial-{best['trial']:03d}," in out


def propose(seed: int, count: int) -> list[dict[str, str]]:
    """The values seeded TPE proposes for a sweep's first `count` trials (each told 0.5)."""
    args, extras = sweep.parse_args([*sweep_command(pathlib.Path("unused"))[3:], f"--seed={seed}"])
    the_sweep = sweep.build_sweep(args, extras)
    study = optuna.create_study(direction="maximize")  # in memory
    proposed = []
    study.optimize(
        lambda trial: proposed.append(sweep.sample(the_sweep, args, trial, trial.number)) or 0.5,
        count,
    )
    return proposed


def test_seeded_tpe_proposes_the_same_first_trials_twice(reference):
    first = propose(7, 3)
    assert propose(7, 3) == first and propose(8, 3) != first
    assert len({trial["optimizer.learning_rate"] for trial in first}) == 3
    # Trial K's draws depend on (seed, K) alone: the two racing workers drew these.
    assert [line["overrides"] for line in read_lines(reference[0])] == [
        {field: float(text) for field, text in trial.items()} for trial in first
    ]


def test_a_stopped_and_a_killed_worker_leave_their_trial_to_the_next(reference, tmp_path):
    """Worker 1 gets SIGTERM during trial 0's step 5 and stops; worker 2 resumes the trial and is
    SIGKILLed after its step 15; worker 3 takes it back once its heartbeat is 2 s late and
    resumes it from step 15: its reports are the uninterrupted trial's, row for row."""
    workdir = tmp_path / "interrupted"
    command = sweep_command(workdir, "--heartbeat=1", "--trials=1")
    # train/__main__.py's test hook: trial-000 signals its worker at an exact step, and waits for
    # the worker to pass the stop on (a SIGKILLed worker's trial gets SIGTERM from the kernel).
    hook = "{}@step:{},workdir=trial-000,to=parent"
    env = dict(os.environ, JAXMODELS_TEST_SIGNAL=hook.format("SIGTERM", 5))
    stdout = finish(start(command, env))
    assert stdout.splitlines()[-1] == (
        "Stopped by SIGTERM: 0 of 1 trials done, 1 to run or resume (stopped trials keep their "
        "checkpoints). Run the same command to resume."
    )
    stopped = read_lines(workdir)
    assert [(line["status"], line["steps"]) for line in stopped] == [("stopped", 5)]

    second = start(command, dict(os.environ, JAXMODELS_TEST_SIGNAL=hook.format("SIGKILL", 15)))
    line = read_until(second, "trial-000 started (pid ")
    second.communicate(timeout=900)  # a safety net
    assert second.returncode == -signal.SIGKILL
    # The orphaned trial saves and exits: wait for that (a pidfd reads ready once it has ended),
    # so that no two processes share its workdir.
    with contextlib.suppress(ProcessLookupError):
        pidfd = os.pidfd_open(int(line.split("(pid ")[1].split(")")[0]))
        select.select([pidfd], [], [])
        os.close(pidfd)

    assert "0 to run" not in finish(start(command))
    lines = read_lines(workdir)
    assert without(lines, "wall_s") == without(read_lines(reference[0])[:1], "wall_s")
    mine = sweep.read_reports(workdir / "trial-000")
    theirs = sweep.read_reports(reference[0] / "trial-000")
    assert without(mine, TIMING) == without(theirs, TIMING)
    log = (workdir / "trial-000" / sweep.LOG).read_text()
    assert "Resumed from checkpoint step 5" in log and "Resumed from checkpoint step 15" in log
    _, study = load(workdir, "--heartbeat=1", "--trials=1")
    F, C = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE
    assert [[t.state for t in tries] for tries in sweep.attempts(study).values()] == [[F, F, C]]


def test_failed_trials_are_recorded_and_the_others_finish(tmp_path):
    workdir = tmp_path / "grid"
    command = [
        sys.executable,
        "-m",
        "train.sweep",
        "--config=configs/mlp.py:tiny",
        f"--workdir={workdir}",
        "--param=optimizer.learning_rate=choice(abc,1e9,0.05)",
        "--sampler=grid",
        *SHORT,
    ]
    result = run(command)
    assert result.returncode == 0, result.stderr
    lines = read_lines(workdir)
    by_value = {line["overrides"]["optimizer.learning_rate"]: line for line in lines}
    assert sorted(by_value, key=str) == sorted([0.05, "abc", 1e9], key=str)
    assert [by_value[v]["status"] for v in (0.05, "abc", 1e9)] == ["done", "failed", "failed"]
    assert by_value[0.05]["steps"] == NUM_STEPS and 0.4 < by_value[0.05]["final"] <= 1.0
    assert by_value["abc"]["reason"] == (
        "flag --config.optimizer.learning_rate=abc: could not convert string to float: 'abc'"
    )
    assert by_value["abc"]["steps"] == 0
    # Diverged at once: the first report (steps 1-5) is not finite.
    assert by_value[1e9]["reason"].startswith("train/loss is nan in steps 1-5;")
    assert f"Best: {by_value[0.05]['workdir']}," in result.stdout
    # The same command again keeps the trials as they are, runs nothing and prints the winner.
    again = run(command)
    assert again.returncode == 0 and "0 to run, 3 finished before" in again.stdout
    assert " started " not in again.stdout and read_lines(workdir) == lines
    retrain = [line for line in result.stdout.splitlines() if line.startswith("Retrain it: ")]
    assert len(retrain) == 1 and retrain[0] in again.stdout.splitlines()


def main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Runs the command line in this process: its exit status, stdout and stderr."""
    with pytest.raises(SystemExit) as ended:
        sweep.main(argv)
    return ended.value.code, *capsys.readouterr()


def test_a_resume_with_other_settings_is_refused(tmp_path, capsys):
    workdir = tmp_path / "sweep"
    workdir.mkdir()
    load(workdir)
    command = sweep_command(workdir)
    other = "optimizer.learning_rate=loguniform(0.01,0.5)"
    command[command.index(f"--param={LEARNING_RATE}")] = f"--param={other}"
    assert main(command[3:], capsys) == (
        2,
        "",
        f"error: {workdir} holds a sweep with other settings (param: ['{LEARNING_RATE}'] then, "
        f"['{other}'] now); repeat its command (--trials may change), restore the config file or "
        "pass another --workdir.\n",
    )
    assert main([*command[3:], "--param=model.dropout_rate=choice(0.1,0.2)"], capsys) == (
        2,
        "",
        "error: model.dropout_rate is set by --param and by --config.model.dropout_rate=0.1; "
        "pass one.\n",
    )


def test_a_resume_after_the_config_file_changed_is_refused(tmp_path):
    config = tmp_path / "mlp.py"
    config.write_text((REPO / "configs" / "mlp.py").read_text())
    args, extras = sweep.parse_args(
        [f"--config={config}:tiny", f"--workdir={tmp_path / 'sweep'}", f"--param={LEARNING_RATE}"]
    )
    study = optuna.create_study()  # in memory
    sweep.check_spec(study, sweep.build_sweep(args, extras))
    sweep.check_spec(study, sweep.build_sweep(args, extras))  # unchanged: fine
    text = config.read_text()
    config.write_text(text.replace("config.data.batch_size = 64", "config.data.batch_size = 32"))
    with pytest.raises(ValueError) as error:
        sweep.check_spec(study, sweep.build_sweep(args, extras))
    assert str(error.value) == (
        f"{tmp_path / 'sweep'} holds a sweep with other settings (base.data.batch_size: 64 then, "
        "32 now); repeat its command (--trials may change), restore the config file or pass "
        "another --workdir."
    )


def test_a_trial_begun_past_the_total_is_given_up(tmp_path):
    """Two workers that ask in the same instant for the last of N trials both get one: the later
    is given up unrun and left out of the slots, the results and the count."""
    args, extras = sweep.parse_args([*sweep_command(tmp_path)[3:], "--trials=1"])
    the_sweep = sweep.build_sweep(args, extras)
    study = optuna.create_study(direction="maximize")  # in memory
    first, second = study.ask(), study.ask()
    with pytest.raises(sweep.Ended, match="surplus"):
        sweep.run_trial(the_sweep, args, second, [])
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    assert list(tmp_path.iterdir()) == []  # nothing ran
    assert {k: [t.number for t in v] for k, v in sweep.attempts(study).items()} == {0: [0]}
    assert sweep.to_run(the_sweep, study) == 0 and first.number == 0


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


def test_grid_values():
    assert sweep.grid_values(sweep.parse_param("a=loguniform(1e-4,1e-2)"), 3) == [
        "0.0001",
        "0.001",
        "0.01",
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


def test_median_pruner_stops_a_trial_below_the_finished_ones(tmp_path):
    """The reports that land in a trial's metrics.jsonl go to the study; the median pruner stops
    the trial at an evaluation whose best value so far is below the median of the finished
    trials' values at that step, and never at its last evaluation."""
    args, extras = sweep.parse_args(
        ["--config=configs/mlp.py:tiny", f"--workdir={tmp_path}", f"--param={LEARNING_RATE}"]
    )
    the_sweep = sweep.build_sweep(args, extras)

    def verdict(*values, prune_after=0):
        pruner = sweep.make_pruner("median", prune_after)
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for finished in ((0.5, 0.8, 0.9), (0.6, 0.85, 0.9), (0.7, 0.9, 0.95)):
            study.add_trial(
                optuna.trial.create_trial(
                    value=finished[-1],
                    intermediate_values={10 * (i + 1): v for i, v in enumerate(finished)},
                )
            )
        trial_dir = the_sweep.trial_dir(0)
        trial_dir.mkdir(exist_ok=True)
        (trial_dir / "config.json").write_text(json.dumps({"train": {"num_steps": 30}}))
        rows = [{"step": 10 * (i + 1), "eval/accuracy": v} for i, v in enumerate(values)]
        (trial_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return sweep.report(the_sweep, study.ask(), trial_dir, set())

    # Step 10: 0.65 is above the median 0.6 there; step 20: its best 0.65 is below the median
    # 0.85 of 0.8, 0.85 and 0.9.
    assert verdict(0.65, 0.55) == "eval/accuracy 0.55 at step 20, stopped by the MedianPruner"
    assert verdict(0.65, 0.86) is None  # above the median
    assert verdict(0.65, 0.86, 0.1) is None  # the last evaluation: the trial is done
    assert verdict(0.3) == "eval/accuracy 0.3 at step 10, stopped by the MedianPruner"
    # --prune_after=20: step 10 is not judged, step 20 is.
    assert verdict(0.3, prune_after=20) is None
    assert verdict(0.3, 0.55, prune_after=20) == (
        "eval/accuracy 0.55 at step 20, stopped by the MedianPruner"
    )


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
