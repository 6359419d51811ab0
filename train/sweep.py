"""Command line: python -m train.sweep --config=configs/X.py[:variant] --param='FIELD=SPACE' ...

Searches hyperparameters by running the ordinary training command, `python -m train`, once per
trial, each in a workdir of its own (DIR/trial-000, DIR/trial-001, ...). The trials are one
optuna study, kept in --storage (default sqlite:///DIR/sweep.db; the study is named after DIR):

  python -m train.sweep --config=configs/mlp.py:tiny --workdir=runs/mlp-sweep \\
      --param='optimizer.learning_rate=loguniform(1e-3,0.3)' \\
      --param='model.dropout_rate=choice(0.0,0.1,0.2)' --trials=8 \\
      --config.train.num_steps=100          # any --config.FIELD=VALUE goes to every trial

Spaces (FIELD is a config field, e.g. optimizer.learning_rate or seed):
  loguniform(a,b)      a float, its logarithm uniform, 0 < a < b
  uniform(a,b)         a float in [a, b]
  int(a,b)             an integer in a..b, both included
  choice(v1,v2,...)    one of the values, written as on the command line: 0.1, adam, (256,256)
--sampler picks the values: tpe (default), random, grid (--grid_points values of each float
range, log-spaced for loguniform; every integer of an int range), cmaes, gp or qmc. Trial K's
random draws are seeded by (--seed, K), so the same command proposes the same first trials.
--pruner (median, percentile, hyperband; default none) stops a trial at an evaluation, from the
reports in its metrics.jsonl, that the finished trials' reports say is not worth going on.

--trials=N is the study's total. Every worker started with the same command (on one machine or
many, with a --storage they share, e.g. postgresql://...) takes trials nobody has, and together
they run exactly N. A worker records a heartbeat for its trials every --heartbeat seconds; the
trial of a worker that died is taken back after two missed heartbeats and resumed from its
checkpoint by another worker.

DIR/sweep.jsonl gets one line per trial (trial, workdir, status: done, failed, pruned, running or
stopped; overrides; the metric's best value, its step and the final value; steps; wall time;
reason), DIR/sweep_curves.png the trials' training curves and DIR/sweep_params.png the final
metric against each parameter, all written from the study. The end prints a table, the best
trial (by the final value of --metric, which is what retraining it gives) and the command that
retrains it.

SIGTERM or Ctrl-C passes SIGTERM on to the running trials, which save a checkpoint; the worker
exits 0 and the same command resumes: finished and failed trials are kept, a stopped trial
resumes from its checkpoint. A trial that fails (a bad value, a non-finite loss) is recorded with
its one-line reason and the study goes on. --parallel=N runs N trials at once in this worker
(--gpus=0,1,... gives each one GPU). Bad arguments end with one line on stderr and exit status 2;
a sweep whose every trial failed exits 1.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
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
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState

from train import cli
from train.config import load_config

KINDS = ("loguniform", "uniform", "int", "choice")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc")
PRUNERS = ("median", "percentile", "hyperband", "none")
LOG = "train.log"  # in each trial's workdir: the training command's stdout and stderr
PRUNE_MIN_TRIALS = 3  # finished trials needed at a step before the median rule prunes there
STATUS = {
    TrialState.COMPLETE: "done",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "stopped",  # taken back: the next worker resumes it
}
FINISHED = ("done", "failed", "pruned")
Reports = list[dict[str, float]]


# --- The search space ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config field.

    Attributes:
      field: the dotted config field, e.g. "optimizer.learning_rate".
      kind: one of KINDS.
      args: (low, high) for a range; the values' command-line texts for a choice.
      spec: the --param text as given.
    """

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


def format_float(value: float) -> str:
    """A grid's `value` to 3 significant digits, as the command line gets it."""
    return repr(float(f"{value:.3g}"))


