"""Train-step throughput of the benchmark models, plain Flax against the XLA:CPU-tuned layers.

Usage (from the repo root):
  python benchmarks/step_throughput.py --all                       # every model, both forms
  python benchmarks/step_throughput.py --model=cnn --implementation=cpu
  python benchmarks/step_throughput.py --model=transformer_small --steps=4 --repeats=3
  python benchmarks/step_throughput.py --all --mode=pipeline

Each benchmark is a config file from `configs/` with a few fields overridden (dropout 0 always),
built and compiled as `python -m train` builds it (`train.loop.init_state`,
`train.parallel.compile_jit` with the state donated, `train.steps.train_step`). Every model that
has an `implementation` field runs twice, each time in a fresh process: `implementation=standard`
(the plain Flax layers) and `implementation=cpu` (the forms in `jaxmodels/tuned.py`); the MLP has
one form. The JSON line's `implementation` says which ran. Each process starts with the
environment `python -m train` gives itself (`train.process.environment`: the config's host-memory
reuse and CPU device count). Where the config sets `train.steps_per_call` > 1 (the MLP: 25), every
call runs that many steps, and times are per step. The persistent compilation cache stays off, so
`compile_s` is a cold compile (benchmarks/compile_time.py measures the cache).

Modes:
  memory    one fixed random batch, put on device once. Warm calls run until the process's peak
            resident memory stops growing (the host heap's start-up growth is not the steady
            step), then `--repeats` times `--steps` steps, one `jax.block_until_ready` at the end
            of each repeat (after every step over several CPU devices, as the loop waits for each).
  pipeline  the same steps fed as `python -m train` feeds them (`train.data.train_iterator`, the
            split in device memory where `data.on_device`), repeats alternating with memory-mode
            repeats in the same process: `share_of_memory_throughput`.

Fields: `step_ms` is the median over repeats (`_min`, `_max`: the extremes). `flops_per_step` is
the hand count of `model_flops`, `xla_flops_per_step` XLA's cost analysis of the compiled step.
A jitted float32 `jnp.dot` of two 4096x4096 matrices (`--peak_size`) is timed after every repeat;
`share_of_peak` is the median of each repeat's model FLOP/s over the peak taken just after it, so
that a slow phase of the machine slows both sides of a ratio. `loadavg` is /proc/loadavg's first
field before the model's work started, `other_cores_busy` the cores other processes kept busy
during the timed repeats, and `cpu` the CPU's model name (`lscpu`'s): tunings pay differently on
different CPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script, the repo root is not on the path
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from train import data, loop, parallel, process  # noqa: E402
from train.config import load_config  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data" / "tensorflow_datasets_array_record"
IMPLEMENTATIONS = ("standard", "cpu")  # plain Flax, then jaxmodels/tuned.py
TARGET_REPEAT_S = 4.0  # default --steps: about this many seconds per repeat
WARMUP_S = 0.5  # the warm-up runs at least this long, however soon memory settles
SETTLED_CALLS = 3  # warm calls in a row without memory growth that end the warm-up
RSS_GROWTH_BYTES = 8 * 2**20  # less peak resident memory growth than this is none
WARMUP_MAX_S = 120.0  # the warm-up stops after this long even if memory still grows
PEAK_SIZE = 4096  # default --peak_size
MNIST_SHAPE = (28, 28, 1)


class Benchmark(NamedTuple):
    """One benchmark: a config file and the fields it overrides.

    Attributes:
      config_file: a file in `configs/`.
      overrides: flattened config keys -> values, applied to `get_config()`.
      float_features: > 0 for a float-feature LSTM: memory-mode inputs are
        `[batch, seq_len, float_features]` instead of token ids.
      memory_only: override keys that pipeline mode skips (keeping the config file's values),
        because the real data set cannot feed them.
      pipeline_note: said in pipeline mode's `note` field.
    """

    config_file: str
    overrides: dict[str, Any]
    float_features: int = 0
    memory_only: tuple[str, ...] = ()
    pipeline_note: str = ""


BENCHMARKS = {
    # 784 -> 128 relu -> 10 on MNIST-shaped images, SGD with momentum (the config's optimizer).
    "mlp": Benchmark(
        "mlp.py",
        {
            "model.hidden_sizes": (128,),
            "model.num_classes": 10,
            "model.dropout_rate": 0.0,
            "data.batch_size": 128,
        },
    ),
    # The CNN model's defaults: conv32-pool-conv64-pool-dense128-dense10, Adam.
    "cnn": Benchmark(
        "cnn.py",
        {
            "model.conv_features": (32, 64),
            "model.dense_features": 128,
            "model.num_classes": 10,
            "model.dropout_rate": 0.0,
            "data.batch_size": 128,
        },
    ),
    # 3 x LSTM(128) over 100 steps of 64 float features, last state -> 64 relu -> 10, Adam (and the
    # config's gradient clipping).
    "lstm": Benchmark(
        "lstm.py",
        {
            "model.num_layers": 3,
            "model.hidden_size": 128,
            "model.num_outputs": 10,
            "model.vocab_size": 0,  # float features, no embedding
            "model.embed_dim": 0,
            "model.head_sizes": (64,),
            "model.per_step": False,
            "model.pooling": "last",  # as measured before the config's default became "max"
            "model.dropout_rate": 0.0,
            "data.seq_len": 100,
            "data.batch_size": 64,
            "train.cpu_devices": 2,  # one device per core: faster here (benchmarks/RESULTS.md)
        },
        float_features=64,
        memory_only=("model.vocab_size", "model.embed_dim"),
        pipeline_note=(
            "SST-2 has word tokens, not 64 float features: pipeline mode (and its memory-mode "
            "reference) uses the lstm config's token embedding (vocab_size 16384, embed_dim 256) "
            "with 3 x 128 LSTM layers, seq_len 100, batch 64, head 64 -> 10"
        ),
    ),
    # Decoder LMs over 65 characters, AdamW (and the config's gradient clipping).
    "transformer_tiny": Benchmark(
        "transformer.py",
        {
            "model.vocab_size": 65,
            "model.num_layers": 4,
            "model.num_heads": 4,
            "model.width": 128,
            "model.mlp_dim": 512,
            "model.max_len": 64,
            "model.dropout_rate": 0.0,
            "data.seq_len": 64,
            "data.batch_size": 12,
            "train.cpu_devices": 0,  # one device: two made this small step slower
        },
    ),
    "transformer_small": Benchmark(
        "transformer.py",
        {
            "model.vocab_size": 65,
            "model.num_layers": 6,
            "model.num_heads": 6,
            "model.width": 384,
            "model.mlp_dim": 1536,
            "model.max_len": 256,
            "model.dropout_rate": 0.0,
            "data.seq_len": 256,
            "data.batch_size": 16,
        },
    ),
}


def implementations(name: str) -> tuple[str, ...]:
    """The forms benchmark `name` comes in: both, or ("standard",) for a model without the field."""
    model = load_config(REPO / "configs" / BENCHMARKS[name].config_file).model
    return IMPLEMENTATIONS if "implementation" in model else ("standard",)


def benchmark_config(
    name: str, implementation: str = "cpu", pipeline: bool = False
) -> ml_collections.ConfigDict:
    """The locked config of benchmark `name` in `implementation` (ignored by a model without the
    field); `pipeline` drops its `memory_only` overrides."""
    benchmark = BENCHMARKS[name]
    config = load_config(REPO / "configs" / benchmark.config_file)
    overrides = {
        key: value
        for key, value in benchmark.overrides.items()
        if not (pipeline and key in benchmark.memory_only)
    }
    if "implementation" in config.model:
        overrides["model.implementation"] = implementation
    config.update_from_flattened_dict(overrides)  # locked: a misspelt key raises
    return config


def implementation_of(config: ml_collections.ConfigDict) -> str:
    """What a benchmark config runs: its `model.implementation`, or "standard" without one."""
    return config.model.implementation if "implementation" in config.model else "standard"


def float_features(name: str, config: ml_collections.ConfigDict) -> int:
    """Float features per LSTM step, or 0 when the model reads token ids or images."""
    if config.model.name == "lstm" and config.model.vocab_size == 0:
        return BENCHMARKS[name].float_features
    return 0


# --- Model FLOPs by hand --------------------------------------------------------------------------


def _dense_chain(sizes: Sequence[int]) -> int:
    """Multiply-adds of a chain of dense layers sizes[0] -> sizes[1] -> ... for one row."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def model_flops(config: ml_collections.ConfigDict, features: int = 0) -> int:
    """Training FLOPs of one step, counted by hand from the config.

    Convention: a matmul of [M, K] by [K, N] (or a convolution, per output position) is
    2 * M * N * K FLOPs; one training step is 3 x the forward matmul FLOPs (the forward pass, plus
    the gradients of the activations and of the weights). Biases, activations, normalisation,
    softmax, the loss, embedding lookups and the optimizer are not counted, nor is the saving of
    skipping the first layer's input gradient (so XLA's count is lower: 2/3 of ours for the MLP).

      mlp          2 * B * sum(d_in * d_out) over the dense layers (784 -> hidden... -> classes).
      cnn          2 * B * H * W * 9 * C_in * C_out per 3x3 SAME conv at its input resolution
                   (each 2x2 pool halves H and W), then the dense layers on the flattened map.
      lstm         per layer 2 * B * T * (F_in * 4H + H * 4H): the input and the recurrent gate
                   projections (F_in = features or embed_dim for the first layer, H after); then the
                   dense head on the last state [B, H] (on [B * T, H] for a per-step model).
      transformer  per layer 2 * B * T * (4 W^2 + 2 W M) for the q/k/v, output and MLP
                   projections, plus 2 * (2 * B * T^2 * W) for the scores and the weighted sum of
                   values over all heads (the full T x T matrix, masked half included, as the usual
                   6N + 12 L T W per token counts it); plus 2 * B * T * W * V for the LM head.

    Args:
      config: a benchmark config.
      features: float features per LSTM step; 0 for a token LSTM (then `embed_dim` counts).

    Returns:
      FLOPs of one training step on the global batch `config.data.batch_size`.
    """
    model, batch = config.model, config.data.batch_size
    if model.name == "mlp":
        sizes = [math.prod(MNIST_SHAPE), *model.hidden_sizes, model.num_classes]
        forward = 2 * batch * _dense_chain(sizes)
    elif model.name == "cnn":
        height, width, channels = MNIST_SHAPE
        forward = 0
        for out_channels in model.conv_features:
            forward += 2 * batch * height * width * 3 * 3 * channels * out_channels
            height, width, channels = height // 2, width // 2, out_channels
        sizes = [height * width * channels, model.dense_features, model.num_classes]
        forward += 2 * batch * _dense_chain(sizes)
    elif model.name == "lstm":
        seq_len, hidden = config.data.seq_len, model.hidden_size
        in_features = features if model.vocab_size == 0 else model.embed_dim
        forward = 0
        for _ in range(model.num_layers):
            forward += 2 * batch * seq_len * (in_features * 4 * hidden + hidden * 4 * hidden)
            in_features = hidden
        rows = batch * seq_len if model.per_step else batch
        forward += 2 * rows * _dense_chain([hidden, *model.head_sizes, model.num_outputs])
    elif model.name == "transformer":
        seq_len, width, mlp_dim = config.data.seq_len, model.width, model.mlp_dim
        tokens = batch * seq_len
        per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)
        per_layer += 2 * 2 * batch * seq_len**2 * width  # scores and values, all heads
        forward = model.num_layers * per_layer
        if model.causal:
            forward += 2 * tokens * width * model.vocab_size  # LM head
        else:
            forward += 2 * batch * width * model.num_classes  # classifier on the mean pool
    else:
        raise KeyError(f"No FLOP formula for model {model.name!r}")
    return 3 * forward


