"""Shared test set-up: four fake CPU devices and the prepared data in ../shared/data."""

import os
import pathlib

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
