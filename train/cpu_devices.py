"""Split the host CPU into several JAX devices (`config.train.cpu_devices`), data parallel.

By default JAX sees one CPU device, and XLA:CPU runs a step as one program whose operations share
the cores. Some of those operations run on one core only: XLA:CPU's batched matmuls (attention's
per-head products), the LSTM's small recurrent matmuls, and much of the elementwise work. While
one of them runs and nothing else is ready, the other cores wait. With `cpu_devices = N` the
process has N CPU devices, the batch is split over them like over any devices (the `data` mesh
axis), and each device runs its half of the step at the same time as the other, so a
single-core operation of one device has the other device's work beside it. The gradients are
summed across the devices (an all-reduce in host memory); the update is the same up to float32
round-off, as on any number of devices.

Measured on the 2-core development machine (`benchmarks/step_throughput.py`, one device -> two,
in one slow phase of the machine): the small benchmark Transformer 3.26-3.40 -> 2.80-2.81 s a
step, the benchmark LSTM 223 -> 191 ms, the default `configs/transformer.py` 1.01 -> 0.87 s. Small
models lose: the tiny benchmark Transformer 48 -> 65 ms and the MLP 0.56 -> 0.89 ms (their steps
are too short to pay for the split), and the default `configs/lstm.py` (whose 16,384-word
embedding gradient is summed across devices) was no faster. So each config sets its own value,
and 0 keeps JAX's default.

The device count must be set before JAX starts its CPU backend. `python -m train` and the
benchmarks call `configure` (or pass `environment`) first; `train_and_evaluate` calls it too,
which works where nothing has run on JAX yet and otherwise logs that the setting came too late.
In your own script: `jax.config.update("jax_num_cpu_devices", N)` right after `import jax`. An
explicit device count in the environment (`JAX_NUM_CPU_DEVICES`, or
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, as the tests use) wins over the config.
The setting only affects the CPU backend: on a GPU or TPU host, training uses those devices.
"""

from __future__ import annotations

import os

from absl import logging

_ENV = "JAX_NUM_CPU_DEVICES"
_XLA_FLAG = "xla_force_host_platform_device_count"


def requested(train_config) -> int:
    """`train_config.cpu_devices`; 0 (JAX's default) where the config lacks the field.

    Raises:
      ValueError: for a negative count.
    """
    count = train_config.get("cpu_devices", 0)
    if count < 0:
        raise ValueError(
            f"train.cpu_devices={count} must be >= 0 (0 keeps JAX's default of one CPU device)"
        )
    return count


def set_elsewhere() -> bool:
    """Whether the environment already fixes the CPU device count (it then wins)."""
    return _ENV in os.environ or _XLA_FLAG in os.environ.get("XLA_FLAGS", "")


def environment(train_config) -> dict[str, str]:
    """Environment variables that give a new process `configure(train_config)`'s device count."""
    count = requested(train_config)
    return {_ENV: str(count)} if count and not set_elsewhere() else {}


def configure(train_config) -> bool:
    """Gives JAX `train_config.cpu_devices` CPU devices, if it asks for some and JAX allows it.

    Args:
      train_config: `config.train`.

    Returns:
      True if the count was set (or was already that count); False if the config asks for none,
      the environment fixes the count, or JAX's CPU backend already runs with another count
      (logged as a warning).
    """
    count = requested(train_config)
    if not count or set_elsewhere():
        return False
    import jax  # here, not at the top: `python -m train` imports this module before JAX

    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend has started with another count
        logging.warning(
            "train.cpu_devices=%d has no effect: JAX has already started its CPU backend. Set it "
            "before the first JAX operation (jax.config.update('jax_num_cpu_devices', %d)), or "
            "run `python -m train`.",
            count,
            count,
        )
        return False
    return True