# --- Building and timing --------------------------------------------------------------------------


def random_batch(config: ml_collections.ConfigDict, features: int, seed: int = 0) -> dict:
    """A random numpy batch of the shapes and dtypes `train.data` produces for `config`.

    Args:
      config: a benchmark config.
      features: float features per LSTM step (0: the inputs are token ids or images).
      seed: numpy seed.

    Returns:
      `inputs`, `targets` and `weights` (ones) with the global batch size as the first axis.
    """
    rng = np.random.default_rng(seed)
    batch, model = config.data.batch_size, config.model
    if config.data.dataset == "mnist":
        inputs = rng.random((batch, *MNIST_SHAPE), np.float32)  # [b, 28, 28, 1] in [0, 1)
        targets = rng.integers(0, model.num_classes, batch, dtype=np.int32)  # [b]
    elif model.name == "lstm":
        seq_len = config.data.seq_len
        if features:
            inputs = rng.standard_normal((batch, seq_len, features), np.float32)  # [b, t, f]
        else:  # token ids without padding (id 0), so every sentence is seq_len long
            inputs = rng.integers(1, model.vocab_size, (batch, seq_len), dtype=np.int32)
        targets = rng.integers(0, model.num_outputs, batch, dtype=np.int32)  # [b]
    else:  # a causal language model: targets are tokens at every position
        shape = (batch, config.data.seq_len)
        inputs = rng.integers(0, model.vocab_size, shape, dtype=np.int32)  # [b, t]
        targets = rng.integers(0, model.vocab_size, shape, dtype=np.int32)  # [b, t]
    return {"inputs": inputs, "targets": targets, "weights": np.ones(targets.shape, np.float32)}


