"""Train-step throughput of the benchmark models, through the project's own state, step and jit.

Usage (from the repo root):
  python benchmarks/step_throughput.py --model=cnn
  python benchmarks/step_throughput.py --model=transformer_small --steps=4 --repeats=3
  python benchmarks/step_throughput.py --model=mlp --mode=pipeline
  python benchmarks/step_throughput.py --all [--mode=pipeline]

Each benchmark is a config file from `configs/` with a few fields overridden (dropout 0 always),
run through `train.state.create_train_state` and `train.steps.train_step`, compiled by
`train.parallel.compile_jit` over `train.parallel.make_mesh()` with the state donated: what
`python -m train` runs. Each model runs in a fresh process, set up as `python -m train` sets up
its own: with the host-memory settings of the config's `train.reuse_host_memory` (see
`train.host_memory`) and as many CPU devices as its `train.cpu_devices` asks for (see
`train.cpu_devices`: the LSTM and the small Transformer run on two, one per core). Where the
config sets `train.steps_per_call` > 1 (the MLP: 25), every call is that many steps
(`train.steps.train_steps` on stacked batches), as in the loop, and the times are per step.

Modes:
  memory    one fixed random batch (stacked `steps_per_call` times), put on device once, laid
            out as the step takes it. Tracing, lowering and compiling the step gives `compile_s`
            (`first_step_s` adds its first run). Warm steps follow until the process's peak
            resident memory stops growing (`warm_up`: the host heap's start-up growth is not the
            steady step; `warmup_steps`, `warmup_s`, `warmup_rss_growth_mb`); then `--repeats`
            times `--steps` steps, with one `jax.block_until_ready` at the end of each repeat
            (after every step over several CPU devices, as the loop waits for each).
  pipeline  the same steps fed the way `python -m train` feeds them: with `data.on_device` the
            split is held in device memory and `train.data.train_iterator` sends batch indices,
            else it reads whole batches; either goes through the loop's `put_batch`. Repeats
            alternate with memory-mode repeats of the same config in the same process (A B A B,
            as load on this machine drifts), which gives `share_of_memory_throughput`.

Every model prints one JSON line. `flops_per_step` is the hand count of `model_flops` (documented
there), `xla_flops_per_step` XLA's cost analysis of the compiled step (or call: it counts the body
of the steps' scan once, so still one step). The peak is a jitted float32
4096x4096 `jnp.dot`, timed `--peak_repeats` times after every repeat of the model, in the same
process. `share_of_peak` is the median over repeats of the repeat's model FLOP/s over the peak
taken just after it (`_min`, `_max`: the extremes over repeats), so that a slow phase of the
machine (it has some, tens of seconds long) slows both sides of a ratio instead of one.
`peak_gflops` is the median of those peaks (with `_min` and `_max`).
`loadavg` is the first field of /proc/loadavg before the model's work started (the benchmark loads
the machine itself, so a later reading would count it); `other_cores_busy` is the CPU time that
other processes used during the timed repeats, in cores, from /proc/stat minus this process.
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

from train import cpu_devices, data, host_memory, loop  # noqa: E402
from train.config import load_config  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data" / "tensorflow_datasets_array_record"
TARGET_REPEAT_S = 4.0  # default --steps: about this many seconds per repeat
WARMUP_S = 0.5  # the warm-up runs at least this long, however soon memory settles
SETTLED_CALLS = 3  # warm calls in a row without memory growth that end the warm-up
RSS_GROWTH_BYTES = 8 * 2**20  # less peak resident memory growth than this is none
WARMUP_MAX_S = 120.0  # the warm-up stops after this long even if memory still grows
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
            "model.dropout_rate": 0.0,
            "data.seq_len": 100,
            "data.batch_size": 64,
            "train.cpu_devices": 2,  # one device per core (train/cpu_devices.py): 223 -> 191 ms
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
            "train.cpu_devices": 0,  # one device: two made the step slower (48 -> 65 ms)
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


def benchmark_config(name: str, pipeline: bool) -> ml_collections.ConfigDict:
    """The locked config of benchmark `name`; `pipeline` drops its `memory_only` overrides."""
    benchmark = BENCHMARKS[name]
    config = load_config(REPO / "configs" / benchmark.config_file)
    overrides = {
        key: value
        for key, value in benchmark.overrides.items()
        if not (pipeline and key in benchmark.memory_only)
    }
    config.update_from_flattened_dict(overrides)  # locked: a misspelt key raises
    return config


def float_features(name: str, config: ml_collections.ConfigDict) -> int:
    """Float features per LSTM step, or 0 when the model reads token ids or images."""
    if config.model.name == "lstm" and config.model.vocab_size == 0:
        return BENCHMARKS[name].float_features
    return 0


# --- Model FLOPs by hand --------------------------------------------------------------------------


def _dense_chain(sizes: Sequence[int]) -> int:
    """Multiply-adds of a chain of dense layers sizes[0] -> sizes[1] -> ... for one row."""
    return sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=False))


def model_flops(
    config: ml_collections.ConfigDict, features: int = 0, visible_scores_only: bool = False
) -> int:
    """Training FLOPs of one step, counted by hand from the config.

    Convention: a matmul of [M, K] by [K, N] (or a convolution, per output position) is
    2 * M * N * K FLOPs; one training step is 3 x the forward matmul FLOPs (the forward pass, plus
    the two matmuls of the backward pass: gradients of the activations and of the weights).
    Biases, activations, normalisation, softmax, the loss, embedding lookups and the optimizer
    update are not counted, and neither is the saving of skipping the input gradient of the first
    layer, which nobody computes (so XLA's count is lower: about 2/3 of ours for the MLP).

      mlp          2 * B * sum(d_in * d_out) over the dense layers (784 -> hidden... -> classes).
      cnn          2 * B * H * W * 9 * C_in * C_out per 3x3 SAME conv at its input resolution
                   (each 2x2 pool halves H and W), then the dense layers on the flattened map.
      lstm         per layer 2 * B * T * (F_in * 4H + H * 4H): the input and the recurrent gate
                   projections (F_in = features or embed_dim for the first layer, H after); then the
                   dense head on the last state [B, H] (on [B * T, H] for a per-step model).
      transformer  per layer 2 * B * T * (3 W^2 + W^2 + 2 W M) for the q/k/v, output and MLP
                   projections, plus 2 * (2 * B * T^2 * W) for the attention scores q.k and the
                   weighted sum of values over all heads; plus 2 * B * T * W * V for the LM head.
                   T^2 counts the full T x T score matrix, masked half included, as a plain
                   Transformer computes it and as the usual model-FLOPs formula (6N + 12 L T W
                   per token) counts it, so that shares compare with other implementations. Our
                   causal attention skips most masked key blocks (see
                   `jaxmodels.transformer.causal_attention`); `visible_scores_only` counts only
                   the T (T + 1) / 2 visible scores instead, a lower bound on the useful work.

    Args:
      config: a benchmark config.
      features: float features per LSTM step; 0 for a token LSTM (then `embed_dim` counts).
      visible_scores_only: a causal Transformer's attention counts the visible scores only.

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
        scores = (
            seq_len * (seq_len + 1) // 2 if visible_scores_only and model.causal else seq_len**2
        )
        per_layer += 2 * 2 * batch * scores * width  # scores and values, all heads
        forward = model.num_layers * per_layer
        if model.causal:
            forward += 2 * tokens * width * model.vocab_size  # LM head
        else:
            forward += 2 * batch * width * model.num_classes  # classifier on the mean pool
    else:
        raise KeyError(f"No FLOP formula for model {model.name!r}")
    return 3 * forward


# --- Batches, state and timing --------------------------------------------------------------------


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


def build(name: str, pipeline: bool = False) -> Setup:
    """Benchmark `name` built as `python -m train` builds it: through the model table, the loop's
    state initialisation and its compiled steps (also used by compile_time.py)."""
    config = benchmark_config(name, pipeline)
    loop.check_batch_size(config)
    features = float_features(name, config)
    host_batch = random_batch(config, features)
    mesh = parallel.make_mesh()
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
    whatever the memory does). Until then the host heap is still growing to its steady size
    (the small Transformer's by 310-380 MB over its first 4 steps), each growth in a slower step
    (the kernel maps and zeroes the new pages): a start-up cost, like compilation, that a timed
    repeat would otherwise catch. The call time used for the count is the mean of the settled
    calls.
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

    The analysed module is the per-device (SPMD-partitioned) program, hence the product. XLA counts
    a while loop's body once, whatever its trip count, so a scanned model (the LSTM; a Transformer
    whose layers are scanned) comes out far below its real count.
    """
    analysis = executable.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"]) * num_devices


def _step_stats(times_s: list[float], num_steps: int) -> dict[str, float]:
    per_step_ms = [1e3 * t / num_steps for t in times_s]
    return {
        "step_ms": statistics.median(per_step_ms),
        "step_ms_min": min(per_step_ms),
        "step_ms_max": max(per_step_ms),
    }


def run_benchmark(
    name: str,
    mode: str = "memory",
    steps: int | None = None,
    repeats: int = 5,
    peak_repeats: int = 2,
) -> dict[str, Any]:
    """Benchmarks one model; returns the JSON line's fields (see the module docstring).

    Args:
      name: a key of `BENCHMARKS`.
      mode: 'memory' or 'pipeline'.
      steps: steps per timed repeat; None picks about TARGET_REPEAT_S seconds' worth (separately
        for memory and pipeline steps).
      repeats: timed repeats (per kind, in pipeline mode).
      peak_repeats: timed runs of the 4096 peak matmul after each repeat (and of the 2048 one,
        once, at the end).
    """
    if mode not in ("memory", "pipeline"):
        raise ValueError(f"Unknown mode {mode!r}; use 'memory' or 'pipeline'.")
    loadavg = read_loadavg()
    pipeline = mode == "pipeline"
    config, features, mesh, state, state_sharding, compiled, batch = build(name, pipeline)
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
    # The peak matmul's buffers are allocated before the warm-up, so that the heap it settles
    # already holds them.
    peak_dot, peaks = PeakMatmul(4096), []
    estimated_calls, memory_warmup = warm_up(runner, lambda: batch, TARGET_REPEAT_S)
    memory_calls = calls or estimated_calls
    meter = CpuMeter()
    memory_times, pipeline_times = [], []
    if pipeline:
        # What `python -m train` does: with data.on_device the split is put in device memory and
        # the host sends batches of indices (see train.parallel.compile_jit), else host batches.
        setup_start = time.perf_counter()
        on_device = config.data.on_device
        examples, decode = data.device_examples(config.data) if on_device else (None, None)
        pipe = parallel.compile_jit(
            mesh,
            state_sharding,
            train_examples=examples,
            decode=decode,
            steps_per_call=per_call,
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
    # The peak is measured after every repeat, so that each repeat has one taken under the same
    # conditions: this machine has slow phases tens of seconds long, which a peak measured once,
    # after all repeats, would miss or catch alone.
    for _ in range(repeats):  # alternating kinds in pipeline mode: load drifts between repeats
        memory_times.append(meter.time(lambda: runner.run(memory_calls, lambda: batch)))
        if pipeline:
            pipeline_times.append(
                meter.time(lambda: runner.run(pipeline_calls, next_batch, pipe_train))
            )
        peaks.append(peak_dot.gflops(peak_repeats))
    del peak_dot
    peak_2048 = PeakMatmul(2048).gflops(peak_repeats)
    flops = model_flops(config, features)
    visible_flops = model_flops(config, features, visible_scores_only=True)
    flops_xla = xla_flops(executable, mesh.size)

    memory_steps = memory_calls * per_call
    pipeline_steps = pipeline_calls * per_call if pipeline else 0
    memory = _step_stats(memory_times, memory_steps)
    timed_times, timed_steps = (
        (pipeline_times, pipeline_steps) if pipeline else (memory_times, memory_steps)
    )
    timed = _step_stats(timed_times, timed_steps)
    step_s = timed["step_ms"] / 1e3

    def shares(model_flops_per_step: float) -> list[float]:
        """Each repeat's model FLOP/s over the peak measured after it."""
        return [
            model_flops_per_step * timed_steps / t / (p * 1e9)
            for t, p in zip(timed_times, peaks, strict=True)
        ]

    flop_shares = shares(flops)

    batch_size = config.data.batch_size
    result: dict[str, Any] = {
        "model": name,
        "mode": mode,
        "examples_per_s": batch_size / step_s,
    }
    if config.model.name == "transformer":
        result["tokens_per_s"] = batch_size * config.data.seq_len / step_s
    result.update(timed)
    result.update(
        {
            "flops_per_step": flops,
            "xla_flops_per_step": flops_xla,
            "peak_gflops": statistics.median(peaks),
            "peak_gflops_min": min(peaks),
            "peak_gflops_max": max(peaks),
            "peak_gflops_2048": peak_2048,
            "share_of_peak": statistics.median(flop_shares),
            "share_of_peak_min": min(flop_shares),
            "share_of_peak_max": max(flop_shares),
            "share_of_peak_visible_scores": statistics.median(shares(visible_flops)),
            "compile_s": compile_s,
            "first_step_s": first_step_s,
            "warmup_steps": memory_warmup.calls * per_call,
            "warmup_s": memory_warmup.seconds,
            "warmup_rss_growth_mb": memory_warmup.rss_growth_bytes / 2**20,
            "warmup_settled": memory_warmup.settled,
            "loadavg": loadavg,
            "loadavg_end": read_loadavg(),
            "other_cores_busy": meter.cores(),
            "steps": pipeline_steps if pipeline else memory_steps,
            "steps_per_call": per_call,
            "repeats": repeats,
            "batch_size": batch_size,
            "devices": jax.device_count(),
            "platform": jax.devices()[0].platform,
            "jax_version": jax.__version__,
        }
    )
    if pipeline:
        memory_examples_per_s = batch_size / (memory["step_ms"] / 1e3)
        result.update(
            {
                "memory_examples_per_s": memory_examples_per_s,
                "memory_step_ms": memory["step_ms"],
                "memory_steps": memory_steps,
                "share_of_memory_throughput": result["examples_per_s"] / memory_examples_per_s,
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

    The process starts with the host-memory settings and CPU device count of the benchmark's
    config in its environment (`train.host_memory.environment`, `train.cpu_devices.environment`),
    as `python -m train` applies them before JAX starts.
    """
    train_config = benchmark_config(name, False).train
    env = {**os.environ, **host_memory.environment(train_config)}
    env.update(cpu_devices.environment(train_config))
    command = [sys.executable, *script_and_args]
    out = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, stderr=stderr)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=sorted(BENCHMARKS))
    which.add_argument("--all", action="store_true", help="every model, one JSON line each")
    parser.add_argument("--mode", choices=("memory", "pipeline"), default="memory")
    parser.add_argument(
        "--steps", type=int, default=None, help=f"steps per repeat (default: ~{TARGET_REPEAT_S} s)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--peak_repeats", type=int, default=2, help="runs of the peak matmul after each repeat"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # see main()
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.repeats < 1 or args.peak_repeats < 1:
        parser.error("--steps, --repeats and --peak_repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmarks named on the command line; prints and returns one dict per model."""
    args = parse_args(argv)
    if "TFDS_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
        os.environ["TFDS_DATA_DIR"] = str(SHARED_DATA)
    if args.child:  # this process was started by the branch below, environment and all
        result = run_benchmark(args.model, args.mode, args.steps, args.repeats, args.peak_repeats)
        print(json.dumps(result), flush=True)
        return [result]
    # Each model runs in a fresh process, as `python -m train` runs one, whose environment carries
    # the host-memory settings of its config (train.host_memory): they must be in place before
    # JAX starts a thread, and this process has already imported JAX.
    results = []
    for name in list(BENCHMARKS) if args.all else [args.model]:
        options = [f"--mode={args.mode}", f"--repeats={args.repeats}"]
        options += [f"--peak_repeats={args.peak_repeats}", "--child"]
        options += [f"--steps={args.steps}"] if args.steps else []
        result = run_fresh(name, [__file__, f"--model={name}", *options])
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
