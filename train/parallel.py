"""Compiling the pure steps over devices: `jax.jit` over a device mesh, or `jax.pmap`.

`compile_jit` and `compile_pmap` return a `Compiled`: the train and eval steps for one way of
using the devices, with the conversions between that form of the state and the canonical one
(global arrays laid out over the mesh, which is what checkpoints hold).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodels import tuned
from train import steps
from train.state import TrainState

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over these; tensor devices share their rows
PMAP_AXIS = "batch"

# The one table from the logical axis names of the models' annotations
# (`nn.with_logical_partitioning` on parameters, `nn.with_logical_constraint` on activations) to
# mesh axes: the Megatron layout,
# attention heads and the MLP's hidden units split over `tensor`. Only `tensor` is placed by name:
# FSDP keeps choosing its axis by shape (`param_spec`, over the axes left free), so data parallel
# and FSDP lay out every model, annotated or not, exactly as they do without a tensor axis.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),  # activations' rows
    ("heads", "tensor"),  # attention: qkv's output columns, out's input rows, q/k/v's heads
    ("mlp", "tensor"),  # the MLP's hidden units: mlp_in's columns, mlp_out's rows
    ("embed", None),  # model width: split by FSDP where it picks it
    ("layers", None),  # the stacked axis of scanned blocks
)


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


def make_mesh(
    mesh_config: ml_collections.ConfigDict | None = None, devices: list | None = None
) -> Mesh:
    """A 3-D device mesh with axes `data`, `fsdp` and `tensor` (see `config.train.mesh`).

    Args:
      mesh_config: `data`, `fsdp` and `tensor` axis sizes; -1 (in `data` or `fsdp`) takes the
        devices left over. None: all data. `slices` > 1 (TPU Multislice) lays `data` across
        the slices (`jax.experimental.mesh_utils.create_hybrid_device_mesh`).
      devices: the devices to use; default every device of every process.
    """
    devices = jax.devices() if devices is None else devices
    if mesh_config is None:
        data, fsdp, tensor = -1, 1, 1
    else:
        data, fsdp, tensor = mesh_config.data, mesh_config.fsdp, mesh_config.tensor
    if tensor < 1 or len(devices) % tensor:
        raise ValueError(
            f"train.mesh.tensor={tensor} does not divide the {len(devices)} devices; pick a "
            f"divisor of {len(devices)} that divides model.num_heads and model.mlp_dim."
        )
    rest = len(devices) // tensor  # devices per tensor group
    if data == -1 and fsdp != -1 and fsdp > 0:
        data = rest // fsdp
    elif fsdp == -1 and data > 0:
        fsdp = rest // data
    if data < 1 or fsdp < 1 or data * fsdp * tensor != len(devices):
        raise ValueError(
            f"train.mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} x tensor={tensor} "
            f"does not cover the {len(devices)} devices; make the product {len(devices)}, or set "
            "data or fsdp to -1."
        )
    slices = 1 if mesh_config is None else mesh_config.get("slices", 1)
    if slices == 1:
        return Mesh(np.array(devices).reshape(data, fsdp, tensor), MESH_AXES)
    if slices < 1 or data % slices:
        raise ValueError(
            f"train.mesh.slices={slices} must divide train.mesh.data={data}: data parallelism is "
            "what goes across slices; set data to a multiple of the slices."
        )
    if not all(hasattr(device, "slice_index") for device in devices):
        raise ValueError(
            f"train.mesh.slices={slices}, but these devices ({devices[0].platform}) belong to "
            "no slices; set train.mesh.slices=1."
        )
    # Each slice holds data / slices x fsdp x tensor devices; only `data` crosses the slower
    # network between slices (its gradient all-reduce), never the FSDP gathers or tensor sums.
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp, tensor), (slices, 1, 1), devices, allow_split_physical_axes=True
    )
    return Mesh(grid, MESH_AXES)


def param_spec(shape: tuple[int, ...], fsdp_size: int, taken: P | None = None) -> P:
    """Where one state array lives: FSDP shards its largest axis that `fsdp_size` divides over the
    `fsdp` mesh axis; scalars, small or indivisible arrays, and everything when fsdp is 1, are
    replicated. XLA gathers the shards where a layer needs them.

    Args:
      shape: the array's shape.
      fsdp_size: the `fsdp` mesh axis's size.
      taken: the array's axes already placed (by `LOGICAL_RULES`), which FSDP leaves alone.
    """
    taken = () if taken is None else tuple(taken)
    placed = list(taken) + [None] * (len(shape) - len(taken))
    divisible = [
        axis for axis, size in enumerate(shape) if size % fsdp_size == 0 and placed[axis] is None
    ]
    if fsdp_size > 1 and divisible:
        placed[max(divisible, key=lambda a: shape[a])] = "fsdp"
    return P(*placed) if any(axis is not None for axis in placed) else P()


def tensor_spec(name: str, shape: tuple[int, ...], logical: P, mesh: Mesh) -> P:
    """The mesh axes of `LOGICAL_RULES` for an array with logical axis names `logical`, keeping
    only mesh axes of more than one device; an axis they do not divide is an error.

    Args:
      name: the array's path, for the error message.
      shape: its shape.
      logical: one logical name (or None) per axis, as `nn.get_partition_spec` gives them.
      mesh: the device mesh.
    """
    spec = []
    for size, mesh_axes, logical_name in zip(
        shape, nn.logical_to_mesh_axes(logical, LOGICAL_RULES), logical, strict=True
    ):
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        names = tuple(axis for axis in names if mesh.shape[axis] > 1)
        devices = math.prod(mesh.shape[axis] for axis in names)
        if size % devices:
            raise ValueError(
                f"{name}'s {logical_name!r} axis of {size} does not divide over train.mesh."
                f"{'/'.join(names)}={devices}; pick a size that divides it."
            )
        spec.append(names[0] if len(names) == 1 else (names or None))
    return P(*spec)


def check_tensor_parallel(model_config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Refuses a model config that `mesh`'s `tensor` axis cannot split: attention heads it does
    not divide, or the XLA:CPU kernels of `jaxmodels.tuned` (their hand-written backward passes
    are tested on whole heads only)."""
    tensor = mesh.shape["tensor"]
    if tensor == 1:
        return
    if "implementation" in model_config and tuned.use_tuned(model_config.implementation):
        raise ValueError(
            f"train.mesh.tensor={tensor} needs the plain layers, but model.implementation="
            f"{model_config.implementation!r} picks jaxmodels/tuned.py's on this CPU; set "
            "--config.model.implementation=standard."
        )
    if "num_heads" in model_config and model_config.num_heads % tensor:
        raise ValueError(
            f"train.mesh.tensor={tensor} does not divide model.num_heads="
            f"{model_config.num_heads}; pick a tensor size that divides it."
        )