class Setup(NamedTuple):
    """A benchmark model ready to step: what `build` returns."""

    config: ml_collections.ConfigDict
    features: int  # float input features (0: the config's own inputs)
    mesh: Any
    state: Any  # a fresh TrainState laid out over `mesh` as the loop lays it out
    state_sharding: Any
    compiled: parallel.Compiled  # the loop's jit steps
    batch: dict  # a fixed random batch in device memory, laid out as the step takes it


def build(name: str, implementation: str = "cpu", pipeline: bool = False) -> Setup:
    """Benchmark `name` built as `python -m train` builds it: through the model table, the loop's
    state initialisation and its compiled steps (also used by compile_time.py)."""
    config = benchmark_config(name, implementation, pipeline)
    loop.check_batch_size(config)
    features = float_features(name, config)
    host_batch = random_batch(config, features)
    mesh = parallel.make_mesh(config.train.mesh)
    state, state_sharding = loop.init_state(
        config, mesh, jax.random.key(config.seed), jnp.asarray(host_batch["inputs"][:1])
    )
    per_call = loop.get_steps_per_call(config.train)
    compiled = parallel.compile_jit(mesh, state_sharding, steps_per_call=per_call)
    batch = jax.device_put(host_batch, NamedSharding(mesh, P(parallel.BATCH_AXES)))
    return Setup(config, features, mesh, state, state_sharding, compiled, batch)


