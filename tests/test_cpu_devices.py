"""train.cpu_devices: a CPU split into the JAX devices `config.train.cpu_devices` asks for."""

import logging
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest

from train import cpu_devices
from train.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0))


def train_config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


@pytest.fixture
def clean_environment(monkeypatch):
    """No device count in the environment (the conftest's XLA_FLAGS sets 4)."""
    monkeypatch.delenv(cpu_devices.ENV_VAR, raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)


def test_requested_count(clean_environment):
    assert cpu_devices.requested(train_config()) is None  # absent: JAX's default
    assert cpu_devices.requested(train_config(cpu_devices=1)) is None
    assert cpu_devices.requested(train_config(cpu_devices=3)) == 3
    assert cpu_devices.requested(train_config(cpu_devices=0)) == (None if CORES == 1 else CORES)
    assert cpu_devices.environment(train_config(cpu_devices=3)) == {"JAX_NUM_CPU_DEVICES": "3"}
    assert cpu_devices.environment(train_config(cpu_devices=1)) == {}


@pytest.mark.parametrize("value", [-1, 2.0, "2", True])
def test_bad_count_is_one_clear_error(value):
    with pytest.raises(ValueError, match=r"train\.cpu_devices=.* is not a device count; use 1"):
        cpu_devices.requested(train_config(cpu_devices=value))


@pytest.mark.parametrize(
    "variable, value",
    [("XLA_FLAGS", "--xla_force_host_platform_device_count=4"), ("JAX_NUM_CPU_DEVICES", "4")],
)
def test_environment_that_sets_a_count_wins(clean_environment, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    assert cpu_devices.count(train_config(cpu_devices=3)) is None
    assert cpu_devices.environment(train_config(cpu_devices=3)) == {}
    assert cpu_devices.configure(train_config(cpu_devices=3)) is None


def test_configure_after_jax_started_keeps_the_devices_and_warns(clean_environment, caplog):
    have = jax.local_device_count()  # JAX runs already (4 CPU devices, from the conftest)
    wanted = have + 1
    with caplog.at_level(logging.WARNING):
        assert cpu_devices.configure(train_config(cpu_devices=wanted)) is None
    assert jax.local_device_count() == have
    assert f"asks for {wanted} CPU devices, but JAX already runs with {have}" in caplog.text


def test_transformer_config_splits_the_cpu_per_core_and_the_others_do_not():
    for name, want in [("transformer", 0), ("mlp", 1), ("cnn", 1), ("lstm", 1)]:
        assert load_config(REPO / "configs" / f"{name}.py").train.cpu_devices == want, name


@pytest.mark.parametrize("environment, devices", [({}, 2), ({"JAX_NUM_CPU_DEVICES": "4"}, 4)])
def test_command_line_runs_on_the_devices_asked_for(tmp_path, environment, devices):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    args = [
        "--config=configs/mlp.py:tiny",
        "--config.train.cpu_devices=2",
        "--config.train.num_steps=4",
        "--config.train.log_every=2",
        "--config.train.eval_every=4",
        "--config.train.checkpoint_every=4",
        "--config.train.compile_cache_dir=",
        f"--workdir={tmp_path}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "train", *args],
        cwd=REPO,
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Devices: {devices} x cpu over 1 process(es)" in result.stderr
    assert "eval/loss=" in result.stdout
