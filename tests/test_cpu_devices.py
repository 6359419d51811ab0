"""train.cpu_devices: `config.train.cpu_devices` splits the CPU into that many JAX devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from train import cpu_devices

REPO = pathlib.Path(__file__).resolve().parents[1]

# Configures the devices as `python -m train` does (before JAX starts), then reports the count.
_CONFIGURE = """
import json, sys
import ml_collections
from train import cpu_devices
done = cpu_devices.configure(ml_collections.ConfigDict({"cpu_devices": int(sys.argv[1])}))
import jax
print(json.dumps({"configured": done, "devices": jax.device_count()}))
"""


def configure_in_fresh_process(count: int, **env) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    for name in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES"):
        if name not in env or env[name] is None:
            env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-c", _CONFIGURE, str(count)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_config_sets_the_cpu_device_count_before_jax_starts():
    assert configure_in_fresh_process(2, XLA_FLAGS=None) == {"configured": True, "devices": 2}
    assert configure_in_fresh_process(0, XLA_FLAGS=None) == {"configured": False, "devices": 1}


def test_a_count_in_the_environment_wins():
    flags = "--xla_force_host_platform_device_count=3"
    assert configure_in_fresh_process(2, XLA_FLAGS=flags) == {"configured": False, "devices": 3}
    assert configure_in_fresh_process(2, JAX_NUM_CPU_DEVICES="1") == {
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


def run_command_line(workdir: pathlib.Path, count: int) -> tuple[list[dict], str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config=configs/transformer.py:tiny",
            f"--workdir={workdir}",
            f"--config.train.cpu_devices={count}",
            "--config.train.num_steps=20",
            "--config.train.log_every=10",
            "--config.train.eval_every=20",
            "--config.train.checkpoint_every=20",
            "--config.train.sample_lines=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], result.stderr


def test_command_line_trains_on_two_cpu_devices_like_on_one(tmp_path):
    one, _ = run_command_line(tmp_path / "one", 0)
    two, log = run_command_line(tmp_path / "two", 2)
    assert "Devices: 2 x cpu over 1 process(es); mesh {'data': 2, 'fsdp': 1}." in log
    assert [r["step"] for r in two] == [r["step"] for r in one] == [10, 20]
    # Real tiny Shakespeare, the batch split over two devices: the same training up to round-off.
    for key in ("train/loss", "eval/loss"):
        a, b = [r[key] for r in one if key in r], [r[key] for r in two if key in r]
        np.testing.assert_allclose(b, a, rtol=1e-5)
