"""The training loop: build, restore, step, log, evaluate, save. `python -m train` calls
`train_and_evaluate`; so can a notebook."""

import contextlib
import functools
import gc
import json
import os
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from train import checkpoint, cpu_devices, data, host_memory, metrics, optim, sample, steps
from train.state import TrainState, create_train_state, example_inputs

PMAP_AXIS = "batch"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # a jax.monitoring event


class Compiled(NamedTuple):
    """The step functions compiled for one way of using the devices, and the conversions they need.

    The loop keeps the state in the form `train` takes (`to_run` / `from_run` convert from and to
    the canonical form: global arrays laid out over the mesh, which is what checkpoints hold).
    """

    put_batch: Callable[[dict[str, np.ndarray]], Any]
    train: Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]]
    eval: Callable[[Any, Any], dict[str, jax.Array]]
    to_run: Callable[[TrainState], Any]
    from_run: Callable[[Any], TrainState]
    # Several steps per call (`steps.train_steps`) on batches stacked `[steps, batch, ...]`, as
    # `put_batches` lays them out; None where the loop was compiled for one step per call.
    put_batches: Callable[[dict[str, np.ndarray]], Any] | None = None
    train_steps: Callable[[Any, Any, jax.Array], tuple[Any, dict[str, jax.Array]]] | None = None


BATCH_AXES = ("data", "fsdp")  # the batch is split over both mesh axes


def serializes_collectives(devices) -> bool:
    """Whether steps over `devices` must run one at a time: several XLA:CPU devices in a process.

    XLA:CPU runs the program of every virtual device (`--xla_force_host_platform_device_count`)
    on one shared thread pool, and an all-reduce holds a thread until all devices reach it. With
    several steps queued ahead, the devices' programs can take every thread while one device's
    share of the all-reduce still waits for one: the rendezvous then aborts the process after
    40 s. Seen here in about one of seven 200-step trainings of the tiny Transformer on 4 CPU
    devices; in none of 72 trainings of the four tiny configs (nor 24 bare 200-step loops) once
    each step was waited for. GPUs and TPUs run each device's program on its own stream, so they
    keep queuing steps ahead.
    """
    devices = list(devices)
    return len(devices) > 1 and all(device.platform == "cpu" for device in devices)


def one_at_a_time(step_fn: Callable) -> Callable:
    """`step_fn`, returning only once its results are computed (see `serializes_collectives`)."""

    @functools.wraps(step_fn)
    def call(*args):
        return jax.block_until_ready(step_fn(*args))

    if hasattr(step_fn, "lower"):
        call.lower = step_fn.lower  # ahead-of-time compilation stays available
    return call


