"""Process settings that the command line (`python -m train`) makes before JAX starts.

The library never changes the process: `train_and_evaluate`, the steps and the models give the
same results without anything here. These settings only make XLA:CPU runs faster or let a second
run skip compiling, so they belong to the program that owns the process. Each has one switch,
a field of `config.train`:

- `reuse_host_memory` (CPU, glibc): keep freed host memory for reuse. XLA:CPU allocates each
  step's temporary buffers afresh, and glibc serves and returns blocks that large with a new
  `mmap` and `munmap`, so the kernel page-faults and zeroes the same pages in every step. With
  one malloc heap that is never trimmed, the next step gets the pages the last one freed, already
  mapped. Blocks of `LARGE_BLOCK_BYTES` and more stay off the heap, on transparent huge pages
  where the kernel offers them: on the heap they fragmented it when several CPU devices freed
  theirs in a different order every step. With several CPU devices (`cpu_devices`) the same
  happens to much smaller blocks, so there blocks of `SHARED_HEAP_BLOCK_BYTES` and more stay off
  the heap: the default Transformer's two devices each free a 241 MB block every step, and on the
  heap those grew the process to 3.5 GB in 200 steps and 7.3 GB in 1500. The price: the process
  keeps its peak host memory, blocks mapped afresh are zeroed by the kernel in every step, and
  threads that allocate at once wait for each other, which costs steps of well under a
  millisecond (the MLP config turns it off). Measured: benchmarks/RESULTS.md.
- `cpu_devices` (CPU): split the CPU into that many JAX devices, data parallel. XLA:CPU runs some
  operations on one core (small matmuls, much elementwise work); with one device per core each
  runs its part of the batch beside the other's. Only large steps gain, so each config sets its
  own count; 0 keeps JAX's one device. An explicit count in the environment
  (`JAX_NUM_CPU_DEVICES`, or `--xla_force_host_platform_device_count` in `XLA_FLAGS`) wins.
- `compile_cache_dir` (any backend): JAX's persistent compilation cache; "" leaves it off.

glibc reads its malloc settings, and JAX its CPU device count, when the process starts, so the
command line restarts itself once with them in its environment (`restart_environment`) before it
imports JAX. In your own script, start Python with `environment(config.train)` in the environment
for the same effect. What each setting buys, measured: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

try:
    import resource
except ImportError:  # Windows: no peak memory to report
    resource = None

LARGE_BLOCK_BYTES = 256 * 2**20  # from here up, blocks are mmapped on huge pages where offered
# The same with several CPU devices: their blocks, freed in a different order every step, leave
# holes in the one heap that the next step's blocks do not fit (glibc's own dynamic limit: 32 MB).
SHARED_HEAP_BLOCK_BYTES = 32 * 2**20
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: malloc memory on huge pages
_THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_DEVICE_COUNT_ENV = "JAX_NUM_CPU_DEVICES"
_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library if it is glibc, else None (macOS, musl, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(part) for part in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):  # no confstr, no such name, or not "glibc X.Y"
        return None
    return (major, minor) if name == "glibc" else None


def huge_pages_offered() -> bool:
    """glibc 2.35 or newer (older ones ignore the tunable) and a kernel that gives transparent huge
    pages to memory that asks for them (`always` or `madvise`, not `never`)."""
    version = glibc_version()
    try:
        return (
            version is not None
            and version >= (2, 35)
            and "[never]" not in (_THP_SETTING.read_text())
        )
    except OSError:
        return False


def cpu_device_count(train_config) -> int:
    """`train_config.cpu_devices`, checked: 0 keeps JAX's default of one CPU device."""
    count = train_config.cpu_devices
    if not isinstance(count, int) or count < 0:
        raise ValueError(
            f"train.cpu_devices={count!r} must be an integer >= 0 (0 keeps JAX's default of one "
            "CPU device)."
        )
    return count


def host_memory_environment(num_devices: int = 1) -> dict[str, str]:
    """glibc's malloc settings for host-memory reuse by `num_devices` CPU devices; {} outside
    glibc."""
    if glibc_version() is None:
        return {}
    env = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(2**62)}  # 2**62: never trim
    if num_devices > 1:  # large blocks off the heap, on huge pages where offered
        env["MALLOC_MMAP_THRESHOLD_"] = str(SHARED_HEAP_BLOCK_BYTES)
    elif not huge_pages_offered():
        env["MALLOC_MMAP_MAX_"] = "0"  # every block on the heap
        return env
    else:
        env["MALLOC_MMAP_THRESHOLD_"] = str(LARGE_BLOCK_BYTES)
    if not huge_pages_offered():
        return env
    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if HUGE_PAGES_TUNABLE not in tunables:
        tunables.append(HUGE_PAGES_TUNABLE)
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def explicit_device_count() -> int | None:
    """The CPU device count the environment sets (`JAX_NUM_CPU_DEVICES`, else
    `--xla_force_host_platform_device_count` in `XLA_FLAGS`), or None."""
    if _DEVICE_COUNT_ENV in os.environ:
        return int(os.environ[_DEVICE_COUNT_ENV])
    flag = re.search(rf"{_DEVICE_COUNT_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(flag.group(1)) if flag else None


def environment(train_config) -> dict[str, str]:
    """The environment variables that give a new process the settings `train_config` asks for:
    host-memory reuse (`reuse_host_memory`) and the CPU device count (`cpu_devices`)."""
    count = cpu_device_count(train_config)
    explicit = explicit_device_count()
    num_devices = explicit if explicit is not None else max(count, 1)
    env = host_memory_environment(num_devices) if train_config.reuse_host_memory else {}
    if count and explicit is None:
        env[_DEVICE_COUNT_ENV] = str(count)
    return env


def restart_environment(train_config) -> dict[str, str] | None:
    """The whole environment to restart this process with, or None when it already has
    `environment(train_config)` (so the command line restarts at most once)."""
    wanted = environment(train_config)
    if all(os.environ.get(name) == value for name, value in wanted.items()):
        return None
    return {**os.environ, **wanted}


def set_compile_cache(cache_dir: str) -> None:
    """Turns on JAX's persistent compilation cache in `cache_dir` ("" leaves it off).

    Every executable is cached, however fast it compiled: a CPU step compiles in about a second,
    a large TPU one in minutes. Must run before the first compile.
    """
    if not cache_dir:
        return
    import jax  # here: the command line calls the functions above before JAX may start

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def peak_memory_bytes() -> int | None:
    """The peak resident memory of this process so far (children not included; across the command
    line's one restart), or None where the platform does not report it."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def describe_peak_memory() -> str:
    """`peak_memory_bytes()` for a log line: "peak resident memory 1.06 GB" (GB of 2**30 bytes)."""
    peak = peak_memory_bytes()
    return "peak resident memory " + ("unknown" if peak is None else f"{peak / 2**30:.2f} GB")