def state_shardings(state: Any, mesh: Mesh, logical_axes: Any = None) -> Any:
    """A NamedSharding for every array of `state` (params and optimizer state alike).

    Args:
      state: the state (arrays or shapes).
      mesh: the device mesh.
      logical_axes: the params' logical axis names, a PartitionSpec per parameter
        (`state.param_logical_axes`), or None. A parameter that has names, and every optimizer
        state array of its shape whose path ends in the parameter's path (Adam's moments), is
        split over `tensor` by `LOGICAL_RULES`; FSDP then shards the largest of its free axes.
        Everything else is laid out by `param_spec` alone.
    """
    fsdp_size, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    named = {}  # parameter path -> logical names, for the parameters that declare them
    if logical_axes is not None:
        for path, names in jax.tree_util.tree_leaves_with_path(
            logical_axes, is_leaf=lambda x: isinstance(x, P)
        ):
            if len(names):
                named[path] = names
    if tensor > 1 and not named:
        raise ValueError(
            f"train.mesh.tensor={tensor}, but this model's parameters declare no logical axes to "
            "split (the Transformer's attention and MLP do); set train.mesh.tensor=1."
        )

    def sharding(path, x):
        shape = jnp.shape(x)
        taken = P()
        for start in range(len(path)):  # the longest parameter path that ends `path`
            names = named.get(path[start:])
            if names is not None and len(names) == len(shape):
                taken = tensor_spec(jax.tree_util.keystr(path[start:]), shape, names, mesh)
                break
        return NamedSharding(mesh, param_spec(shape, fsdp_size, taken))

    return jax.tree_util.tree_map_with_path(sharding, state)


