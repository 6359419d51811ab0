"""The Colab notebooks run top to bottom in a Jupyter kernel, with small settings; they are
committed without outputs; and `train.notebook.check_accelerator` stops where a runtime's
accelerator goes unused.

The notebooks run as Colab runs them, cell after cell in one kernel, started in colab/ as Jupyter
starts a notebook opened from there. Their settings come from environment variables of the same
names as the variables of their first cell. A last cell, added here and not in the file, prints
what the notebook computed as one JSON line.
"""

import json
import pathlib
import stat
import sys

import jax
import nbformat
import numpy as np
import pytest
from commands import xla_flags
from nbclient import NotebookClient
from PIL import Image

from train import notebook

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(path.name for path in COLAB.glob("*.ipynb"))
RESULTS = "RESULTS "


def run_notebook(
    name: str, tmp_path: pathlib.Path, results: str, monkeypatch
) -> tuple[dict, list[str]]:
    """Executes colab/`name` plus a last cell printing RESULTS + json.dumps(`results`).

    Returns (the JSON object, what each code cell of the notebook itself printed to stdout).
    """
    nb = nbformat.read(COLAB / name, as_version=4)
    nb.cells.append(
        nbformat.v4.new_code_cell(f"import json\nprint({RESULTS!r} + json.dumps({results}))")
    )
    # A kernel spec of this interpreter: a user-wide "python3" spec may name another Python.
    spec_dir = tmp_path / "jupyter" / "kernels" / "jaxmodels-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "jaxmodels test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    client = NotebookClient(
        nb,
        timeout=600,  # per cell
        kernel_name="jaxmodels-test",
        resources={"metadata": {"path": str(COLAB)}},
    )
    client.execute()
    texts = [stdout(cell) for cell in nb.cells[:-1] if cell.cell_type == "code"]
    last = stdout(nb.cells[-1])
    line = next(line for line in last.splitlines() if line.startswith(RESULTS))
    return json.loads(line[len(RESULTS) :]), texts


def stdout(cell) -> str:
    return "".join(out.text for out in cell.outputs if out.get("name") == "stdout")


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS == ["quickstart.ipynb", "research_loop.ipynb"]
    for name in NOTEBOOKS:
        nb = nbformat.read(COLAB / name, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code), name
        # No machine settings: Colab's runtime type is the user's choice.
        assert "accelerator" not in nb.metadata and "colab" not in nb.metadata, name
        assert code[0].source.startswith("import os\n\nREPO_URL = "), name


def test_quickstart_notebook(shared_data_dir, tmp_path, monkeypatch):
    """Trains the Transformer (20 steps), plots, samples, prepares MNIST from ../shared's raw
    files and trains the CNN (40 steps), in a clone: nothing is cloned or installed."""
    workdir = tmp_path / "runs"
    data_dir = tmp_path / "tfds"
    settings = {
        "TRANSFORMER_STEPS": "20",
        "CNN_STEPS": "40",
        "LOG_EVERY": "5",
        "EVAL_EVERY": "10",
        "SAMPLE_LENGTH": "50",
        "WORKDIR": str(workdir),
        "DATA_DIR": str(data_dir),
        "MNIST_MANUAL_DIR": str(shared_data_dir / "raw" / "mnist"),
    }
    for variable, value in settings.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("XLA_FLAGS", xla_flags())  # one CPU device, as on Colab's CPU runtime
    results = (
        "dict(repo=str(REPO_DIR), cwd=os.getcwd(), "
        "transformer_step=int(transformer_state.step), transformer=transformer_report, "
        "cnn_step=int(cnn_state.step), cnn=cnn_report)"
    )
    results, texts = run_notebook("quickstart.ipynb", tmp_path / "kernel", results, monkeypatch)

    # Inside the clone: the install cell cloned nothing.
    assert results["repo"] == results["cwd"] == str(REPO)
    assert not (COLAB / "jaxmodels").exists()
    assert "CpuDevice" in texts[2]  # print(jax.devices())

    assert results["transformer_step"] == 20
    # ln 65 = 4.17 is chance over the 65 characters; 20 steps get to about 3.3 (3.5 allows for
    # other JAX versions' random streams).
    assert results["transformer"]["eval/loss"] < 3.5
    transformer_steps = [
        json.loads(line)["step"]
        for line in (workdir / "transformer" / "metrics.jsonl").read_text().splitlines()
    ]
    assert transformer_steps == [5, 10, 15, 20]
    for png in ("transformer.png", "cnn.png"):
        pixels = np.asarray(Image.open(workdir / png).convert("L"))
        assert pixels.std() > 10, png  # drawn, not blank

    sampled = texts[5].removesuffix("\n")  # sample.main prints the prompt and what follows
    assert sampled.startswith("ROMEO:") and len(sampled) == len("ROMEO:") + 50

    assert (data_dir / "mnist" / "3.0.1" / "dataset_info.json").is_file()
    assert "mnist-train.array_record" in " ".join(
        p.name for p in (data_dir / "mnist" / "3.0.1").iterdir()
    )
    assert results["cnn_step"] == 40
    assert results["cnn"]["eval/accuracy"] > 0.6  # of 1000 test images; chance is 0.1


