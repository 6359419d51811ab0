"""The training loop. `train_and_evaluate` is the entry point (`python -m train` calls it, and so
can a notebook); the functions below it follow its steps in order: check, build, restore, step
(log, evaluate, save), sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from train import checkpoint, data, metrics, optim, parallel, process, signals, steps
from train.parallel import Compiled
from train.state import (
    TrainState,
    create_train_state,
    param_logical_axes,
)

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # a jax.monitoring event
# The intervals (fields of config.train) at which the loop must see the state between calls.
CALL_BOUNDARIES = ("log_every", "checkpoint_every")
# Step counts of config.train, what each counts (for the error message), all integers >= 1.
STEP_COUNTS = {
    "num_steps": "steps to train",
    "log_every": "steps between reports; the last step always reports",
    "eval_every": "steps between evaluations; the last step always evaluates",
    "checkpoint_every": "steps between checkpoints; the last step always saves",
}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    model: nn.Module | None = None,
    on_event: Callable[[str, int], None] | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

    SIGTERM or SIGINT stops the run after the current step (the current call of
    `train.steps_per_call` steps) with a checkpoint; calling this again with the same workdir
    resumes it. Changes nothing process-wide (environment, `jax.config`, signal handlers after
    it returns); the command line's process settings are in `train.process`.

    Args:
      config: a full config (`model`, `data`, `optimizer`, `train`, `seed`).
      workdir: receives config.json, metrics.jsonl, TensorBoard files and checkpoints.
      model: a Flax module to train instead of the one `config.model` names (for a module of
        your own; it takes `(inputs, train=...)` and returns logits).
      on_event: called as `on_event(moment, step)` at fixed moments of the run, for tests that
        stop or kill it at an exact step (see `run_steps`); None: nothing is called.

    Returns:
      (the final train state, the scalars of the last report).
    """
    # Check: bad input fails here, before anything is built or written.
    workdir = pathlib.Path(workdir)
    check_train_config(config)
    info = data.load_info(config.data)
    data.eval_batches(config.data)  # a bad eval split fails now, not after training

    # Build: the state laid out over the mesh; the base key is passed unchanged to every step.
    mesh = make_mesh(config)
    init_rng, step_rng, sample_rng = split_keys(config.seed, mesh)
    state, shardings = init_state(config, mesh, init_rng, model=model)
    check_model_fits_data(config, state, info)
    # Only once model and data are known to be good, so bad input leaves no trace; a second run
    # on the same workdir stops here.
    if jax.process_index() == 0:
        check_workdir_model(config, workdir)

    # Restore and step: log, evaluate and save on schedule until the last step or a stop signal.
    with open_run(config, workdir, mesh, state, shardings, step_rng, on_event) as run:
        state, scalars, last_step = run_steps(run)
        if last_step < config.train.num_steps:
            run.manager.wait_until_finished()
            logging.warning(
                "Stopped by %s after step %d; checkpoint saved in %s. Run the same command to "
                "resume.",
                run.received[0],
                last_step,
                run.manager.directory,
            )
            return state, scalars
        if run.start_step >= config.train.num_steps:
            logging.info("%s already holds a finished run of %d steps.", workdir, last_step)
            scalars = evaluate(run.compiled, run.compiled.to_run(state), config)

    # Sample: what the task writes after training (`train.tasks`): a language model a few texts,
    # to the log and samples.txt, an encoder-decoder a few translations of held-out sources.
    if config.train.sample_lines > 0:
        state.task.after_training(config, state, info, sample_rng, workdir)
    logging.info("Finished at step %d; %s.", last_step, process.describe_peak_memory())
    return state, scalars


@dataclasses.dataclass
class Run:
    """What `run_steps` works with, opened (and closed) by `open_run`."""

    config: ml_collections.ConfigDict
    compiled: Compiled  # the train and eval steps
    state: TrainState  # where the steps start: fresh, or restored from a checkpoint
    start_step: int
    step_rng: jax.Array  # the base key of every step
    window: ReportWindow  # the steps since the last report (restored ones included)
    train_iter: Any  # this process's training batches, at start_step
    manager: Any  # the orbax manager of WORKDIR/checkpoints
    best: Any  # the manager of WORKDIR/best (`train.keep_best`), or None
    writer: metrics.MetricWriter | None  # metrics.jsonl and TensorBoard (the chief process)
    received: list[str]  # the stop signals received so far
    profile_dir: pathlib.Path
    on_event: Callable[[str, int], None]

    def should_stop(self) -> bool:
        return stop_requested(self.received)


