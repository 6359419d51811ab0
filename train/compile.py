"""Command line: python -m train.compile --config=FILE[:variant] --topology=SLICE [--num_slices=N]
[--config.FIELD=VALUE ...] [--json]

Compiles the train step of a config for a TPU slice, on this machine and without a TPU, and
reports what the compiler says of it: bytes per device against the chip's memory, FLOPs, and the
collectives between devices. With libtpu installed (`pip install 'jaxmodels[tpu]'`), JAX builds
the real TPU program for a slice's devices (`jax.experimental.topologies`); the state is only
described (`jax.eval_shape`), so nothing is allocated. The step is the one `python -m train` runs
with the same config: the same mesh (`train.mesh`: data x fsdp x tensor), steps per call,
gradient accumulation, remat and dtype, with the plain layers `model.implementation='auto'` picks
on a TPU.

  python -m train.compile --config=configs/transformer.py:124m --topology=v5e-16
  python -m train.compile --config=configs/transformer.py:1b --topology=v5p-64 \\
      --config.train.mesh.fsdp=32 --json
  python -m train.compile --config=configs/transformer.py:7b --topology=v5e-256 \\
      --config.train.mesh.tensor=8  # heads and MLP units over 8 chips, FSDP over the other 32
  python -m train.compile --config=configs/transformer.py:tiny --topology=cpu-4  # no libtpu

SLICE is a slice as Cloud TPU names it: v4-8 ... v4-4096 and v5p-8 ... v5p-8192 (the number counts
TensorCores, two per chip, one JAX device per chip), v5e-1 ... v5e-256 and v6e-1 ... v6e-256
(chips), or cpu-N (N CPU devices, no libtpu needed). --num_slices=N compiles for N such slices
joined by the data-center network (Multislice); the collectives between slices are listed apart.

The report: parameters; bytes per device of parameters, optimizer state, batch and the compiler's
temporaries, and their total against the chip's memory; model FLOPs per step (a hand count)
beside the compiler's `cost_analysis`; the collectives of the compiled program (count and bytes);
and a projected step time at 40% of the chips' peak bf16 FLOPs, which is a projection, not a
measurement. --json adds one line of JSON. A config that does not fit ends with one line naming
the shortfall and what to change, exit status 2; so does a TPU slice without libtpu, and any bad
input.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from ml_collections import config_flags

from train import __main__ as command_line
from train import loop, parallel, tasks
from train.state import create_train_state, param_logical_axes

flags.DEFINE_string("topology", None, "A slice: v5e-16, v4-8, v5p-128, v6e-256, ... or cpu-N.")
flags.DEFINE_integer("num_slices", 1, "Slices joined by the data-center network (Multislice).")
flags.DEFINE_bool("json", False, "Also print the report as one line of JSON.")
flags.mark_flags_as_required(["topology"])
FLAGS = flags.FLAGS

GiB = 1024**3
PROJECTED_UTILIZATION = 0.4  # the share of peak FLOPs the projection assumes


class Chip(NamedTuple):
    """One TPU generation as slices of it are ordered and compiled for."""

    topology_prefix: str  # the generation in libtpu's topology names, e.g. "v5e" in "v5e:2x4"
    chip_config: str  # libtpu's chip config: "megacore" joins a chip's two TensorCores
    cores_per_chip: int  # what the number in a slice's name counts per chip
    hbm_bytes: int  # memory per chip, which is one JAX device
    peak_flops: float  # dense bf16 FLOP/s per chip
    shapes: dict[int, tuple[int, ...]]  # chips -> the slice's shape in chips


_SHAPES_3D = {  # v4 and v5p: cubes of 4x4x4 chips and their parts
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_SHAPES_2D = {  # v5e and v6e
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}
_V4_SHAPES = {chips: shape for chips, shape in _SHAPES_3D.items() if chips <= 2048}  # to v4-4096

CHIPS = {
    "v4": Chip("v4", "megacore", 2, 32 * GiB, 275e12, _V4_SHAPES),
    "v5p": Chip("v5", "megacore", 2, 95 * GiB, 459e12, _SHAPES_3D),
    "v5e": Chip("v5e", "default", 1, 16 * GiB, 197e12, _SHAPES_2D),
    "v6e": Chip("v6e", "default", 1, 32 * GiB, 918e12, _SHAPES_2D),
}


class Slice(NamedTuple):
    """A slice to compile for: a TPU generation's (`chip` a key of CHIPS) or CPU devices."""

    name: str  # as given: v5e-16, cpu-4
    chip: str  # a key of CHIPS, or "cpu"
    num_chips: int  # JAX devices per slice

    @property
    def is_tpu(self) -> bool:
        return self.chip != "cpu"