def test_research_loop_notebook(tmp_path, monkeypatch):
    """Two optimizers, 20 steps each, on the embedded text, and the gradients of one batch."""
    monkeypatch.setenv("NUM_STEPS", "20")
    monkeypatch.setenv("EVAL_BATCHES", "4")
    monkeypatch.setenv("XLA_FLAGS", xla_flags())  # one CPU device, as on Colab's CPU runtime
    results = (
        "dict(repo=str(REPO_DIR), losses={k: v[1].tolist() for k, v in runs.items()}, "
        "validation=validation, grad_norms=grad_norms, num_params=len(jax.tree.leaves(params)))"
    )
    results, texts = run_notebook("research_loop.ipynb", tmp_path, results, monkeypatch)

    assert results["repo"] == str(REPO)
    assert sorted(results["losses"]) == ["adamw 3e-3", "clip 1 + lion 3e-4"]
    for name, losses in results["losses"].items():
        assert len(losses) == 20 and np.all(np.isfinite(losses)), name
        # ln 65 = 4.17 at chance; the first step is a little above it (4.61 here).
        assert 3.9 < losses[0] < 5.0, name
        assert losses[-1] < losses[0] - 0.5, name  # 4.61 -> 3.25 (adamw), 3.46 (lion) here
        assert results["validation"][name]["loss"] < 3.7, name  # 3.14, 3.38 here
    norms = results["grad_norms"]
    assert len(norms) == results["num_params"] == 30  # 2 blocks of 12 arrays, 6 others
    assert all(np.isfinite(norm) and norm > 0 for norm in norms.values())
    assert texts[-1].splitlines()[-1].startswith("global norm ")


# --- train.notebook.check_accelerator ------------------------------------------------------------


def machine(tmp_path: pathlib.Path, *paths: str, files: dict[str, str] | None = None):
    """A file system root holding the given empty device files and text files."""
    for path in paths:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    for path, text in (files or {}).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return tmp_path


def fake_nvidia_smi(tmp_path: pathlib.Path, output: str, status: int) -> dict[str, str]:
    """An environment whose PATH holds only an nvidia-smi printing `output`, exit `status`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": str(bin_dir)}


NO_PATH = {"PATH": ""}


def test_a_plain_cpu_machine_asks_for_nothing(tmp_path):
    root = machine(tmp_path, "dev/null", "dev/vfio/vfio")
    assert notebook.requested_accelerator(NO_PATH, root) is None
    assert notebook.check_accelerator("cpu", environ=NO_PATH, root=root) == "cpu"


@pytest.mark.parametrize(
    "environ, paths, files",
    [
        ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, (), {}),  # Colab's TPU runtime
        ({"TPU_NAME": "local"}, (), {}),
        ({}, ("dev/accel0", "dev/accel1"), {}),  # TPU v2-v4 VMs
        (  # TPU v5e on the PCI bus
            {},
            (),
            {
                "sys/bus/pci/devices/0000:00:05.0/vendor": "0x1ae0\n",
                "sys/bus/pci/devices/0000:00:05.0/device": "0x0063\n",
            },
        ),
    ],
)
def test_a_tpu_is_found_and_must_be_used(tmp_path, environ, paths, files):
    root = machine(tmp_path, *paths, files=files)
    environ = {**NO_PATH, **environ}
    assert notebook.requested_accelerator(environ, root) == "tpu"
    assert notebook.check_accelerator("tpu", environ=environ, root=root) == "tpu"
    with pytest.raises(notebook.AcceleratorNotUsed) as raised:
        notebook.check_accelerator("cpu", environ=environ, root=root)
    message = str(raised.value)
    assert message.startswith("This runtime has a TPU, but JAX sees only its CPU")
    assert "pip install -U 'jax[tpu]'" in message and "JAX_PLATFORMS=cpu" in message


def test_googles_network_card_is_no_tpu(tmp_path):
    files = {
        "sys/bus/pci/devices/0000:00:04.0/vendor": "0x1ae0\n",
        "sys/bus/pci/devices/0000:00:04.0/device": "0x0042\n",  # gVNIC
    }
    assert notebook.requested_accelerator(NO_PATH, machine(tmp_path, files=files)) is None


def test_a_gpu_is_found_by_its_device_file_or_nvidia_smi(tmp_path):
    root = machine(tmp_path / "root", "dev/nvidia0")
    assert notebook.requested_accelerator(NO_PATH, root) == "gpu"
    with pytest.raises(notebook.AcceleratorNotUsed, match=r"jax\[cuda12\]"):
        notebook.check_accelerator("cpu", environ=NO_PATH, root=root)
    assert notebook.check_accelerator("gpu", environ=NO_PATH, root=root) == "gpu"

    empty = machine(tmp_path / "empty")
    listing = "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-0)"
    environ = fake_nvidia_smi(tmp_path / "with", listing, 0)
    assert notebook.requested_accelerator(environ, empty) == "gpu"
    # Colab's CPU runtimes have an nvidia-smi that fails for want of a driver.
    failing = "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."
    environ = fake_nvidia_smi(tmp_path / "without", failing, 9)
    assert notebook.requested_accelerator(environ, empty) is None


def test_jax_platforms_leaving_the_accelerator_out_is_respected(tmp_path):
    root = machine(tmp_path, "dev/nvidia0")
    cpu_only = {**NO_PATH, "JAX_PLATFORMS": "cpu"}
    assert notebook.check_accelerator("cpu", environ=cpu_only, root=root) == "cpu"
    with pytest.raises(notebook.AcceleratorNotUsed):  # asked for the GPU, still on the CPU
        notebook.check_accelerator(
            "cpu", environ={**NO_PATH, "JAX_PLATFORMS": "cuda,cpu"}, root=root
        )


def test_check_accelerator_defaults_to_this_process():
    assert notebook.check_accelerator() == jax.default_backend()
