"""Keep freed host memory for reuse, so XLA:CPU does not page-fault its buffers in every step.

XLA:CPU allocates each step's temporary buffers when the step starts and frees them when it ends:
136 MB for the benchmark LSTM, 98 MB for the CNN, 1.2 GB for the small benchmark Transformer.
glibc's malloc serves a block that large with a fresh `mmap` and returns it with `munmap`, so in
every step the kernel maps and zeroes the same pages again, 4 KiB at a time. On the 2-core
development machine that was 34,900 page faults and 90 ms of system CPU time per LSTM step of
218 ms, and 64 ms per CNN step of 88 ms: time the cores did not spend on the model.

`keep_freed_memory()` sets malloc options (glibc's `mallopt`) so that every thread allocates from
one heap, large blocks come from that heap instead of `mmap`, and the heap is not trimmed: the next
step gets the pages the last one freed, already mapped. Measured on that machine (step time before
-> after, `benchmarks/step_throughput.py`): LSTM 205 -> 171 ms, CNN 88 -> 46 ms, tiny Transformer
58 -> 43 ms, small Transformer 2.72 -> 2.33 s (whose temporaries made 356,000 page faults a step).
The cost: the process keeps its peak host memory until it exits.

Blocks of `LARGE_BLOCK_BYTES` (256 MB) and more are the exception, where the kernel offers
transparent huge pages. On the heap they fragment it: XLA asks for 64-byte aligned blocks, glibc
carves each from a slightly larger free chunk and the slivers left at its ends are soon taken by
small allocations, so a freed block's hole no longer fits the next request of the same size. Over
two CPU devices (`train.cpu_devices`), whose blocks come and go in a different order every step,
the small benchmark Transformer's heap grew by a device's 592 MB block every few steps without
settling (2.0 -> 7.9 GB in 52 steps, each growth a step one second slower); on one device it grew
to 3.1-4.4 GB. So those blocks come from `mmap` on 2 MB huge pages (glibc's tunable
`glibc.malloc.hugetlb=1`): freed at once, and mapped again with 300 page faults where 4 KiB pages
took 151,000. The small Transformer then holds 1.9 GB at most; in alternating runs of 25 steps its
median step was 2.27 and 2.17 s on two devices against 2.89 and 2.10 s with every block on the heap.

glibc reads that tunable only when a process starts (it has no `mallopt`), so `environment()`
gives the variables that set all of it for a new process, and `python -m train` restarts itself
once with them (`restart_environment`) before it imports JAX. Without huge pages (a kernel with
them off, or the tunable missing) large blocks stay on the heap, as above.

One heap has a cost: threads that allocate at the same time wait for each other. The MLP's step
(0.55 ms) allocates small buffers from several threads while the next step is dispatched, and ran
10% slower (0.61 ms), so `configs/mlp.py` turns it off: `config.train.reuse_host_memory` (absent:
True) decides, through `configure(config.train)` and `environment(config.train)`.

The one-heap setting only holds if it comes before any thread but the main one has allocated,
and importing JAX starts a thread. So `python -m train` calls `configure` before it imports JAX
(importing the `train` package does not), the benchmarks start each model in a process whose
environment carries the settings (`environment`), and in your own script start Python with that
environment, or call `configure` before `import jax`. `train.loop.train_and_evaluate` calls
`configure` as well, which in a process where JAX already runs still keeps large blocks off
`mmap` for the threads that share the main heap (in one test, 60% fewer page faults instead of
all of them). All of it is a no-op outside glibc (macOS, musl) and when
`JAXMODELS_KEEP_FREED_MEMORY=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pathlib
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD -1: never trim (glibc mallopt(3))
_ENV_SWITCH = "JAXMODELS_KEEP_FREED_MEMORY"
LARGE_BLOCK_BYTES = 256 * 2**20  # from here up, blocks are mmapped on huge pages where offered
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: malloc memory on huge pages
_THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


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


def huge_pages_offered() -> bool:
    """Whether malloc can put memory on huge pages here: glibc 2.35 or newer (older ones ignore
    the tunable) and a kernel that gives transparent huge pages to memory that asks (`always` or
    `madvise`, not `never`)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    try:
        version = tuple(int(part) for part in libc.gnu_get_libc_version().split(b".")[:2])
        return version >= (2, 35) and "[never]" not in _THP_SETTING.read_text()
    except (OSError, ValueError):  # no THP setting to read, or a version that is not numbers
        return False


def _tunables(environ) -> list[str]:
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def started_with_huge_pages() -> bool:
    """Whether this process started with glibc's huge-page tunable (read only at start)."""
    return HUGE_PAGES_TUNABLE in _tunables(os.environ)


def environment(train_config) -> dict[str, str]:
    """Environment variables that give a new process the malloc settings `train_config` asks for.

    Returns:
      `{}` when reuse is off (`reuse_host_memory` False, `JAXMODELS_KEEP_FREED_MEMORY=0`) or
      outside glibc; else one heap, never trimmed, and where the kernel offers huge pages, blocks
      of LARGE_BLOCK_BYTES and more mapped on them (`GLIBC_TUNABLES` keeps its other entries),
      elsewhere every block on the heap.
    """
    if not (_asked_for(train_config) and _switched_on() and _glibc() is not None):
        return {}
    env = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(2**62)}  # 2**62: never
    if not huge_pages_offered():
        env["MALLOC_MMAP_MAX_"] = "0"
        return env
    env["MALLOC_MMAP_THRESHOLD_"] = str(LARGE_BLOCK_BYTES)
    tunables = _tunables(os.environ)
    if HUGE_PAGES_TUNABLE not in tunables:
        tunables.append(HUGE_PAGES_TUNABLE)
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def restart_environment(train_config) -> dict[str, str] | None:
    """The whole environment to restart this process with, or None if it needs no restart.

    A restart is needed only for what glibc reads at start alone: the huge-page tunable, when
    `environment(train_config)` asks for it and this process started without it. The command
    line restarts at most once (the new process has the tunable).
    """
    wanted = environment(train_config)
    if "GLIBC_TUNABLES" not in wanted or started_with_huge_pages():
        return None
    return {**os.environ, **wanted}


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
    # Large blocks off the heap only where they land on huge pages (see the module docstring).
    on_huge_pages = started_with_huge_pages()
    large = (_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) if on_huge_pages else (_M_MMAP_MAX, 0)
    settings = ((_M_ARENA_MAX, 1), large, (_M_TRIM_THRESHOLD, _NEVER))
    # mallopt returns 1 on success, 0 on error; every option is tried either way.
    return all([libc.mallopt(option, value) == 1 for option, value in settings])
