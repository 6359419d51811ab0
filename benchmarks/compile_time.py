"""Compile time of a train step: cold and from the persistent cache, or against Transformer depth.

Usage (from the repo root):
  python benchmarks/compile_time.py --model=transformer_small        # cold, then cached: one line
  python benchmarks/compile_time.py --model=transformer_small --repeats=3   # medians of 3 pairs
  python benchmarks/compile_time.py --layers=2,4,8,12 [--scan_layers=true|false] [--remat=false]

`--model` (a benchmark of `step_throughput.py`) runs two fresh Python processes one after the other
that share an empty persistent compilation cache, as two runs of `python -m train` would. Each
builds the state and a batch, then times tracing and lowering (`lower_s`) and compiling, or loading
from the cache (`compile_s`), of the train step the loop compiles, and runs it once
(`first_run_s`). The first process compiles; the second finds the executable in the cache. The
printed `first_step_compile_s` is lower_s + compile_s: the time before the first step can start.
With `--repeats=N` the pair runs N times, each over a new cache; every field is then the median
of the N runs, and `cold_first_step_compile_s_runs` / `cached_..._runs` list each run's figure.
`first_run_s` doubles as a gauge of the machine's phase: the same step in a slow phase takes
longer to run as well as to compile. `--implementation` picks the model's layers as in
step_throughput.py (default `cpu`, what `auto` runs on a CPU).

`--layers` compiles the tiny Transformer at several depths, cache off: with `model.scan_layers=true`
XLA compiles one layer and loops over it, so compile time stays flat as layers are added; unrolled
layers (the default, faster to run on CPU) compile one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train import loop, parallel, process  # noqa: E402
from train.config import load_config  # noqa: E402

CONFIG = REPO / "configs" / "transformer.py"


def time_first_step(name: str, implementation: str = "cpu") -> dict[str, float | bool]:
    """Lower, compile (or load) and run one train step of benchmark `name`; seconds of each, and
    whether the executable came from the persistent cache (`cache_hit`)."""
    import step_throughput  # noqa: PLC0415  (imports jax and the models: only in this mode)

    # The same state and step as the throughput benchmark.
    setup = step_throughput.build(name, implementation)
    state, batch, rng = setup.state, setup.batch, jax.random.key(1)
    with loop.monitoring_events() as events:
        start = time.perf_counter()
        lowered = setup.compiled.train.lower(state, batch, rng)
        lowered_at = time.perf_counter()
        executable = lowered.compile()
        compiled_at = time.perf_counter()
    jax.block_until_ready(executable(state, batch, rng))
    return {
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "first_run_s": time.perf_counter() - compiled_at,
        "cache_hit": loop.CACHE_HIT_EVENT in events,
    }


def cold_and_cached(name: str, implementation: str = "cpu") -> dict:
    """Runs `--child` twice in fresh processes over one new cache directory."""
    import step_throughput  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as cache_dir:
        command = [__file__, f"--child={name}", f"--cache_dir={cache_dir}"]
        command.append(f"--implementation={implementation}")
        runs = [step_throughput.run_fresh(name, command, subprocess.PIPE) for _ in range(2)]
        cache_files = sum(1 for _ in pathlib.Path(cache_dir).rglob("*") if _.is_file())
    result = {"model": name, "implementation": implementation}
    for label, run in zip(("cold", "cached"), runs, strict=True):
        result.update({f"{label}_{key}": _rounded(value) for key, value in run.items()})
        result[f"{label}_first_step_compile_s"] = round(run["lower_s"] + run["compile_s"], 3)
    result["cache_files"] = cache_files
    return result


def _rounded(value):
    return round(value, 3) if isinstance(value, float) else value


def repeated(name: str, repeats: int, implementation: str = "cpu") -> dict:
    """`cold_and_cached` `repeats` times: the median of each field, and each run's totals."""
    runs = [cold_and_cached(name, implementation) for _ in range(repeats)]
    result = {"model": name, "implementation": implementation, "repeats": repeats}
    for key, value in runs[0].items():
        if key in result:  # model, implementation
            continue
        if isinstance(value, bool):  # the cache hits: one per run
            result[f"{key}_runs"] = [run[key] for run in runs]
        elif isinstance(value, float | int):
            median = np.median([run[key] for run in runs])
            result[key] = int(median) if isinstance(value, int) else round(float(median), 3)
    for label in ("cold", "cached"):
        key = f"{label}_first_step_compile_s"
        result[f"{key}_runs"] = [run[key] for run in runs]
    result.update({"loadavg": os.getloadavg()[0], "jax_version": jax.__version__})
    return result


def compile_seconds(num_layers: int, scan_layers: bool, remat: bool) -> float:
    """Wall time to lower and compile one train step of the tiny Transformer at this depth."""
    config = load_config(f"{CONFIG}:tiny")
    config.model.num_layers = num_layers
    config.model.scan_layers = scan_layers
    config.model.remat = remat
    mesh = parallel.make_mesh(config.train.mesh)
    state, shardings = loop.init_state(config, mesh, jax.random.key(0))
    compiled = parallel.compile_jit(mesh, shardings)
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    batch = compiled.put_batch(
        {
            "inputs": np.zeros((batch_size, seq_len), np.int32),
            "targets": np.zeros((batch_size, seq_len), np.int32),
            "weights": np.ones((batch_size, seq_len), np.float32),
        }
    )
    start = time.perf_counter()
    compiled.train.lower(state, batch, jax.random.key(1)).compile()
    return time.perf_counter() - start


def depth_sweep(depths: list[int], scan: bool, remat: bool) -> None:
    jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
    seconds = {}
    for depth in depths:
        seconds[depth] = compile_seconds(depth, scan, remat)
        print(json.dumps({"num_layers": depth, "scan_layers": scan, "remat": remat,
                          "compile_s": round(seconds[depth], 3)}), flush=True)  # fmt: skip
    summary = {
        "scan_layers": scan,
        "remat": remat,
        "ratio_deepest_to_shallowest": round(seconds[depths[-1]] / seconds[depths[0]], 2),
        "loadavg": os.getloadavg()[0],
        "jax_version": jax.__version__,
    }
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a benchmark of step_throughput.py: cold and cached")
    which.add_argument("--layers", help="comma-separated depths of the tiny Transformer")
    which.add_argument("--child", help=argparse.SUPPRESS)  # one timed process of --model
    parser.add_argument("--repeats", type=int, default=1, help="--model: cold/cached pairs")
    parser.add_argument("--scan_layers", default="true")
    parser.add_argument("--remat", default="false")
    parser.add_argument(
        "--implementation", choices=("standard", "cpu"), default="cpu", help="--model: its layers"
    )
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        process.set_compile_cache(args.cache_dir)  # what `python -m train` does
        print(json.dumps(time_first_step(args.child, args.implementation)))
    elif args.model:
        print(json.dumps(repeated(args.model, args.repeats, args.implementation)))
    else:
        depths = [int(n) for n in args.layers.split(",")]
        depth_sweep(depths, args.scan_layers == "true", args.remat == "true")


if __name__ == "__main__":
    main()