def compile_jit(
    mesh: Mesh,
    state_sharding: Any,
    grad_accum_steps: int = 1,
    train_examples: dict[str, np.ndarray] | None = None,
    decode: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
    steps_per_call: int = 1,
) -> Compiled:
    """jit over the mesh: the batch is split along its first axis over the `data` x `fsdp`
    devices, the state is replicated (data parallel), sharded over `fsdp` (see `param_spec`) and
    split over `tensor` by its logical axes (`state_shardings`), and XLA inserts the collectives.
    With a `tensor` axis the steps are traced in `logical_mesh`. The state is donated: its
    buffers are reused for the new state.

    With `train_examples` (every training example, as `data.device_examples` gives them, with its
    `decode`) the split is copied to every device once, and `train` takes batches of example
    *indices* (`{"indices": int32 [b]}`, from `data.train_iterator(..., indices_only=True)`) and
    gathers (and decodes) the examples inside the compiled step: per step, one small array crosses
    from the host instead of the whole batch. On a CPU that lets a sub-millisecond step run at the
    speed of a batch already in memory; on an accelerator it takes the host-to-device copy off
    every step. `eval` still takes host batches.

    With `steps_per_call` > 1, `train_steps` runs that many steps in one call on batches stacked
    `[steps_per_call, batch, ...]` (`put_batches`; with `train_examples`, stacked indices), and
    `train` still runs one.
    """
    layout = JitLayout(mesh, state_sharding)
    step = functools.partial(steps.train_step, grad_accum_steps=grad_accum_steps)
    examples = None
    one, many = step, functools.partial(steps.train_steps, step=step)
    if train_examples is not None:
        examples = layout.put_replicated(train_examples)
        one, many = gathering_steps(step, layout.batch, decode)
    train = layout.jit_step(one, layout.batch, examples)
    train_many = layout.jit_step(many, layout.stacked, examples) if steps_per_call > 1 else None
    evaluate = jax.jit(
        steps.eval_step,
        in_shardings=(state_sharding, layout.batch),
        out_shardings=layout.replicated,
    )
    train, evaluate = layout.wrap(train), layout.wrap(evaluate)
    train_many = layout.wrap(train_many) if train_many else None
    identity = lambda state: state  # noqa: E731
    return Compiled(
        layout.putter(layout.batch),
        train,
        evaluate,
        identity,
        identity,
        layout.putter(layout.stacked) if train_many else None,
        train_many,
    )