def read_loadavg() -> float:
    """The one-minute load average (first field of /proc/loadavg)."""
    return float(pathlib.Path("/proc/loadavg").read_text().split()[0])


def cpu_model() -> str:
    """The CPU's model name, as `lscpu` reports it (from /proc/cpuinfo); "" where unknown."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else ""


def _busy_cpu_s() -> float:
    """Seconds of CPU time all processes have used since boot (/proc/stat, all but idle+iowait)."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is in user


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """Accumulates, over timed intervals, the CPU time other processes used (in cores)."""

    def __init__(self):
        self.other_s = 0.0
        self.wall_s = 0.0

    def time(self, work: Callable[[], Any]) -> float:
        """Runs `work()`, adds to the totals and returns its wall time in seconds."""
        busy, own, start = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        work()
        wall = time.perf_counter() - start
        self.other_s += (_busy_cpu_s() - busy) - (_own_cpu_s() - own)
        self.wall_s += wall
        return wall

    def cores(self) -> float:
        """Mean number of cores other processes kept busy while timed (clamped at 0)."""
        return max(self.other_s, 0.0) / max(self.wall_s, 1e-9)


class Runner:
    """A donated, compiled train step and its state; `run(n, next_batch)` makes n calls of it (of
    `train.steps_per_call` steps each)."""

    def __init__(self, train: Callable, state, rng: jax.Array):
        self.train, self.state, self.rng = train, state, rng

    def run(self, num_calls: int, next_batch: Callable[[], Any], train: Callable | None = None):
        """n calls (of `train`, if given, on the same state); one host sync at the end (the state
        is donated, so it is replaced each call)."""
        state, train = self.state, train or self.train
        for _ in range(num_calls):
            state, _ = train(state, next_batch(), self.rng)
        self.state = jax.block_until_ready(state)


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (`getrusage`: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class WarmUp(NamedTuple):
    """What `warm_up` did: warm calls, their seconds, and the peak resident memory they added."""

    calls: int
    seconds: float
    rss_growth_bytes: int
    settled: bool  # False: stopped by WARMUP_MAX_S while memory still grew


def warm_up(
    runner: Runner, next_batch: Callable[[], Any], target_s: float, train: Callable | None = None
) -> tuple[int, WarmUp]:
    """Runs warm calls until the step has settled; returns the call count for about `target_s`.

    Settled: the process's peak resident memory has grown by less than RSS_GROWTH_BYTES over the
    last SETTLED_CALLS calls, and at least WARMUP_S seconds have passed (or WARMUP_MAX_S have,
    whatever the memory does). Until then the host heap is still growing to its steady size, each
    growth in a slower step (the kernel maps and zeroes the new pages): a start-up cost, like
    compilation, that a timed repeat would otherwise catch. The call time used for the count is
    the mean of the settled calls.
    """
    count, quiet, quiet_s, start = 0, 0, 0.0, time.perf_counter()
    first_rss = last_rss = peak_rss_bytes()
    while True:
        call_start = time.perf_counter()
        runner.run(1, next_batch, train)
        now = time.perf_counter()
        count += 1
        rss = peak_rss_bytes()
        if rss - last_rss >= RSS_GROWTH_BYTES:
            quiet, quiet_s, last_rss = 0, 0.0, rss
        else:
            quiet, quiet_s = quiet + 1, quiet_s + now - call_start
        settled = quiet >= SETTLED_CALLS and now - start >= WARMUP_S
        if settled or now - start >= WARMUP_MAX_S:
            break
    call_s = quiet_s / quiet if quiet else (now - start) / count
    calls = max(1, math.ceil(target_s / call_s))
    return calls, WarmUp(count, now - start, peak_rss_bytes() - first_rss, settled)


class PeakMatmul:
    """A jitted float32 `jnp.dot` of two [size, size] matrices, compiled once, timed on demand."""

    def __init__(self, size: int):
        rng = np.random.default_rng(0)  # numpy: no jax.random kernels to compile and run first
        self.a, self.b = (
            jnp.asarray(rng.standard_normal((size, size), np.float32)) for _ in range(2)
        )
        self.flops = 2 * size**3
        self.dot = jax.jit(jnp.dot)
        self.dot(self.a, self.b).block_until_ready()  # compile

    def gflops(self, runs: int) -> float:
        """Median GFLOP/s of `runs` timed runs."""
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            self.dot(self.a, self.b).block_until_ready()
            times.append(time.perf_counter() - start)
        return self.flops / statistics.median(times) / 1e9


def xla_flops(executable, num_devices: int) -> float:
    """FLOPs of the compiled step from XLA's cost analysis, summed over the mesh's devices.

    The analysed module is the per-device program, hence the product. XLA counts a loop's body
    once, whatever its trip count, so a scanned model (the LSTM) comes out far below its count.
    """
    analysis = executable.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"]) * num_devices


def _spread(values: list[float], name: str) -> dict[str, float]:
    """`name`: the median of `values`; `name_min`, `name_max`: the extremes."""
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def run_benchmark(
    name: str,
    implementation: str = "cpu",
    mode: str = "memory",
    steps: int | None = None,
    repeats: int = 5,
    peak_repeats: int = 2,
    peak_size: int = PEAK_SIZE,
) -> dict[str, Any]:
    """Benchmarks one model in one process; returns the JSON line's fields (module docstring).

    Args:
      name: a key of `BENCHMARKS`.
      implementation: "standard" or "cpu" (the model's `implementation` field).
      mode: 'memory' or 'pipeline'.
      steps: steps per timed repeat; None picks about TARGET_REPEAT_S seconds' worth (separately
        for memory and pipeline steps).
      repeats: timed repeats (per kind, in pipeline mode).
      peak_repeats: timed runs of the peak matmul after each repeat.
      peak_size: the peak matmul's side.
    """
    if mode not in ("memory", "pipeline"):
        raise ValueError(f"Unknown mode {mode!r}; use 'memory' or 'pipeline'.")
    loadavg = read_loadavg()
    pipeline = mode == "pipeline"
    config, features, mesh, state, state_sharding, compiled, batch = build(
        name, implementation, pipeline
    )
    rng = jax.random.key(config.seed + 1)

    # With train.steps_per_call > 1 (the MLP) the loop calls `train_steps` on stacked batches, and
    # so does this: memory mode stacks copies of its batch, pipeline mode iterator batches.
    per_call = loop.get_steps_per_call(config.train)
    if per_call > 1:
        stacked = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
        batch = jax.device_put(jax.tree.map(lambda x: jnp.stack([x] * per_call), batch), stacked)
    train = compiled.train_steps if per_call > 1 else compiled.train

    start = time.perf_counter()
    executable = train.lower(state, batch, rng).compile()  # trace, lower and compile
    compile_s = time.perf_counter() - start
    state, sums = executable(state, batch, rng)  # the same program the loop's jit call runs
    jax.block_until_ready((state, sums))
    first_step_s = time.perf_counter() - start

    # Over several CPU devices the loop waits for every step (steps queued ahead there can
    # deadlock an all-reduce); the executable run directly must too.
    serial = parallel.serializes_collectives(mesh.devices.flat)
    runner = Runner(parallel.one_at_a_time(executable) if serial else executable, state, rng)
    calls = None if steps is None else -(-steps // per_call)  # --steps, rounded up to whole calls
    # Allocated before the warm-up, so that the heap it settles already holds these buffers.
    peak_dot = PeakMatmul(peak_size)
    estimated_calls, warmup = warm_up(runner, lambda: batch, TARGET_REPEAT_S)
    memory_calls = calls or estimated_calls
    if pipeline:
        setup_start = time.perf_counter()
        on_device = config.data.on_device
        examples, decode = data.device_examples(config.data) if on_device else (None, None)
        pipe = parallel.compile_jit(
            mesh, state_sharding, train_examples=examples, decode=decode, steps_per_call=per_call
        )
        train_iter = data.train_iterator(config.data, seed=config.seed, indices_only=on_device)
        pipe_train = pipe.train_steps if per_call > 1 else pipe.train

        def next_batch():
            if per_call == 1:
                return pipe.put_batch(next(train_iter))
            return pipe.put_batches(loop.stack([next(train_iter) for _ in range(per_call)]))

        runner.run(1, next_batch, pipe_train)  # compiles the gathering step, outside the timing
        pipeline_setup_s = time.perf_counter() - setup_start
        estimated_calls, pipeline_warmup = warm_up(
            runner, next_batch, TARGET_REPEAT_S, train=pipe_train
        )
        pipeline_calls = calls or estimated_calls

    # A peak after every repeat: the machine's slow phases last tens of seconds, which a peak
    # measured once would miss or catch alone. Pipeline repeats alternate with memory repeats.
    meter, peaks, memory_times, pipeline_times = CpuMeter(), [], [], []
    for _ in range(repeats):
        memory_times.append(meter.time(lambda: runner.run(memory_calls, lambda: batch)))
        if pipeline:
            pipeline_times.append(
                meter.time(lambda: runner.run(pipeline_calls, next_batch, pipe_train))
            )
        peaks.append(peak_dot.gflops(peak_repeats))

    memory_steps = memory_calls * per_call
    timed_steps = pipeline_calls * per_call if pipeline else memory_steps
    timed_times = pipeline_times if pipeline else memory_times
    step_ms = _spread([1e3 * t / timed_steps for t in timed_times], "step_ms")
    flops = model_flops(config, features)
    shares = [
        flops * timed_steps / t / (peak * 1e9) for t, peak in zip(timed_times, peaks, strict=True)
    ]
    batch_size = config.data.batch_size
    step_s = step_ms["step_ms"] / 1e3
    result: dict[str, Any] = {
        "model": name,
        "implementation": implementation_of(config),
        "mode": mode,
        "examples_per_s": batch_size / step_s,
    }
    if config.model.name == "transformer":
        result["tokens_per_s"] = batch_size * config.data.seq_len / step_s
    result.update(step_ms)
    result.update(
        {
            "flops_per_step": flops,
            "xla_flops_per_step": xla_flops(executable, mesh.size),
            **_spread(peaks, "peak_gflops"),
            **_spread(shares, "share_of_peak"),
            "compile_s": compile_s,
            "first_step_s": first_step_s,
            "warmup_steps": warmup.calls * per_call,
            "warmup_s": warmup.seconds,
            "warmup_rss_growth_mb": warmup.rss_growth_bytes / 2**20,
            "warmup_settled": warmup.settled,
            "loadavg": loadavg,
            "loadavg_end": read_loadavg(),
            "other_cores_busy": meter.cores(),
            "steps": timed_steps,
            "steps_per_call": per_call,
            "repeats": repeats,
            "batch_size": batch_size,
            "devices": jax.device_count(),
            "platform": jax.devices()[0].platform,
            "cpu": cpu_model(),
            "jax_version": jax.__version__,
        }
    )
    if pipeline:
        memory_step_ms = statistics.median([1e3 * t / memory_steps for t in memory_times])
        result.update(
            {
                "memory_examples_per_s": batch_size / (memory_step_ms / 1e3),
                "memory_step_ms": memory_step_ms,
                "memory_steps": memory_steps,
                "share_of_memory_throughput": memory_step_ms / step_ms["step_ms"],
                "pipeline_setup_s": pipeline_setup_s,
                "pipeline_warmup_steps": pipeline_warmup.calls * per_call,
                "pipeline_warmup_settled": pipeline_warmup.settled,
                "dataset": config.data.dataset,
                "num_workers": config.data.num_workers,
                "on_device": config.data.on_device,
            }
        )
        if BENCHMARKS[name].pipeline_note:
            result["note"] = BENCHMARKS[name].pipeline_note
    return result


def run_fresh(name: str, script_and_args: list[str], stderr=None) -> dict:
    """Runs a benchmark script for model `name` in a fresh Python process; its last JSON line.

    The process starts with the environment `python -m train` gives itself for the benchmark's
    config (`train.process.environment`: host-memory reuse, CPU device count), which must be in
    place before JAX starts.
    """
    env = {**os.environ, **process.environment(benchmark_config(name).train)}
    command = [sys.executable, *script_and_args]
    out = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, stderr=stderr)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=sorted(BENCHMARKS))
    which.add_argument("--all", action="store_true", help="every model, one JSON line each")
    parser.add_argument(
        "--implementation",
        choices=("both", *IMPLEMENTATIONS),
        default="both",
        help="the plain Flax layers, jaxmodels/tuned.py's, or both (a model without the field "
        "runs its one form)",
    )
    parser.add_argument("--mode", choices=("memory", "pipeline"), default="memory")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"steps per repeat (default: ~{TARGET_REPEAT_S} s)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--peak_repeats", type=int, default=2, help="runs of the peak matmul after each repeat"
    )
    parser.add_argument(
        "--peak_size", type=int, default=PEAK_SIZE, help="side of the peak matmul's matrices"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # see main()
    args = parser.parse_args(argv)
    counts = (args.repeats, args.peak_repeats, args.peak_size, args.steps or 1)
    if min(counts) < 1:
        parser.error("--steps, --repeats, --peak_repeats and --peak_size must be positive")
    if args.child and (args.model is None or args.implementation == "both"):
        parser.error("--child runs one --model in one --implementation")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmarks named on the command line; prints and returns one dict per line."""
    args = parse_args(argv)
    if "TFDS_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
        os.environ["TFDS_DATA_DIR"] = str(SHARED_DATA)
    if args.child:  # this process was started by the loop below, environment and all
        result = run_benchmark(
            args.model,
            args.implementation,
            args.mode,
            args.steps,
            args.repeats,
            args.peak_repeats,
            args.peak_size,
        )
        print(json.dumps(result), flush=True)
        return [result]
    # Each run is a fresh process: the environment of `train.process` must be in place before
    # JAX starts a thread, and this process has already imported JAX.
    wanted = IMPLEMENTATIONS if args.implementation == "both" else (args.implementation,)
    options = [f"--mode={args.mode}", f"--repeats={args.repeats}"]
    options += [f"--peak_repeats={args.peak_repeats}", f"--peak_size={args.peak_size}", "--child"]
    options += [f"--steps={args.steps}"] if args.steps else []
    results = []
    for name in list(BENCHMARKS) if args.all else [args.model]:
        available = implementations(name)
        for implementation in [i for i in wanted if i in available] or available[:1]:
            result = run_fresh(
                name, [__file__, f"--model={name}", f"--implementation={implementation}", *options]
            )
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
