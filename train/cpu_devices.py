"""Split a CPU-only host into several JAX devices, so the batch is split over its cores.

JAX gives a CPU one device, and XLA:CPU spreads each op of a step over the cores as it sees fit.
Some ops it runs on one core: batched matmuls (a Transformer's attention: 96 heads x batch of
small matmuls at about 72 GFLOP/s with 1 core or 2) and many elementwise fusions. With one JAX
device per core instead (`jax_num_cpu_devices`), the batch is split over the devices as over
GPUs (data parallel, gradients all-reduced), each device's program runs on its own core, and
those ops use every core. The costs: the all-reduce, and waiting for every step before the next
is queued (`train.loop.serializes_collectives`).

`config.train.cpu_devices` decides (absent: 1):

  1   JAX's default: one CPU device.
  0   one device per core this process may run on.
  N   N devices.

Measured on the 2-core development machine (step time, 1 -> 2 devices, `python
benchmarks/step_throughput.py` or the config on random batches):

  small benchmark Transformer (6 x 384, 4096 tokens)  2.16 -> 1.90 s
  configs/transformer.py (4 x 256, 4096 tokens)        767 -> 735 ms
  configs/transformer.py:tiny (2 x 64, 1024 tokens)    12.9 -> 12.0 ms
  tiny benchmark Transformer (4 x 128, 768 tokens)     44 -> 52 ms
  configs/cnn.py                                       48 -> 49 ms
  configs/lstm.py                                      221 -> 239 ms
  benchmark MLP                                        0.56 -> 0.89 ms

so `configs/transformer.py` asks for 0 and the other configs for 1.

The count only holds if it is set before JAX starts its backends: `python -m train` calls
`configure` before anything touches a device, the benchmarks start each model in a process whose
environment carries it (`environment`), and `train.loop.train_and_evaluate` calls it too (in a
process where JAX already runs it can only log that the count stays). An environment that fixes
the count already (`JAX_NUM_CPU_DEVICES`, or `--xla_force_host_platform_device_count` in
`XLA_FLAGS`, as the tests set) wins over the config. GPUs and TPUs are not affected: the setting
only shapes JAX's CPU backend, which then holds no training arrays.
"""

from __future__ import annotations

import os

from absl import logging

ENV_VAR = "JAX_NUM_CPU_DEVICES"  # read by JAX when it is imported
_XLA_FLAG = "--xla_force_host_platform_device_count"


def _cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def environment_fixes_count() -> bool:
    """Whether the environment already sets the CPU device count (then it wins)."""
    return ENV_VAR in os.environ or _XLA_FLAG in os.environ.get("XLA_FLAGS", "")


def requested(train_config) -> int | None:
    """The CPU device count `train_config.cpu_devices` asks for; None for JAX's default.

    Raises:
      ValueError: `cpu_devices` is negative or not an integer.
    """
    value = train_config.get("cpu_devices", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"train.cpu_devices={value!r} is not a device count; use 1 (one CPU device, JAX's "
            "default), 0 (one per core) or a positive number."
        )
    count = _cores() if value == 0 else value
    return None if count == 1 else count


def count(train_config) -> int | None:
    """The CPU device count to set for `train_config`: None when JAX's default or the
    environment decides."""
    wanted = requested(train_config)
    return None if wanted is None or environment_fixes_count() else wanted


def environment(train_config) -> dict[str, str]:
    """Environment variables that give a new process `configure(train_config)`'s device count."""
    wanted = count(train_config)
    return {} if wanted is None else {ENV_VAR: str(wanted)}


def configure(train_config) -> int | None:
    """Sets JAX's CPU device count to what `train_config.cpu_devices` asks for.

    Must come before JAX starts its backends (before the first array or device query). Later, it
    changes nothing, and logs a warning if JAX's CPU devices differ from the request.

    Args:
      train_config: `config.train`.

    Returns:
      The device count set, or None if nothing was set.
    """
    wanted = count(train_config)
    if wanted is None:
        return None
    import jax  # not at module level: `python -m train` calls this before JAX is imported

    try:
        jax.config.update("jax_num_cpu_devices", wanted)
    except RuntimeError:  # the backends are up: the count is fixed for this process
        have = jax.local_device_count() if jax.default_backend() == "cpu" else wanted
        if have != wanted:
            logging.warning(
                "train.cpu_devices asks for %d CPU devices, but JAX already runs with %d; set "
                "%s=%d before JAX starts (python -m train does).",
                wanted,
                have,
                ENV_VAR,
                wanted,
            )
        return None
    return wanted
