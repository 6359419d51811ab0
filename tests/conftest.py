"""Shared test set-up: four fake CPU devices and the prepared data in ../shared/data."""

import json
import os
import pathlib
import subprocess
import sys

# Must happen before jax is imported anywhere: multi-device tests (jit vs pmap) need 4 devices.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED = _REPO.parent / "shared" / "data" / "tensorflow_datasets_array_record"
if "TFDS_DATA_DIR" not in os.environ and _SHARED.is_dir():
    os.environ["TFDS_DATA_DIR"] = str(_SHARED)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The TFDS data directory holding the prepared ArrayRecord datasets."""
    path = os.environ.get("TFDS_DATA_DIR", "")
    if not pathlib.Path(path).is_dir():
        pytest.fail(
            f"TFDS_DATA_DIR={path!r} is not a directory; point it at "
            "shared/data/tensorflow_datasets_array_record"
        )
    return path


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
