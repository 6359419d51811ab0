"""train.mesh.tensor: the Transformer's attention heads and MLP units split over devices (Megatron).

The layout comes from the logical axis names the layers declare (`nn.with_logical_partitioning`)
and `parallel.LOGICAL_RULES`; these tests check that it computes what one device computes, that
the parameters really are split, and that a mesh it cannot use is refused in one line.
"""

import pathlib

import chex
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from stepping import losses_and_params

from train import loop, parallel
from train.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def tiny(name: str):
    """The tiny config with 4 heads (of 16 units), so that 2 and 4 tensor devices divide them,
    and the plain layers (the XLA:CPU ones refuse a tensor axis)."""
    config = load_config(CONFIGS / f"{name}.py:tiny")
    config.model.num_heads = 4
    config.model.implementation = "standard"
    config.data.batch_size = 16
    return config


def mesh_of(data_size: int, fsdp: int, tensor: int):
    devices = jax.devices()[: data_size * fsdp * tensor]
    sizes = ml_collections.ConfigDict({"data": data_size, "fsdp": fsdp, "tensor": tensor})
    return parallel.make_mesh(sizes, devices)


def run_losses(config, mesh, num_steps: int = 4):
    """Per-step losses of `config` jitted over `mesh`, and the final params (on the host)."""
    return losses_and_params(
        config, mesh, lambda shardings: parallel.compile_jit(mesh, shardings), num_steps
    )


# (data, fsdp, tensor) on the 4 CPU devices of conftest; the decoder LM on every split, the
# encoder classifier (padding masks, pooling) on one.
LAYOUTS = {
    "transformer": [(2, 1, 2), (1, 1, 4), (1, 2, 2)],
    "transformer_classifier": [(2, 1, 2)],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_tensor_parallel_losses_equal_one_devices(name):
    assert jax.device_count() == 4
    config = tiny(name)
    reference, reference_params = run_losses(config, mesh_of(1, 1, 1))
    assert len(set(reference)) == len(reference)  # four different batches: the steps do something
    for sizes in LAYOUTS[name]:
        losses, params = run_losses(config, mesh_of(*sizes))
        message = f"data x fsdp x tensor = {sizes}"
        # The tolerances of test_steps' data parallel and FSDP against one device.
        np.testing.assert_allclose(losses, reference, rtol=1e-6, err_msg=message)
        chex.assert_trees_all_close(params, reference_params, rtol=1e-5, atol=1e-4)


def test_heads_and_mlp_units_are_split_over_tensor():
    config = tiny("transformer")  # width 64, 4 heads, mlp_dim 256, vocab 65
    state, _ = loop.init_state(config, mesh_of(1, 2, 2), jax.random.key(0))
    block = state.params["block_0"]
    # Megatron: qkv and mlp_in split their outputs, out and mlp_out their inputs over tensor;
    # FSDP takes the other axis.
    expected = {
        ("attn", "qkv", "kernel"): (P("fsdp", "tensor"), (32, 96)),  # [width, 3 * width]
        ("attn", "qkv", "bias"): (P("tensor"), (96,)),  # 192 by tensor, then FSDP finds no axis
        ("attn", "out", "kernel"): (P("tensor", "fsdp"), (32, 32)),  # [width, width]
        ("mlp_in", "kernel"): (P("fsdp", "tensor"), (32, 128)),  # [width, mlp_dim]
        ("mlp_in", "bias"): (P("tensor"), (128,)),
        ("mlp_out", "kernel"): (P("tensor", "fsdp"), (128, 32)),  # [mlp_dim, width]
    }
    for path, (spec, shard_shape) in expected.items():
        param = block
        for key in path:
            param = param[key]
        assert param.sharding.spec == spec, path
        assert param.addressable_shards[0].data.shape == shard_shape, path
    # Adam's moments lie like their parameters.
    (adam,) = [
        s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
        if hasattr(s, "mu")
    ]  # fmt: skip
    assert adam.mu["block_0"]["mlp_in"]["kernel"].sharding.spec == P("fsdp", "tensor")
    # Unannotated arrays keep FSDP's layout: the LM head [64, 65] by its first axis.
    assert state.params["lm_head"]["kernel"].sharding.spec == P("fsdp", None)


def test_tensor_one_keeps_the_fsdp_layout():
    config = tiny("transformer")
    state, _ = loop.init_state(config, mesh_of(1, 4, 1), jax.random.key(0))
    # FSDP's largest divisible axis, as without a tensor axis: qkv's 192 outputs.
    assert state.params["block_0"]["attn"]["qkv"]["kernel"].sharding.spec == P(None, "fsdp")


def test_a_bad_tensor_size_is_one_line():
    config = tiny("transformer")
    config.model.num_heads = 2
    with pytest.raises(
        ValueError, match=r"^train.mesh.tensor=4 does not divide model.num_heads=2;"
    ):
        loop.init_state(config, mesh_of(1, 1, 4), jax.random.key(0))
    with pytest.raises(ValueError, match=r"^train.mesh.tensor=3 does not divide the 4 devices;"):
        parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 3}))
    with pytest.raises(ValueError, match=r"x tensor=2 does not cover the 4 devices;"):
        parallel.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 2}))
    config = tiny("transformer")
    config.model.implementation = "cpu"
    with pytest.raises(ValueError, match=r"--config.model.implementation=standard\.$"):
        loop.init_state(config, mesh_of(2, 1, 2), jax.random.key(0))
    mlp = load_config(CONFIGS / "mlp.py:tiny")
    with pytest.raises(ValueError, match=r"declare no logical axes to split"):
        loop.init_state(mlp, mesh_of(2, 1, 2), jax.random.key(0))
