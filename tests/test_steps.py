"""train_step / eval_step: numbers on real batches, jit vs pmap on 4 devices, one trace per step."""

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core
from jax.sharding import PartitionSpec as P
from stepping import losses_and_params

from train import TrainState, create_train_state, data, eval_step, loop, parallel, steps, train_step
from train.config import load_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Each tiny config, trained for `steps` steps on ONE fixed real batch, must bring the training loss
# on that batch below `below` (it starts near ln(num_classes or vocab)): ln 10 = 2.30, ln 2 = 0.69,
# ln 65 = 4.17.
MEMORIZE = {
    "mlp": dict(steps=40, below=0.01),  # measured 0.0008
    "cnn": dict(steps=40, below=0.05),  # measured 0.007
    "lstm": dict(steps=60, below=0.2),  # measured 0.064
    "transformer": dict(steps=60, below=0.1),  # measured 0.011
}


def first_batch(config):
    return next(data.train_iterator(config.data, seed=config.seed))


@pytest.mark.parametrize("name", sorted(MEMORIZE))
def test_loss_falls_on_a_fixed_real_batch(name):
    config = load_config(CONFIGS / f"{name}.py:tiny")
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    batch = first_batch(config)
    state = create_train_state(config, jax.random.key(0))
    step = jax.jit(train_step)
    rng = jax.random.key(1)
    _, first = step(state, batch, rng)
    for _ in range(MEMORIZE[name]["steps"]):
        state, sums = step(state, batch, rng)
    start_loss = float(first["loss_sum"] / first["count"])
    metrics = eval_step(state, batch)
    final_loss = float(metrics["loss_sum"] / metrics["count"])
    assert start_loss > 0.6
    assert final_loss < MEMORIZE[name]["below"], (start_loss, final_loss)


def test_eval_step_matches_hand_computed_cross_entropy():
    # An identity "model": the inputs are the logits, so the expected sums can be written by hand.
    state = TrainState.create(apply_fn=lambda variables, x, train: x, params={}, tx=optax.sgd(0.0))
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    batch = {
        "inputs": logits,
        "targets": jnp.array([0, 2, 2]),
        "weights": jnp.array([1.0, 1.0, 0.0]),  # the third row is padding
    }
    sums = eval_step(state, batch)
    np.testing.assert_allclose(sums["loss_sum"], -np.log(0.5) - np.log(0.1), rtol=1e-6)
    assert float(sums["correct_sum"]) == 1.0  # row 0 right, row 1 wrong, row 2 not counted
    assert float(sums["count"]) == 2.0


def test_language_model_targets_use_the_same_loss():
    state = TrainState.create(apply_fn=lambda variables, x, train: x, params={}, tx=optax.sgd(0.0))
    logits = jnp.log(jnp.full((2, 3, 4), 0.25))  # [batch, seq_len, vocab], uniform
    batch = {"inputs": logits, "targets": jnp.zeros((2, 3), jnp.int32)}
    sums = eval_step(state, batch)
    np.testing.assert_allclose(sums["loss_sum"], 6 * np.log(4.0), rtol=1e-6)
    assert float(sums["count"]) == 6.0


def test_dropout_key_depends_on_step_only():
    """The loop passes one base key; the step folds its number in, so steps differ and repeat."""
    config = load_config(CONFIGS / "mlp.py:tiny")
    config.model.dropout_rate = 0.5
    batch = first_batch(config)
    state = create_train_state(config, jax.random.key(0))
    step = jax.jit(train_step)
    _, a = step(state, batch, jax.random.key(1))
    _, b = step(state, batch, jax.random.key(1))
    _, c = step(state.replace(step=state.step + 1), batch, jax.random.key(1))
    assert float(a["loss_sum"]) == float(b["loss_sum"])
    assert float(a["loss_sum"]) != float(c["loss_sum"])


def run_losses(config, mode: str, num_devices: int, num_steps: int = 4):
    """Per-step losses of `config` on the first `num_devices` devices, compiled as `mode`:
    'dp' (jit, replicated state), 'fsdp' (jit, state sharded over all devices) or 'pmap'."""
    devices = jax.devices()[:num_devices]
    fsdp = num_devices if mode == "fsdp" else 1
    mesh = parallel.make_mesh(
        ml_collections.ConfigDict({"data": -1, "fsdp": fsdp, "tensor": 1}), devices
    )

    def compile_steps(shardings):
        if mode == "pmap":
            return parallel.compile_pmap(devices)
        return parallel.compile_jit(mesh, shardings)

    return losses_and_params(config, mesh, compile_steps, num_steps)


