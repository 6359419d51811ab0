"""Compile time of the Transformer train step against depth.

With the layers as a scan (`model.scan_layers=True`, the default) XLA compiles one layer and loops
over it, so compile time stays flat as layers are added; unrolled layers compile one by one.

Usage (from the repo root; prints one JSON line per depth, then a summary line):
  python benchmarks/compile_time.py [--layers=2,4,8,12] [--scan_layers=true|false] [--remat=false]
"""

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train import loop  # noqa: E402
from train.config import load_config  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "transformer.py"


def compile_seconds(num_layers: int, scan_layers: bool, remat: bool) -> float:
    """Wall time to lower and compile one train step of the tiny Transformer at this depth."""
    config = load_config(f"{CONFIG}:tiny")
    config.model.num_layers = num_layers
    config.model.scan_layers = scan_layers
    config.model.remat = remat
    mesh = loop.make_mesh(config.train.mesh)
    state, shardings = loop.init_state(config, mesh, jax.random.key(0))
    compiled = loop.compile_jit(mesh, shardings)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,4,8,12")
    parser.add_argument("--scan_layers", default="true")
    parser.add_argument("--remat", default="false")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
    scan, remat = args.scan_layers == "true", args.remat == "true"
    depths = [int(n) for n in args.layers.split(",")]
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


if __name__ == "__main__":
    main()
