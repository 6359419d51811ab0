"""Peak host memory of the command line, as a README user runs it.

One `python -m train --config=configs/transformer.py:tiny` run, started by a small Python process
that reads `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` once the run has ended: the peak
resident memory of the training process alone (the pytest process's own children, earlier tests'
runs among them, do not count). `--workdir` and the compile cache aside (off, so every run
compiles alike and nothing is written to ~/.cache), the command is the README's.
"""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from train import process

REPO = pathlib.Path(__file__).resolve().parents[1]

# Measured on a 2-core AMD EPYC with glibc 2.36 and the defaults of train/process.py (one heap,
# never trimmed; the tiny model's blocks, 15 MB at most, all on it), two runs each: 0.64 and
# 0.67 GB with jax 0.10.2, 0.49 and 0.48 GB with jax 0.7.2. The bound is 1.3 x 0.67 GB.
PEAK_BOUND_GB = 0.87

_RUN_AND_MEASURE = """
import json, resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
print(json.dumps({"status": result.returncode, "stderr": result.stderr[-20000:],
                  "peak_gb": peak_kib / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
def test_tiny_transformer_command_stays_under_its_peak_memory(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # JAX's one CPU device, as for a README user (conftest sets 4)
    command = [
        sys.executable,
        "-m",
        "train",
        "--config=configs/transformer.py:tiny",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.compile_cache_dir=",
    ]
    out = subprocess.run(
        [sys.executable, "-c", _RUN_AND_MEASURE, *command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    run = json.loads(out.strip().splitlines()[-1])
    assert run["status"] == 0, run["stderr"][-3000:]
    assert run["peak_gb"] < PEAK_BOUND_GB, run["peak_gb"]
    # The end-of-run log line reports the same peak, as the process saw it.
    line = [ln for ln in run["stderr"].splitlines() if "Finished at step 200;" in ln]
    assert len(line) == 1, run["stderr"][-3000:]
    logged = float(line[0].split("peak resident memory ")[1].split(" GB")[0])
    assert abs(logged - run["peak_gb"]) <= 0.01, (logged, run["peak_gb"])


def test_several_cpu_devices_keep_blocks_from_32_mb_off_the_heap(monkeypatch):
    # The default Transformer's two devices each freed a 241 MB block every step; on the one heap
    # they grew the process to 7.3 GB over 1500 steps (benchmarks/RESULTS.md, 2026-12-06).
    monkeypatch.setattr(process, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(process, "huge_pages_offered", lambda: True)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    config = ml_collections.ConfigDict(
        dict(reuse_host_memory=True, cpu_devices=2, compile_cache_dir="")
    )
    threshold = lambda: process.environment(config)["MALLOC_MMAP_THRESHOLD_"]  # noqa: E731
    assert threshold() == str(32 * 2**20)
    config.cpu_devices = 0  # one device: only blocks from 256 MB
    assert threshold() == str(256 * 2**20)
    # A device count in the environment wins over the config's, for the malloc settings too.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert threshold() == str(32 * 2**20)
    assert "JAX_NUM_CPU_DEVICES" not in process.environment(config)
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
    config.cpu_devices = 2
    assert threshold() == str(256 * 2**20)
    # Without huge pages, several devices still map their large blocks (4 KiB pages then).
    monkeypatch.setattr(process, "huge_pages_offered", lambda: False)
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")
    env = process.environment(config)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 * 2**20) and "MALLOC_MMAP_MAX_" not in env
    assert "GLIBC_TUNABLES" not in env
