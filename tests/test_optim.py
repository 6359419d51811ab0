"""Optimizers and schedules built from the config: exact values at known steps."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from train import optim


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            name="sgd",
            learning_rate=0.1,
            momentum=0.9,
            b1=0.9,
            b2=0.999,
            weight_decay=0.0,
            schedule="cosine",
            warmup_steps=10,
            end_learning_rate=0.01,
            grad_clip_norm=0.0,
        )
    )
    config.update(overrides)
    return config


def test_warmup_then_cosine_reaches_peak_and_end():
    schedule = optim.make_schedule(optimizer_config(), num_steps=110)
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), 0.05, rtol=1e-6)  # halfway up the linear warmup
    np.testing.assert_allclose(schedule(10), 0.1, rtol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.01 + 0.09 * 0.5, rtol=1e-5)  # half the cosine
    np.testing.assert_allclose(schedule(110), 0.01, rtol=1e-6)


def test_constant_schedule_after_warmup():
    schedule = optim.make_schedule(optimizer_config(schedule="constant"), num_steps=100)
    np.testing.assert_allclose(
        [schedule(0), schedule(5), schedule(10), schedule(99)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6
    )


def test_sgd_momentum_update_by_hand():
    config = optimizer_config(schedule="constant", warmup_steps=0, learning_rate=0.5)
    optimizer, _ = optim.make_optimizer(config, num_steps=10)
    params = {"w": jnp.array([1.0, -2.0])}
    state = optimizer.init(params)
    grads = {"w": jnp.array([0.2, 0.4])}
    updates, state = optimizer.update(grads, state, params)
    np.testing.assert_allclose(updates["w"], [-0.1, -0.2], rtol=1e-6)
    updates, state = optimizer.update(grads, state, params)
    # second step: velocity = 0.9 * g + g = 1.9 g
    np.testing.assert_allclose(updates["w"], [-0.19, -0.38], rtol=1e-6)


def test_gradient_clipping_bounds_the_global_norm():
    config = optimizer_config(
        schedule="constant", warmup_steps=0, learning_rate=1.0, momentum=0.0, grad_clip_norm=1.0
    )
    optimizer, _ = optim.make_optimizer(config, num_steps=10)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["a"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], [-0.8], rtol=1e-6)


def test_adamw_first_step_and_decay():
    config = optimizer_config(
        name="adamw", schedule="constant", warmup_steps=0, learning_rate=0.1, weight_decay=0.5
    )
    optimizer, _ = optim.make_optimizer(config, num_steps=10)
    params = {"w": jnp.array([2.0])}
    updates, _ = optimizer.update({"w": jnp.array([3.0])}, optimizer.init(params), params)
    # Adam's first step is lr * sign(g) (up to eps); decoupled decay adds lr * wd * w.
    np.testing.assert_allclose(updates["w"], [-0.1 - 0.1 * 0.5 * 2.0], rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("name", "lion", "Unknown optimizer.name 'lion'"),
        ("schedule", "linear", "Unknown optimizer.schedule 'linear'"),
    ],
)
def test_unknown_names_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message) as error:
        optim.make_optimizer(optimizer_config(**{field: value}), num_steps=10)
    assert "\n" not in str(error.value)


def test_schedule_is_jittable():
    schedule = optim.make_schedule(optimizer_config(), num_steps=110)
    np.testing.assert_allclose(jax.jit(schedule)(10), 0.1, rtol=1e-6)
