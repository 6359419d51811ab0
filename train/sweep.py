"""Command line: python -m train.sweep --config=configs/X.py[:variant] --param='FIELD=SPACE' ...

A hyperparameter search as one optuna study, each trial the ordinary training command
`python -m train` in a workdir of its own (DIR/trial-000, DIR/trial-001, ...):

  python -m train.sweep --config=configs/mlp.py:tiny --workdir=runs/mlp-sweep \\
      --param='optimizer.learning_rate=loguniform(1e-3,0.3)' \\
      --param='model.dropout_rate=choice(0.0,0.1,0.2)' --trials=8 \\
      --config.train.num_steps=100          # any --config.FIELD=VALUE goes to every trial

Spaces (FIELD is a config field, e.g. optimizer.learning_rate or seed):
  loguniform(a,b)      a float, its logarithm uniform, 0 < a < b
  uniform(a,b)         a float in [a, b]
  int(a,b)             an integer in a..b, both included
  choice(v1,v2,...)    one of the values, written as on the command line: 0.1, adam, (256,256)

The study is kept in --storage (default sqlite:///DIR/sweep.db). Every worker started with the same
command (one per GPU or machine) takes trials until --trials have begun, one at a time, then waits
for the others'. A trial whose worker misses two --heartbeat's, or is stopped by SIGTERM or
Ctrl-C, goes back to the study and is resumed from its checkpoint; a failed one is recorded with
its reason. The end writes DIR/sweep.jsonl, DIR/sweep_curves.png and DIR/sweep_params.png from
the study and prints a table, the best trial by the final --metric and its retrain command.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import dataclasses
import json
import math
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from train import cli, signals
from train.config import load_config

try:
    import fcntl
except ImportError:  # Windows: no lock, the retries alone
    fcntl = None

KINDS = ("loguniform", "uniform", "int", "choice")
SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "grid": optuna.samplers.GridSampler,
}
PRUNERS = ("median", "percentile", "hyperband", "none")
SPEC = ("config", "param", "sampler", "grid_points", "seed", "startup_trials", "metric", "mode")
LEARNING = ("tpe", "cmaes", "gp")  # samplers that draw at random for their first trials
FINISHED = ("done", "failed", "pruned")
LOG = "train.log"  # in each trial's workdir: the training command's stdout and stderr
STATUS = {
    TrialState.COMPLETE: "done",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "stopped",  # put back: the next worker resumes it
}
Reports = list[dict[str, float]]


# --- The search space ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config field: `field` (dotted), `kind` (one of KINDS), `args` ((low, high),
    or a choice's command-line texts) and `spec`, the --param text."""

    field: str
    kind: str
    args: tuple
    spec: str


def split_arguments(text: str) -> list[str]:
    """Splits `text` at the commas outside brackets and quotes: "1,(2,3),'a,b'" -> 3 parts."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def parse_param(spec: str) -> Param:
    """`FIELD=kind(args)` -> Param; a one-line ValueError for anything else."""
    match = re.fullmatch(r"\s*(?:config\.)?([A-Za-z_][\w.]*)\s*=\s*(\w+)\s*\((.*)\)\s*", spec)
    usage = "write FIELD=loguniform(a,b), uniform(a,b), int(a,b) or choice(v1,v2,...)"
    if not match:
        raise ValueError(f"--param={spec}: {usage}.")
    field, kind, body = match.groups()
    if kind not in KINDS:
        raise ValueError(f"--param={spec}: unknown space {kind!r}; {usage}.")
    args = split_arguments(body)
    if kind == "choice":
        if not all(args):
            raise ValueError(f"--param={spec}: choice() needs values, none of them empty.")
        # A quoted string goes to the command line without its quotes.
        texts = tuple(v if isinstance(v := literal(a), str) else a for a in args)
        return Param(field, kind, texts, spec)
    if len(args) != 2:
        raise ValueError(f"--param={spec}: {kind}() takes two bounds, low and high.")
    try:
        low, high = (int(a) for a in args) if kind == "int" else (float(a) for a in args)
    except ValueError:
        number = "integers" if kind == "int" else "numbers"
        raise ValueError(f"--param={spec}: the bounds of {kind}() must be {number}.") from None
    if not (low <= high if kind == "int" else low < high) or not math.isfinite(high - low):
        raise ValueError(f"--param={spec}: needs finite bounds with low < high.")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"--param={spec}: loguniform() needs 0 < low.")
    return Param(field, kind, (low, high), spec)


def literal(text: str) -> Any:
    """The Python value a command-line text spells (0.1, 3, True, (128,)), else the text itself."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, (bool, int, float, str, tuple, list)) else text