@dataclasses.dataclass(frozen=True)
class JitLayout:
    """Where `compile_jit`'s arrays live on `mesh`: the state as `state_sharding` says, batches
    split over the batch axes, stacked batches `[steps, batch, ...]` likewise, keys and metrics
    replicated."""

    mesh: Mesh
    state_sharding: Any

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def stacked(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(None, BATCH_AXES))

    def jit_step(
        self, step_fn: Callable, data_sharding: NamedSharding, examples: Any = None
    ) -> Callable:
        """jit of `step_fn(state, batch, rng) -> (state, sums)`, the state donated; with
        `examples` (on every device), of `step_fn(state, examples, batch, rng)` with them bound
        (an argument, not a constant folded into the program)."""
        shardings = dict(out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
        if examples is None:
            return jax.jit(
                step_fn,
                in_shardings=(self.state_sharding, data_sharding, self.replicated),
                **shardings,
            )
        compiled = jax.jit(
            step_fn,
            in_shardings=(self.state_sharding, self.replicated, data_sharding, self.replicated),
            **shardings,
        )
        return lambda state, batch, rng: compiled(state, examples, batch, rng)

    def putter(self, sharding: NamedSharding) -> Callable[[dict], dict]:
        """A function placing a host batch (this process's rows) as one global array per field."""

        def put_batch(batch):
            if self.mesh.size == 1:
                # jit copies numpy arguments to their device itself, with much less host time
                # per array than a separate device_put.
                return batch
            return {
                k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()
            }

        return put_batch

    def put_replicated(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The same arrays on every device (valid with many processes too), copied now."""
        replicated = self.replicated
        return jax.block_until_ready(
            {
                k: jax.make_array_from_callback(v.shape, replicated, lambda index, v=v: v[index])
                for k, v in arrays.items()
            }
        )

    def wrap(self, fn: Callable) -> Callable:
        """`fn` traced in the logical mesh (a `tensor` axis), and called one at a time where
        the devices serialize collectives."""
        if self.mesh.shape["tensor"] > 1:
            fn = in_mesh(fn, self.mesh)
        if serializes_collectives(self.mesh.devices.flat):
            fn = one_at_a_time(fn)
        return fn


def gathering_steps(
    step: Callable, batch_sharding: NamedSharding, decode: Callable | None
) -> tuple[Callable, Callable]:
    """`step` on example indices: one step `(state, examples, {"indices": [b]}, rng)`, whose rows
    are gathered from `examples` and decoded inside the step, and the same over stacked index
    batches `[steps, b]` (`steps.train_steps`)."""

    def one(state, examples, index_batch, rng):
        batch = gather_rows(examples, index_batch["indices"])
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)  # rows stay local
        if decode is not None:
            batch = decode(batch)
        return step(state, batch, rng)

    def many(state, examples, index_batches, rng):
        def step_on(state, index_batch, rng):
            return one(state, examples, index_batch, rng)

        return steps.train_steps(state, index_batches, rng, step=step_on)

    return one, many


@contextlib.contextmanager
def logical_mesh(mesh: Mesh):
    """`mesh` set and `LOGICAL_RULES` in effect: what the models' activation constraints
    (`nn.with_logical_constraint`) need to name mesh axes while a step is traced; without them
    those constraints do nothing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def in_mesh(step_fn: Callable, mesh: Mesh) -> Callable:
    """`step_fn` (a jitted step), traced at its first call or by `.lower` in `logical_mesh`."""

    @functools.wraps(step_fn)
    def call(*args):
        with logical_mesh(mesh):
            return step_fn(*args)

    if hasattr(step_fn, "lower"):

        def lower(*args):
            with logical_mesh(mesh):
                return step_fn.lower(*args)

        call.lower = lower  # ahead-of-time compilation (train.compile) sees the rules too
    return call


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
    replicated = NamedSharding(per_device.mesh, P())

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
            # The key on this pmap's devices: one laid out over the loop's jit mesh meets the
            # state's mesh inside the step, which JAX 0.7 rejects in a scan over steps.
            state, sums = train_fn(state, batch, jax.device_put(rng, replicated))
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


def serializes_collectives(devices) -> bool:
    """Whether steps over `devices` must run one at a time: several XLA:CPU devices in a process.

    XLA:CPU runs the program of every virtual device (`--xla_force_host_platform_device_count`)
    on one shared thread pool, and an all-reduce holds a thread until all devices reach it. With
    several steps queued ahead, the devices' programs can take every thread while one device's
    share of the all-reduce still waits for one: the rendezvous then aborts the process after
    40 s; it happened in a few percent of short trainings on 4 CPU devices, and never once each
    step was waited for. GPUs and TPUs run each device's program on its own stream, so they keep
    queuing steps ahead.
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
