"""Command line: python -m train.sweep --config=configs/X.py[:variant] --param='FIELD=SPACE' ...

Searches hyperparameters by running the ordinary training command, `python -m train`, once per
trial, each in a workdir of its own (DIR/trial-000, DIR/trial-001, ...):

  python -m train.sweep --config=configs/mlp.py:tiny --workdir=runs/mlp-sweep \\
      --param='optimizer.learning_rate=loguniform(1e-3,0.3)' \\
      --param='model.dropout_rate=choice(0.0,0.1,0.2)' --trials=8 \\
      --config.train.num_steps=100          # any --config.FIELD=VALUE goes to every trial

Spaces (FIELD is a config field, e.g. optimizer.learning_rate or seed):
  loguniform(a,b)      a float drawn uniformly in log space, 0 < a < b
  uniform(a,b)         a float drawn uniformly in [a, b]
  int(a,b)             an integer in a..b, both included
  choice(v1,v2,...)    one of the values, written as on the command line: 0.1, adam, (256,256)
Floats are drawn to 3 significant digits. Random search draws trial K's values from
numpy.random.default_rng([seed, K]): the same trials on every run and every machine, and more
--trials only add trials. --grid runs every combination instead (--grid_points values of each
float range, log-spaced for loguniform; every integer of an int range).

DIR/sweep.jsonl gets one line per trial that has run (trial, workdir, status: done, failed,
pruned or stopped; overrides; the metric's best value, its step and the final value; steps; wall
time; reason), DIR/sweep_curves.png the trials' training curves and DIR/sweep_params.png the
final metric against each parameter. The end prints a table, the best trial (by the final value
of --metric, which is what retraining it gives) and the command that retrains it.

A sweep is a run like any other. SIGTERM or Ctrl-C passes SIGTERM on to the running trials, which
save a checkpoint; the sweep exits 0 and the same command resumes it: finished and failed trials
are kept, a stopped trial resumes from its checkpoint. A trial that fails (a bad value, a
non-finite loss) is recorded with its one-line reason and the sweep goes on. --parallel=N runs N
trials at once (--gpus=0,1,... gives each one GPU); --trial=K runs only trial K, for a cluster
scheduler's job array; --report prints and writes the results so far and runs nothing. Bad
arguments end with one line on stderr and exit status 2; a sweep whose every trial failed exits 1.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import itertools
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
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from train import cli
from train.config import load_config

try:
    import fcntl
except ImportError:  # Windows: sweeps are not locked
    fcntl = None

KINDS = ("loguniform", "uniform", "int", "choice")
FINISHED = ("done", "failed", "pruned")  # statuses a resumed sweep keeps; "stopped" is resumed
RECORD = "sweep_trial.json"  # in each trial's workdir: its status, reason and wall time
LOG = "train.log"  # in each trial's workdir: the training command's stdout and stderr
PRUNE_MIN_TRIALS = 3  # finished trials needed at a step before the median rule prunes there
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


def format_float(value: float, low: float, high: float) -> str:
    """`value` to 3 significant digits, kept in [low, high], as the command line gets it."""
    return repr(min(max(float(f"{value:.3g}"), low), high))


def draw_value(param: Param, rng: np.random.Generator) -> str:
    """One random value of `param`, as command-line text."""
    if param.kind == "choice":
        return param.args[int(rng.integers(len(param.args)))]
    low, high = param.args
    if param.kind == "int":
        return str(int(rng.integers(low, high + 1)))
    if param.kind == "loguniform":
        return format_float(math.exp(rng.uniform(math.log(low), math.log(high))), low, high)
    return format_float(rng.uniform(low, high), low, high)


def grid_values(param: Param, grid_points: int) -> list[str]:
    """Every value of `param` a grid visits, as command-line texts."""
    if param.kind == "choice":
        return list(param.args)
    low, high = param.args
    if param.kind == "int":
        return [str(value) for value in range(low, high + 1)]
    spaced = np.geomspace if param.kind == "loguniform" else np.linspace
    texts = [format_float(v, low, high) for v in spaced(low, high, grid_points)]
    return list(dict.fromkeys(texts))  # 3 digits can merge close points: each once


def draw_trials(
    params: Sequence[Param], *, seed: int, num_trials: int, grid: bool, grid_points: int
) -> list[dict[str, str]]:
    """The sweep's trials in order, each a dict field -> command-line text.

    Random search draws trial K from `np.random.default_rng([seed, K])`, the fields in the order
    of `params`, so trial K is the same whatever `num_trials` is. A grid is the product of
    `grid_values`, the last field changing fastest.
    """
    fields = [p.field for p in params]
    if grid:
        combos = itertools.product(*(grid_values(p, grid_points) for p in params))
        return [dict(zip(fields, combo, strict=True)) for combo in combos]
    trials = []
    for index in range(num_trials):
        rng = np.random.default_rng([seed, index])
        trials.append({p.field: draw_value(p, rng) for p in params})
    return trials


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


def value_at(reports: Reports, metric: str, step: int) -> float | None:
    for report in reports:
        if report["step"] == step and metric in report:
            return finite_or_none(report[metric])
    return None


def prune_reason(
    reports: Reports,
    finished: Sequence[Reports],
    metric: str,
    mode: str,
    num_steps: int,
    min_trials: int = PRUNE_MIN_TRIALS,
) -> str | None:
    """The median rule (as optuna's MedianPruner): a running trial stops at an evaluation before
    its last if its best value so far is worse than the median of the finished trials' values at
    that step, once `min_trials` finished trials have one. Returns why, or None to go on."""
    evaluated = [(r["step"], finite_or_none(r[metric])) for r in reports if metric in r]
    if not evaluated or evaluated[-1][0] >= num_steps:
        return None
    step = evaluated[-1][0]
    others = [v for v in (value_at(f, metric, step) for f in finished) if v is not None]
    if len(others) < min_trials:
        return None
    values = [v for _, v in evaluated if v is not None]
    median = float(np.median(others))
    if not values:
        return f"{metric} is not finite at step {step}"
    best = max(values) if mode == "max" else min(values)
    if (best < median) if mode == "max" else (best > median):
        return (
            f"{metric} {best:.4g} by step {step}, worse than the median {median:.4g} of "
            f"{len(others)} finished trials there"
        )
    return None


# --- The sweep and its trials -------------------------------------------------------------------


@dataclasses.dataclass
class Sweep:
    """What a sweep runs and where.

    Attributes:
      config: the --config argument, passed to every trial as given.
      workdir: DIR, holding sweep.json, sweep.jsonl, the plots and a workdir per trial.
      params: the searched fields.
      overrides: --config.FIELD=VALUE arguments passed to every trial.
      trials: each trial's field -> command-line text, in trial order.
      metric, mode: what ranks the trials ('max' or 'min').
      spec: what fixes the trials, kept in DIR/sweep.json and checked on every resume.
    """

    config: str
    workdir: pathlib.Path
    params: list[Param]
    overrides: list[str]
    trials: list[dict[str, str]]
    metric: str
    mode: str
    spec: dict[str, Any]

    def trial_dir(self, index: int) -> pathlib.Path:
        return self.workdir / f"trial-{index:03d}"

    def command(self, index: int, workdir: str | pathlib.Path | None = None) -> list[str]:
        """The training command of trial `index` (argv after the Python executable)."""
        return [
            "-m",
            "train",
            f"--config={self.config}",
            f"--workdir={workdir or self.trial_dir(index)}",
            *self.overrides,
            *(f"--config.{field}={text}" for field, text in self.trials[index].items()),
        ]


def read_record(sweep: Sweep, index: int) -> dict[str, Any] | None:
    """Trial `index`'s record (status, reason, wall time), or None if it never ran."""
    try:
        return json.loads((sweep.trial_dir(index) / RECORD).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes whole, then renames over the old file: a kill never leaves half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    partial.replace(path)


def num_steps_of(trial_dir: pathlib.Path) -> int | None:
    """train.num_steps of the trial's own config.json (None before the trial wrote it)."""
    try:
        return int(json.loads((trial_dir / "config.json").read_text())["train"]["num_steps"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def summary_line(sweep: Sweep, index: int, record: dict[str, Any]) -> dict[str, Any]:
    """Trial `index`'s line of sweep.jsonl, its metrics read from its metrics.jsonl."""
    reports = read_reports(sweep.trial_dir(index))
    return {
        "trial": index,
        "workdir": sweep.trial_dir(index).name,
        "status": record["status"],
        "overrides": {field: json_value(text) for field, text in sweep.trials[index].items()},
        "metric": sweep.metric,
        **metric_summary(reports, sweep.metric, sweep.mode),
        "wall_s": round(record["wall_s"], 1),
        "reason": record.get("reason"),
    }


def write_summary(sweep: Sweep) -> list[dict[str, Any]]:
    """Rewrites DIR/sweep.jsonl from the trials' records, in trial order; returns its lines."""
    lines = []
    for index in range(len(sweep.trials)):
        record = read_record(sweep, index)
        if record is not None:
            lines.append(summary_line(sweep, index, record))
    partial = sweep.workdir / "sweep.jsonl.partial"
    partial.write_text("".join(json.dumps(line) + "\n" for line in lines))
    partial.replace(sweep.workdir / "sweep.jsonl")
    return lines


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


@dataclasses.dataclass
class Running:
    """A trial process and what the sweep knows of it."""

    index: int
    process: subprocess.Popen
    started: float  # time.monotonic()
    log_offset: int  # where this attempt's output starts in LOG
    gpu: str | None
    checked_step: int = -1  # the last reported step the pruner looked at
    pruned: str | None = None  # why it was told to stop
    signals_sent: int = 0  # of the sweep's stop signals passed on to it


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


def pass_on(received: Sequence[str], running: dict[int, Running]) -> None:
    """The first signal asks every running trial to stop with a checkpoint (SIGTERM); a second
    SIGINT (Ctrl-C twice) is passed on too, and the trials stop at once."""
    for trial in running.values():
        if trial.signals_sent == 0:
            trial.process.send_signal(signal.SIGTERM)
            trial.signals_sent = 1
        if trial.signals_sent == 1 and "SIGINT" in received[1:]:
            trial.process.send_signal(signal.SIGINT)
            trial.signals_sent = 2


def describe(trial: dict[str, str]) -> str:
    return " ".join(f"{field}={text}" for field, text in trial.items())


def launch(sweep: Sweep, index: int, gpu: str | None, preexec) -> Running:
    """Starts trial `index` as `python -m train`, its output appended to its LOG."""
    trial_dir = sweep.trial_dir(index)
    trial_dir.mkdir(parents=True, exist_ok=True)
    command = sweep.command(index)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(trial_dir / LOG, "a") as log:
        log.write(f"=== {time.ctime()}: python {shlex.join(command)}\n")
        log.flush()
        offset = log.tell()
        # Its own session: a Ctrl-C in the terminal reaches the sweep alone, which passes on one
        # SIGTERM (two SIGINTs would stop the trial without a checkpoint).
        process = subprocess.Popen(
            [sys.executable, *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,
        )
    on = f" on GPU {gpu}" if gpu is not None else ""
    print(f"{trial_dir.name} started{on}: {describe(sweep.trials[index])}", flush=True)
    return Running(index, process, time.monotonic(), offset, gpu)


def finish(sweep: Sweep, trial: Running, stopping: bool) -> dict[str, Any]:
    """Records how trial `trial` ended; returns its record."""
    trial_dir = sweep.trial_dir(trial.index)
    returncode = trial.process.returncode
    with open(trial_dir / LOG, errors="replace") as log:
        log.seek(trial.log_offset)
        output = log.read()
    reports = read_reports(trial_dir)
    num_steps = num_steps_of(trial_dir)
    completed = returncode == 0 and num_steps is not None and bool(reports)
    completed = completed and reports[-1]["step"] >= num_steps
    reason = None
    if completed:
        status = "done"
    elif returncode > 0 and (not stopping or "error: " in output):  # its own one-line error
        status, reason = "failed", failure_reason(output, returncode)
    elif trial.pruned is not None:
        status, reason = "pruned", trial.pruned
    elif returncode == 0 or stopping:
        # Stopped by a signal: with a checkpoint (exit 0), or before it had one (killed while
        # starting). Either way a resume runs it again.
        status = "stopped"
    else:
        status, reason = "failed", failure_reason(output, returncode)
    previous = read_record(sweep, trial.index) or {"wall_s": 0.0, "attempts": 0}
    record = {
        "trial": trial.index,
        "overrides": sweep.trials[trial.index],
        "status": status,
        "reason": reason,
        "wall_s": previous["wall_s"] + time.monotonic() - trial.started,
        "attempts": previous["attempts"] + 1,
    }
    write_json(trial_dir / RECORD, record)
    line = summary_line(sweep, trial.index, record)
    result = f"{sweep.metric} final {fmt(line['final'])}, best {fmt(line['best'])}"
    result += f" at step {line['best_step']}" if line["best"] is not None else ""
    why = f" ({reason})" if reason else ""
    print(
        f"{trial_dir.name} {status} after {line['steps']} steps, {line['wall_s']:.1f} s: "
        f"{result}{why}",
        flush=True,
    )
    return record


def run_trials(
    sweep: Sweep,
    indices: Sequence[int],
    *,
    parallel: int,
    gpus: Sequence[str],
    prune: bool,
) -> str | None:
    """Runs trials `indices`, `parallel` at a time, until all end or a signal stops them.

    Returns the name of the signal that stopped the sweep, or None.
    """
    pending = list(indices)
    running: dict[int, Running] = {}
    preexec = parent_death_signal()
    finished_reports = [
        read_reports(sweep.trial_dir(i))
        for i in range(len(sweep.trials))
        if (read_record(sweep, i) or {}).get("status") == "done"
    ]
    announced = False
    with stop_signals() as received:
        while running or (pending and not received):
            while pending and not received and len(running) < parallel:
                busy = {trial.gpu for trial in running.values()}
                gpu = next((g for g in gpus if g not in busy), None)
                index = pending.pop(0)
                running[index] = launch(sweep, index, gpu, preexec)
            if received:
                if not announced:
                    announced = True
                    print(f"{received[0]}: stopping the running trials (they save checkpoints).")
                pass_on(received, running)
            time.sleep(0.1)
            for index, trial in list(running.items()):
                if trial.process.poll() is not None:
                    del running[index]
                    record = finish(sweep, trial, stopping=bool(received))
                    if record["status"] == "done":
                        finished_reports.append(read_reports(sweep.trial_dir(index)))
                elif prune and trial.pruned is None and not received:
                    check_prune(sweep, trial, finished_reports)
    return received[0] if received else None


def check_prune(sweep: Sweep, trial: Running, finished: Sequence[Reports]) -> None:
    """Asks `trial` to stop (SIGTERM: it saves a checkpoint) if the median rule says so."""
    trial_dir = sweep.trial_dir(trial.index)
    reports = read_reports(trial_dir)
    num_steps = num_steps_of(trial_dir)
    if not reports or num_steps is None or reports[-1]["step"] == trial.checked_step:
        return
    trial.checked_step = reports[-1]["step"]
    reason = prune_reason(reports, finished, sweep.metric, sweep.mode, num_steps)
    if reason is not None:
        trial.pruned = reason
        trial.process.send_signal(signal.SIGTERM)


# --- Results ------------------------------------------------------------------------------------


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


def table(sweep: Sweep, lines: Sequence[dict[str, Any]]) -> str:
    """The trials as a text table, one row per trial that has run."""
    header = ["trial", "status", f"{sweep.metric} final", "best", "step", "steps", "wall_s"]
    header += [p.field for p in sweep.params]
    rows = [header]
    for line in lines:
        rows.append(
            [
                f"{line['trial']:03d}",
                line["status"],
                fmt(line["final"]),
                fmt(line["best"]),
                fmt(line["best_step"]),
                str(line["steps"]),
                f"{line['wall_s']:.1f}",
                *(sweep.trials[line["trial"]][p.field] for p in sweep.params),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def plot_params(sweep: Sweep, lines: Sequence[dict[str, Any]]):
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
        texts = [sweep.trials[line["trial"]][param.field] for line in lines]
        if param.kind == "choice":
            order = list(param.args)
            xs = [order.index(text) for text in texts]
            ax.set_xticks(range(len(order)), order)
            ax.set_xlim(-0.5, len(order) - 0.5)
        else:
            xs = [float(text) for text in texts]
        if param.kind == "loguniform":
            ax.set_xscale("log")
        for x, line in zip(xs, lines, strict=True):
            if line["status"] == "failed":  # a red x on the bottom edge
                ax.plot(x, 0.02, "x", color="tab:red", transform=ax.get_xaxis_transform())
            if line["final"] is None:
                continue
            done = line["status"] == "done"
            ax.plot(
                x,
                line["final"],
                "*" if line is best else "o",
                markersize=14 if line is best else 7,
                color="tab:orange" if line is best else "tab:blue",
                fillstyle="full" if done else "none",
            )
        ax.set_title(param.field)
        ax.set_xlabel(param.field.rsplit(".", 1)[-1])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{sweep.metric} (final)")
    return figure


def write_plots(sweep: Sweep, lines: Sequence[dict[str, Any]]) -> list[pathlib.Path]:
    """DIR/sweep_curves.png (train.plot's panels, one line per trial) and DIR/sweep_params.png."""
    from train import plot  # matplotlib: only when there is something to draw

    runs = {}
    for line in lines:
        reports = read_reports(sweep.trial_dir(line["trial"]))
        if reports:
            name = f"{line['trial']:03d} " + " ".join(
                f"{field.rsplit('.', 1)[-1]}={text}"
                for field, text in sweep.trials[line["trial"]].items()
            )
            runs[name] = reports
    written = []
    if runs:
        curves = sweep.workdir / "sweep_curves.png"
        plot.plot_runs(runs).savefig(curves, dpi=100)
        params = sweep.workdir / "sweep_params.png"
        plot_params(sweep, lines).savefig(params, dpi=100)
        written = [curves, params]
    return written


def print_results(sweep: Sweep, lines: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Prints the table, the best trial and the command that retrains it; returns the best."""
    if lines:
        print(table(sweep, lines))
    best = winner(lines, sweep.mode)
    if best is not None:
        index = best["trial"]
        command = sweep.command(index, workdir=sweep.workdir / "winner")
        print(
            f"Best: {sweep.trial_dir(index).name}, {sweep.metric} {fmt(best['final'])} at step "
            f"{best['steps']} (best {fmt(best['best'])} at step {best['best_step']}): "
            f"{describe(sweep.trials[index])}"
        )
        print(f"Retrain it: python {shlex.join(command)}")
    return best


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
    if args.grid and args.trials is not None:
        raise ValueError("--grid runs every combination; leave out --trials.")
    num_trials = 8 if args.trials is None else args.trials
    trials = draw_trials(
        params,
        seed=args.seed,
        num_trials=num_trials,
        grid=args.grid,
        grid_points=args.grid_points,
    )
    if args.trial is not None and not 0 <= args.trial < len(trials):
        raise ValueError(f"--trial={args.trial}: the sweep has trials 0..{len(trials) - 1}.")
    workdir = pathlib.Path(args.workdir or default_workdir(args.config))
    spec = {
        "config": args.config,
        "params": [p.spec for p in params],
        "overrides": list(extras),
        "grid": args.grid,
        "grid_points": args.grid_points if args.grid else None,
        "seed": None if args.grid else args.seed,
        # The config file's values: a file edited between a stop and a resume would give the
        # remaining trials another base.
        "base_config": flatten(json.loads(config.to_json_best_effort())),
    }
    return Sweep(args.config, workdir, params, list(extras), trials, args.metric, args.mode, spec)


def default_workdir(config_arg: str) -> str:
    """runs/mlp-tiny-sweep for configs/mlp.py:tiny."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    return str(pathlib.Path("runs") / (f"{name}-{variant}-sweep" if variant else f"{name}-sweep"))


def check_spec(sweep: Sweep) -> None:
    """Writes DIR/sweep.json, or refuses a DIR whose sweep has other settings: its trials would
    not be the ones this command draws."""
    path = sweep.workdir / "sweep.json"
    if path.exists():
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            previous = None  # cut short by a kill: the trials' own records still hold
        previous = previous or sweep.spec
        differ = [k for k in sweep.spec if k != "base_config" and previous.get(k) != sweep.spec[k]]
        if differ:
            there = "; ".join(f"{key}={previous.get(key)}" for key in differ)
            raise ValueError(
                f"{sweep.workdir} holds a sweep with other settings ({there}); repeat its "
                "command (--trials may change) or pass another --workdir."
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
    write_json(path, sweep.spec)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextlib.contextmanager
def sweep_lock(workdir: pathlib.Path, shared: bool) -> Iterator[None]:
    """A lock on DIR: a whole sweep holds it alone; --trial=K runs share it with each other."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        file = (workdir / ".sweep.lock").open("a+")
    except OSError as error:
        raise ValueError(f"Cannot write to {workdir} ({error.strerror}).") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(file, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                raise ValueError(
                    f"{workdir} is in use by another sweep ({holder}); wait for it to finish or "
                    "pass another --workdir."
                ) from None
            if not shared:
                file.seek(0)
                file.truncate()
                file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n")
                file.flush()
        yield
    finally:
        file.close()  # drops the lock


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
    parser.add_argument("--trials", type=int, help="Random search: number of trials (8).")
    parser.add_argument("--seed", type=int, default=0, help="Random search: the draws' seed.")
    parser.add_argument("--grid", action="store_true", help="Every combination of values.")
    parser.add_argument(
        "--grid_points", type=int, default=3, help="Grid: values of each float range."
    )
    parser.add_argument("--metric", default="eval/accuracy", help="A metrics.jsonl key.")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="Best is max/min.")
    parser.add_argument("--parallel", type=int, help="Trials run at once (1; --gpus: one each).")
    parser.add_argument("--gpus", default="", help="GPU ids, one per running trial: 0,1,2,3.")
    parser.add_argument(
        "--prune", action="store_true", help="Stop trials below the median (see prune_reason)."
    )
    parser.add_argument("--trial", type=int, help="Run only trial K (a scheduler's job array).")
    parser.add_argument(
        "--retry_failed", action="store_true", help="Run failed trials again on resume."
    )
    parser.add_argument(
        "--report", action="store_true", help="Write and print the results so far; run nothing."
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
    return args, extras


def main(argv: Sequence[str] | None = None) -> None:
    args, extras = parse_args(argv)
    try:
        sweep = build_sweep(args, extras)
    except (ValueError, FileNotFoundError, OSError) as error:
        cli.fail(error)
    except Exception as error:  # a config file that does not load: its error, on one line
        cli.fail(f"--config={args.config}: {type(error).__name__}: {error}")
    if args.report:
        if not sweep.workdir.is_dir():
            for index, trial in enumerate(sweep.trials):
                print(f"{sweep.trial_dir(index).name} not run: {describe(trial)}")
            return
        lines = write_summary(sweep)
        write_plots(sweep, lines)
        print_results(sweep, lines)
        return
    try:
        with sweep_lock(sweep.workdir, shared=args.trial is not None):
            check_spec(sweep)
            stopped_by, lines = run_sweep(sweep, args)
    except ValueError as error:
        cli.fail(error)
    end(sweep, args, stopped_by, lines)


def run_sweep(sweep: Sweep, args: argparse.Namespace) -> tuple[str | None, list[dict[str, Any]]]:
    """Runs the trials not finished yet; returns (the signal that stopped it, the summary)."""
    keep = ("done", "pruned") if args.retry_failed else FINISHED
    indices = [args.trial] if args.trial is not None else range(len(sweep.trials))
    to_run = [i for i in indices if (read_record(sweep, i) or {}).get("status") not in keep]
    kind = "grid" if args.grid else f"random search, seed {args.seed}"
    print(
        f"Sweep of {len(sweep.trials)} trials ({kind}) in {sweep.workdir}: "
        f"{len(to_run)} to run, {len(indices) - len(to_run)} finished before.",
        flush=True,
    )
    stopped_by = run_trials(sweep, to_run, parallel=args.parallel, gpus=args.gpus, prune=args.prune)
    return stopped_by, write_summary(sweep)


def end(sweep: Sweep, args: argparse.Namespace, stopped_by: str | None, lines: list[dict]) -> None:
    """Plots, the table, the winner, and how the sweep ended."""
    if args.trial is not None:
        status = next((line["status"] for line in lines if line["trial"] == args.trial), "not run")
        print(
            f"Trial {args.trial}: {status}. All trials' results: the same command without "
            "--trial, with --report."
        )
        return
    try:
        write_plots(sweep, lines)
    except (OSError, ValueError) as error:
        print(f"warning: no plots ({cli_text(error)})", file=sys.stderr)
    print_results(sweep, lines)
    done = sum(line["status"] == "done" for line in lines)
    unfinished = [line for line in lines if line["status"] == "stopped"]
    unfinished_count = len(sweep.trials) - sum(line["status"] in FINISHED for line in lines)
    if stopped_by is not None or unfinished:
        how = f"Stopped by {stopped_by}" if stopped_by else "Not finished"
        print(
            f"{how}: {done} of {len(sweep.trials)} trials done, {unfinished_count} to run or "
            "resume (stopped trials keep their checkpoints). Run the same command to resume."
        )
        return
    if done == 0:
        first = next((line["reason"] for line in lines if line["reason"]), "no metric")
        cli.fail(f"no trial of {sweep.workdir} finished; the first reason: {first}", status=1)
    if all(line["final"] is None for line in lines if line["status"] == "done"):
        keys = sorted({k for r in read_reports(sweep.trial_dir(lines[0]["trial"])) for k in r})
        cli.fail(f"the trials report no {sweep.metric}; pass --metric= one of {', '.join(keys)}.")


def cli_text(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    main()