# Every way to run the tiny MLP; the Transformer (FSDP's target) sharded over all four devices
# and replicated by pmap, the two layouts that differ most from one device.
LAYOUTS = {
    "mlp": [(mode, n) for mode in ("dp", "fsdp", "pmap") for n in (1, 2, 4)],
    "transformer": [("fsdp", 4), ("pmap", 4)],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_same_losses_on_1_2_and_4_devices_for_dp_fsdp_and_pmap(name):
    assert jax.device_count() == 4
    config = load_config(CONFIGS / f"{name}.py:tiny")
    config.data.batch_size = 16
    reference, reference_params = run_losses(config, "dp", 1)
    # The steps do something (losses on 4 different batches differ); whether they train is
    # checked by test_loss_falls_on_a_fixed_real_batch.
    assert len(set(reference)) == len(reference)
    for mode, num_devices in LAYOUTS[name]:
        losses, params = run_losses(config, mode, num_devices)
        message = f"{mode} on {num_devices} devices"
        np.testing.assert_allclose(losses, reference, rtol=1e-6, err_msg=message)
        # Adam turns round-off in near-zero gradients into lr-sized moves: compare to 1e-4
        # (a wrong update moves by about the learning rate, 3e-3).
        chex.assert_trees_all_close(params, reference_params, rtol=1e-5, atol=1e-4)


def compile_layout(config, mode: str, num_devices: int, steps_per_call: int = 1):
    """(compiled steps, fresh state) for `mode` on the first `num_devices` devices (run_losses)."""
    devices = jax.devices()[:num_devices]
    fsdp = num_devices if mode == "fsdp" else 1
    mesh = parallel.make_mesh(
        ml_collections.ConfigDict({"data": -1, "fsdp": fsdp, "tensor": 1}), devices
    )
    state, shardings = loop.init_state(config, mesh, jax.random.key(0))
    if mode == "pmap":
        return parallel.compile_pmap(devices, steps_per_call=steps_per_call), state
    return parallel.compile_jit(mesh, shardings, steps_per_call=steps_per_call), state


# train.steps_per_call: the same steps in one lax.scan, on every layout of the tiny MLP and on the
# Transformer sharded by FSDP.
STEPS_PER_CALL_LAYOUTS = {
    "mlp": [("dp", 1), ("dp", 4), ("fsdp", 2), ("pmap", 4)],
    "transformer": [("fsdp", 2)],
}


@pytest.mark.parametrize("name", sorted(STEPS_PER_CALL_LAYOUTS))
def test_four_steps_in_one_call_are_bitwise_the_four_steps_one_by_one(name):
    config = load_config(CONFIGS / f"{name}.py:tiny")
    config.data.batch_size = 16
    iterator = data.train_iterator(config.data, seed=0)
    batches = [next(iterator) for _ in range(4)]
    for mode, num_devices in STEPS_PER_CALL_LAYOUTS[name]:
        compiled, state = compile_layout(config, mode, num_devices, steps_per_call=4)
        start = jax.tree.map(lambda x: x.copy(), state)  # the steps donate their state
        run_state, loss_sum, rng = compiled.to_run(state), 0.0, jax.random.key(3)
        for batch in batches:
            run_state, sums = compiled.train(run_state, compiled.put_batch(batch), rng)
            loss_sum += float(sums["loss_sum"])
        one_by_one = jax.device_get(compiled.from_run(run_state))

        stacked = compiled.put_batches(loop.stack(batches))
        run_state, sums = compiled.train_steps(compiled.to_run(start), stacked, rng)
        in_one_call = jax.device_get(compiled.from_run(run_state))
        message = f"{mode} on {num_devices} devices"
        assert int(in_one_call.step) == 4, message
        chex.assert_trees_all_equal(in_one_call.params, one_by_one.params, custom_message=message)
        chex.assert_trees_all_equal(in_one_call.opt_state, one_by_one.opt_state)
        assert float(sums["count"]) == 4 * config.data.batch_size * (config.data.seq_len or 1), (
            message
        )
        np.testing.assert_allclose(float(sums["loss_sum"]), loss_sum, rtol=1e-6, err_msg=message)


def test_fsdp_shards_parameters_and_optimizer_state():
    config = load_config(CONFIGS / "transformer.py:tiny")
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 4, "tensor": 1}))
    state, _ = loop.init_state(config, mesh, jax.random.key(0))
    kernel = state.params["lm_head"]["kernel"]  # [width 64, vocab 65]: 64 divides by 4
    assert kernel.sharding.spec == P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (16, 65)
    (adam,) = [  # optax's Adam state inside the chain (clipping, adamw)
        s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
        if hasattr(s, "mu")
    ]  # fmt: skip
    adam_mu = adam.mu["lm_head"]["kernel"]  # adamw's first moment
    assert adam_mu.sharding.spec == P("fsdp", None)
    assert state.params["lm_head"]["bias"].sharding.spec == P()  # 65 does not divide by 4