def slice_names(chip: str) -> list[str]:
    """Every slice name of a TPU generation, smallest first: v4-8, v4-16, ..."""
    spec = CHIPS[chip]
    return [f"{chip}-{chips * spec.cores_per_chip}" for chips in sorted(spec.shapes)]


def parse_slice(name: str) -> Slice:
    """`v5e-16` -> Slice("v5e-16", "v5e", 16); `v4-8` -> 4 chips; `cpu-4` -> 4 CPU devices."""
    chip, _, count = name.partition("-")
    if chip == "cpu" and count.isdigit() and int(count) >= 1:
        return Slice(name, "cpu", int(count))
    if chip in CHIPS and count.isdigit():
        spec = CHIPS[chip]
        chips, rest = divmod(int(count), spec.cores_per_chip)
        if not rest and chips in spec.shapes:
            return Slice(name, chip, chips)
    if chip in CHIPS:
        raise ValueError(
            f"Unknown slice {name!r}; {chip} slices are {', '.join(slice_names(chip))}."
        )
    raise ValueError(
        f"Unknown slice {name!r}; pass one of {', '.join(sorted(CHIPS))} with its size "
        "(v5e-16, v4-8, v5p-128, v6e-256), or cpu-N."
    )


# The settings of a process that compiles for a TPU it does not have: JAX's own devices are the
# CPU's; libtpu takes no lock on the (absent) TPU, so compiles can run side by side, and asks no
# metadata server for the host's TPU type and workers (it would print errors when none answers).
COMPILE_ONLY_ENV = {
    "JAX_PLATFORMS": "cpu",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-8",  # any valid type; the topology is passed explicitly
    "TPU_WORKER_HOSTNAMES": "localhost",
}


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def slice_devices(slice_: Slice, num_slices: int = 1) -> list:
    """The devices of `num_slices` slices `slice_`, in slice order: compile-only TPU devices from
    libtpu (set COMPILE_ONLY_ENV before the first call), or this process's first CPU devices."""
    if num_slices < 1:
        raise ValueError(f"--num_slices must be >= 1, got {num_slices}.")
    if not slice_.is_tpu:
        if num_slices > 1:
            raise ValueError("--num_slices > 1 is for TPU slices; cpu-N has one.")
        devices = jax.devices("cpu")
        if len(devices) < slice_.num_chips:
            raise ValueError(
                f"{slice_.name} needs {slice_.num_chips} CPU devices but this process has "
                f"{len(devices)}; start it with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{slice_.num_chips} (python -m train.compile does)."
            )
        return devices[: slice_.num_chips]
    if not has_libtpu():
        raise ValueError(
            f"Compiling for {slice_.name} needs libtpu: pip install 'jaxmodels[tpu]' "
            "(or use --topology=cpu-N)."
        )
    spec = CHIPS[slice_.chip]
    shape = spec.shapes[slice_.num_chips]
    # Hosts of 4 chips (2x2), as multi-host slices have; an 8-chip slice is one host of 8.
    host = {1: (1, 1, 1), 4: (2, 2, 1), 8: (2, 4, 1)}.get(slice_.num_chips, (2, 2, 1))
    wrap = (False, False, False)
    if len(shape) == 3:
        host = (2, 2, 1)  # v4 and v5p hosts hold 2x2x1 chips
        # Full cubes of 4x4x4 chips and more close their rings (a torus); smaller slices do not.
        wrap = tuple(slice_.num_chips >= 64 and size % 4 == 0 for size in shape)
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{spec.topology_prefix}:{'x'.join(map(str, shape))}",
        chip_config_name=spec.chip_config,
        chips_per_host_bounds=host,
        num_slices=num_slices,
        wrap=wrap,
    )
    return list(topology.devices)


