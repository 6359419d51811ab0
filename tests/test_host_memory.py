"""train.host_memory: XLA:CPU's freed temporaries are reused, not page-faulted again every call."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from train import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]

# The CNN benchmark's train step (98 MB of XLA temporaries per step), run five times after warming
# up; prints the minor page faults per step.
_FAULTS_PER_STEP = """
import json, resource, sys
from train import host_memory
configured = host_memory.keep_freed_memory()  # before JAX starts its threads
sys.path.insert(0, "benchmarks")
import jax
import step_throughput
setup = step_throughput.build("cnn")
state, rng = setup.state, jax.random.key(0)
for step in range(8):
    if step == 3:
        jax.block_until_ready(state)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, _ = setup.compiled.train(state, setup.batch, rng)
jax.block_until_ready(state)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"configured": configured, "faults": faults}))
"""


def faults_per_step(run_python, keep: bool) -> dict:
    switch = "1" if keep else "0"
    # One CPU device, as the benchmark runs.
    return run_python(
        _FAULTS_PER_STEP, env={"JAXMODELS_KEEP_FREED_MEMORY": switch, "XLA_FLAGS": None}
    )


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's")
def test_freed_temporaries_are_reused_instead_of_page_faulted(run_python):
    default = faults_per_step(run_python, keep=False)
    kept = faults_per_step(run_python, keep=True)
    assert (default["configured"], kept["configured"]) == (False, True)
    # Measured here: 25,200 faults per step (98 MB in 4 KiB pages) without; with it, 0, 5,040 or
    # 10,080 over 10 runs (whole 20 MB blocks that did not fit the space the last step freed).
    # With transparent huge pages always on there would be few faults either way.
    if default["faults"] < 10_000:
        pytest.skip(f"only {default['faults']:.0f} faults per step without the setting")
    assert kept["faults"] < 0.6 * default["faults"], (kept, default)


# Two CPU devices, each with a 335 MB temporary per call, as a step of the small benchmark
# Transformer has 592 MB on each of two devices. Prints the
# minor page faults per call and the peak resident memory gained over the last 8 of 12 calls.
_LARGE_BLOCKS = """
import json, resource
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2,), ("d",))
x = jax.device_put(np.ones((2, 512, 1024), np.float32), NamedSharding(mesh, P("d")))
w = jnp.asarray(np.random.default_rng(0).standard_normal((160, 4), np.float32))

@jax.jit
def f(x, w):
    y = jnp.exp(x[..., None] * jnp.arange(160.0) / 160)  # the matmul reads it from memory
    return (y @ w).sum(axis=(1, 2, 3))

usage = lambda: resource.getrusage(resource.RUSAGE_SELF)
for call in range(12):
    if call == 4:
        before = usage()
    jax.block_until_ready(f(x, w))
after = usage()
print(json.dumps({
    "faults": (after.ru_minflt - before.ru_minflt) / 8,
    "growth_mb": (after.ru_maxrss - before.ru_maxrss) / 1024,
}))
"""


@pytest.mark.skipif(not host_memory.huge_pages_offered(), reason="no transparent huge pages")
def test_large_blocks_are_mapped_on_huge_pages_and_memory_stays_bounded(run_python):
    env = host_memory.environment(ml_collections.ConfigDict({}))
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_NUM_CPU_DEVICES=None)
    result = run_python(_LARGE_BLOCKS, env=env)
    # 2 x 335 MB a call: measured 163,842 faults on 4 KiB pages (glibc's defaults), 1,350 with
    # the environment (2 MB pages; the blocks' unaligned ends take 4 KiB ones).
    assert result["faults"] < 10_000, result
    # Unmapped when freed, the blocks do not pile up. (This program does not fragment the heap
    # the way the small Transformer's steps do; see the module docstring.)
    assert result["growth_mb"] < 100, result


def test_environment_and_restart(monkeypatch):
    on = ml_collections.ConfigDict({})
    monkeypatch.setattr(host_memory, "_glibc", lambda: object())  # as on glibc, anywhere
    monkeypatch.setattr(host_memory, "huge_pages_offered", lambda: True)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")
    env = host_memory.environment(on)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(256 * 2**20)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
    assert "MALLOC_MMAP_MAX_" not in env
    restart = host_memory.restart_environment(on)
    assert restart["GLIBC_TUNABLES"] == env["GLIBC_TUNABLES"]
    assert restart["PATH"] == os.environ["PATH"]  # the whole environment, amended
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # started with it: no restart
    assert host_memory.restart_environment(on) is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    off = ml_collections.ConfigDict({"reuse_host_memory": False})
    assert host_memory.restart_environment(off) is None
    monkeypatch.setattr(host_memory, "huge_pages_offered", lambda: False)  # every block on the heap
    env = host_memory.environment(on)
    assert env["MALLOC_MMAP_MAX_"] == "0" and "GLIBC_TUNABLES" not in env
    assert host_memory.restart_environment(on) is None


def test_config_field_and_environment_switch(monkeypatch):
    off = ml_collections.ConfigDict({"reuse_host_memory": False})
    assert host_memory.configure(off) is False
    monkeypatch.setenv("JAXMODELS_KEEP_FREED_MEMORY", "0")
    assert host_memory.keep_freed_memory() is False
    assert host_memory.configure(ml_collections.ConfigDict({})) is False  # absent: on, env: off


def test_importing_train_does_not_import_jax():
    # The command line sets up host memory after `import train` and before JAX starts a thread.
    code = "import sys, train; from train import host_memory; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    assert out.stdout.decode().strip() == "False"