@contextlib.contextmanager
def open_run(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    mesh: Mesh,
    state: TrainState,
    shardings: Any,
    step_rng: jax.Array,
    on_event: Callable[[str, int], None] | None = None,
) -> Iterator[Run]:
    """Locks `workdir`, writes config.json, restores the newest checkpoint, compiles the steps
    and yields the `Run`; on leaving, even on error, saves in flight reach the disk, the managers,
    the metric writer and the lock are closed and the stop-signal handlers restored."""
    is_chief = jax.process_index() == 0
    with contextlib.ExitStack() as resources:  # closed in reverse order: the lock last
        if is_chief:
            resources.callback(WorkdirLock(workdir).release)
            write_config(config, workdir)
        manager = checkpoint.make_manager(
            workdir / "checkpoints", keep=config.train.checkpoint_keep
        )
        resources.callback(close_manager, manager)
        best = None
        if keep_best(config.train):  # the parameters of the best evaluation, in WORKDIR/best
            best = checkpoint.make_best_manager(workdir / "best", keep_best(config.train))
            resources.callback(close_manager, best, keep_best(config.train))

        # With data.on_device the training split lives in device memory and the host sends
        # indices; a streamed split (data.in_memory) is never held whole, so its batches come
        # from the host.
        on_device = (
            config.data.on_device
            and config.train.parallelism == "jit"
            and data.in_memory(config.data)
        )
        had_checkpoints = bool(manager.all_steps())
        train_iter = new_train_iterator(config, on_device)
        start_step, state, step_rng, window = restore_run(manager, state, step_rng, train_iter)
        if had_checkpoints and start_step == 0:
            train_iter = new_train_iterator(config, on_device)  # a failed restore moved it

        compiled = compile_steps(
            config, mesh, shardings, on_device, get_steps_per_call(config.train)
        )
        writer = None
        if is_chief:
            writer = resources.enter_context(
                contextlib.closing(metrics.MetricWriter(workdir, start_step))
            )
        received = resources.enter_context(signals.stop_signals())
        yield Run(
            config=config,
            compiled=compiled,
            state=state,
            start_step=start_step,
            step_rng=step_rng,
            window=window,
            train_iter=train_iter,
            manager=manager,
            best=best,
            writer=writer,
            received=received,
            profile_dir=workdir / "profile",
            on_event=on_event or (lambda moment, step: None),
        )


def close_manager(manager: Any, best_metric: str = "") -> None:
    """Waits for a save in flight to reach the disk, then closes `manager` (with `best_metric`:
    the best-parameters manager, whose kept step is logged)."""
    manager.wait_until_finished()
    if best_metric:
        log_best(manager, best_metric)
    manager.close()


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The device mesh of `config.train.mesh`, logged; pmap refuses a sharded state."""
    mesh = parallel.make_mesh(config.train.mesh)
    logging.info(
        "Devices: %d x %s over %d process(es); mesh %s.",
        jax.device_count(),
        jax.devices()[0].platform,
        jax.process_count(),
        dict(mesh.shape),
    )
    if config.train.parallelism == "pmap" and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
        raise ValueError(
            "train.parallelism='pmap' replicates the state; FSDP and tensor parallelism need 'jit'."
        )
    return mesh


def split_keys(seed: int, mesh: Mesh) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The run's keys for initialisation, the steps and sampling: made under jit, so they are
    global arrays replicated over the mesh (as checkpoints hold them)."""
    return jax.jit(
        lambda: tuple(jax.random.split(jax.random.key(seed), 3)),
        out_shardings=NamedSharding(mesh, P()),
    )()


def keep_best(train_config: ml_collections.ConfigDict) -> str:
    """`train.keep_best`: the eval metric whose best step's parameters are kept, or ""."""
    return train_config.get("keep_best", "")  # configs written before the field have none


def check_best_metric(metric: str, scalars: dict[str, float]) -> None:
    if metric not in scalars:
        known = sorted(k for k in scalars if k.startswith("eval/"))
        raise ValueError(
            f"train.keep_best={metric!r} is not an evaluation metric of this run; known: {known}."
        )


def log_best(best: Any, metric: str) -> None:
    step = best.best_step()
    if step is not None:
        where = best.directory
        logging.info("Kept the parameters of step %d, the best %s, in %s.", step, metric, where)