def test_make_mesh_fills_in_minus_one_and_rejects_a_bad_product():
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 1}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="does not cover the 4 devices"):
        parallel.make_mesh(ml_collections.ConfigDict({"data": 3, "fsdp": 1, "tensor": 1}))


def test_gradient_accumulation_4_x_8_equals_a_batch_of_32():
    config = load_config(CONFIGS / "transformer.py:tiny")
    config.data.batch_size = 32
    config.optimizer.name = "sgd"  # Adam's first steps hide gradient differences: use SGD
    config.optimizer.warmup_steps = 0
    state = create_train_state(config, jax.random.key(0))
    whole = jax.jit(train_step)
    accumulated = jax.jit(functools.partial(train_step, grad_accum_steps=4))
    iterator = data.train_iterator(config.data, seed=0)
    whole_state, accum_state = state, state
    for _ in range(3):
        batch = next(iterator)
        whole_state, whole_sums = whole(whole_state, batch, jax.random.key(1))
        accum_state, accum_sums = accumulated(accum_state, batch, jax.random.key(1))
        np.testing.assert_allclose(accum_sums["loss_sum"], whole_sums["loss_sum"], rtol=1e-6)
        assert float(accum_sums["count"]) == float(whole_sums["count"]) == 32 * 64
    chex.assert_trees_all_close(accum_state.params, whole_state.params, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), whole_state.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the comparison is not between unchanged params


def test_grad_accum_steps_must_divide_the_batch():
    config = load_config(CONFIGS / "mlp.py:tiny")
    state = create_train_state(config, jax.random.key(0))
    batch = next(data.train_iterator(config.data, seed=0))  # 64 examples
    with pytest.raises(ValueError, match="does not split into 5 micro-batches"):
        jax.jit(functools.partial(train_step, grad_accum_steps=5))(state, batch, jax.random.key(1))


def _primitives_in_order(jaxpr) -> list[str]:
    """The names of `jaxpr`'s primitives in program order, sub-jaxprs (nested jits) inlined."""
    names = []
    for eqn in jaxpr.eqns:
        # A nested jit holds a ClosedJaxpr, pmap's body an open Jaxpr.
        inner = [
            p for p in eqn.params.values() if isinstance(p, jax_core.ClosedJaxpr | jax_core.Jaxpr)
        ]
        for sub in inner:
            names += _primitives_in_order(getattr(sub, "jaxpr", sub))  # ClosedJaxpr.jaxpr
        if not inner:
            names.append(eqn.primitive.name)
    return names


def test_every_cross_device_sum_comes_after_the_backward_pass():
    # A sum over devices before the backward pass (e.g. of the global weight, to divide the loss
    # by it) is a blocking wait on an XLA:CPU worker thread while the other device's forward pass
    # needs one (benchmarks/RESULTS.md). Traced under pmap's axis: every psum must come after
    # the last matmul of the backward pass.
    config = load_config(CONFIGS / "mlp.py:tiny")
    state = create_train_state(config, jax.random.key(0))
    batch = first_batch(config)
    step = jax.pmap(functools.partial(train_step, axis_name="batch"), axis_name="batch")
    one_device = jax.tree.map(lambda x: jnp.asarray(x)[None], (state, batch, jax.random.key(0)))
    names = _primitives_in_order(jax.make_jaxpr(step)(*one_device).jaxpr)
    psums = [i for i, name in enumerate(names) if name == "psum"]
    dots = [i for i, name in enumerate(names) if name == "dot_general"]
    # Two Dense layers: two forward matmuls, two kernel gradients, the hidden layer's gradient.
    assert psums and len(dots) == 5
    assert min(psums) > max(dots), f"psum at {psums}, matmuls at {dots}"