def grid_values(param: Param, grid_points: int) -> list[str]:
    """Every value of `param` the grid sampler visits, as command-line texts."""
    if param.kind == "choice":
        return list(param.args)
    low, high = param.args
    if param.kind == "int":
        return [str(value) for value in range(low, high + 1)]
    spaced = np.geomspace if param.kind == "loguniform" else np.linspace
    return list(dict.fromkeys(format_float(v) for v in spaced(low, high, grid_points)))


def suggest(trial: optuna.Trial, param: Param) -> str:
    """The sampler's value of `param` for `trial`, as command-line text."""
    if param.kind == "choice":
        return trial.suggest_categorical(param.field, list(param.args))
    low, high = param.args
    if param.kind == "int":
        return str(trial.suggest_int(param.field, low, high))
    return repr(trial.suggest_float(param.field, low, high, log=param.kind == "loguniform"))


def text_of(param: Param, value: Any) -> str:
    """A study's value of `param` as the command-line text it was given as."""
    if param.kind == "choice":
        return str(value)
    return str(int(value)) if param.kind == "int" else repr(float(value))


def make_sampler(
    name: str, seed: int, params: Sequence[Param], grid_points: int
) -> optuna.samplers.BaseSampler:
    """The --sampler of that name, seeded."""
    if name == "grid":
        space = {p.field: grid_values(p, grid_points) for p in params}
        space = {
            p.field: [v if p.kind == "choice" else json.loads(v) for v in space[p.field]]
            for p in params
        }
        return optuna.samplers.GridSampler(space, seed=seed)
    kinds = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
        "qmc": optuna.samplers.QMCSampler,
    }
    return kinds[name](seed=seed)


def trial_seed(seed: int, slot: int) -> int:
    """The sampler seed of trial `slot`: its draws do not depend on which worker takes it."""
    return int(np.random.SeedSequence([seed, slot]).generate_state(1)[0])


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The --pruner of that name."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_MIN_TRIALS, n_min_trials=3)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(25.0, n_startup_trials=PRUNE_MIN_TRIALS)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


# --- Metrics ------------------------------------------------------------------------------------


def read_reports(workdir: pathlib.Path) -> Reports:
    """The reports of `workdir`/metrics.jsonl so far; [] if none. A line being written (cut short)
    is skipped, so this reads a running trial too."""
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
    """The best value of `metric` over `reports` (highest for mode 'max'), its step, the value of
    the last report that has it, and the last step reported. Non-finite values count as missing.
    """
    values = [(r["step"], finite_or_none(r[metric])) for r in reports if metric in r]
    finite = [(step, value) for step, value in values if value is not None]
    best_step = best = None
    if finite:  # ties go to the earliest step
        pick = max if mode == "max" else min
        best_step, best = pick(finite, key=lambda sv: (sv[1], -sv[0] if mode == "max" else sv[0]))
    return {
        "best": best,
        "best_step": best_step,
        "final": values[-1][1] if values else None,
        "steps": int(reports[-1]["step"]) if reports else 0,
    }


# --- The sweep and its study --------------------------------------------------------------------


@dataclasses.dataclass
class Sweep:
    """What a sweep runs and where.

    Attributes:
      config: the --config argument, passed to every trial as given.
      workdir: DIR, holding sweep.jsonl, the plots and a workdir per trial.
      params: the searched fields.
      overrides: --config.FIELD=VALUE arguments passed to every trial.
      num_trials: the study's total number of trials.
      metric, mode: what ranks the trials ('max' or 'min').
      spec: what fixes the trials, kept in the study and checked by every worker.
    """

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
        """The command-line texts of `trial`'s values."""
        params = trial.params
        return {p.field: text_of(p, params[p.field]) for p in self.params if p.field in params}