def check_train_config(config: ml_collections.ConfigDict) -> None:
    """One-line errors for `config.train` values the loop cannot run with."""
    check_batch_size(config)
    check_step_counts(config.train)
    get_steps_per_call(config.train)
    metric = keep_best(config.train)
    if metric and not (isinstance(metric, str) and metric.startswith("eval/")):
        raise ValueError(
            f"train.keep_best must be an evaluation metric such as 'eval/accuracy' or 'eval/loss' "
            f"(or '' to keep none), got {metric!r}; set --config.train.keep_best."
        )
    if config.train.parallelism not in ("jit", "pmap"):
        raise ValueError(
            f"Unknown train.parallelism {config.train.parallelism!r}; use 'jit' or 'pmap'."
        )


def check_batch_size(config: ml_collections.ConfigDict) -> None:
    """The global batch must split evenly over processes and devices."""
    batch_size, num_devices = config.data.batch_size, jax.device_count()
    if batch_size % num_devices:
        raise ValueError(
            f"data.batch_size={batch_size} does not divide over {num_devices} devices; "
            f"set --config.data.batch_size to a multiple of {num_devices}."
        )


def check_step_counts(train_config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError unless every field of STEP_COUNTS is an integer >= 1."""
    for name, meaning in STEP_COUNTS.items():
        value = train_config[name]
        if not _is_count(value):
            raise ValueError(
                f"train.{name} must be an integer >= 1 ({meaning}), got {value!r}; "
                f"set --config.train.{name}."
            )


def get_steps_per_call(train_config: ml_collections.ConfigDict) -> int:
    """`train.steps_per_call` (absent: 1), checked."""
    value = train_config.get("steps_per_call", 1)
    if not _is_count(value):
        raise ValueError(f"train.steps_per_call must be an integer >= 1, got {value!r}.")
    return value


def _is_count(value: Any) -> bool:
    """Whether `value` is an int >= 1 (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_model_fits_data(config: ml_collections.ConfigDict, state: TrainState, info) -> None:
    """One-line errors for a model whose outputs cannot cover the data's classes or vocabulary
    (the state's task checks the shapes of the logits)."""
    inputs = state.task.example_inputs(config)
    logits = jax.eval_shape(
        lambda p: state.apply_fn({"params": p}, *inputs, train=False), state.params
    )
    state.task.check_fits(config, logits, info)


def init_state(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    rng: jax.Array,
    inputs: Any = None,
    *,
    model: nn.Module | None = None,
) -> tuple[TrainState, Any]:
    """A fresh TrainState created directly with its shardings, and those shardings.

    `inputs` is an example batch of model inputs (default: `state.example_inputs(config)`), for
    models fed something other than their data set gives, like the benchmark's float-feature LSTM;
    `model` replaces the module `config.model` names.
    """
    create = functools.partial(create_train_state, config, inputs=inputs, model=model)
    abstract = jax.eval_shape(create, rng)
    parallel.check_tensor_parallel(config.model, mesh)
    axes = param_logical_axes(config, inputs, model=model)
    shardings = parallel.state_shardings(abstract, mesh, axes)
    # jit sees the arrays only: the state's static parts (apply_fn, tx) come from `abstract`,
    # so the state and its shardings have the same tree structure.
    leaves = jax.jit(
        lambda rng: jax.tree.leaves(create(rng)), out_shardings=jax.tree.leaves(shardings)
    )(rng)
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves), shardings


class WorkdirLock:
    """An exclusive lock on `workdir` for one run, held until `release()`.

    An `fcntl.flock` on `workdir/.lock`, which the kernel drops when the process ends however it
    ends, so a killed run never leaves it stuck; the file names the holder for the next run's
    message. Creating it is also the first write to the workdir: one line if that fails. (Where
    `fcntl` is missing, Windows, runs are not locked.)
    """

    def __init__(self, workdir: pathlib.Path):
        self.file = None
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            file = (workdir / ".lock").open("a+")
        except OSError as error:
            raise ValueError(
                f"Cannot write to workdir {workdir} ({error.strerror}); pass a --workdir you can "
                "write to."
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.seek(0)
                holder = file.read().strip() or "another process"
                file.close()
                raise ValueError(
                    f"{workdir} is in use by another run ({holder}); wait for it to finish or "
                    "pass another --workdir."
                ) from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            if fcntl is not None:
                fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def check_workdir_model(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses a workdir whose config.json holds a run of a different model (before anything is
    written there). An unreadable config.json is left to `write_config`."""
    try:
        previous = json.loads((workdir / "config.json").read_text())["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable
        return
    if previous != config.model.name:
        raise ValueError(
            f"{workdir} holds a run of model {previous!r}, not {config.model.name!r}; pass a "
            "different --workdir."
        )


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Writes config.json, whole or not at all (written aside, then renamed over the old one).

    An unreadable config.json (empty, cut short) is rewritten from this run's config, with a
    warning: the checkpoints still refuse another model's parameters.
    """
    path = workdir / "config.json"
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except (ValueError, UnicodeDecodeError) as error:
        logging.warning("%s was unreadable (%s); rewriting it from this run's config.", path, error)
    partial = path.with_name("config.json.partial")
    partial.write_text(config.to_json_best_effort(indent=2) + "\n")
    partial.replace(path)


def restore_run(manager, state: TrainState, rng: jax.Array, train_iter):
    """Restores the newest readable checkpoint onto this run's shapes and shardings.

    Returns (start step, state, base key, unreported window); (0, state, rng, a new window) if
    there is no checkpoint. `train_iter` is moved to the checkpoint's position in place. Steps
    found damaged are moved aside; a step that fails to restore for any other reason raises
    `checkpoint.RestoreError` (one line) and moves nothing (`checkpoint.restore_newest`).
    """
    target = checkpoint.abstract_like(saved_form(state, rng, ReportWindow.new(0)))
    restored = checkpoint.restore_newest(manager, target, train_iter)
    if restored is None:
        return 0, state, rng, ReportWindow.new(0)
    step, saved = restored
    state = state.replace(step=saved["step"], params=saved["params"], opt_state=saved["opt_state"])
    logging.info("Resumed from checkpoint step %d in %s.", step, manager.directory)
    window = ReportWindow.from_saved(saved["report"])
    return step, state, jax.random.wrap_key_data(saved["rng"]), window


def saved_form(state: TrainState, rng: jax.Array, window: ReportWindow) -> dict[str, Any]:
    """What a checkpoint holds: the state's arrays, the run's base key, and the metric sums of
    the steps since the last report, so that a resumed run's next report covers the same steps
    as an uninterrupted run's."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(rng),
        "report": window.saved(),
    }


class ReportWindow:
    """The steps since the last report: their metric sums (on device until a report) and the
    first step's number."""

    def __init__(self, sums: dict[str, Any] | None, first_step: int):
        self.sums, self.first_step = sums, first_step
        self.started = time.perf_counter()  # for steps/s: the steps this process ran
        self.steps_run = 0

    @classmethod
    def new(cls, last_reported_step: int) -> ReportWindow:
        return cls(None, last_reported_step + 1)

    def add(self, step_sums: dict[str, Any], num_steps: int) -> None:
        self.sums = metrics.accumulate(self.sums, step_sums)
        self.steps_run += num_steps

    def steps_per_second(self) -> float:
        return self.steps_run / max(time.perf_counter() - self.started, 1e-9)

    def saved(self) -> dict[str, np.ndarray]:
        """Host arrays: the sums (zeros before the first step) and the first step."""
        sums = jax.device_get(self.sums) if self.sums is not None else {}
        saved = {name: np.float32(sums.get(name, 0.0)) for name in steps.TRAIN_SUMS}
        return {"sums": saved, "first_step": np.int64(self.first_step)}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> ReportWindow:
        sums = {name: np.asarray(value, np.float32) for name, value in saved["sums"].items()}
        return cls(sums if float(sums["count"]) > 0 else None, int(saved["first_step"]))


def new_train_iterator(config: ml_collections.ConfigDict, indices_only: bool):
    """This process's training batches from the start (`data.train_iterator`)."""
    return data.train_iterator(
        config.data,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        indices_only=indices_only,
    )


def compile_steps(
    config: ml_collections.ConfigDict, mesh: Mesh, shardings: Any, on_device: bool, per_call: int
) -> Compiled:
    """The train and eval steps compiled as `config.train` asks: jit over `mesh` (the training
    split in device memory when `on_device`) or pmap, `per_call` steps per call."""
    accum = config.train.grad_accum_steps
    uneven = [
        f"train.{name}={config.train[name]}"
        for name in CALL_BOUNDARIES
        if config.train[name] % per_call
    ]
    if per_call > 1 and uneven:
        logging.warning(
            "train.steps_per_call=%d does not divide %s: the steps that a whole call would carry "
            "past a report or save run one per call. Pick a divisor for full speed.",
            per_call,
            " and ".join(uneven),
        )
    if config.train.parallelism == "pmap":
        return parallel.compile_pmap(grad_accum_steps=accum, steps_per_call=per_call)
    examples, decode = data.device_examples(config.data) if on_device else (None, None)
    return parallel.compile_jit(
        mesh,
        shardings,
        grad_accum_steps=accum,
        train_examples=examples,
        decode=decode,
        steps_per_call=per_call,
    )


def run_steps(run: Run) -> tuple[TrainState, dict[str, float], int]:
    """Steps from `run.start_step` to `config.train.num_steps`: log, evaluate and save on schedule.

    Returns (state, scalars of the last report, the last step run). Stops early, with a
    checkpoint, once `run.should_stop()` is true (checked after every call: every step, or every
    `train.steps_per_call` steps). With `train.profile_steps` > 0, steps
    `train.profile_first_step` onwards are recorded by JAX's profiler into `run.profile_dir`.
    With a `run.best` manager (`train.keep_best`), every evaluation offers the parameters to it.
    `run.on_event(moment, step)` is called after each call's steps ("step", before the stop is
    asked, so a stop signal sent there stops the run after that step), after a report was written
    ("report") and after the async save of a checkpoint was started ("save").
    """
    config, compiled, train_iter = run.config, run.compiled, run.train_iter
    trace = StepTrace(config.train, run.profile_dir)
    window = run.window
    _, schedule = optim.make_optimizer(config.optimizer, config.train.num_steps)
    num_steps = config.train.num_steps
    run_state = compiled.to_run(run.state)
    scalars: dict[str, float] = {}
    step = run.start_step
    progress = tqdm(
        total=num_steps,
        initial=step,
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    while step < num_steps:
        count = steps_in_call(step, config.train) if compiled.train_steps else 1
        if count == 1:
            train, batch = compiled.train, compiled.put_batch(next(train_iter))
        else:
            batches = stack([next(train_iter) for _ in range(count)])
            train, batch = compiled.train_steps, compiled.put_batches(batches)
        trace.before(step + 1, step + count)
        if step == run.start_step:
            run_state, step_sums = timed_first_step(train, run_state, batch, run.step_rng, count)
        else:
            run_state, step_sums = train(run_state, batch, run.step_rng)
        trace.after(step + count, step_sums)
        window.add(step_sums, count)  # stays on device until a report
        step += count
        progress.update(count)
        run.on_event("step", step)

        is_last = step == num_steps
        stop = run.should_stop()
        # Reports fall on step numbers alone (log and checkpoint steps, the last step), so a run
        # stopped and resumed reports the same steps as one that never stopped; a stop saves the
        # unreported sums instead. Either way the sums are checked before a checkpoint is written.
        is_checkpoint_step = step % config.train.checkpoint_every == 0 or is_last
        if step % config.train.log_every == 0 or is_checkpoint_step:
            scalars = metrics.summarize(window.sums, "train")
            metrics.check_finite(scalars, window.first_step, step)
            scalars["train/steps_per_second"] = window.steps_per_second()
            scalars["train/learning_rate"] = float(schedule(step - 1))
            if step % config.train.eval_every == 0 or is_last:
                scalars.update(evaluate(compiled, run_state, config))
                if run.best is not None:
                    check_best_metric(keep_best(config.train), scalars)
                    params = compiled.from_run(run_state).params
                    checkpoint.save_best(run.best, step, params, scalars)
            if run.writer:
                run.writer.write(step, scalars)
            progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
            window = ReportWindow.new(step)
            run.on_event("report", step)
        elif stop:
            metrics.check_finite(metrics.summarize(window.sums, "train"), window.first_step, step)
        if is_checkpoint_step or stop:
            saved = saved_form(compiled.from_run(run_state), run.step_rng, window)
            checkpoint.save(run.manager, step, saved, train_iter)
            run.on_event("save", step)
        if stop:
            break
    trace.close()
    progress.close()
    return compiled.from_run(run_state), scalars, step


class StepTrace:
    """A JAX profiler trace of `train.profile_steps` steps from `train.profile_first_step` on.

    The trace (an `.xplane.pb` under `directory/plugins/profile/<time>/`) opens in XProf or in
    TensorBoard's profile plugin: `tensorboard --logdir WORKDIR/profile`. Steps are numbered from
    1; pick a first step after the compile of step 1. A call of several steps
    (`train.steps_per_call`) is recorded whole: the trace spans every call that holds a step asked
    for, so it may begin before `profile_first_step` and end after the last step asked for.
    """

    def __init__(self, train_config: ml_collections.ConfigDict, directory: pathlib.Path | None):
        self.first, self.count = train_config.profile_first_step, train_config.profile_steps
        self.last = self.first + self.count - 1
        self.directory, self.active, self.done = directory, False, False

    def before(self, first_step: int, last_step: int) -> None:
        """Starts the trace if the call about to run steps `first_step`..`last_step` holds one
        to record."""
        wanted = self.count > 0 and self.directory is not None and not self.done
        if wanted and not self.active and first_step <= self.last and last_step >= self.first:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        """Stops the trace once `step` (just dispatched) is at or past the last one to record."""
        if self.active and step >= self.last:
            jax.block_until_ready(outputs)  # the steps' device work belongs in the trace
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True
            logging.info(
                "Profiler trace of steps %d-%d in %s.", self.first, self.last, self.directory
            )


def steps_in_call(step: int, train_config: ml_collections.ConfigDict) -> int:
    """How many steps the call after `step` runs: `train.steps_per_call` or 1.

    Calls of several steps start at multiples of `steps_per_call` and end at or before the next
    log, checkpoint or last step, which the loop only sees between calls; the steps that do not fit
    run one per call. Only step numbers decide, so a resumed run calls the same steps together as
    an uninterrupted one (and gives bitwise the same state).
    """
    count = get_steps_per_call(train_config)
    if count == 1 or step % count or step + count > train_config.num_steps:
        return 1
    for name in CALL_BOUNDARIES:
        every = train_config[name]
        if (step // every + 1) * every < step + count:  # a log or save inside the call
            return 1
    return count


def stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Host batches stacked along a new leading axis: `[len(batches), batch, ...]`."""
    return {k: np.stack([batch[k] for batch in batches]) for k in batches[0]}


def timed_first_step(train: Callable, run_state, batch, rng, num_steps: int = 1):
    """Runs the first call of `train` (`num_steps` steps), logging how long compiling and running
    it took, and whether the executable came from the persistent compilation cache."""
    start = time.perf_counter()
    with monitoring_events() as events:
        run_state, sums = train(run_state, batch, rng)
        jax.block_until_ready(sums)
    source = "from the compilation cache" if CACHE_HIT_EVENT in events else "compiled"
    what = "First step" if num_steps == 1 else f"First {num_steps} steps (one call)"
    logging.info("%s: %.2f s (train step %s).", what, time.perf_counter() - start, source)
    return run_state, sums


@contextlib.contextmanager
def monitoring_events() -> Iterator[list[str]]:
    """The names of the `jax.monitoring` events recorded during the block, such as
    `CACHE_HIT_EVENT` when an executable comes from the persistent compilation cache."""
    events: list[str] = []
    recording = [True]

    def listen(event: str, **kwargs) -> None:
        del kwargs
        if recording[0]:
            events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        yield events
    finally:
        recording[0] = False
        # JAX 0.7 (Colab's) has no public way to remove a listener: there it stays, inert.
        unregister = getattr(jax.monitoring, "unregister_event_listener", None)
        if unregister is not None:
            unregister(listen)


def evaluate(
    compiled: Compiled, run_state: Any, config: ml_collections.ConfigDict
) -> dict[str, float]:
    """One pass over `config.data.eval_split`; returns `eval/loss` and `eval/accuracy`."""
    total = None
    batches = data.eval_batches(
        config.data, process_index=jax.process_index(), process_count=jax.process_count()
    )
    for batch in batches:
        total = metrics.accumulate(total, compiled.eval(run_state, compiled.put_batch(batch)))
    return metrics.summarize(total, "eval", run_state.task.eval_averages)


def stop_requested(received: list[str]) -> bool:
    """True once any process got a stop signal: all processes must stop after the same step."""
    if jax.process_count() == 1:
        return bool(received)
    flags = multihost_utils.process_allgather(np.array(bool(received)))  # a host sync per step
    return bool(np.any(flags))