def test_train_step_traces_once():
    config = load_config(CONFIGS / "transformer.py:tiny")
    state = create_train_state(config, jax.random.key(0))
    counted_train = jax.jit(chex.assert_max_traces(train_step, n=1), donate_argnums=0)
    counted_eval = jax.jit(chex.assert_max_traces(eval_step, n=1))
    rng = jax.random.key(0)
    iterator = data.train_iterator(config.data, seed=0)
    for _ in range(4):  # new batches, new states: the same shapes never retrace
        batch = next(iterator)
        state, _ = counted_train(state, batch, rng)
        counted_eval(state, batch)
    assert int(state.step) == 4


def test_the_loop_compiles_each_step_once(monkeypatch):
    config = load_config(CONFIGS / "mlp.py:tiny")
    # compile_jit looks steps.train_step up when called: count its traces through the real path,
    # so a sharding mismatch between the initial and the returned state would show as a retrace.
    monkeypatch.setattr(steps, "train_step", chex.assert_max_traces(steps.train_step, n=1))
    mesh = parallel.make_mesh()
    state, shardings = loop.init_state(config, mesh, jax.random.key(0))
    compiled = parallel.compile_jit(mesh, shardings)
    iterator = data.train_iterator(config.data, seed=0)
    for _ in range(3):
        state, _ = compiled.train(state, compiled.put_batch(next(iterator)), jax.random.key(0))
    assert int(state.step) == 3


def test_bfloat16_transformer_trains_with_float32_parameters():
    config = load_config(CONFIGS / "transformer.py:tiny")
    config.model.dtype = "bfloat16"
    config.optimizer.warmup_steps = 0
    state = create_train_state(config, jax.random.key(0))
    batch = first_batch(config)
    step = jax.jit(train_step)
    losses = []
    for _ in range(30):
        state, sums = step(state, batch, jax.random.key(1))
        losses.append(float(sums["loss_sum"] / sums["count"]))
        assert sums["loss_sum"].dtype == jnp.float32  # the loss is summed in float32
    assert losses[-1] < 0.6 * losses[0], losses  # ln 65 = 4.17 at the start
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state))}
    assert dtypes <= {jnp.dtype("float32"), jnp.dtype("int32")}, dtypes


@pytest.mark.parametrize("mode", ["dp", "pmap"])
def test_several_cpu_devices_run_one_step_at_a_time(mode):
    # XLA:CPU devices share one thread pool, and steps queued ahead can deadlock their
    # all-reduce (see parallel.serializes_collectives): over several CPU devices each call returns
    # finished arrays. On one device the call returns at once and the step runs behind it.
    config = load_config(CONFIGS / "mlp.py:tiny")
    assert parallel.serializes_collectives(jax.devices()) and not parallel.serializes_collectives(
        jax.devices()[:1]
    )
    mesh = parallel.make_mesh()
    state, shardings = loop.init_state(config, mesh, jax.random.key(0))
    compiled = parallel.compile_pmap() if mode == "pmap" else parallel.compile_jit(mesh, shardings)
    iterator = data.train_iterator(config.data, seed=0)
    run_state = compiled.to_run(state)
    for _ in range(3):
        batch = compiled.put_batch(next(iterator))
        run_state, sums = compiled.train(run_state, batch, jax.random.key(0))
        # (pmap's metrics are then sliced to one copy by a separate call, so check the state.)
        assert all(leaf.is_ready() for leaf in jax.tree.leaves(run_state))
        if mode == "dp":
            assert all(leaf.is_ready() for leaf in jax.tree.leaves(sums))
            assert all(leaf.is_ready() for leaf in jax.tree.leaves(compiled.eval(run_state, batch)))
