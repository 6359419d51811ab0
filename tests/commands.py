"""Starting the command line from a test. A plain module, free of conftest.py's process
settings, so that a test module importing it can itself be imported by the fresh processes some
tests start."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


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
