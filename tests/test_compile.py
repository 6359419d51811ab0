"""python -m train.compile: a config's train step compiled for a TPU slice (or CPU devices) here.

The TPU tests need libtpu (`pip install 'jaxmodels[tpu]'`) and are skipped without it; the CPU
devices, the slice table and the HLO reading need nothing more than JAX.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmodels import tuned
from train import compile as tc
from train.config import load_config

needs_libtpu = pytest.mark.skipif(
    not tc.has_libtpu(), reason="needs libtpu to compile for a TPU: pip install 'jaxmodels[tpu]'"
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIGS = ["mlp", "cnn", "lstm", "transformer", "transformer_classifier", "seq2seq"]


@pytest.fixture(scope="module", autouse=True)
def compile_only_environment():
    """libtpu's settings for a process without a TPU (read once, when libtpu first loads)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in tc.COMPILE_ONLY_ENV.items():
            if name != "JAX_PLATFORMS":  # conftest's choice stays
                patch.setenv(name, value)
        yield


def tiny(name: str, **overrides):
    config = load_config(f"configs/{name}.py:tiny")
    for field, value in overrides.items():
        section, _, key = field.rpartition(".")
        target = config
        for part in section.split("."):
            target = target[part]
        target[key] = value
    return config


def test_slice_names():
    assert tc.parse_slice("v4-8") == tc.Slice("v4-8", "v4", 4)  # TensorCores: 2 per chip
    assert tc.parse_slice("v5p-8192").num_chips == 4096
    assert tc.parse_slice("v5e-256").num_chips == 256
    assert tc.parse_slice("v6e-1").num_chips == 1
    assert tc.parse_slice("cpu-3") == tc.Slice("cpu-3", "cpu", 3)
    assert tc.slice_names("v4")[:3] == ["v4-8", "v4-16", "v4-32"]
    assert tc.slice_names("v4")[-1] == "v4-4096"
    assert tc.slice_names("v5e") == [f"v5e-{n}" for n in (1, 4, 8, 16, 32, 64, 128, 256)]
    with pytest.raises(ValueError, match="v5e slices are v5e-1, v5e-4"):
        tc.parse_slice("v5e-2")
    with pytest.raises(ValueError, match="or cpu-N"):
        tc.parse_slice("v9-8")


def test_collectives_of_hlo_text():
    # A loop of 3 trips gathering 8 x 128 floats, and outside it an all-reduce of two arrays
    # (combined), a reduce-scatter of 1024 bf16 and one transfer to another slice.
    hlo = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %w = f32[1,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %ag = f32[8,128]{1,0:T(8,128)} all-gather(%w), channel_id=1, replica_groups={{0,1}}
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %ag)
}