def json_value(text: str) -> Any:
    """A value for sweep.jsonl: numbers as numbers, tuples as lists, anything else as written."""
    value = literal(text)
    return list(value) if isinstance(value, tuple) else value


def grid_values(param: Param, grid_points: int) -> list[str]:
    """The grid's values of `param` as command-line texts: a choice's values, every integer, or
    `grid_points` floats (log-spaced for loguniform) to 3 significant digits."""
    if param.kind == "choice":
        return list(param.args)
    low, high = param.args
    if param.kind == "int":
        return [str(value) for value in range(low, high + 1)]
    spaced = np.geomspace if param.kind == "loguniform" else np.linspace
    return list(dict.fromkeys(repr(float(f"{v:.3g}")) for v in spaced(low, high, grid_points)))


def suggest(trial: optuna.Trial, param: Param) -> str:
    """The sampler's value of `param` for `trial`, as command-line text."""
    if param.kind == "choice":
        return trial.suggest_categorical(param.field, list(param.args))
    low, high = param.args
    if param.kind == "int":
        return str(trial.suggest_int(param.field, low, high))
    return repr(trial.suggest_float(param.field, low, high, log=param.kind == "loguniform"))


def make_sampler(
    name: str, seed: int, params: Sequence[Param], grid_points: int, startup: int | None = None
) -> optuna.samplers.BaseSampler:
    """The --sampler of that name, seeded; tpe, cmaes and gp draw their first `startup` trials at
    random (None: optuna's own number, 10 for tpe and gp, 1 for cmaes)."""
    if name in LEARNING and startup is not None:
        return SAMPLERS[name](seed=seed, n_startup_trials=startup)
    if name != "grid":
        return SAMPLERS[name](seed=seed)
    space = {p.field: [literal(v) for v in grid_values(p, grid_points)] for p in params}
    space = {p.field: list(p.args) if p.kind == "choice" else space[p.field] for p in params}
    return optuna.samplers.GridSampler(space, seed=seed)


def make_pruner(name: str, prune_after: int = 0) -> optuna.pruners.BasePruner:
    """The --pruner of that name; median and percentile wait for 3 finished trials and judge no
    evaluation before step `prune_after` (hyperband: its first rung)."""
    if name == "median":
        return optuna.pruners.MedianPruner(3, prune_after, n_min_trials=3)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, 3, prune_after, n_min_trials=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=prune_after or "auto")
    return optuna.pruners.NopPruner()


# --- Metrics ------------------------------------------------------------------------------------


def read_reports(workdir: pathlib.Path) -> Reports:
    """The reports of `workdir`/metrics.jsonl so far, [] if none; a line cut short (being
    written) is skipped, so this reads a running trial too."""
    try:
        text = (workdir / "metrics.jsonl").read_text()
    except (FileNotFoundError, NotADirectoryError):
        return []
    reports = []
    for line in text.splitlines():
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(report, dict) and "step" in report:
            reports.append(report)
    return reports


def finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def metric_summary(reports: Reports, metric: str, mode: str) -> dict[str, Any]:
    """The best value of `metric` in `reports` (highest for mode 'max'; the earliest step among
    equals), its step, the last report's value and the last step. Non-finite values are missing."""
    values = [(r["step"], finite_or_none(r[metric])) for r in reports if metric in r]
    finite = [(step, value) for step, value in values if value is not None]
    best_step = best = None
    if finite:
        pick = max if mode == "max" else min
        best_step, best = pick(finite, key=lambda sv: (sv[1], -sv[0] if mode == "max" else sv[0]))
    return {
        "best": best,
        "best_step": best_step,
        "final": values[-1][1] if values else None,
        "steps": int(reports[-1]["step"]) if reports else 0,
    }


def num_steps_of(trial_dir: pathlib.Path) -> int | None:
    """train.num_steps of the trial's own config.json (None before the trial wrote it)."""
    try:
        return int(json.loads((trial_dir / "config.json").read_text())["train"]["num_steps"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


# --- The sweep and its study --------------------------------------------------------------------


@dataclasses.dataclass
class Sweep:
    """What a sweep runs: the --config argument, DIR, the searched fields, the --config.FIELD=VALUE
    overrides of every trial, the study's total, the metric and mode ('max' or 'min') that rank
    trials, and `spec`, the settings that fix the trials, kept in the study."""

    config: str
    workdir: pathlib.Path
    params: list[Param]
    overrides: list[str]
    num_trials: int
    metric: str
    mode: str
    spec: dict[str, Any]

    def trial_dir(self, slot: int) -> pathlib.Path:
        return self.workdir / f"trial-{slot:03d}"

    def command(self, texts: dict[str, str], workdir: str | pathlib.Path) -> list[str]:
        """The training command of a trial with values `texts` (argv after the executable)."""
        return [
            "-m",
            "train",
            f"--config={self.config}",
            f"--workdir={workdir}",
            *self.overrides,
            *(f"--config.{field}={text}" for field, text in texts.items()),
        ]

    def texts(self, trial: optuna.trial.FrozenTrial) -> dict[str, str]:
        """`trial`'s values as command-line texts."""
        texts = {}
        for p in (p for p in self.params if p.field in trial.params):
            value = trial.params[p.field]
            texts[p.field] = str(value) if p.kind in ("choice", "int") else repr(float(value))
        return texts


def open_study(sweep: Sweep, args: argparse.Namespace) -> optuna.Study:
    """The sweep's study in --storage, with heartbeats; a new one records the sweep's settings."""
    url = args.storage or f"sqlite:///{(sweep.workdir / 'sweep.db').resolve()}"
    # Workers started at once would all create the tables and stamp their version: one at a time
    # on this machine (a lock on the workdir); across machines, those that lose the race to
    # another's write retry after a pause and load what it wrote.
    with (sweep.workdir / ".storage.lock").open("a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for attempt in range(8):
            try:
                storage = optuna.storages.RDBStorage(
                    url,
                    # sqlite: workers wait for each other's writes rather than fail at once.
                    engine_kwargs={"connect_args": {"timeout": 60}} if "sqlite" in url else None,
                    heartbeat_interval=args.heartbeat,
                    heartbeat_stale_trial_callback=put_back,
                )
                break
            except sqlalchemy.exc.DBAPIError:  # "table studies already exists", a unique key
                if attempt == 7:
                    raise
                time.sleep(0.25 * (attempt + 1))
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.workdir.resolve().name,
        sampler=make_sampler(
            args.sampler, args.seed, sweep.params, args.grid_points, args.startup_trials
        ),
        pruner=make_pruner(args.pruner, args.prune_after),
        direction="maximize" if sweep.mode == "max" else "minimize",
        load_if_exists=True,
    )
    check_spec(study, sweep)
    return study


def check_spec(study: optuna.Study, sweep: Sweep) -> None:
    """Records the sweep's settings in a new study; refuses a study with others (a resume with
    other arguments, or after the config file changed): its trials are not the ones asked for."""
    then, now = study.user_attrs.get("spec"), sweep.spec
    if then is None:
        study.set_user_attr("spec", now)
        return
    if differ := [k for k in sorted({*then, *now}) if then.get(k) != now.get(k)]:
        there = ", ".join(f"{k}: {then.get(k)} then, {now.get(k)} now" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise ValueError(
            f"{sweep.workdir} holds a sweep with other settings ({there}{more}); repeat its "
            "command (--trials may change), restore the config file or pass another --workdir."
        )


def put_back(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Puts `trial` (stopped, or its worker dead) back in the study: a waiting copy with its
    values, attributes and reports, which the next worker resumes in the same workdir."""
    if not trial.user_attrs.get("surplus"):  # a worker died giving it up: it stays given up
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
        retry(study, trial)


def original(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the trial that `trial` retries, its own if it is no retry."""
    number = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if number is None else number


def sweep_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, but those begun past --trials and given up (see run_trial)."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]


def slot_of(trials: Sequence[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial) -> int:
    """K of trial-K, `trial`'s workdir: its original's rank among the `trials` that are no retry.
    A retry has its original's slot, so it resumes in that workdir."""
    return sum(original(t) == t.number and t.number < original(trial) for t in trials)


def attempts(study: optuna.Study) -> dict[int, list[optuna.trial.FrozenTrial]]:
    """slot -> the attempts of trial-<slot>, oldest first."""
    trials = sweep_trials(study)
    slots = {n: k for k, n in enumerate(t.number for t in trials if original(t) == t.number)}
    by_slot: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials:
        by_slot.setdefault(slots[original(trial)], []).append(trial)
    return by_slot


def to_run(sweep: Sweep, study: optuna.Study) -> int:
    """How many trials the workers have yet to begin: the waiting ones and the rest of the N."""
    trials = sweep_trials(study)
    begun = sum(original(t) == t.number for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return waiting + max(sweep.num_trials - begun, 0)


# --- A worker: the objective runs a trial and reports its evaluations ----------------------------


class Ended(Exception):
    """A trial that failed (its reason) or was stopped (it goes back to the study)."""


def sample(
    sweep: Sweep, args: argparse.Namespace, trial: optuna.Trial, slot: int
) -> dict[str, str]:
    """`trial`'s values as command-line texts. Samplers but grid and qmc (which take their points
    from the study) are seeded by (--seed, slot): the same command proposes the same first trials
    whichever worker takes them."""
    if args.sampler not in ("grid", "qmc"):
        seed = int(np.random.SeedSequence([args.seed, slot]).generate_state(1)[0])
        trial.study.sampler = make_sampler(args.sampler, seed, sweep.params, 0, args.startup_trials)
    return {p.field: suggest(trial, p) for p in sweep.params}


def run_trial(
    sweep: Sweep,
    args: argparse.Namespace,
    trial: optuna.Trial,
    received: list[str],
) -> float:
    """The objective: runs `trial` as `python -m train` in its workdir (resuming its checkpoint),
    reports its evaluations as they land in metrics.jsonl, stops it with SIGTERM when the pruner
    says so or the worker got a signal (`received`), and returns its final metric, or raises
    TrialPruned or Ended."""
    trials = sweep_trials(trial.study)
    frozen = next(t for t in trials if t.number == trial.number)
    slot = slot_of(trials, frozen)
    if slot >= sweep.num_trials:  # all N had begun: another worker asked in the same instant
        trial.set_user_attr("surplus", True)
        raise Ended("surplus")
    texts = sample(sweep, args, trial, slot)
    trial_dir = sweep.trial_dir(slot)
    reported = set(frozen.intermediate_values)  # a retry's inherited reports
    process, offset = launch(sweep, texts, trial_dir)
    started, pruned, sent = time.monotonic(), None, 0
    while process.poll() is None:
        try:
            process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        if received and sent == 0:  # stop with a checkpoint
            process.send_signal(signal.SIGTERM)
            sent = 1
        if sent == 1 and "SIGINT" in received[1:]:  # Ctrl-C twice: stop at once
            process.send_signal(signal.SIGINT)
            sent = 2
        if pruned is None and not received:
            pruned = report(sweep, trial, trial_dir, reported)
            if pruned is not None:  # it saves a checkpoint and exits
                process.send_signal(signal.SIGTERM)
    report(sweep, trial, trial_dir, reported)
    with open(trial_dir / LOG, errors="replace") as log:
        log.seek(offset)
        output = log.read()
    reports, num_steps = read_reports(trial_dir), num_steps_of(trial_dir)
    summary = metric_summary(reports, sweep.metric, sweep.mode)
    returncode, reason = process.returncode, None
    completed = returncode == 0 and num_steps is not None and summary["steps"] >= num_steps
    if completed and summary["final"] is not None:
        status = "done"
    elif completed:
        keys = sorted({key for row in reports for key in row if key != "step"})
        status, reason = "failed", f"no {sweep.metric} reported; pass --metric= one of {keys}"
    elif returncode > 0 and (not received or "error: " in output):  # its own one-line error
        status, reason = "failed", failure_reason(output, returncode)
    elif pruned is not None:
        status, reason = "pruned", pruned
    elif returncode == 0 or received:  # stopped, with a checkpoint or before it had one
        status = "stopped"
    else:
        status, reason = "failed", failure_reason(output, returncode)
    wall_s = trial.user_attrs.get("wall_s", 0.0) + time.monotonic() - started
    attrs = {"wall_s": wall_s, "steps": summary["steps"], "reason": reason}
    for key, value in {**attrs, "stopped": status == "stopped"}.items():
        trial.set_user_attr(key, value)
    why = f" ({reason})" if reason else ""
    print(f"{trial_dir.name} {status} after {summary['steps']} steps, {wall_s:.1f} s{why}")
    if status == "done":
        return summary["final"]
    if status == "pruned":
        raise optuna.TrialPruned(reason)
    raise Ended(reason or status)


def launch(
    sweep: Sweep, texts: dict[str, str], trial_dir: pathlib.Path
) -> tuple[subprocess.Popen, int]:
    """Starts a trial's training command, its output appended to its LOG; returns the process
    and where this attempt's output starts in LOG."""
    trial_dir.mkdir(parents=True, exist_ok=True)
    command = sweep.command(texts, trial_dir)
    with open(trial_dir / LOG, "a") as log:
        log.write(f"=== {time.ctime()} on {socket.gethostname()}: python {shlex.join(command)}\n")
        log.flush()
        offset = log.tell()
        # Its own session: a Ctrl-C in the terminal reaches the worker alone, which passes on
        # one SIGTERM (two SIGINTs would stop the trial without a checkpoint).
        process = subprocess.Popen(
            [sys.executable, *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )
    print(f"{trial_dir.name} started (pid {process.pid}): {describe(texts)}")
    return process, offset


def report(
    sweep: Sweep, trial: optuna.Trial, trial_dir: pathlib.Path, reported: set[int]
) -> str | None:
    """Tells the study the trial's evaluations not yet `reported`; returns why the pruner stops
    it at one, or None. The last evaluation (train.num_steps) is never pruned."""
    num_steps = num_steps_of(trial_dir)
    for row in read_reports(trial_dir):
        value, step = finite_or_none(row.get(sweep.metric)), int(row["step"])
        if value is None or step in reported:
            continue
        trial.report(value, step)
        reported.add(step)
        if num_steps is not None and step < num_steps and trial.should_prune():
            pruner = type(trial.study.pruner).__name__
            return f"{sweep.metric} {value:.4g} at step {step}, stopped by the {pruner}"
    return None


def failure_reason(output: str, returncode: int) -> str:
    """One line on why a trial failed: its last `error: ...` line (what `python -m train` prints
    for bad input or a non-finite loss), else the signal or its last line of output."""
    # A progress bar's last redraw may share the line: "...[00:06<00:19]error: ...".
    errors = re.findall(r"(?:^|\])error: (.+)", output.replace("\r", "\n"), flags=re.M)
    if errors:
        return errors[-1].strip()
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    return f"exit status {returncode}" + (f": {lines[-1][:300]}" if lines else "")


def parent_death_signal() -> Callable[[], None] | None:
    """Linux: a preexec_fn by which the kernel sends the trial SIGTERM if its worker dies (a kill
    -9), so it saves a checkpoint rather than running on, orphaned, in its workdir."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def run_worker(sweep: Sweep, study: optuna.Study, args: argparse.Namespace) -> str | None:
    """Runs trials of the study, one at a time, until all N have begun and ended (another
    worker's too: one two heartbeats late is put back, and run here); returns the name of the
    signal that stopped the worker, or None."""
    wake = threading.Event()

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("stopped"):
            put_back(study, trial)
        if received or to_run(sweep, study) <= 0:
            study.stop()

    # A signal stops taking trials; the running trial's loop, which got it too, stops and saves.
    with signals.stop_signals(wake.set, second_interrupt_stops_now=False) as received:
        while not received:
            if count := to_run(sweep, study):
                study.optimize(
                    lambda trial: run_trial(sweep, args, trial, received),
                    n_trials=count,
                    catch=(Ended,),
                    callbacks=[after_trial],
                )
            elif any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
                wake.wait(1.0)  # for another worker's trial to end, or to go stale
                optuna.storages.fail_stale_trials(study)
            else:
                break
    return received[0] if received else None


def describe(texts: dict[str, str]) -> str:
    return " ".join(f"{field}={text}" for field, text in texts.items())


# --- Results, from the study --------------------------------------------------------------------


def study_lines(sweep: Sweep, study: optuna.Study) -> list[dict[str, Any]]:
    """sweep.jsonl's lines: one per trial slot, in slot order, from its latest attempt."""
    lines = []
    for slot, tries in sorted(attempts(study).items()):
        last = tries[-1]
        rows = [{"step": s, sweep.metric: v} for s, v in sorted(last.intermediate_values.items())]
        summary = metric_summary(rows, sweep.metric, sweep.mode)
        lines.append(
            {
                "trial": slot,
                "workdir": sweep.trial_dir(slot).name,
                "status": STATUS[last.state],
                "overrides": {f: json_value(t) for f, t in sweep.texts(last).items()},
                "metric": sweep.metric,
                "best": summary["best"],
                "best_step": summary["best_step"],
                "final": last.value if last.state == TrialState.COMPLETE else summary["final"],
                "steps": last.user_attrs.get("steps", 0),
                "wall_s": round(last.user_attrs.get("wall_s", 0.0), 1),
                "reason": last.user_attrs.get("reason"),
            }
        )
    return lines


def replace_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """write() to a name of this process's own, then rename it over `path`: workers writing at
    once never mix their files, and a kill never leaves half a file."""
    partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{path.suffix}")
    try:
        write(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def winner(lines: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial with the best final value (the lowest trial number among equals)."""
    done = [line for line in lines if line["status"] == "done" and line["final"] is not None]
    sign = -1 if mode == "max" else 1
    return min(done, key=lambda line: (sign * line["final"], line["trial"]), default=None)


def table(sweep: Sweep, lines: Sequence[dict[str, Any]], texts: Sequence[dict]) -> str:
    """The trials as a text table, one row per trial."""
    header = ["trial", "status", f"{sweep.metric} final", "best", "step", "steps", "wall_s"]
    rows = [header + [p.field for p in sweep.params]]
    for line, values in zip(lines, texts, strict=True):
        cells = [f"{line['trial']:03d}", line["status"], fmt(line["final"]), fmt(line["best"])]
        cells += [fmt(line["best_step"]), str(line["steps"]), f"{line['wall_s']:.1f}"]
        rows.append(cells + [values.get(p.field, "-") for p in sweep.params])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def write_plots(sweep: Sweep, study: optuna.Study, lines: Sequence[dict], texts: Sequence[dict]):
    """DIR/sweep_curves.png (train.plot's panels, a line per trial) and DIR/sweep_params.png
    (optuna's slice plot: the final metric of each finished trial against each parameter)."""
    from optuna.visualization.matplotlib import plot_slice

    from train import plot  # matplotlib: only when there is something to draw

    runs = {}
    for line, values in zip(lines, texts, strict=True):
        if reports := read_reports(sweep.workdir / line["workdir"]):
            runs[f"{line['trial']:03d} {describe(values)}"] = reports
    figures = {"sweep_curves.png": plot.plot_runs(runs)} if runs else {}
    if any(line["status"] == "done" for line in lines):
        axes = np.atleast_1d(plot_slice(study, target_name=f"{sweep.metric} (final)"))
        figures["sweep_params.png"] = axes[0].figure
    for name, figure in figures.items():
        replace_atomically(
            sweep.workdir / name, lambda path, f=figure: f.savefig(path, dpi=100, format="png")
        )


def end(sweep: Sweep, study: optuna.Study, stopped_by: str | None) -> None:
    """Writes sweep.jsonl and the plots; prints the table, the winner and its retrain command,
    and how the sweep ended."""
    slots = attempts(study)
    lines = study_lines(sweep, study)
    texts = [sweep.texts(slots[line["trial"]][-1]) for line in lines]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    replace_atomically(sweep.workdir / "sweep.jsonl", lambda path: path.write_text(text))
    try:
        write_plots(sweep, study, lines, texts)
    except (OSError, ValueError) as error:
        print(f"warning: no plots ({' '.join(str(error).split())})", file=sys.stderr)
    if lines:
        print(table(sweep, lines, texts))
    if (best := winner(lines, sweep.mode)) is not None:
        values = texts[lines.index(best)]
        print(f"Best: {best['workdir']}, {sweep.metric} {fmt(best['final'])}: {describe(values)}")
        print(f"Retrain it: python {shlex.join(sweep.command(values, sweep.workdir / 'winner'))}")
    done = sum(line["status"] == "done" for line in lines)
    finished = sum(line["status"] in FINISHED for line in lines)
    if stopped_by is not None or finished < sweep.num_trials:
        how = f"Stopped by {stopped_by}" if stopped_by else "Not finished"
        print(
            f"{how}: {done} of {sweep.num_trials} trials done, {sweep.num_trials - finished} to "
            "run or resume (stopped trials keep their checkpoints). Run the same command to resume."
        )
    elif done == 0:
        first = next((line["reason"] for line in lines if line["reason"]), "no metric")
        cli.fail(f"no trial of {sweep.workdir} finished; the first reason: {first}", status=1)


# --- Command line -------------------------------------------------------------------------------


def check_field(config: ml_collections.ConfigDict, field: str, where: str) -> None:
    """A one-line ValueError unless `field` (dotted) names a field of `config`."""
    node: Any = config
    for part in field.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f"{where}: the config has no field {field!r}.")
        node = node[part]


def build_sweep(args: argparse.Namespace, extras: Sequence[str]) -> Sweep:
    """The sweep the arguments describe; one-line errors for bad ones."""
    for extra in extras:
        if not re.fullmatch(r"--config\.[\w.]+=.*", extra, flags=re.S):
            raise ValueError(
                f"unknown argument {extra!r}; pass settings for every trial as "
                "--config.FIELD=VALUE."
            )
    config = load_config(args.config)
    params = [parse_param(spec) for spec in args.param]
    fields = [p.field for p in params]
    if len(set(fields)) != len(fields):
        raise ValueError(f"a field is searched twice: {', '.join(fields)}.")
    for param in params:
        check_field(config, param.field, f"--param={param.spec}")
    for extra in extras:
        field = extra.split("=", 1)[0][len("--config.") :]
        check_field(config, field, extra)
        if field in fields:
            raise ValueError(f"{field} is set by --param and by {extra}; pass one.")
    num_trials = args.trials
    if num_trials is None and args.sampler == "grid":
        num_trials = math.prod(len(grid_values(p, args.grid_points)) for p in params)
    workdir = pathlib.Path(args.workdir or default_workdir(args.config))
    spec = {key: getattr(args, key) for key in SPEC} | {"overrides": list(extras)}
    # The config file's values: one edited between a stop and a resume would change trials.
    spec |= flatten(json.loads(config.to_json_best_effort()), "base.")
    return Sweep(
        args.config, workdir, params, list(extras), num_trials or 8, args.metric, args.mode, spec
    )


def default_workdir(config_arg: str) -> str:
    """runs/mlp-tiny-sweep for configs/mlp.py:tiny."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    return str(pathlib.Path("runs") / (f"{name}-{variant}-sweep" if variant else f"{name}-sweep"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = cli.ArgumentParser(
        prog="python -m train.sweep", description=__doc__.split("\n\n", 1)[1], allow_abbrev=False
    )
    add = parser.add_argument
    add("--config", required=True, help="configs/X.py[:variant], as for train.")
    add("--workdir", help="Sweep directory (default runs/<config>-sweep).")
    add("--param", action="append", required=True, help="FIELD=SPACE; repeat for more fields.")
    add("--trials", type=int, help="Trials in the study, all workers together (8; grid: all).")
    add("--sampler", choices=list(SAMPLERS), default="tpe", help="What picks the values.")
    add("--seed", type=int, default=0, help="The sampler's seed.")
    add("--grid_points", type=int, default=3, help="Grid: values of each float range.")
    add("--startup_trials", type=int, help="tpe, cmaes, gp: random trials first (optuna's).")
    add("--pruner", choices=PRUNERS, default="none", help="What stops trials early.")
    add("--prune_after", type=int, default=0, help="No pruning before this step (0).")
    add("--metric", default="eval/accuracy", help="A metrics.jsonl key.")
    add("--mode", choices=("max", "min"), default="max", help="Best is max/min.")
    add("--storage", help="An optuna storage URL the workers share (sqlite:///DIR/sweep.db).")
    add("--heartbeat", type=int, default=60, help="Seconds between a worker's heartbeats.")
    args, extras = parser.parse_known_args(argv)
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials={args.trials}: run at least 1 trial.")
    if args.grid_points < 2:
        parser.error(f"--grid_points={args.grid_points}: a range needs at least 2 points.")
    if args.startup_trials is not None and args.startup_trials < 0:
        parser.error(f"--startup_trials={args.startup_trials}: give 0 or more.")
    if args.heartbeat < 1:
        parser.error(f"--heartbeat={args.heartbeat}: give at least 1 second.")
    return args, extras


def main(argv: Sequence[str] | None = None) -> None:
    args, extras = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # a line per trial, as it happens
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        sweep = build_sweep(args, extras)
    except (ValueError, FileNotFoundError, OSError) as error:
        cli.fail(error)
    except Exception as error:  # a config file that does not load: its error, on one line
        cli.fail(f"--config={args.config}: {type(error).__name__}: {error}")
    try:
        sweep.workdir.mkdir(parents=True, exist_ok=True)
        study = open_study(sweep, args)
    except (ValueError, OSError, ImportError) as error:
        cli.fail(error)
    finished = sum(line["status"] in FINISHED for line in study_lines(sweep, study))
    print(
        f"Sweep of {sweep.num_trials} trials ({args.sampler}, seed {args.seed}) in "
        f"{sweep.workdir}: {max(sweep.num_trials - finished, 0)} to run, {finished} finished "
        "before."
    )
    end(sweep, study, run_worker(sweep, study, args))


if __name__ == "__main__":
    main()