def for_slice(config: ml_collections.ConfigDict, slice_: Slice) -> ml_collections.ConfigDict:
    """`config` as the loop would run it on `slice_`'s devices: on a TPU, `implementation='auto'`
    means the plain layers (this process's own backend is the CPU, where auto means the tuned
    ones of jaxmodels/tuned.py), and 'cpu' is refused."""
    config = config.copy_and_resolve_references()
    if slice_.is_tpu and "implementation" in config.model:
        if config.model.implementation == "cpu":
            raise ValueError(
                "model.implementation='cpu' is XLA:CPU's (jaxmodels/tuned.py); compile for a TPU "
                "with 'auto' or 'standard'."
            )
        config.model.implementation = "standard"
    return config


def abstract_arguments(
    config: ml_collections.ConfigDict, mesh: Mesh, steps_per_call: int
) -> tuple[Any, Any, dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """The train step's arguments as shapes, nothing allocated: (state, its shardings, batch,
    rng). The state is what `loop.init_state` builds, laid out by `parallel.state_shardings`; the
    batch holds `data.batch_size` rows of the task's fields (`Task.example_batch`), stacked
    `[steps_per_call, ...]` when several steps run per call."""
    rng = jax.random.key(config.seed)
    state = jax.eval_shape(functools.partial(create_train_state, config), rng)
    parallel.check_tensor_parallel(config.model, mesh)
    shardings = parallel.state_shardings(state, mesh, param_logical_axes(config))
    batch = jax.eval_shape(lambda: state.task.example_batch(config, config.data.batch_size))
    if steps_per_call > 1:
        batch = {
            k: jax.ShapeDtypeStruct((steps_per_call, *v.shape), v.dtype) for k, v in batch.items()
        }
    return state, shardings, batch, jax.eval_shape(lambda: rng)


@dataclasses.dataclass
class Report:
    """What the compiler says of one config's train step on one slice (see the module docstring).

    Bytes are per device; FLOPs are per optimizer step, over all devices.
    """

    slice: str
    num_slices: int
    devices: int
    device_kind: str
    mesh: dict[str, int]
    params: int
    per_device: dict[str, int]  # params, opt_state, batch, temporaries, arguments, total
    hbm_bytes: int | None  # per device; None where unknown
    model_flops: float | None  # hand count (`model_flops_per_step`); None where there is none
    compiler_flops: float | None  # cost_analysis of one call, all devices, loop bodies once
    has_loops: bool  # whether the program holds loops, whose bodies cost_analysis counts once
    collectives: dict[str, dict[str, int]]  # kind -> count and bytes per call, per device
    cross_slice: dict[str, dict[str, int]]  # the same, over the data-center network
    tokens_per_step: int
    steps_per_call: int
    peak_flops: float | None  # per device; None for CPU devices
    compile_seconds: float
    refusal: str = ""  # the compiler's message where it refused the program (out of memory)

    @property
    def fits(self) -> bool | None:
        if self.refusal:
            return False
        return None if self.hbm_bytes is None else self.per_device["total"] <= self.hbm_bytes

    @property
    def projected_step_seconds(self) -> float | None:
        flops = self.model_flops
        if flops is None and not self.has_loops:
            flops = self.compiler_flops
        if not self.peak_flops or not flops:
            return None
        return flops / (self.devices * self.peak_flops * PROJECTED_UTILIZATION)

    def to_json(self) -> dict[str, Any]:
        step = self.projected_step_seconds
        return {
            "slice": self.slice,
            "num_slices": self.num_slices,
            "devices": self.devices,
            "device_kind": self.device_kind,
            "mesh": self.mesh,
            "params": self.params,
            "per_device_bytes": self.per_device["total"],
            "per_device": self.per_device,
            "hbm_bytes": self.hbm_bytes,
            "fits": self.fits,
            "flops_per_step": self.model_flops,
            "compiler_flops_per_call": self.compiler_flops,
            "compiler_counts_loops_once": self.has_loops,
            "collectives": self.collectives,
            "cross_slice_collectives": self.cross_slice,
            "tokens_per_step": self.tokens_per_step,
            "steps_per_call": self.steps_per_call,
            "projected_step_seconds": step,
            "projected_tokens_per_second": self.tokens_per_step / step if step else None,
            "projected_utilization": PROJECTED_UTILIZATION,
            "compile_seconds": round(self.compile_seconds, 2),
            "compiler_refusal": self.refusal,
        }


def compile_train_step(
    config: ml_collections.ConfigDict, slice_: Slice, num_slices: int = 1
) -> tuple[Report, Any]:
    """Lowers and compiles `config`'s train step for `num_slices` slices `slice_` (on TPU devices
    from libtpu, or CPU devices), as `python -m train` would run it there.

    Returns:
      (the Report, the compiled executable).
    """
    loop.check_step_counts(config.train)
    per_call = loop.get_steps_per_call(config.train)
    if config.train.parallelism != "jit":
        raise ValueError("train.compile compiles the jit step; set train.parallelism='jit'.")
    config = for_slice(config, slice_)
    devices = slice_devices(slice_, num_slices)
    batch_size = config.data.batch_size
    if batch_size % len(devices):
        raise ValueError(
            f"data.batch_size={batch_size} does not divide over {len(devices)} devices; "
            f"set --config.data.batch_size to a multiple of {len(devices)}."
        )
    if num_slices > 1:  # the slices' own layout, as a run on them sets train.mesh.slices
        config = config.copy_and_resolve_references()
        config.train.mesh.slices = num_slices
    mesh = parallel.make_mesh(config.train.mesh, devices)
    state, shardings, batch, rng = abstract_arguments(config, mesh, per_call)
    steps = parallel.compile_jit(
        mesh, shardings, grad_accum_steps=config.train.grad_accum_steps, steps_per_call=per_call
    )
    train = steps.train_steps if per_call > 1 else steps.train
    start = time.perf_counter()
    lowered = train.lower(state, batch, rng)
    try:
        compiled, refusal = lowered.compile(), ""
    except jax.errors.JaxRuntimeError as error:
        # libtpu refuses a program that cannot fit the chip's memory; report what it says.
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        compiled, refusal = None, " ".join(str(error).split())
    seconds = time.perf_counter() - start

    batch_sharding = steps_batch_sharding(mesh, per_call)
    per_device = {
        "params": shard_bytes(state.params, shardings.params),
        "opt_state": shard_bytes(
            (state.step, state.opt_state), (shardings.step, shardings.opt_state)
        ),
        "batch": shard_bytes(batch, jax.tree.map(lambda _: batch_sharding, batch)),
    }
    if compiled is None:
        per_device.update(refused_memory(refusal, sum(per_device.values())))
    else:
        per_device.update(compiled_memory(compiled))
    spec = CHIPS.get(slice_.chip)
    text = "" if compiled is None else compiled.as_text()
    within, across = collectives(text)
    report = Report(
        slice=slice_.name,
        num_slices=num_slices,
        devices=len(devices),
        device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape),
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        per_device=per_device,
        hbm_bytes=spec.hbm_bytes if spec else cpu_memory_per_device(len(devices)),
        model_flops=model_flops_per_step(config, state.params),
        compiler_flops=None if compiled is None else compiler_flops(compiled, len(devices)),
        has_loops=" while(" in text,
        collectives=within,
        cross_slice=across,
        tokens_per_step=tokens_per_step(config),
        steps_per_call=per_call,
        peak_flops=spec.peak_flops if spec else None,
        compile_seconds=seconds,
        refusal=refusal,
    )
    return report, compiled


