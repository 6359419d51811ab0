"""Runs a config to completion and prints one JSON line of results.

    python benchmarks/results.py --config=configs/cnn.py [--workdir=DIR] [--config.FIELD=VALUE ...]

The line holds the final report's metrics, the best evaluation metric (highest accuracy, or
lowest loss for language models) and the step it came at, the wall time of the whole command,
the steps per second, the peak resident memory of the training process, the hardware and the
exact command. The run itself is `python -m train` in a fresh workdir (default
`runs/results/<config>`), so a table row is reproduced by its command. Language models are
evaluated over the whole validation split, as every evaluation is. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """`lscpu`'s model name (the kind of CPU matters more than its speed here)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> str:
    """The devices JAX trains on, and the CPU."""
    code = "import jax; d = jax.devices(); print(f'{len(d)} x {d[0].device_kind}')"
    devices = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return f"{devices}; {os.cpu_count()}-core {cpu_name()}"


def best(reports: list[dict], language_model: bool) -> tuple[str, float, int]:
    """(metric, best value, its step) over the reports with an evaluation."""
    evaluated = [r for r in reports if "eval/loss" in r]
    if language_model:
        top = min(evaluated, key=lambda r: r["eval/loss"])
        return "eval/loss", top["eval/loss"], top["step"]
    metric = (
        "eval/sequence_accuracy" if "eval/sequence_accuracy" in evaluated[-1] else "eval/accuracy"
    )
    top = max(evaluated, key=lambda r: r[metric])
    return metric, top[metric], top["step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/X.py[:variant]")
    parser.add_argument("--workdir", default=None)
    args, overrides = parser.parse_known_args(argv)
    name = pathlib.Path(args.config.split(":")[0]).stem
    variant = args.config.partition(":")[2]
    workdir = pathlib.Path(args.workdir or f"runs/results/{name}{'-' + variant if variant else ''}")
    shutil.rmtree(workdir, ignore_errors=True)  # a result is a whole run, never a resumed one
    train = [sys.executable, "-m", "train", f"--config={args.config}", f"--workdir={workdir}"]
    start = time.monotonic()
    completed = subprocess.run([*train, *overrides], cwd=REPO, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - start
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        return completed.returncode
    config = json.loads((REPO / workdir / "config.json").read_text())
    reports = [
        json.loads(line) for line in (REPO / workdir / "metrics.jsonl").read_text().splitlines()
    ]
    final = reports[-1]
    language_model = config["data"]["dataset"] == "tiny_shakespeare"
    metric, value, step = best(reports, language_model)
    rates = [r["train/steps_per_second"] for r in reports[1:]] or [final["train/steps_per_second"]]
    result = {
        "config": args.config,
        "final": {k: v for k, v in final.items() if k.startswith("eval/") or k == "train/loss"},
        "best": {"metric": metric, "value": value, "step": step},
        "steps": final["step"],
        "wall_s": round(wall, 1),
        # The median report's rate: the first report also carries the compile.
        "steps_per_s": round(sorted(rates)[len(rates) // 2], 2),
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "hardware": hardware(),
        "command": shlex.join(
            ["python", "benchmarks/results.py", f"--config={args.config}", *overrides]
        ),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