def make_mesh(
    mesh_config: ml_collections.ConfigDict | None = None, devices: list | None = None
) -> Mesh:
    """A 2-D device mesh with axes `data` and `fsdp` (see `config.train.mesh`).

    Args:
      mesh_config: `data` and `fsdp` axis sizes; -1 takes the devices left over. None: all data.
      devices: the devices to use; default every device of every process.
    """
    devices = jax.devices() if devices is None else devices
    data, fsdp = (-1, 1) if mesh_config is None else (mesh_config.data, mesh_config.fsdp)
    if data == -1 and fsdp != -1 and fsdp > 0:
        data = len(devices) // fsdp
    elif fsdp == -1 and data > 0:
        fsdp = len(devices) // data
    if data < 1 or fsdp < 1 or data * fsdp != len(devices):
        raise ValueError(
            f"train.mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} does not cover the "
            f"{len(devices)} devices; make the product {len(devices)}, or set one of them to -1."
        )
    return Mesh(np.array(devices).reshape(data, fsdp), BATCH_AXES)


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Where one state array lives: FSDP shards its largest axis that `fsdp_size` divides over the
    `fsdp` mesh axis; scalars, small or indivisible arrays, and everything when fsdp is 1, are
    replicated. XLA gathers the shards where a layer needs them."""
    divisible = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if fsdp_size == 1 or not divisible:
        return P()
    axis = max(divisible, key=lambda a: shape[a])
    return P(*(["fsdp" if a == axis else None for a in range(len(shape))]))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every array of `state` (params and optimizer state alike)."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(jnp.shape(x), fsdp_size)), state)


def gather_rows(examples: dict[str, jax.Array], indices: jax.Array) -> dict[str, jax.Array]:
    """Rows `indices` `[b]` of every array in `examples`, inside a compiled step (see compile_jit).

    Gathered from a 2-D view: XLA:CPU's gather is faster on `[n, features]` rows.
    """
    return {
        k: jnp.take(v.reshape(len(v), -1), indices, axis=0, mode="clip").reshape(
            indices.shape + v.shape[1:]
        )
        for k, v in examples.items()
    }


def compile_jit(
    mesh: Mesh,
    state_sharding: Any,
    grad_accum_steps: int = 1,
    train_examples: dict[str, np.ndarray] | None = None,
    decode: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
    steps_per_call: int = 1,
) -> Compiled:
    """jit over the mesh: the batch is split along its first axis over all devices, the state is
    replicated (data parallel) or sharded over `fsdp` (see `param_spec`), and XLA inserts the
    collectives. The state is donated: its buffers are reused for the new state.

    With `train_examples` (every training example, as `data.device_examples` gives them, with its
    `decode`) the split is copied to every device once, and `train` takes batches of example
    *indices* (`{"indices": int32 [b]}`, from `data.train_iterator(..., indices_only=True)`) and
    gathers (and decodes) the examples inside the compiled step: per step, one small array crosses
    from the host instead of the whole batch. On this 2-core CPU that is what lets a 0.6 ms MLP
    step run at the speed of a batch already in memory; on an accelerator it takes the
    host-to-device copy off every step. `eval` still takes host batches.

    With `steps_per_call` > 1, `train_steps` runs that many steps in one call on batches stacked
    `[steps_per_call, batch, ...]` (`put_batches`; with `train_examples`, stacked indices), and
    `train` still runs one.
    """
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    stacked_sharding = NamedSharding(mesh, P(None, BATCH_AXES))  # [steps, batch, ...]
    step = functools.partial(steps.train_step, grad_accum_steps=grad_accum_steps)
    shardings = dict(out_shardings=(state_sharding, replicated), donate_argnums=0)

    def jit_steps(step_fn, data_sharding, *, examples=None):
        """jit of `step_fn(state, batch, rng)`, or of `step_fn(state, examples, batch, rng)` with
        `examples` bound."""
        if examples is None:
            return jax.jit(
                step_fn, in_shardings=(state_sharding, data_sharding, replicated), **shardings
            )
        compiled = jax.jit(
            step_fn,
            in_shardings=(state_sharding, replicated, data_sharding, replicated),
            **shardings,
        )
        return lambda state, batch, rng: compiled(state, examples, batch, rng)

    train_many = None
    if train_examples is None:
        train = jit_steps(step, batch_sharding)
        if steps_per_call > 1:
            train_many = jit_steps(
                functools.partial(steps.train_steps, step=step), stacked_sharding
            )
    else:

        def gather_and_train(state, examples, index_batch, rng):
            batch = gather_rows(examples, index_batch["indices"])
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)  # rows stay local
            if decode is not None:
                batch = decode(batch)
            return step(state, batch, rng)

        def gather_and_train_steps(state, examples, index_batches, rng):
            def gather_and_step(state, index_batch, rng):
                return gather_and_train(state, examples, index_batch, rng)

            return steps.train_steps(state, index_batches, rng, step=gather_and_step)

        on_device = jax.block_until_ready(
            {  # the same arrays on every device; valid with many processes too
                k: jax.make_array_from_callback(v.shape, replicated, lambda index, v=v: v[index])
                for k, v in train_examples.items()
            }
        )
        train = jit_steps(gather_and_train, batch_sharding, examples=on_device)
        if steps_per_call > 1:
            train_many = jit_steps(gather_and_train_steps, stacked_sharding, examples=on_device)

    evaluate = jax.jit(
        steps.eval_step, in_shardings=(state_sharding, batch_sharding), out_shardings=replicated
    )

    def put(sharding):
        def put_batch(batch):
            if mesh.size == 1:
                # jit copies numpy arguments to their device itself, about 10x faster per array
                # than a separate device_put (9 us against 70 us on this CPU).
                return batch
            # Each process holds its own rows; together they form the global batch.
            return {
                k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
            }

        return put_batch

    if serializes_collectives(mesh.devices.flat):
        train, evaluate = one_at_a_time(train), one_at_a_time(evaluate)
        if train_many:
            train_many = one_at_a_time(train_many)
    identity = lambda state: state  # noqa: E731
    put_batches = put(stacked_sharding) if train_many else None
    return Compiled(
        put(batch_sharding), train, evaluate, identity, identity, put_batches, train_many
    )


def compile_pmap(
    devices: list | None = None, grad_accum_steps: int = 1, steps_per_call: int = 1
) -> Compiled:
    """The same pure steps under jax.pmap: one state copy per local device, gradients and metric
    sums combined with psum over the `batch` axis. `steps_per_call` as in `compile_jit`."""
    devices = jax.local_devices() if devices is None else devices
    step = functools.partial(
        steps.train_step, axis_name=PMAP_AXIS, grad_accum_steps=grad_accum_steps
    )

    def pmap_train(step_fn):
        return jax.pmap(
            step_fn,
            axis_name=PMAP_AXIS,
            in_axes=(0, 0, None),
            donate_argnums=0,
            devices=devices,
        )

    train = pmap_train(step)
    train_many = None
    if steps_per_call > 1:
        train_many = pmap_train(functools.partial(steps.train_steps, step=step))
    evaluate = jax.pmap(
        functools.partial(steps.eval_step, axis_name=PMAP_AXIS),
        axis_name=PMAP_AXIS,
        devices=devices,
    )

    def put_batch(batch):
        # [local_batch, ...] -> [local_devices, local_batch / local_devices, ...]
        return {k: v.reshape(len(devices), -1, *v.shape[1:]) for k, v in batch.items()}

    def put_batches(batches):
        # [steps, local_batch, ...] -> [local_devices, steps, local_batch / local_devices, ...]
        return {
            k: np.swapaxes(v.reshape(v.shape[0], len(devices), -1, *v.shape[2:]), 0, 1)
            for k, v in batches.items()
        }

    def first(tree):  # metrics were psum'd, so every device holds the same values
        return jax.tree.map(lambda x: x[0], tree)

    per_device = NamedSharding(Mesh(np.array(devices), (PMAP_AXIS,)), P(PMAP_AXIS))

    def replicate(tree):  # one copy per local device, stacked on a new leading axis
        return jax.tree.map(
            lambda x: jax.device_put(
                jnp.broadcast_to(x, (len(devices), *jnp.shape(x))), per_device
            ),
            tree,
        )

    if serializes_collectives(devices):
        train, evaluate = one_at_a_time(train), one_at_a_time(evaluate)
        if train_many:
            train_many = one_at_a_time(train_many)

    def metrics_once(train_fn):
        def call(state, batch, rng):
            state, sums = train_fn(state, batch, rng)
            return state, first(sums)

        return call

    return Compiled(
        put_batch,
        metrics_once(train),
        lambda state, batch: first(evaluate(state, batch)),
        replicate,
        first,
        put_batches if train_many else None,
        metrics_once(train_many) if train_many else None,
    )


def check_batch_size(config: ml_collections.ConfigDict) -> None:
    """The global batch must split evenly over processes and devices."""
    batch_size, num_devices = config.data.batch_size, jax.device_count()
    if batch_size % num_devices:
        raise ValueError(
            f"data.batch_size={batch_size} does not divide over {num_devices} devices; "
            f"set --config.data.batch_size to a multiple of {num_devices}."
        )


def check_model_fits_data(config: ml_collections.ConfigDict, state: TrainState, info) -> None:
    """One-line errors for a model whose outputs cannot cover the data's classes or vocabulary."""
    logits = jax.eval_shape(
        lambda p: state.apply_fn({"params": p}, example_inputs(config), train=False), state.params
    )
    if info.is_language_model:
        if logits.ndim != 3 or logits.shape[-1] < info.vocab_size:
            raise ValueError(
                f"{config.data.dataset} is a language-model data set of {info.vocab_size} tokens, "
                f"but the model's logits have shape {logits.shape}; use a per-step model with "
                f"model.vocab_size >= {info.vocab_size}."
            )
    elif logits.ndim != 2 or logits.shape[-1] < info.num_classes:
        raise ValueError(
            f"{config.data.dataset} has {info.num_classes} classes, but the model's logits have "
            f"shape {logits.shape}; use a classifier with {info.num_classes} outputs."
        )


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Writes config.json; refuses a workdir that holds a run of a different model."""
    path = workdir / "config.json"
    if path.exists():
        previous = json.loads(path.read_text())
        if previous["model"]["name"] != config.model.name:
            raise ValueError(
                f"{workdir} holds a run of model {previous['model']['name']!r}, not "
                f"{config.model.name!r}; pass a different --workdir."
            )
    path.write_text(config.to_json_best_effort(indent=2) + "\n")


def saved_form(state: TrainState, rng: jax.Array) -> dict[str, Any]:
    """What a checkpoint holds: the state's arrays and the run's base key."""
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": jax.random.key_data(rng),
    }


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
    return metrics.summarize(total, "eval")


def write_samples(
    config: ml_collections.ConfigDict, state: TrainState, info, rng: jax.Array, workdir
) -> list[str]:
    """Samples `train.sample_lines` texts from a language model; logs and writes samples.txt."""
    num_lines = config.train.sample_lines
    prompt = jnp.asarray(np.tile(info.encode("\n")[:1], (num_lines, 1)), jnp.int32)
    draw = jax.jit(
        functools.partial(
            sample.sample_tokens,
            state.apply_fn,
            length=config.train.sample_length,
            context=config.data.seq_len,
            temperature=config.train.sample_temperature,
        )
    )
    tokens = np.asarray(jax.device_get(draw(state.params, prompt, rng)))
    texts = [info.decode(row[1:]) for row in tokens]
    if jax.process_index() == 0:
        blocks = [f"--- sample {i} ---\n{text}\n" for i, text in enumerate(texts)]
        (workdir / "samples.txt").write_text("".join(blocks))
        for text in texts:
            logging.info("Sample:\n%s", text)
    return texts


@contextlib.contextmanager
def stop_signals() -> Iterator[list[str]]:
    """Turns SIGTERM and SIGINT into a request to stop after the current step.

    Yields a list that receives the name of the first signal. A second SIGINT (Ctrl-C twice) stops
    at once. Outside the main thread, where Python cannot take signals, nothing is installed.
    """
    received: list[str] = []

    def request_stop(signum, frame):
        del frame
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_requested(received: list[str]) -> bool:
    """True once any process got a stop signal: all processes must stop after the same step."""
    if jax.process_count() == 1:
        return bool(received)
    flags = multihost_utils.process_allgather(np.array(bool(received)))  # a host sync per step
    return bool(np.any(flags))


def init_state(
    config: ml_collections.ConfigDict, mesh: Mesh, rng: jax.Array, inputs: Any = None
) -> tuple[TrainState, Any]:
    """A fresh TrainState created directly with its shardings, and those shardings.

    `inputs` is an example batch of model inputs (default: `state.example_inputs(config)`), for
    models fed something other than their data set gives, like the benchmark's float-feature LSTM.
    """
    create = functools.partial(create_train_state, config, inputs=inputs)
    with gc_paused():  # tracing and compiling the initialisers
        abstract = jax.eval_shape(create, rng)
        shardings = state_shardings(abstract, mesh)
        # jit sees the arrays only: the state's static parts (apply_fn, tx) come from `abstract`,
        # so the state and its shardings have the same tree structure.
        leaves = jax.jit(
            lambda rng: jax.tree.leaves(create(rng)), out_shardings=jax.tree.leaves(shardings)
        )(rng)
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves), shardings


def restore_run(manager, state: TrainState, rng: jax.Array, train_iter):
    """Restores the newest readable checkpoint onto this run's shapes and shardings.

    Returns (start step, state, base key); (0, state, rng) unchanged if there is no checkpoint.
    `train_iter` is moved to the checkpoint's position in place.
    """
    target = checkpoint.abstract_like(saved_form(state, rng))
    restored = checkpoint.restore_newest(manager, target, train_iter)
    if restored is None:
        return 0, state, rng
    step, saved = restored
    state = state.replace(step=saved["step"], params=saved["params"], opt_state=saved["opt_state"])
    logging.info("Resumed from checkpoint step %d in %s.", step, manager.directory)
    return step, state, jax.random.wrap_key_data(saved["rng"])


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> tuple[TrainState, dict[str, float]]:
    """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

    SIGTERM or SIGINT stops the run after the current step (the current call of
    `train.steps_per_call` steps) with a checkpoint; calling this again with the same workdir
    resumes it.

    Returns:
      (the final train state, the scalars of the last report).
    """
    # Again if the command line did it (the same settings); in a notebook, where JAX already
    # runs, it helps only in part (see train.host_memory).
    host_memory.configure(config.train)
    cpu_devices.configure(config.train)  # only takes effect if nothing has run on JAX yet
    setup_compile_cache(config.train.compile_cache_dir)
    workdir = pathlib.Path(workdir)
    is_chief = jax.process_index() == 0
    check_batch_size(config)
    check_step_counts(config.train)
    per_call = get_steps_per_call(config.train)  # a bad value fails before anything is built
    if config.train.parallelism not in ("jit", "pmap"):
        raise ValueError(
            f"Unknown train.parallelism {config.train.parallelism!r}; use 'jit' or 'pmap'."
        )
    info = data.load_info(config.data)
    data.eval_batches(config.data)  # a bad eval split fails now, not after training

    # Build: the state laid out over the mesh; the base key is passed unchanged to every step.
    mesh = make_mesh(config.train.mesh)
    logging.info(
        "Devices: %d x %s over %d process(es); mesh %s.",
        jax.device_count(),
        jax.devices()[0].platform,
        jax.process_count(),
        dict(mesh.shape),
    )
    if config.train.parallelism == "pmap" and mesh.shape["fsdp"] > 1:
        raise ValueError("train.parallelism='pmap' replicates the state; FSDP needs 'jit'.")
    # Keys made under jit are global arrays, replicated over the mesh (as checkpoints hold them).
    init_rng, step_rng, sample_rng = jax.jit(
        lambda: jax.random.split(jax.random.key(config.seed), 3),
        out_shardings=NamedSharding(mesh, P()),
    )()
    state, shardings = init_state(config, mesh, init_rng)
    check_model_fits_data(config, state, info)
    if is_chief:  # only once model and data are known to be good, so bad input leaves no trace
        workdir.mkdir(parents=True, exist_ok=True)
        write_config(config, workdir)

    # The training split in device memory, batches of indices from the host (see compile_jit).
    on_device = config.data.on_device and config.train.parallelism == "jit"

    def new_train_iterator():
        return data.train_iterator(
            config.data,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            indices_only=on_device,
        )

    # Restore: the newest readable checkpoint, the data iterator's position included.
    manager = checkpoint.make_manager(workdir / "checkpoints", keep=config.train.checkpoint_keep)
    had_checkpoints = bool(manager.all_steps())
    train_iter = new_train_iterator()
    start_step, state, step_rng = restore_run(manager, state, step_rng, train_iter)
    if had_checkpoints and start_step == 0:
        train_iter = new_train_iterator()  # every restore failed, and one may have moved it

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
        compiled = compile_pmap(grad_accum_steps=accum, steps_per_call=per_call)
    else:
        examples, decode = data.device_examples(config.data) if on_device else (None, None)
        compiled = compile_jit(
            mesh,
            shardings,
            grad_accum_steps=accum,
            train_examples=examples,
            decode=decode,
            steps_per_call=per_call,
        )
    writer = metrics.MetricWriter(workdir, start_step) if is_chief else None
    try:
        with stop_signals() as received:
            state, scalars, last_step = run_steps(
                config,
                compiled,
                state,
                train_iter,
                step_rng,
                manager,
                writer,
                start_step,
                lambda: stop_requested(received),
            )
        if last_step < config.train.num_steps:
            manager.wait_until_finished()
            logging.warning(
                "Stopped by %s after step %d; checkpoint saved in %s. Run the same command to "
                "resume.",
                received[0],
                last_step,
                manager.directory,
            )
            return state, scalars
        if start_step >= config.train.num_steps:
            logging.info("%s already holds a finished run of %d steps.", workdir, last_step)
            scalars = evaluate(compiled, compiled.to_run(state), config)
    finally:
        manager.wait_until_finished()  # a save in flight must reach the disk, even on an error
        manager.close()
        if writer:
            writer.close()
    if info.is_language_model and config.train.sample_lines > 0:
        write_samples(config, state, info, sample_rng, workdir)
    return state, scalars


def setup_compile_cache(cache_dir: str) -> None:
    """Turns on JAX's persistent compilation cache in `cache_dir` ('' leaves it off).

    Must run before the first compile. Every executable is cached, however fast it compiled: a
    CPU train step compiles in about a second, a large TPU one in minutes.
    """
    if not cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off for the block, as around tracing and compiling.

    Tracing a step makes hundreds of thousands of short-lived Python objects, and each full
    collection they set off walks every object of the process (JAX's, Flax's, TFDS's modules):
    tracing the small benchmark Transformer's step took 0.61-0.71 s with the collector off
    against 0.83-0.93 s with it on (0.17-0.19 s of it in 64 collections). Reference counting
    still frees what the block drops; cycles wait for the next collection after it. Leaves the
    collector off afterwards if it was off before.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def monitoring_events() -> Iterator[list[str]]:
    """The names of the `jax.monitoring` events recorded during the block, such as
    `CACHE_HIT_EVENT` when an executable comes from the persistent compilation cache."""
    events: list[str] = []

    def listen(event: str, **kwargs) -> None:
        del kwargs
        events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_listener(listen)


def timed_first_step(train: Callable, run_state, batch, rng, num_steps: int = 1):
    """Runs the first call of `train` (`num_steps` steps), logging how long compiling and running
    it took, and whether the executable came from the persistent compilation cache."""
    start = time.perf_counter()
    with monitoring_events() as events:
        with gc_paused():  # tracing and compiling
            run_state, sums = train(run_state, batch, rng)
        jax.block_until_ready(sums)
    source = "from the compilation cache" if CACHE_HIT_EVENT in events else "compiled"
    what = "First step" if num_steps == 1 else f"First {num_steps} steps (one call)"
    logging.info("%s: %.2f s (train step %s).", what, time.perf_counter() - start, source)
    return run_state, sums


def get_steps_per_call(train_config: ml_collections.ConfigDict) -> int:
    """`train.steps_per_call` (absent: 1), checked."""
    value = train_config.get("steps_per_call", 1)
    if not _is_count(value):
        raise ValueError(f"train.steps_per_call must be an integer >= 1, got {value!r}.")
    return value


def _is_count(value: Any) -> bool:
    """Whether `value` is an int >= 1 (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# The intervals (fields of config.train) at which the loop must see the state between calls.
CALL_BOUNDARIES = ("log_every", "checkpoint_every")
# Step counts of config.train, what each counts (for the error message), all integers >= 1.
STEP_COUNTS = {
    "num_steps": "steps to train",
    "log_every": "steps between reports; the last step always reports",
    "eval_every": "steps between evaluations; the last step always evaluates",
    "checkpoint_every": "steps between checkpoints; the last step always saves",
}


def check_step_counts(train_config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError unless every field of STEP_COUNTS is an integer >= 1."""
    for name, meaning in STEP_COUNTS.items():
        value = train_config[name]
        if not _is_count(value):
            raise ValueError(
                f"train.{name} must be an integer >= 1 ({meaning}), got {value!r}; "
                f"set --config.train.{name}."
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


def run_steps(
    config, compiled, state, train_iter, step_rng, manager, writer, start_step, should_stop
) -> tuple[TrainState, dict[str, float], int]:
    """Steps from `start_step` to `config.train.num_steps`: log, evaluate and save on schedule.

    Returns (state, scalars of the last report, the last step run). Stops early, with a
    checkpoint, once `should_stop()` is true (checked after every call: every step, or every
    `train.steps_per_call` steps).
    """
    _, schedule = optim.make_optimizer(config.optimizer, config.train.num_steps)
    num_steps = config.train.num_steps
    run_state = compiled.to_run(state)
    scalars: dict[str, float] = {}
    step = start_step
    progress = tqdm(
        total=num_steps,
        initial=start_step,
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    sums, window_start, window_time = None, start_step + 1, time.perf_counter()
    while step < num_steps:
        count = steps_in_call(step, config.train) if compiled.train_steps else 1
        if count == 1:
            train, batch = compiled.train, compiled.put_batch(next(train_iter))
        else:
            batches = stack([next(train_iter) for _ in range(count)])
            train, batch = compiled.train_steps, compiled.put_batches(batches)
        if step == start_step:
            run_state, step_sums = timed_first_step(train, run_state, batch, step_rng, count)
        else:
            run_state, step_sums = train(run_state, batch, step_rng)
        sums = metrics.accumulate(sums, step_sums)  # stays on device until a report
        step += count
        progress.update(count)

        is_last = step == num_steps
        stop = should_stop()
        should_save = step % config.train.checkpoint_every == 0 or is_last or stop
        # A checkpoint step always reports first, so a non-finite loss is caught before it is saved.
        if step % config.train.log_every == 0 or should_save:
            scalars = metrics.summarize(sums, "train")
            metrics.check_finite(scalars, window_start, step)
            elapsed = time.perf_counter() - window_time
            scalars["train/steps_per_second"] = (step - window_start + 1) / max(elapsed, 1e-9)
            scalars["train/learning_rate"] = float(schedule(step - 1))
            if step % config.train.eval_every == 0 or is_last:
                scalars.update(evaluate(compiled, run_state, config))
            if writer:
                writer.write(step, scalars)
            progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
            sums, window_start, window_time = None, step + 1, time.perf_counter()
        if should_save:
            saved_state = compiled.from_run(run_state)
            checkpoint.save(manager, step, saved_form(saved_state, step_rng), train_iter)
        if stop:
            break
    progress.close()
    return compiled.from_run(run_state), scalars, step
