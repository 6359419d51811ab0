"""Shared test set-up: four fake CPU devices, and real data that travels with the repository.

$TFDS_DATA_DIR defaults to tests/data/tfds: small real slices of MNIST and SST-2 (see
tests/data/make_slices.py); tiny_shakespeare comes whole from the package's embedded copy. Tests
that need the full data sets use the `shared_data_dir` fixture, ../shared/data's prepared copy,
and are skipped where there is none.
"""

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from commands import xla_flags

# Must happen before jax is imported anywhere: multi-device tests (jit vs pmap) need 4 devices;
# the tests' compile setting is commands.COMPILE_FLAGS.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags(4)}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_REPO = pathlib.Path(__file__).resolve().parents[1]
SLICES_DIR = _REPO / "tests" / "data" / "tfds"
SHARED_DATA = _REPO.parent / "shared" / "data"  # CI has it; a fresh clone need not
os.environ.setdefault("TFDS_DATA_DIR", str(SLICES_DIR))

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same tiny configs' steps again (a reference run, then a stopped and a
# resumed one): a persistent compilation cache for this test session, in a fresh directory so
# no test reads another session's executables, compiles each once. Under pytest-xdist the
# workers share their controller's (JAX writes each entry whole, so a worker reads a program
# another compiled, never half of it), which the controller made and removes at exit. In
# these processes only; the command-line runs the tests start use their configs' own cache
# settings.
_IS_XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
_COMPILE_CACHE = os.path.join(
    tempfile.gettempdir(),
    f"jaxmodels-tests-xla-{os.getppid() if _IS_XDIST_WORKER else os.getpid()}",
)
if not _IS_XDIST_WORKER:
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)  # a dead process's of the same number
    atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
os.makedirs(_COMPILE_CACHE, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The TFDS data dir of the committed slices (MNIST train[:8192] and test[:1000]; SST-2
    train[:4096], all of validation, test[:256]), whatever $TFDS_DATA_DIR says, so the numbers
    tests assert hold everywhere."""
    return str(SLICES_DIR)


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """../shared/data (raw files and full prepared copies); the test is skipped without it."""
    if not (SHARED_DATA / "tensorflow_datasets_array_record").is_dir():
        pytest.skip(f"needs the full data sets in {SHARED_DATA}, which is absent here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def run_python():
    """`run_python(code, *args, env={...})`: runs `python -c code *args` from the repo root in a
    fresh process, whose environment is this one's with `env` applied (a None value unsets the
    variable), and returns the JSON object that its last line of stdout prints."""

    def run(code: str, *args: str, env: dict[str, str | None] | None = None) -> dict:
        environ = {**os.environ, **(env or {})}
        environ = {name: value for name, value in environ.items() if value is not None}
        out = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=_REPO,
            env=environ,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    return run
