"""train.cpu_devices: `config.train.cpu_devices` splits the CPU into that many JAX devices.

Training on two of them through the command line: tests/test_loop.py.
"""

import jax
import ml_collections
import pytest

from train import cpu_devices

# Configures the devices as `python -m train` does (before JAX starts), then reports the count.
_CONFIGURE = """
import json, sys
import ml_collections
from train import cpu_devices
done = cpu_devices.configure(ml_collections.ConfigDict({"cpu_devices": int(sys.argv[1])}))
import jax
print(json.dumps({"configured": done, "devices": jax.device_count()}))
"""


def configure_in_fresh_process(run_python, count: int, **env) -> dict:
    return run_python(_CONFIGURE, str(count), env={"JAX_PLATFORMS": "cpu", **env})


def test_config_sets_the_cpu_device_count_before_jax_starts(run_python):
    assert configure_in_fresh_process(run_python, 2, XLA_FLAGS=None) == {
        "configured": True,
        "devices": 2,
    }
    assert configure_in_fresh_process(run_python, 0, XLA_FLAGS=None) == {
        "configured": False,
        "devices": 1,
    }


def test_a_count_in_the_environment_wins(run_python):
    flags = "--xla_force_host_platform_device_count=3"
    assert configure_in_fresh_process(run_python, 2, XLA_FLAGS=flags) == {
        "configured": False,
        "devices": 3,
    }
    assert configure_in_fresh_process(run_python, 2, JAX_NUM_CPU_DEVICES="1") == {
        "configured": False,
        "devices": 1,
    }
    assert cpu_devices.environment(ml_collections.ConfigDict({"cpu_devices": 2})) == {}  # conftest


def test_field_values(monkeypatch):
    running = jax.device_count()  # JAX runs here with conftest's 4 devices
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    two = ml_collections.ConfigDict({"cpu_devices": 2})
    assert cpu_devices.environment(two) == {"JAX_NUM_CPU_DEVICES": "2"}
    assert cpu_devices.environment(ml_collections.ConfigDict({})) == {}  # absent: JAX's default
    with pytest.raises(ValueError, match=r"train.cpu_devices=-1 must be >= 0"):
        cpu_devices.requested(ml_collections.ConfigDict({"cpu_devices": -1}))
    # JAX already runs in this process: another count is refused (with a warning), not applied.
    assert cpu_devices.configure(ml_collections.ConfigDict({"cpu_devices": 3})) is False
    assert jax.device_count() == running == 4
