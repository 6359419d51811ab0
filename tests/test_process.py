"""train.process: the command line's process settings, and a library that changes no process."""

import ml_collections
import pytest

from train import process

# The library's entry point, in a fresh process, on a config that asks for every process setting
# the command line knows: afterwards the environment, jax.config, the garbage collector and the
# signal handlers are as they were. Prints what changed.
_UNCHANGED = """
import gc, json, os, signal, sys
import jax
from train import loop
from train.config import load_config

config = load_config("configs/mlp.py:tiny")
config.train.update(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
config.train.update(reuse_host_memory=True, cpu_devices=2)
config.train.compile_cache_dir = sys.argv[2]
environ, values = dict(os.environ), dict(jax.config.values)
handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
loop.train_and_evaluate(config, sys.argv[1])
changed_config = sorted(k for k, v in jax.config.values.items() if values.get(k, v) != v)
print(json.dumps({
    "environ": sorted(set(os.environ.items()) ^ set(environ.items())),
    "config": changed_config,
    "gc": gc.isenabled(),
    "signals": all(signal.getsignal(s) is h for s, h in handlers.items()),
    "devices": jax.device_count(),
}))
"""


def test_train_and_evaluate_leaves_the_process_as_it_found_it(run_python, tmp_path):
    result = run_python(
        _UNCHANGED, str(tmp_path / "run"), str(tmp_path / "cache"), env={"XLA_FLAGS": None}
    )
    assert result == {"environ": [], "config": [], "gc": True, "signals": True, "devices": 1}
    assert not (tmp_path / "cache").exists()  # the compile cache is the command line's


def train_config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(dict(reuse_host_memory=True, cpu_devices=0, compile_cache_dir=""), **fields)
    )


def test_environment_holds_each_requested_setting(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(process, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(process, "huge_pages_offered", lambda: True)
    assert process.environment(train_config(cpu_devices=2)) == {
        "MALLOC_ARENA_MAX": "1",
        "MALLOC_TRIM_THRESHOLD_": str(2**62),
        "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # several devices: off the heap from 32 MB
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        "JAX_NUM_CPU_DEVICES": "2",
    }
    assert process.environment(train_config())["MALLOC_MMAP_THRESHOLD_"] == str(256 * 2**20)
    monkeypatch.setattr(process, "huge_pages_offered", lambda: False)  # every block on the heap
    assert process.environment(train_config())["MALLOC_MMAP_MAX_"] == "0"
    assert process.environment(train_config(reuse_host_memory=False)) == {}
    monkeypatch.setattr(process, "glibc_version", lambda: None)  # macOS, musl: nothing to set
    assert process.environment(train_config()) == {}
    # An explicit device count in the environment wins over the config.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert process.environment(train_config(cpu_devices=2)) == {}
    with pytest.raises(ValueError, match=r"train.cpu_devices=-1 must be an integer >= 0"):
        process.environment(train_config(cpu_devices=-1))


def test_restart_only_when_the_environment_lacks_a_setting(monkeypatch):
    monkeypatch.setattr(process, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(process, "huge_pages_offered", lambda: False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    config = train_config()
    restart = process.restart_environment(config)
    assert restart is not None and restart["MALLOC_ARENA_MAX"] == "1"
    for name, value in process.environment(config).items():
        monkeypatch.setenv(name, value)
    assert process.restart_environment(config) is None  # the restarted process goes on


_FAULTS_PER_STEP = """
import json, resource, statistics
import jax, jax.numpy as jnp, numpy as np
x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 1024), np.float32))

@jax.jit
def f(x):  # about 100 MB of temporaries, allocated and freed in every call
    y = jnp.exp(x[:, :, None] * jnp.arange(96.0))
    return (y * y.sum(axis=0)).sum()

faults = []
for call in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call after the first ten: the heap settles within a few calls, and with jaxlib
# 0.7's XLA:CPU one call in five may still grow it.
print(json.dumps({"faults": statistics.median(faults[10:])}))
"""


@pytest.mark.skipif(process.glibc_version() is None, reason="malloc settings are glibc's")
def test_reused_host_memory_is_not_page_faulted_again_every_step(run_python):
    plain = run_python(_FAULTS_PER_STEP, env={"XLA_FLAGS": None})
    env = process.host_memory_environment()
    env.pop("GLIBC_TUNABLES", None)  # huge pages aside: these blocks are smaller than 256 MB
    reused = run_python(_FAULTS_PER_STEP, env={"XLA_FLAGS": None, **env})
    # 100 MB of 4 KiB pages is 25,000 faults a call when glibc maps and unmaps each block.
    if plain["faults"] < 10_000:
        pytest.skip(f"only {plain['faults']:.0f} faults per call without the settings")
    assert reused["faults"] < 0.2 * plain["faults"], (reused, plain)