def open_storage(sweep: Sweep, args: argparse.Namespace) -> optuna.storages.RDBStorage:
    """--storage, by default DIR/sweep.db, with heartbeats every --heartbeat seconds."""
    url = args.storage or f"sqlite:///{(sweep.workdir / 'sweep.db').resolve()}"
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url,
                # sqlite: workers wait for each other's writes rather than fail at once.
                engine_kwargs={"connect_args": {"timeout": 60}} if "sqlite" in url else None,
                heartbeat_interval=args.heartbeat,
                heartbeat_stale_trial_callback=take_back,
            )
        except sqlalchemy.exc.IntegrityError:  # another worker created the tables first
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def open_study(sweep: Sweep, args: argparse.Namespace, storage) -> optuna.Study:
    """The sweep's study, created by the first worker, named after DIR."""
    study = optuna.create_study(
        storage=storage,
        study_name=sweep.workdir.resolve().name,
        sampler=make_sampler(args.sampler, args.seed, sweep.params, args.grid_points),
        pruner=make_pruner(args.pruner),
        direction="maximize" if sweep.mode == "max" else "minimize",
        load_if_exists=True,
    )
    check_spec(study, sweep)
    return study


def take_back(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Puts `trial`, whose worker died or was stopped, back in the study: a waiting copy with its
    values, attributes and reports, which the next worker to ask takes and resumes in its
    workdir (optuna's RetryFailedTrialCallback, renamed in optuna 4.9)."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
    retry(study, trial)


def check_spec(study: optuna.Study, sweep: Sweep) -> None:
    """Records the sweep's settings in a new study, or refuses a study with other settings: its
    trials would not be the ones this command asks for."""
    previous = study.user_attrs.get("spec")
    if previous is None:
        study.set_user_attr("spec", sweep.spec)
        return
    differ = [k for k in sweep.spec if k != "base_config" and previous.get(k) != sweep.spec[k]]
    if differ:
        there = "; ".join(f"{key}={previous.get(key)}" for key in differ)
        raise ValueError(
            f"{sweep.workdir} holds a sweep with other settings ({there}); repeat its command "
            "(--trials may change) or pass another --workdir."
        )
    then, now = previous.get("base_config", {}), sweep.spec["base_config"]
    changed = [key for key in sorted({*then, *now}) if then.get(key) != now.get(key)]
    if changed:
        fields = ", ".join(f"{k}: {then.get(k)} then, {now.get(k)} now" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ValueError(
            f"{sweep.config} has changed since the sweep in {sweep.workdir} began ({fields}"
            f"{more}); restore it or pass another --workdir."
        )


def tell(study: optuna.Study, trial: optuna.Trial, value: float | None, state: TrialState) -> None:
    """study.tell, but the grid sampler's after_trial, which calls Study.stop once the grid is
    done (allowed only inside Study.optimize), is left out: the sweep counts trials itself."""
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.GridSampler):
        study.sampler = optuna.samplers.RandomSampler()
    try:
        study.tell(trial, value, state=state)
    finally:
        study.sampler = sampler


def original(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the trial that `trial` retries (its own if it is no retry)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def attempts(study: optuna.Study) -> dict[int, list[optuna.trial.FrozenTrial]]:
    """The sweep's trials (slot -> its attempts, oldest first), without surplus trials."""
    slots: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        if "trial" in trial.user_attrs and not trial.user_attrs.get("surplus"):
            slots.setdefault(trial.user_attrs["trial"], []).append(trial)
    return slots


def status_of(slot_attempts: Sequence[optuna.trial.FrozenTrial]) -> str:
    return STATUS[slot_attempts[-1].state]


def ask(sweep: Sweep, study: optuna.Study, args: argparse.Namespace) -> Trial | None:
    """A trial nobody runs (a taken-back one first), its slot and values; None when all N are
    taken. Two workers may ask at once: each trial's slot is its rank among the study's first
    attempts, and a worker that got a slot past N gives it up."""
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    firsts = [t for t in trials if original(t) == t.number and not t.user_attrs.get("surplus")]
    if not waiting and len(firsts) >= sweep.num_trials:
        return None
    trial = study.ask()
    slot = trial.user_attrs.get("trial")
    if slot is None:
        trials = study.get_trials(deepcopy=False)
        ranks = [t.number for t in trials if original(t) == t.number and t.number < trial.number]
        ranks = [n for n in ranks if not trials[n].user_attrs.get("surplus")]
        slot = len(ranks)
        if slot >= sweep.num_trials:
            trial.set_user_attr("surplus", True)
            tell(study, trial, None, TrialState.FAIL)
            return None
        trial.set_user_attr("trial", slot)
        trial.set_user_attr("workdir", sweep.trial_dir(slot).name)
    if args.sampler not in ("grid", "qmc"):  # they take their points from the study itself
        study.sampler = make_sampler(args.sampler, trial_seed(args.seed, slot), sweep.params, 0)
    texts = {p.field: suggest(trial, p) for p in sweep.params}
    return Trial(slot, trial, texts)


@dataclasses.dataclass
class Trial:
    """A trial this worker runs and what it knows of it."""

    slot: int
    trial: optuna.Trial
    texts: dict[str, str]  # field -> command-line text
    process: subprocess.Popen | None = None
    started: float = 0.0  # time.monotonic()
    log_offset: int = 0  # where this attempt's output starts in LOG
    gpu: str | None = None
    trial_id: int = 0  # the storage's id, for heartbeats
    reported: set[int] = dataclasses.field(default_factory=set)  # steps told to the study
    pruned: str | None = None  # why it was told to stop
    signals_sent: int = 0  # of the worker's stop signals passed on to it


def launch(sweep: Sweep, trial: Trial, gpu: str | None, preexec) -> None:
    """Starts `trial` as `python -m train` in its workdir, its output appended to its LOG."""
    trial_dir = sweep.trial_dir(trial.slot)
    trial_dir.mkdir(parents=True, exist_ok=True)
    command = sweep.command(trial.texts, trial_dir)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(trial_dir / LOG, "a") as log:
        log.write(f"=== {time.ctime()} on {socket.gethostname()}: python {shlex.join(command)}\n")
        log.flush()
        trial.log_offset = log.tell()
        # Its own session: a Ctrl-C in the terminal reaches the worker alone, which passes on
        # one SIGTERM (two SIGINTs would stop the trial without a checkpoint).
        trial.process = subprocess.Popen(
            [sys.executable, *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,
        )
    trial.started, trial.gpu = time.monotonic(), gpu
    on = f" on GPU {gpu}" if gpu is not None else ""
    print(
        f"{trial_dir.name} started{on} (pid {trial.process.pid}): {describe(trial.texts)}",
        flush=True,
    )


def report(sweep: Sweep, study: optuna.Study, trial: Trial) -> str | None:
    """Tells the study the evaluations that landed in the trial's metrics.jsonl since the last
    call; returns why the pruner stops it there, or None. The last evaluation is never pruned."""
    trial_dir = sweep.trial_dir(trial.slot)
    num_steps = num_steps_of(trial_dir)
    for row in read_reports(trial_dir):
        value = finite_or_none(row.get(sweep.metric))
        step = int(row["step"])
        if value is None or step in trial.reported:
            continue
        trial.trial.report(value, step)
        trial.reported.add(step)
        if num_steps is not None and step < num_steps and trial.trial.should_prune():
            pruner = type(study.pruner).__name__
            return f"{sweep.metric} {value:.4g} at step {step}, stopped by the {pruner}"
    return None


def num_steps_of(trial_dir: pathlib.Path) -> int | None:
    """train.num_steps of the trial's own config.json (None before the trial wrote it)."""
    try:
        return int(json.loads((trial_dir / "config.json").read_text())["train"]["num_steps"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def finish(sweep: Sweep, study: optuna.Study, trial: Trial, stopping: bool) -> str:
    """Tells the study how `trial` ended; returns its status."""
    trial_dir = sweep.trial_dir(trial.slot)
    returncode = trial.process.returncode
    with open(trial_dir / LOG, errors="replace") as log:
        log.seek(trial.log_offset)
        output = log.read()
    report(sweep, study, trial)
    reports = read_reports(trial_dir)
    num_steps = num_steps_of(trial_dir)
    summary = metric_summary(reports, sweep.metric, sweep.mode)
    completed = returncode == 0 and num_steps is not None and summary["steps"] >= num_steps
    reason, state, value = None, TrialState.FAIL, None
    if completed and summary["final"] is not None:
        status, state, value = "done", TrialState.COMPLETE, summary["final"]
    elif completed:
        keys = sorted({key for row in reports for key in row if key != "step"})
        status, reason = "failed", f"no {sweep.metric} reported; pass --metric= one of {keys}"
    elif returncode > 0 and (not stopping or "error: " in output):  # its own one-line error
        status, reason = "failed", failure_reason(output, returncode)
    elif trial.pruned is not None:
        status, state, reason = "pruned", TrialState.PRUNED, trial.pruned
    elif returncode == 0 or stopping:
        # Stopped by a signal: with a checkpoint (exit 0), or before it had one. Either way it
        # goes back to the study, and the next worker resumes it.
        status = "stopped"
    else:
        status, reason = "failed", failure_reason(output, returncode)
    wall_s = trial.trial.user_attrs.get("wall_s", 0.0) + time.monotonic() - trial.started
    for key, attr in (("wall_s", wall_s), ("steps", summary["steps"]), ("reason", reason)):
        trial.trial.set_user_attr(key, attr)
    tell(study, trial.trial, value, state)
    if status == "stopped":
        take_back(study, study.get_trials(deepcopy=False)[trial.trial.number])
    result = f"{sweep.metric} final {fmt(summary['final'])}, best {fmt(summary['best'])}"
    result += f" at step {summary['best_step']}" if summary["best"] is not None else ""
    why = f" ({reason})" if reason else ""
    print(
        f"{trial_dir.name} {status} after {summary['steps']} steps, {wall_s:.1f} s: {result}{why}",
        flush=True,
    )
    return status


def run_worker(sweep: Sweep, study: optuna.Study, storage, args: argparse.Namespace) -> str | None:
    """Runs trials of the study, --parallel at a time, until all N have ended (those of other
    workers too: one that dies leaves its trial to be taken back) or a signal stops it.

    Returns the name of the signal that stopped the worker, or None.
    """
    running: dict[int, Trial] = {}
    preexec = parent_death_signal()
    study_id = storage.get_study_id_from_name(study.study_name)
    beaten = time.monotonic()
    announced = False
    with stop_signals() as received:
        while True:
            if not received:
                optuna.storages.fail_stale_trials(study)  # takes back the dead workers' trials
            while not received and len(running) < args.parallel:
                trial = ask(sweep, study, args)
                if trial is None:
                    break
                trial.trial_id = storage.get_trial_id_from_study_id_trial_number(
                    study_id, trial.trial.number
                )
                storage.record_heartbeat(trial.trial_id)
                trial.reported = set(storage.get_trial(trial.trial_id).intermediate_values)
                busy = {t.gpu for t in running.values()}
                launch(sweep, trial, next((g for g in args.gpus if g not in busy), None), preexec)
                running[trial.trial.number] = trial
            if received:
                if not announced:
                    announced = True
                    print(f"{received[0]}: stopping the running trials (they save checkpoints).")
                pass_on(received, running)
            if not running and (received or all_ended(sweep, study)):
                break
            time.sleep(0.2 if running else 1.0)
            if time.monotonic() - beaten >= args.heartbeat / 2:
                beaten = time.monotonic()
                for trial in running.values():
                    storage.record_heartbeat(trial.trial_id)
            for number, trial in list(running.items()):
                if trial.process.poll() is not None:
                    del running[number]
                    finish(sweep, study, trial, stopping=bool(received))
                elif trial.pruned is None and not received:
                    trial.pruned = report(sweep, study, trial)
                    if trial.pruned is not None:  # it saves a checkpoint and exits
                        trial.process.send_signal(signal.SIGTERM)
    return received[0] if received else None


def all_ended(sweep: Sweep, study: optuna.Study) -> bool:
    slots = attempts(study)
    ended = [s for s in slots.values() if status_of(s) in FINISHED]
    return len(ended) >= sweep.num_trials


def describe(texts: dict[str, str]) -> str:
    return " ".join(f"{field}={text}" for field, text in texts.items())


def failure_reason(output: str, returncode: int) -> str:
    """One line on why a trial failed: its last `error: ...` line (what `python -m train` prints
    for bad input or a non-finite loss), else the signal or its last line of output."""
    # A progress bar's last redraw may share the line: "...[00:06<00:19]error: ...".
    errors = re.findall(r"(?:^|\])error: (.+)", output.replace("\r", "\n"), flags=re.M)
    if errors:
        return errors[-1].strip()
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    last = f": {lines[-1][:300]}" if lines else ""
    return f"exit status {returncode}{last}"


def parent_death_signal() -> Callable[[], None] | None:
    """Linux: a preexec_fn by which the kernel sends a trial SIGTERM if the sweep dies (killed by
    SIGKILL, say), so the trial saves a checkpoint rather than running on, orphaned, holding
    its workdir. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM))


@contextlib.contextmanager
def stop_signals() -> Iterator[list[str]]:
    """Records SIGTERM and SIGINT to the sweep in the yielded list, by name; the loop passes them
    on to the trials (a handler that signalled them itself could miss one being started)."""
    received: list[str] = []

    def record(signum, frame):
        del frame
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def pass_on(received: Sequence[str], running: dict[int, Trial]) -> None:
    """The first signal asks every running trial to stop with a checkpoint (SIGTERM); a second
    SIGINT (Ctrl-C twice) is passed on too, and the trials stop at once."""
    for trial in running.values():
        if trial.signals_sent == 0:
            trial.process.send_signal(signal.SIGTERM)
            trial.signals_sent = 1
        if trial.signals_sent == 1 and "SIGINT" in received[1:]:
            trial.process.send_signal(signal.SIGINT)
            trial.signals_sent = 2


# --- Results, from the study --------------------------------------------------------------------


def study_lines(sweep: Sweep, study: optuna.Study) -> list[dict[str, Any]]:
    """sweep.jsonl's lines: one per trial slot, in slot order, from its latest attempt."""
    lines = []
    for slot, tries in sorted(attempts(study).items()):
        last = tries[-1]
        values = sorted(last.intermediate_values.items())
        rows = [{"step": step, sweep.metric: value} for step, value in values]
        summary = metric_summary(rows, sweep.metric, sweep.mode)
        final = last.value if last.state == TrialState.COMPLETE else summary["final"]
        lines.append(
            {
                "trial": slot,
                "workdir": sweep.trial_dir(slot).name,
                "status": status_of(tries),
                "overrides": {f: json_value(t) for f, t in sweep.texts(last).items()},
                "metric": sweep.metric,
                "best": summary["best"],
                "best_step": summary["best_step"],
                "final": final,
                "steps": last.user_attrs.get("steps", 0),
                "wall_s": round(last.user_attrs.get("wall_s", 0.0), 1),
                "reason": last.user_attrs.get("reason"),
            }
        )
    return lines


def replace_atomically(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """write(a name of this process's own), then a rename over `path`: workers writing at once
    never mix their files, and a kill never leaves half a file."""
    partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{path.suffix}")
    try:
        write(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_summary(sweep: Sweep, lines: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    replace_atomically(sweep.workdir / "sweep.jsonl", lambda path: path.write_text(text))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def winner(lines: Sequence[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial with the best final value (the lowest trial number among equals)."""
    done = [line for line in lines if line["status"] == "done" and line["final"] is not None]
    if not done:
        return None
    sign = -1 if mode == "max" else 1
    return min(done, key=lambda line: (sign * line["final"], line["trial"]))


def table(sweep: Sweep, lines: Sequence[dict[str, Any]], texts: Sequence[dict]) -> str:
    """The trials as a text table, one row per trial."""
    header = ["trial", "status", f"{sweep.metric} final", "best", "step", "steps", "wall_s"]
    header += [p.field for p in sweep.params]
    rows = [header]
    for line, values in zip(lines, texts, strict=True):
        rows.append(
            [
                f"{line['trial']:03d}",
                line["status"],
                fmt(line["final"]),
                fmt(line["best"]),
                fmt(line["best_step"]),
                str(line["steps"]),
                f"{line['wall_s']:.1f}",
                *(values.get(p.field, "-") for p in sweep.params),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def plot_params(sweep: Sweep, lines: Sequence[dict[str, Any]], texts: Sequence[dict]):
    """A figure with one panel per parameter: the final metric of each trial against its value
    (log axis for loguniform; choices in their order). Pruned and stopped trials are drawn
    hollow at their last value, failed ones as a red x on the bottom edge; the winner is a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(sweep.params), 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, len(sweep.params), sharey=True))
    best = winner(lines, sweep.mode)
    for ax, param in zip(axes, sweep.params, strict=True):
        drawn = [(line, values[param.field]) for line, values in zip(lines, texts, strict=True)]
        if param.kind == "choice":
            order = list(param.args)
            xs = [order.index(text) for _, text in drawn]
            ax.set_xticks(range(len(order)), order)
            ax.set_xlim(-0.5, len(order) - 0.5)
        else:
            xs = [float(text) for _, text in drawn]
        if param.kind == "loguniform":
            ax.set_xscale("log")
        for x, (line, _) in zip(xs, drawn, strict=True):
            if line["status"] == "failed":  # a red x on the bottom edge
                ax.plot(x, 0.02, "x", color="tab:red", transform=ax.get_xaxis_transform())
            if line["final"] is None:
                continue
            ax.plot(
                x,
                line["final"],
                "*" if line is best else "o",
                markersize=14 if line is best else 7,
                color="tab:orange" if line is best else "tab:blue",
                fillstyle="full" if line["status"] == "done" else "none",
            )
        ax.set_title(param.field)
        ax.set_xlabel(param.field.rsplit(".", 1)[-1])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{sweep.metric} (final)")
    return figure


def write_plots(sweep: Sweep, lines: Sequence[dict[str, Any]], texts: Sequence[dict]) -> None:
    """DIR/sweep_curves.png (train.plot's panels, one line per trial) and DIR/sweep_params.png."""
    from train import plot  # matplotlib: only when there is something to draw

    runs = {}
    for line, values in zip(lines, texts, strict=True):
        reports = read_reports(sweep.workdir / line["workdir"])
        if reports:
            name = " ".join(f"{f.rsplit('.', 1)[-1]}={t}" for f, t in values.items())
            runs[f"{line['trial']:03d} {name}"] = reports
    if runs:
        figures = {"sweep_curves.png": plot.plot_runs(runs)}
        figures["sweep_params.png"] = plot_params(sweep, lines, texts)
        for name, figure in figures.items():
            replace_atomically(
                sweep.workdir / name, lambda path, f=figure: f.savefig(path, dpi=100, format="png")
            )


def print_results(sweep: Sweep, lines: Sequence[dict[str, Any]], texts: Sequence[dict]) -> None:
    """Prints the table, the best trial and the command that retrains it."""
    if lines:
        print(table(sweep, lines, texts))
    best = winner(lines, sweep.mode)
    if best is not None:
        values = texts[lines.index(best)]
        command = sweep.command(values, sweep.workdir / "winner")
        print(
            f"Best: {best['workdir']}, {sweep.metric} {fmt(best['final'])} at step "
            f"{best['steps']} (best {fmt(best['best'])} at step {best['best_step']}): "
            f"{describe(values)}"
        )
        print(f"Retrain it: python {shlex.join(command)}")


def end(sweep: Sweep, study: optuna.Study, stopped_by: str | None) -> None:
    """sweep.jsonl, the plots, the table, the winner, and how the sweep ended."""
    slots = attempts(study)
    lines = study_lines(sweep, study)
    texts = [sweep.texts(slots[line["trial"]][-1]) for line in lines]
    write_summary(sweep, lines)
    try:
        write_plots(sweep, lines, texts)
    except (OSError, ValueError) as error:
        print(f"warning: no plots ({' '.join(str(error).split())})", file=sys.stderr)
    print_results(sweep, lines, texts)
    done = sum(line["status"] == "done" for line in lines)
    finished = sum(line["status"] in FINISHED for line in lines)
    if stopped_by is not None or finished < sweep.num_trials:
        how = f"Stopped by {stopped_by}" if stopped_by else "Not finished"
        print(
            f"{how}: {done} of {sweep.num_trials} trials done, {sweep.num_trials - finished} to "
            "run or resume (stopped trials keep their checkpoints). Run the same command to resume."
        )
        return
    if done == 0:
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
    spec = {
        "config": args.config,
        "params": [p.spec for p in params],
        "overrides": list(extras),
        "sampler": args.sampler,
        "grid_points": args.grid_points if args.sampler == "grid" else None,
        "seed": args.seed,
        "metric": args.metric,
        "mode": args.mode,
        # The config file's values: a file edited between a stop and a resume would give the
        # remaining trials another base.
        "base_config": flatten(json.loads(config.to_json_best_effort())),
    }
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
        prog="python -m train.sweep",
        description=__doc__.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="configs/X.py[:variant], as for train.")
    parser.add_argument("--workdir", help="Sweep directory (default runs/<config>-sweep).")
    parser.add_argument(
        "--param", action="append", required=True, help="FIELD=SPACE; repeat for more fields."
    )
    parser.add_argument(
        "--trials", type=int, help="Trials in the study, all workers together (8; grid: all)."
    )
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="What picks values.")
    parser.add_argument("--seed", type=int, default=0, help="The sampler's seed.")
    parser.add_argument(
        "--grid_points", type=int, default=3, help="Grid: values of each float range."
    )
    parser.add_argument("--pruner", choices=PRUNERS, default="none", help="What stops trials.")
    parser.add_argument("--metric", default="eval/accuracy", help="A metrics.jsonl key.")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="Best is max/min.")
    parser.add_argument("--parallel", type=int, help="Trials run at once (1; --gpus: one each).")
    parser.add_argument("--gpus", default="", help="GPU ids, one per running trial: 0,1,2,3.")
    parser.add_argument(
        "--storage", help="An optuna storage URL shared by the workers (sqlite:///DIR/sweep.db)."
    )
    parser.add_argument(
        "--heartbeat", type=int, default=60, help="Seconds between a worker's heartbeats."
    )
    args, extras = parser.parse_known_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    args.gpus = gpus
    if args.parallel is None:
        args.parallel = len(gpus) or 1
    if args.parallel < 1:
        parser.error(f"--parallel={args.parallel}: run at least 1 trial at a time.")
    if gpus and args.parallel > len(gpus):
        parser.error(f"--parallel={args.parallel} needs as many --gpus, not {len(gpus)}.")
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials={args.trials}: run at least 1 trial.")
    if args.grid_points < 2:
        parser.error(f"--grid_points={args.grid_points}: a range needs at least 2 points.")
    if args.heartbeat < 1:
        parser.error(f"--heartbeat={args.heartbeat}: give at least 1 second.")
    return args, extras


def main(argv: Sequence[str] | None = None) -> None:
    args, extras = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Heartbeats are recorded here, by the loop that watches the trials, not by Study.optimize.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    try:
        sweep = build_sweep(args, extras)
    except (ValueError, FileNotFoundError, OSError) as error:
        cli.fail(error)
    except Exception as error:  # a config file that does not load: its error, on one line
        cli.fail(f"--config={args.config}: {type(error).__name__}: {error}")
    try:
        sweep.workdir.mkdir(parents=True, exist_ok=True)
        storage = open_storage(sweep, args)
        study = open_study(sweep, args, storage)
    except (ValueError, OSError, ImportError) as error:
        cli.fail(error)
    finished = sum(status_of(s) in FINISHED for s in attempts(study).values())
    print(
        f"Sweep of {sweep.num_trials} trials ({args.sampler}, seed {args.seed}) in "
        f"{sweep.workdir}: {max(sweep.num_trials - finished, 0)} to run, {finished} finished "
        "before.",
        flush=True,
    )
    stopped_by = run_worker(sweep, study, storage, args)
    end(sweep, study, stopped_by)


if __name__ == "__main__":
    main()
