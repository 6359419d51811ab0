"""What the Colab notebooks (colab/*.ipynb) need beyond the library: a check that JAX sees the
accelerator the runtime was chosen for.

On Colab, a TPU or GPU runtime whose JAX finds only its CPU trains hundreds of times slower
without saying so, typically after `pip install` replaced the JAX that matches the runtime's
accelerator with a CPU-only one. `check_accelerator()` looks at the machine without JAX (device
files, nvidia-smi, Colab's and Cloud TPU's environment variables) and stops with one message
naming the fix when JAX's backend is not the accelerator found there.

    import jax
    from train import notebook

    print(jax.devices())
    notebook.check_accelerator()
"""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess
from collections.abc import Mapping

# Set on Colab's TPU runtimes (COLAB_TPU_ADDR) and by Cloud TPU tooling (TPU_NAME).
TPU_ENVIRONMENT = ("COLAB_TPU_ADDR", "TPU_NAME")
GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x and one unnamed), as JAX's own
# hardware_utils lists them; Google's vendor id alone would also match its virtual NICs.
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")

# JAX_PLATFORMS names that select each accelerator.
PLATFORM_NAMES = {"tpu": ("tpu",), "gpu": ("gpu", "cuda", "rocm")}
FIXES = {
    "tpu": "pip install -U 'jax[tpu]'",
    "gpu": "pip install -U 'jax[cuda12]'",
}


class AcceleratorNotUsed(RuntimeError):
    """The machine has a TPU or GPU, but JAX runs on another backend (usually the CPU)."""


def requested_accelerator(
    environ: Mapping[str, str] | None = None, root: str | os.PathLike = "/"
) -> str | None:
    """The accelerator this machine (a Colab runtime) has, judged without JAX.

    Args:
      environ: environment variables (default `os.environ`); its PATH is where nvidia-smi is
        looked for.
      root: the file system root holding /dev and /sys (for tests).

    Returns:
      'tpu' (a TPU environment variable, /dev/accel*, or a TPU chip on the PCI bus), 'gpu' (an
      NVIDIA device file, or an nvidia-smi that lists a GPU) or None.
    """
    environ = os.environ if environ is None else environ
    root = pathlib.Path(root)
    if any(environ.get(name) for name in TPU_ENVIRONMENT):
        return "tpu"
    if glob.glob(os.fspath(root / "dev" / "accel*")) or _tpu_on_pci_bus(root):
        return "tpu"
    if (root / "dev" / "nvidia0").exists() or _nvidia_smi_lists_gpu(environ):
        return "gpu"
    return None


def check_accelerator(
    backend: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    root: str | os.PathLike = "/",
) -> str:
    """Stops (raises) when the machine has a TPU or GPU but JAX does not use it.

    A JAX_PLATFORMS setting that leaves the accelerator out on purpose (JAX_PLATFORMS=cpu) is
    respected: nothing is raised.

    Args:
      backend: JAX's backend, 'cpu', 'gpu' or 'tpu' (default `jax.default_backend()`).
      environ: environment variables (default `os.environ`).
      root: the file system root holding /dev and /sys (for tests).

    Returns:
      The backend JAX uses.

    Raises:
      AcceleratorNotUsed: with what was found, what JAX uses, and the fix.
    """
    environ = os.environ if environ is None else environ
    if backend is None:
        import jax

        backend = jax.default_backend()
    wanted = requested_accelerator(environ, root)
    if wanted is None or backend == wanted:
        return backend
    chosen = {name.strip().lower() for name in environ.get("JAX_PLATFORMS", "").split(",")}
    if chosen - {""} and not chosen & set(PLATFORM_NAMES[wanted]):
        return backend  # JAX_PLATFORMS leaves the accelerator out on purpose
    raise AcceleratorNotUsed(
        f"This runtime has a {wanted.upper()}, but JAX sees only its {backend.upper()}, which "
        f"would train far more slowly. Install the JAX for the {wanted.upper()} "
        f"({FIXES[wanted]}) and restart the runtime, or on Colab use Runtime > Disconnect and "
        f"delete runtime and run again without changing JAX. To train on the {backend.upper()} "
        f"anyway, set JAX_PLATFORMS={backend} before importing JAX."
    )


def _tpu_on_pci_bus(root: pathlib.Path) -> bool:
    for vendor in glob.glob(os.fspath(root / "sys" / "bus" / "pci" / "devices" / "*" / "vendor")):
        vendor = pathlib.Path(vendor)
        try:
            if vendor.read_text().strip() != GOOGLE_PCI_VENDOR:
                continue
            if (vendor.parent / "device").read_text().strip() in TPU_PCI_DEVICES:
                return True
        except OSError:
            continue
    return False


def _nvidia_smi_lists_gpu(environ: Mapping[str, str]) -> bool:
    # Colab's CPU runtimes have nvidia-smi too; there it fails for want of a driver.
    nvidia_smi = shutil.which("nvidia-smi", path=environ.get("PATH", os.defpath))
    if nvidia_smi is None:
        return False
    try:
        listing = subprocess.run(
            [nvidia_smi, "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout
