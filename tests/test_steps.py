"""train_step / eval_step: numbers on real batches, jit vs pmap on 4 devices, one trace per step."""

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import TrainState, create_train_state, data, eval_step, loop, steps, train_step
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


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_jit_and_pmap_give_the_same_losses_on_4_devices(name):
    assert jax.device_count() == 4
    config = load_config(CONFIGS / f"{name}.py:tiny")
    config.data.batch_size = 16
    batches = list(zip(range(3), data.train_iterator(config.data, seed=0), strict=False))
    rng = jax.random.key(3)
    state = create_train_state(config, jax.random.key(0))

    jit = loop.compile_jit(loop.make_mesh())
    jit_state = jax.device_put(state, NamedSharding(loop.make_mesh(), P()))
    pmap = loop.compile_pmap()
    pmap_state = pmap.to_run(state)
    jit_losses, pmap_losses = [], []
    for _, batch in batches:
        jit_state, jit_sums = jit.train(jit_state, jit.put_batch(batch), rng)
        pmap_state, pmap_sums = pmap.train(pmap_state, pmap.put_batch(batch), rng)
        jit_losses.append(float(jit_sums["loss_sum"] / jit_sums["count"]))
        pmap_losses.append(float(pmap_sums["loss_sum"] / pmap_sums["count"]))
    np.testing.assert_allclose(jit_losses, pmap_losses, rtol=1e-6)
    assert jit_losses[-1] < jit_losses[0]  # the steps did train
    chex.assert_trees_all_close(
        jit_state.params, pmap.from_run(pmap_state).params, rtol=1e-5, atol=1e-6
    )


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
    compiled = loop.compile_jit(loop.make_mesh())
    state = jax.jit(
        functools.partial(create_train_state, config),
        out_shardings=NamedSharding(loop.make_mesh(), P()),
    )(jax.random.key(0))
    iterator = data.train_iterator(config.data, seed=0)
    for _ in range(3):
        state, _ = compiled.train(state, compiled.put_batch(next(iterator)), jax.random.key(0))
    assert int(state.step) == 3