def steps_batch_sharding(mesh: Mesh, steps_per_call: int) -> NamedSharding:
    """How `parallel.compile_jit` lays out a batch: rows over the batch axes (`JitLayout`)."""
    layout = parallel.JitLayout(mesh, state_sharding=None)
    return layout.stacked if steps_per_call > 1 else layout.batch


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree`'s arrays laid out by `shardings` (the largest shard)."""
    total = 0
    for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shape = sharding.shard_shape(x.shape)
        total += math.prod(shape) * array_itemsize(x.dtype)
    return total


def array_itemsize(dtype: Any) -> int:
    """Bytes per element; a PRNG key counts its key data."""
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype))
        return math.prod(data.shape) * data.dtype.itemsize
    return np.dtype(dtype).itemsize


def compiled_memory(compiled: Any) -> dict[str, int]:
    """The compiler's bytes per device: `arguments`, `outputs`, `aliased` (donated arguments that
    the outputs reuse), `temporaries`, and `total`, what the program holds at once."""
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without the analysis
        return {"arguments": 0, "outputs": 0, "aliased": 0, "temporaries": 0, "total": 0}
    memory = {
        "arguments": stats.argument_size_in_bytes,
        "outputs": stats.output_size_in_bytes,
        "aliased": stats.alias_size_in_bytes,
        "temporaries": stats.temp_size_in_bytes,
    }
    memory["total"] = (
        memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    )
    return memory


_SIZE = r"(\d+(?:\.\d+)?)([KMGT]?)"
_REFUSED_TEMPORARIES = re.compile(r"required for HLO temporaries \(" + _SIZE + r"\)")
_REFUSED_USED = re.compile(r"Used " + _SIZE + " of " + _SIZE + " hbm")


def _size(number: str, unit: str) -> int:
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def refused_memory(message: str, arguments: int) -> dict[str, int]:
    """The compiler's bytes per device from its out-of-memory message (`compiled_memory`'s
    fields): what it says it needs, else the arguments alone."""
    memory = {"arguments": arguments, "outputs": 0, "aliased": 0, "temporaries": 0}
    used, temporaries = _REFUSED_USED.search(message), _REFUSED_TEMPORARIES.search(message)
    if temporaries:
        memory["temporaries"] = _size(*temporaries.groups())
    memory["total"] = arguments + memory["temporaries"]
    if used:
        memory["total"] = max(memory["total"], _size(*used.groups()[:2]))
    return memory


def cpu_memory_per_device(num_devices: int) -> int | None:
    """This machine's memory shared by `num_devices` CPU devices."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // num_devices
    except (ValueError, OSError, AttributeError):
        return None


def compiler_flops(compiled: Any, num_devices: int) -> float | None:
    """`cost_analysis()`'s FLOPs of one device's program, times the devices. The analysis counts
    the body of a loop once (a scan over layers, micro-batches or steps per call)."""
    costs = compiled.cost_analysis()
    if isinstance(costs, list | tuple):  # older JAX: one dict per program
        costs = costs[0] if costs else None
    if not costs or "flops" not in costs:
        return None
    return float(costs["flops"]) * num_devices


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
    """Positions a step trains on: every token of a batch's inputs (batch x seq_len) for inputs of
    token ids, else one per example (an image)."""
    task = tasks.for_config(config)
    inputs = jax.eval_shape(lambda: task.example_batch(config, config.data.batch_size))["inputs"]
    if jnp.issubdtype(inputs.dtype, jnp.integer):
        return math.prod(inputs.shape)
    return inputs.shape[0]


def model_flops_per_step(config: ml_collections.ConfigDict, params: Any) -> float | None:
    """A hand count of a step's FLOPs, forward and backward, over the global batch: 6 per
    parameter per position for every matmul weight (embedding tables are lookups and are left
    out); the Transformer adds attention, 12 x layers x width x seq_len per position (scores and
    their product with the values, forward and backward, over the whole masked square, as XLA
    computes it). None for the models where 6 x N undercounts (the CNN reuses each weight over
    the image; the encoder-decoder), where only the compiler's count is given."""
    name = config.model.name
    if name not in ("transformer", "mlp", "lstm"):
        return None
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): x
        for path, x in jax.tree_util.tree_leaves_with_path(params)
    }
    tables = ("token_embed/embedding", "pos_embed", "embed/embedding")
    weights = sum(math.prod(x.shape) for path, x in flat.items() if path not in tables)
    positions = tokens_per_step(config)
    flops = 6 * weights * positions
    if name == "transformer":
        model = config.model
        flops += 12 * model.num_layers * model.width * config.data.seq_len * positions
    return float(flops)


# --- Collectives in the compiled program's HLO text ---------------------------------------------

COLLECTIVE_KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "collective-permute",
)
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ARRAY = re.compile(r"\b([a-z]+)(\d*)[a-z0-9]*\[([\d,]*)\]")
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def array_bytes(hlo_type: str, first: bool = False) -> int:
    """Bytes of the arrays in an HLO type: `f32[1024,768]{1,0}`, or a tuple of them (summed; with
    `first`, only the first: the data of a `send`)."""
    total = 0
    for kind, bits, dims in _ARRAY.findall(hlo_type)[: 1 if first else None]:
        if kind == "token":
            continue
        width = 8 if kind == "pred" else int(bits or 8)
        total += math.prod(int(d) for d in dims.split(",") if d) * width // 8
    return total


def _split_type(text: str) -> tuple[str, str]:
    """`'(f32[2], u32[]) send(...)'` -> the type and the rest (a tuple type holds spaces)."""
    if not text.startswith("("):
        head, _, rest = text.partition(" ")
        return head, rest
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return text[: i + 1], text[i + 1 :].strip()
    return text, ""


def trip_count(while_rest: str, computations: dict[str, list[tuple[str, str, str, str]]]) -> int:
    """How often a while loop runs: its known trip count, else the bound N of its condition
    `counter < N` (how a scan's loop reads, its counter starting at 0), else 1."""
    known = _TRIP_COUNT.search(while_rest)
    if known:
        return int(known.group(1))
    condition = re.search(r"\bcondition=%?([\w.\-]+)", while_rest)
    instructions = computations.get(condition.group(1), []) if condition else []
    constants = {}
    for name, _, opcode, rest in instructions:
        value = re.match(r"constant\((\d+)\)", rest)
        if opcode == "constant" and value:
            constants[name] = int(value.group(1))
    for _, _, opcode, rest in instructions:
        if opcode == "compare" and "direction=LT" in rest:
            operands = re.findall(r"%([\w.\-]+)", rest.partition(")")[0])
            if len(operands) == 2 and operands[1] in constants:
                return constants[operands[1]]
    return 1


def collectives(hlo_text: str) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """The collectives of a compiled program's HLO text, per call of the program.

    Each is counted as often as it runs: inside a loop (a scan over layers, micro-batches or
    steps) as often as the loop's known trip count. Bytes are those of the whole array the
    collective gathers or reduces, per device. Collectives between slices go over the
    data-center network as transfers of libtpu's Megascale runtime (`send` to another slice),
    counted apart.

    Returns:
      (within the slice, across slices): {kind: {"count": n, "bytes": b}}, every kind of
      COLLECTIVE_KINDS in the first.
    """
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(2)
            computations[current] = []
            entry = current if match.group(1) else entry
            continue
        match = _INSTRUCTION.match(line)
        if current is None or not match:
            continue
        hlo_type, rest = _split_type(match.group(2))
        opcode = rest.partition("(")[0]
        computations[current].append((match.group(1), hlo_type, opcode, rest))
    callers: dict[str, list[tuple[str, int]]] = {}
    for name, instructions in computations.items():
        for _, _, opcode, rest in instructions:
            if opcode.endswith(("-done", "-update")):  # the same computation as its -start
                continue
            callees = _CALLEE.findall(rest)
            for group in _CALLEE_LISTS.findall(rest):
                callees += [("calls", c.strip().lstrip("%")) for c in group.split(",") if c]
            trips = trip_count(rest, computations) if opcode == "while" else 1
            for key, callee in callees:
                callers.setdefault(callee, []).append((name, trips if key == "body" else 1))

    @functools.cache
    def runs(name: str) -> int:
        if name == entry:
            return 1
        return sum(runs(caller) * times for caller, times in callers.get(name, []))

    within = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVE_KINDS}
    across: dict[str, dict[str, int]] = {}
    for name, instructions in computations.items():
        shapes = {instruction[0]: instruction[1] for instruction in instructions}
        times = runs(name)
        for _, hlo_type, opcode, rest in instructions:
            kind = opcode.removesuffix("-start")
            megascale = _MEGASCALE.search(rest) if opcode == "send" else None
            if megascale:
                kind = megascale.group(1).lower().replace("_", "-")
                entry_ = across.setdefault(kind, {"count": 0, "bytes": 0})
                entry_["count"] += times
                entry_["bytes"] += times * array_bytes(hlo_type, first=True)
                continue
            if kind not in within:
                continue
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # libtpu's fused form: an all-reduce sliced at once
            # The whole array: an all-gather's result, a reduce-scatter's operand (several of
            # each where XLA combined collectives into one); an async -start's result tuple
            # holds its operands too.
            arguments = rest.partition("(")[2].partition(")")[0]  # `%a, %b`
            operands = sum(
                array_bytes(shapes.get(operand, ""))
                for operand in re.findall(r"%([\w.\-]+)", arguments)
            )
            results = array_bytes(hlo_type)
            if opcode.endswith("-start") and results > operands:
                results -= operands
            size = max(results, operands)
            within[kind]["count"] += times
            within[kind]["bytes"] += times * size
    return within, across


# --- The command line ---------------------------------------------------------------------------


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def shortfall(report: Report, config: ml_collections.ConfigDict) -> str:
    """The one line for a config that does not fit: how much, and what to change."""
    fixes = []
    most_fsdp = report.devices // report.mesh["tensor"]  # the devices of one tensor rank
    if report.mesh["fsdp"] < most_fsdp:
        fixes.append(f"raise train.mesh.fsdp (now {report.mesh['fsdp']}, up to {most_fsdp})")
    if "remat" in config.model and not config.model.remat:
        fixes.append("set model.remat=True")
    per_device_batch = config.data.batch_size // report.devices
    if per_device_batch > config.train.grad_accum_steps:
        fixes.append("raise train.grad_accum_steps")
    fixes.append("use a slice with more chips")
    chip = report.slice.rpartition("-")[0]
    return (
        f"needs {report.per_device['total'] / GiB:.1f} GiB per device of a {chip}'s "
        f"{report.hbm_bytes / GiB:.0f} GiB: {', '.join(fixes[:-1])} or {fixes[-1]}"
        if len(fixes) > 1
        else f"needs {report.per_device['total'] / GiB:.1f} GiB per device of a {chip}'s "
        f"{report.hbm_bytes / GiB:.0f} GiB: {fixes[0]}"
    )


def report_lines(report: Report, config_name: str) -> list[str]:
    """The report as text: one topic a line."""
    memory = report.per_device
    slices = f"{report.num_slices} slices of " if report.num_slices > 1 else ""
    mesh = " x ".join(f"{axis}={size}" for axis, size in report.mesh.items())
    lines = [
        f"{config_name} on {slices}{report.slice}: {report.devices} devices "
        f"({report.device_kind}), mesh {mesh}; compiled in {report.compile_seconds:.1f} s",
        f"parameters      {report.params:,}",
    ]
    of = ""
    if report.hbm_bytes:
        share = memory["total"] / report.hbm_bytes
        verdict = "fits" if report.fits else "DOES NOT FIT"
        of = f" of {format_bytes(report.hbm_bytes)} ({share:.0%}): {verdict}"
    lines.append(
        f"per device      params {format_bytes(memory['params'])}, optimizer state "
        f"{format_bytes(memory['opt_state'])}, batch {format_bytes(memory['batch'])}, "
        f"temporaries {format_bytes(memory['temporaries'])}; total "
        f"{format_bytes(memory['total'])}{of}"
    )
    if not report.refusal:
        lines.append(
            f"                (compiler: arguments {format_bytes(memory['arguments'])} + outputs "
            f"{format_bytes(memory['outputs'])} - donated {format_bytes(memory['aliased'])} + "
            f"temporaries)"
        )
    model = "n/a" if report.model_flops is None else f"{report.model_flops:.3g}"
    compiler = "n/a" if report.compiler_flops is None else f"{report.compiler_flops:.3g}"
    loops = "; it counts each loop body once" if report.has_loops else ""
    lines.append(
        f"FLOPs per step  model {model} (hand count: 6 N tokens + attention); compiler "
        f"{compiler} (cost_analysis of one call over all devices{loops})"
    )
    if report.refusal:
        lines.append(f"compiler        refused the program: {report.refusal}")
        return lines
    per_call = f" per call of {report.steps_per_call} steps" if report.steps_per_call > 1 else ""
    lines.append(f"collectives{per_call}: " + describe_collectives(report.collectives))
    if report.num_slices > 1:
        lines.append("  across slices: " + (describe_collectives(report.cross_slice) or "none"))
    step = report.projected_step_seconds
    if step:
        peak = report.peak_flops / 1e12
        lines.append(
            f"projection      at {PROJECTED_UTILIZATION:.0%} of {report.devices} x {peak:.0f} "
            f"TFLOP/s bf16: {format_seconds(step)} per step, "
            f"{report.tokens_per_step / step:,.0f} tokens/s (from FLOPs, not a measurement)"
        )
    else:
        lines.append("projection      none (no peak FLOPs known for these devices)")
    return lines


def describe_collectives(found: dict[str, dict[str, int]]) -> str:
    parts = [
        f"{kind} {entry['count']} x {format_bytes(entry['bytes'])}"
        for kind, entry in found.items()
        if entry["count"]
    ]
    return ", ".join(parts) or "none"


def main(argv: list[str]) -> None:
    del argv
    try:
        config = FLAGS.config
        config.to_dict()  # ml_collections loads the file lazily: make a missing one fail here
        slice_ = parse_slice(FLAGS.topology)
    except (*command_line.INPUT_ERRORS, OSError, flags.Error) as error:
        command_line.fail(error)
    # Before any backend starts: JAX's own devices are the CPU's, with cpu-N's count.
    os.environ.update({k: v for k, v in COMPILE_ONLY_ENV.items() if k not in os.environ})
    jax.config.update("jax_platforms", "cpu")
    if not slice_.is_tpu:
        count_flag = f"--xla_force_host_platform_device_count={slice_.num_chips}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {count_flag}".strip()
    try:
        report, _ = compile_train_step(config, slice_, FLAGS.num_slices)
    except command_line.INPUT_ERRORS as error:
        command_line.fail(error)
    config_name = config_flags.get_config_filename(FLAGS["config"])
    print("\n".join(report_lines(report, config_name)))
    if FLAGS.json:
        print(json.dumps(report.to_json()))
    sys.stdout.flush()
    if report.fits is False:
        command_line.fail(ValueError(shortfall(report, config)))


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
