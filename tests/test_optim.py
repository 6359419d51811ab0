"""Optimizers and schedules built from the config: exact values at known steps."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
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


def reference_optimizer(name: str, weight_decay: float, clip_norm: float, schedule):
    """What `optim.adamw` replaces: optax's own Adam(W), after optax's global-norm clipping."""
    if name == "adam":
        reference = optax.adam(schedule, b1=0.9, b2=0.999)
    else:
        reference = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=weight_decay)
    if clip_norm:
        reference = optax.chain(optax.clip_by_global_norm(clip_norm), reference)
    return reference


# A matrix, three vectors of one length and one of another, and a scalar: the clipping norm
# stacks vectors by length, so every kind of leaf is in play.
SHAPES = {
    "dense": {"kernel": (6, 5), "bias": (5,)},
    "norm": {"scale": (5,), "bias": (5,)},
    "head": (7,),
    "temperature": (),
}


@pytest.mark.parametrize(
    "name, weight_decay, clip_norm",
    [("adam", 0.0, 0.0), ("adamw", 0.1, 0.0), ("adamw", 0.1, 1.0), ("adam", 0.0, 1e3)],
)
def test_adamw_matches_optax_over_ten_steps(name, weight_decay, clip_norm):
    config = optimizer_config(
        name=name, learning_rate=0.01, warmup_steps=3, end_learning_rate=0.0,
        weight_decay=weight_decay, grad_clip_norm=clip_norm,
    )  # fmt: skip
    ours, schedule = optim.make_optimizer(config, num_steps=10)
    reference = reference_optimizer(name, weight_decay, clip_norm, schedule)
    rng = np.random.default_rng(0)
    draw = lambda: jax.tree.map(  # noqa: E731
        lambda shape: jnp.asarray(3 * rng.normal(size=shape), jnp.float32),
        SHAPES, is_leaf=lambda x: isinstance(x, tuple),
    )  # fmt: skip
    params = ours_params = draw()
    ours_state, reference_state = ours.init(params), reference.init(params)
    norms = []
    for _ in range(10):
        grads = draw()
        norms.append(float(optax.tree.norm(grads)))
        updates, reference_state = reference.update(grads, reference_state, params)
        params = optax.apply_updates(params, updates)
        updates, ours_state = ours.update(grads, ours_state, ours_params)
        ours_params = optax.apply_updates(ours_params, updates)
    if clip_norm == 1.0:
        assert min(norms) > 5  # every step clipped
    # A wrong update moves a parameter by about the learning rate (1e-2); round-off by 1e-7.
    chex.assert_trees_all_close(ours_params, params, rtol=1e-6, atol=1e-6)
    adam_state = reference_state[-1][0] if clip_norm else reference_state[0]
    chex.assert_trees_all_close(ours_state.mu, adam_state.mu, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(ours_state.nu, adam_state.nu, rtol=1e-6, atol=1e-7)
    assert int(ours_state.count) == 10


def test_clipping_sums_vectors_of_one_length_together():
    # XLA:CPU compiles three small kernels for each vector's sum of squares: the norm stacks
    # vectors of one length and sums each stack once. Here the matrix, then vectors of lengths 5
    # (three), 7 and 1 (the scalar): 4 sums, where one per array would be 6.
    config = optimizer_config(name="adam", grad_clip_norm=1.0)
    optimizer, _ = optim.make_optimizer(config, num_steps=10)
    params = jax.tree.map(jnp.zeros, SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    jaxpr = jax.make_jaxpr(optimizer.update)(params, optimizer.init(params), params)
    sums = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce_sum"]
    assert len(sums) == 4, jaxpr  # the only sums of the update are the norm's
