"""Scale-out on the command line: two processes on 127.0.0.1, the persistent compile cache."""

import concurrent.futures
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
from commands import xla_flags

from train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT = [
    "--config=configs/mlp.py:tiny",
    "--config.train.num_steps=20",
    "--config.train.log_every=5",
    "--config.train.eval_every=20",
    "--config.train.checkpoint_every=10",
    "--config.train.compile_cache_dir=",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(arguments, num_devices, **kwargs):
    env = dict(os.environ, XLA_FLAGS=xla_flags(num_devices))
    return subprocess.Popen(
        [sys.executable, "-m", "train", *arguments],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def test_two_processes_match_one_process_with_two_devices(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    shared = tmp_path / "two_processes"  # one workdir, as on a shared file system
    # Two steps per call: steps 1-4, 7-14 and 17-20 in pairs, each process stacking its own rows
    # of both batches; 5, 6, 15 and 16 (around the reports at 5 and 15) one per call.
    short = [*SHORT, "--config.train.steps_per_call=2"]
    processes = [
        start(
            [
                *short,
                f"--workdir={shared}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            num_devices=1,
        )  # fmt: skip
        for i in range(2)
    ]
    # Both at once: each waits for the other at every step, so one left unread (its pipe full)
    # would stall both.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        logs = list(pool.map(finish, processes))
    single = tmp_path / "one_process"
    finish(start([*short, f"--workdir={single}"], num_devices=2))

    two, one = read_metrics(shared / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [5, 10, 15, 20]
    for key in ("train/loss", "eval/loss"):
        got = [r[key] for r in two if key in r]
        want = [r[key] for r in one if key in r]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # Only process 0 writes the log's progress bar and the metrics.
    assert "step/s" in logs[0] and "step/s" not in logs[1]
    data_states = sorted(p.name for p in (shared / "checkpoints" / "20" / "data").iterdir())
    assert data_states == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


def test_a_missing_process_is_named_after_the_startup_timeout(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    lonely = start(
        [*SHORT, f"--workdir={tmp_path}", f"--coordinator_address={address}",
         "--num_processes=2", "--process_id=0", "--startup_timeout=1"],
        num_devices=1,
    )  # fmt: skip
    _, stderr = lonely.communicate(timeout=120)
    assert lonely.returncode == 2, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "process 0 of 2 could not reach the other processes" in line
    assert "within 1 s" in line and "ids 0..1" in line


def first_step(stderr: str) -> tuple[float, str]:
    seconds, source = re.search(
        r"First step: ([0-9.]+) s \(train step ([a-z ]+)\)", stderr
    ).groups()
    return float(seconds), source


def test_second_run_compiles_from_the_persistent_cache(tmp_path):
    cache = tmp_path / "cache"
    arguments = [
        "--config=configs/transformer.py:tiny",
        "--config.train.num_steps=2",
        "--config.train.sample_lines=0",
        f"--config.train.compile_cache_dir={cache}",
    ]
    cold = finish(start([*arguments, f"--workdir={tmp_path / 'a'}"], num_devices=1))
    warm = finish(start([*arguments, f"--workdir={tmp_path / 'b'}"], num_devices=1))
    # The sources come from JAX's cache-hit event. How much time the cache saves is measured by
    # benchmarks/compile_time.py, not asserted here (timings vary with the machine's load).
    (_, cold_source), (_, warm_source) = first_step(cold), first_step(warm)
    assert cold_source == "compiled" and warm_source == "from the compilation cache"
    assert any(cache.iterdir())
