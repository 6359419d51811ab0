"""Starting the command line from a test. A plain module, free of conftest.py's process
settings, so that a test module importing it can itself be imported by the fresh processes some
tests start."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tests compile hundreds of small programs and run most of them for a few steps, where
# XLA:CPU's fullest machine-code optimisation (LLVM's, level 3 by default) costs more than it
# saves. Level 1 keeps every HLO pass (the programs compute the same things) and runs the tiny
# configs' steps as fast (21 ms a Transformer step either way) but compiles their
# initialisation in a fraction of the time (the Transformer's 3.3 -> 2.2 s, the CNN's 6.7 ->
# 1.5 s, measured with nothing beside); level 0 compiles faster still but runs
# three times slower. Users' runs keep XLA's default; the tests' processes, and the command
# lines they start, use this.
COMPILE_FLAGS = "--xla_backend_optimization_level=1"


def xla_flags(num_devices: int = 1) -> str:
    """XLA_FLAGS for a test process: the tests' compile setting and `num_devices` CPU devices."""
    devices = f" --xla_force_host_platform_device_count={num_devices}" if num_devices > 1 else ""
    return COMPILE_FLAGS + devices


def start_train(*arguments: str, signal_at: str | None = None) -> subprocess.Popen:
    """Starts `python -m train *arguments` from the repo root, with text pipes for its output.
    `signal_at` sets the command line's test hook JAXMODELS_TEST_SIGNAL (train/__main__.py), by
    which the run signals itself at an exact step; without it the hook is unset."""
    env = dict(os.environ)
    env.pop("JAXMODELS_TEST_SIGNAL", None)
    if signal_at is not None:
        env["JAXMODELS_TEST_SIGNAL"] = signal_at
    return subprocess.Popen(
        [sys.executable, "-m", "train", *arguments],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
