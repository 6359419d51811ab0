"""Keep freed host memory for reuse, so XLA:CPU does not page-fault its buffers in every step.

XLA:CPU allocates each step's temporary buffer when the step starts and frees it when it ends: 136
MB for the benchmark LSTM, 98 MB for the CNN. glibc's malloc serves a block that large with a fresh
`mmap` and returns it with `munmap`, so in every step the kernel maps and zeroes the same pages
again. On the 2-core development machine that was 34,900 page faults and 90 ms of system CPU time
per LSTM step of 218 ms, and 64 ms per CNN step of 88 ms: time the cores did not spend on the model.

`keep_freed_memory()` sets three malloc options (glibc's `mallopt`, the same settings as the
environment variables `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>`):
every thread allocates from one heap, large blocks come from that heap instead of `mmap`, and the
heap is not trimmed, so the next step gets the pages the last one freed, already mapped. Measured
on that machine (step time before -> after, `benchmarks/step_throughput.py`): LSTM 205 -> 171 ms,
CNN 88 -> 46 ms, tiny Transformer 58 -> 43 ms, small Transformer 2.72 -> 2.33 s (whose 1.4 GB of
temporaries made 356,000 page faults a step). The cost: the process keeps its peak host memory
until it exits instead of handing it back between steps.

One heap has a cost: threads that allocate at the same time wait for each other. The MLP's step
(0.55 ms) allocates small buffers from several threads while the next step is dispatched, and ran
10% slower (0.61 ms), so `configs/mlp.py` turns it off: `config.train.reuse_host_memory` (absent:
True) decides, through `configure(config.train)`.

The one-heap setting only holds if it comes before any thread but the main one has allocated,
and importing JAX starts a thread. So `python -m train` calls `configure` before it imports JAX
(importing the `train` package does not), the benchmarks start each model in a process whose
environment carries the settings (`ENVIRONMENT`), and in your own script call `configure` before
`import jax`, or set those environment variables. `train.loop.train_and_evaluate` calls
`configure` as well, which in a process where JAX already runs still keeps large blocks off
`mmap` for the threads that share the main heap (in one test, 60% fewer page faults instead of
all of them). Both are no-ops outside glibc (macOS, musl) and when
`JAXMODELS_KEEP_FREED_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD -1: never trim (glibc mallopt(3))
_ENV_SWITCH = "JAXMODELS_KEEP_FREED_MEMORY"
# The same settings as glibc environment variables, read when a process starts.
ENVIRONMENT = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**62),  # a size_t here: effectively never
}


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (the only one with these options), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError outside glibc)
    except (OSError, AttributeError):
        return None
    return libc


def _asked_for(train_config) -> bool:
    """`train_config.reuse_host_memory`; True where the config lacks the field."""
    return train_config.get("reuse_host_memory", True)


def _switched_on() -> bool:
    """False when the environment turns the settings off (`JAXMODELS_KEEP_FREED_MEMORY=0`)."""
    return os.environ.get(_ENV_SWITCH, "1") != "0"


def environment(train_config) -> dict[str, str]:
    """Environment variables that give a new process `configure(train_config)`'s settings."""
    on = _asked_for(train_config) and _switched_on() and _glibc() is not None
    return dict(ENVIRONMENT) if on else {}


def configure(train_config) -> bool:
    """`keep_freed_memory()` if `train_config.reuse_host_memory` (absent: True), else nothing.

    Args:
      train_config: `config.train`.

    Returns:
      Whether the malloc options were set.
    """
    return keep_freed_memory() if _asked_for(train_config) else False


def keep_freed_memory() -> bool:
    """Makes malloc keep freed memory mapped for reuse (see the module docstring).

    Returns:
      True if the options were set; False outside glibc, when `JAXMODELS_KEEP_FREED_MEMORY=0`, or
      if glibc refused one of them.
    """
    libc = _glibc() if _switched_on() else None
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
    # mallopt returns 1 on success, 0 on error; every option is tried either way.
    return all([libc.mallopt(option, value) == 1 for option, value in settings])