%cond (p.1: (s32[], f32[8,128])) -> pred[] {
  %p.1 = (s32[], f32[8,128]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[16], b: f32[4,4], c: bf16[1024]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %c = bf16[1024]{0} parameter(2)
  %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
  %ar = (f32[16]{0}, f32[4,4]{1,0}) all-reduce(%a, %b), replica_groups={{0,1}}, to_apply=%add
  %rs = bf16[512]{0} reduce-scatter(%c), dimensions={0}, to_apply=%add
  %send = (f32[16]{0}, u32[], token[]) send(%a, %tok), frontend_attributes={MEGASCALE}
  ROOT %r = f32[16]{0} copy(%a)
}
"""
    hlo = hlo.replace("MEGASCALE", '_xla_megascale_transfer_type="ALL_REDUCE"')
    within, across = tc.collectives(hlo)
    assert within["all-gather"] == {"count": 3, "bytes": 3 * 8 * 128 * 4}
    assert within["all-reduce"] == {"count": 1, "bytes": (16 + 16) * 4}
    assert within["reduce-scatter"] == {"count": 1, "bytes": 1024 * 2}
    assert within["all-to-all"] == {"count": 0, "bytes": 0}
    assert across == {"all-reduce": {"count": 1, "bytes": 16 * 4}}


def test_cpu_devices_without_libtpu(monkeypatch):
    monkeypatch.setattr(tc, "has_libtpu", lambda: False)
    config = tiny("transformer")
    report, _ = tc.compile_train_step(config, tc.parse_slice("cpu-4"))
    assert (report.devices, report.device_kind, report.mesh) == (
        4,
        "cpu",
        {"data": 4, "fsdp": 1, "tensor": 1},
    )
    assert report.params == 112_577
    assert report.per_device["params"] == 112_577 * 4  # replicated: every device holds all
    assert report.per_device["batch"] == 3 * 4 * 64 * 4  # inputs, targets, weights: 4 rows each
    assert report.collectives["all-reduce"]["count"] >= 1  # the gradients
    assert report.peak_flops is None and report.projected_step_seconds is None
    with pytest.raises(ValueError, match=r"pip install 'jaxmodels\[tpu\]'"):
        tc.compile_train_step(config, tc.parse_slice("v5e-8"))
    with pytest.raises(ValueError, match="needs 8 CPU devices but this process has 4"):
        tc.compile_train_step(config, tc.parse_slice("cpu-8"))


@needs_libtpu
def test_every_slice_compiles():
    """Every slice of the table gives its devices, and a sharded program compiles for them."""
    for chip in tc.CHIPS:
        for name in tc.slice_names(chip):
            devices = tc.slice_devices(tc.parse_slice(name))
            assert len(devices) == tc.parse_slice(name).num_chips
            mesh = Mesh(np.array(devices), ("x",))
            step = jax.jit(
                lambda w, x: jnp.sum(x @ w),
                in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("x"))),
            )
            rows = jax.ShapeDtypeStruct((len(devices) * 8, 128), jnp.float32)
            step.lower(jax.ShapeDtypeStruct((128, 128), jnp.float32), rows).compile()


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-8", "v4-8"])
@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_configs_compile(name, topology):
    report, _ = tc.compile_train_step(tiny(name), tc.parse_slice(topology))
    assert report.devices == {"v5e-8": 8, "v4-8": 4}[topology]
    assert report.device_kind == {"v5e-8": "TPU v5 lite", "v4-8": "TPU v4"}[topology]
    assert report.fits and report.per_device["total"] > report.per_device["params"] > 0
    assert report.compiler_flops > 0
    if report.model_flops is not None and not report.has_loops:
        # The hand count leaves out the elementwise work (softmax, norms, the optimizer), a good
        # share of so small a model's: the compiler's count is up to a third higher.
        assert 1.0 <= report.compiler_flops / report.model_flops < 1.35


@needs_libtpu
def test_param_bytes_are_hand_count_over_fsdp():
    # Transformer: vocab 128, width 64, MLP 256, 2 layers, 64 positions; every array divides by 4.
    params = transformer_params(128, 64, 256, 2, 64)
    assert params == 120_704
    config = tiny("transformer", **{"model.vocab_size": 128, "train.mesh.fsdp": 4})
    report, _ = tc.compile_train_step(config, tc.parse_slice("v4-8"))  # 4 chips
    assert report.params == params
    assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report.per_device["params"] == params * 4 // 4
    assert report.collectives["all-gather"]["count"] > 0  # FSDP gathers the parameters


@needs_libtpu
def test_tensor_parallel_compiles_for_a_v5e_8():
    # The tiny Transformer's 2 heads and 256 MLP units split over 2 chips, the batch over 4.
    config = tiny("transformer", **{"train.mesh.tensor": 2})
    report, _ = tc.compile_train_step(config, tc.parse_slice("v5e-8"))
    assert report.mesh == {"data": 4, "fsdp": 1, "tensor": 2}
    assert report.params == 112_577
    # Every block's qkv, out, mlp_in and mlp_out kernels and the qkv and mlp_in biases are halved.
    width, mlp_dim, layers = 64, 256, 2
    split = layers * (3 * width * width + 3 * width + width * width + 2 * width * mlp_dim + mlp_dim)
    assert report.per_device["params"] == (112_577 - split // 2) * 4
    assert report.collectives["all-reduce"]["count"] > 0  # the heads' and units' partial sums
    assert "mesh data=4 x fsdp=1 x tensor=2" in tc.report_lines(report, "tiny")[0]


@needs_libtpu
def test_tpu_compile_calls_nothing_from_tuned(monkeypatch):
    """On a TPU `implementation='auto'` is the plain layers, although this process's backend is
    the CPU (where auto picks jaxmodels/tuned.py's)."""

    def refuse(*args, **kwargs):
        raise AssertionError("called jaxmodels.tuned on a TPU compile")

    chosen = []
    use_tuned = tuned.use_tuned
    monkeypatch.setattr(tuned, "use_tuned", lambda impl: chosen.append(use_tuned(impl)) or False)
    for name in dir(tuned):
        if callable(getattr(tuned, name)) and name != "use_tuned" and not name.startswith("_"):
            if getattr(getattr(tuned, name), "__module__", None) == tuned.__name__:
                monkeypatch.setattr(tuned, name, refuse)
    for name in ("transformer", "lstm", "cnn"):
        tc.compile_train_step(tiny(name), tc.parse_slice("v5e-8"))
    assert chosen and not any(chosen)
    # The same config for CPU devices does take the tuned forms: the patches above would see it.
    monkeypatch.setattr(tuned, "use_tuned", use_tuned)
    with pytest.raises(AssertionError, match="called jaxmodels.tuned"):
        tc.compile_train_step(tiny("transformer"), tc.parse_slice("cpu-2"))


def test_shortfall_line():
    report = tc.Report(
        slice="v5e-8",
        num_slices=1,
        devices=8,
        device_kind="TPU v5 lite",
        mesh={"data": 8, "fsdp": 1, "tensor": 1},
        params=0,
        per_device={"total": int(21.3 * tc.GiB)},
        hbm_bytes=16 * tc.GiB,
        model_flops=None,
        compiler_flops=None,
        has_loops=False,
        collectives={},
        cross_slice={},
        tokens_per_step=0,
        steps_per_call=1,
        peak_flops=None,
        compile_seconds=0,
    )
    config = tiny("transformer")
    assert tc.shortfall(report, config) == (
        "needs 21.3 GiB per device of a v5e's 16 GiB: raise train.mesh.fsdp (now 1, up to 8), "
        "set model.remat=True, raise train.grad_accum_steps or use a slice with more chips"
    )


def transformer_params(vocab, width, mlp, layers, positions):
    """The Transformer's parameter count by hand: embeddings, blocks (two LayerNorms, qkv, out,
    mlp_in, mlp_out), the final LayerNorm and the LM head."""
    block = 4 * width + (width * 3 * width + 3 * width) + (width * width + width)
    block += (width * mlp + mlp) + (mlp * width + width)
    return vocab * width + positions * width + layers * block + 2 * width + width * vocab + vocab


@needs_libtpu
def test_1b_without_fsdp_is_refused_in_one_line_on_v5e_8():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.compile",
            "--config=configs/transformer.py:1b",
            "--topology=v5e-8",
            "--config.train.mesh.fsdp=1",
            "--config.train.mesh.data=-1",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: needs "), result.stderr
    assert " GiB per device of a v5e's 16 GiB: raise train.mesh.fsdp (now 1, up to 8)" in lines[0]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    params = transformer_params(256, 2048, 8192, 16, 2048)
    assert report["params"] == params == 810_979_584
    assert report["per_device"]["params"] == params * 4  # replicated over the 8 chips
    assert report["fits"] is False and report["per_device_bytes"] > report["hbm_bytes"]


@pytest.mark.slow  # compiles a 0.8B-parameter step for 32 chips: about a minute
@needs_libtpu
def test_1b_fits_a_v5p_64():
    report, _ = tc.compile_train_step(
        load_config("configs/transformer.py:1b"), tc.parse_slice("v5p-64")
    )
    assert report.devices == 32 and report.mesh == {"data": 1, "fsdp": 32, "tensor": 1}
    assert report.fits and report.per_device["total"] < 95 * tc.GiB
    params = transformer_params(256, 2048, 8192, 16, 2048)
    assert report.per_device["params"] == params * 4 // 32


@needs_libtpu
def test_slices_put_data_parallelism_across_slices_and_the_rest_within():
    """train.mesh.slices: the data axis runs across the slices, fsdp and tensor within one, so
    only data parallelism's gradient sums cross the data-center network."""
    from train import parallel

    devices = tc.slice_devices(tc.parse_slice("v5e-8"), num_slices=2)
    config = load_config(f"{REPO}/configs/transformer.py:tiny").train.mesh
    config.update(dict(data=4, fsdp=2, tensor=2, slices=2))
    mesh = parallel.make_mesh(config, list(reversed(devices)))  # any order of the devices
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 2}
    slice_of = np.vectorize(lambda device: device.slice_index)(mesh.devices)
    np.testing.assert_array_equal(slice_of[:2], 0)  # the first half of `data`: slice 0
    np.testing.assert_array_equal(slice_of[2:], 1)
    config.update(dict(data=3, fsdp=-1, tensor=1))
    with pytest.raises(ValueError, match=r"^train.mesh.slices=2 must divide train.mesh.data=3"):
        parallel.make_mesh(config, devices[:12])
    config.update(dict(data=2, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match=r"belong to no slices; set train.mesh.slices=1"):
        parallel.make_mesh(config, jax.devices("cpu")[:1] * 4)
