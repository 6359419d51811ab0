"""Optimizers and schedules built from the config: exact values at known steps, any optax optimizer
by name, weight decay on weight matrices and embeddings only."""

import inspect
import re
import subprocess
import sys
from functools import partial

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
            kwargs=dict(momentum=0.9),
            learning_rate=0.1,
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
        schedule="constant", warmup_steps=0, learning_rate=1.0, grad_clip_norm=1.0
    )
    config.kwargs.momentum = None  # None: not passed (plain SGD)
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
    params = {"kernel": jnp.array([[2.0]])}
    updates, _ = optimizer.update({"kernel": jnp.array([[3.0]])}, optimizer.init(params), params)
    # Adam's first step is lr * sign(g) (up to eps); decoupled decay adds lr * wd * w.
    np.testing.assert_allclose(updates["kernel"], [[-0.1 - 0.1 * 0.5 * 2.0]], rtol=1e-5)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("name", "lamb2", "Unknown optimizer.name 'lamb2': not an optax optimizer"),
        ("name", "chain", "Unknown optimizer.name 'chain': not an optax optimizer"),
        ("name", "_deprecated_dpsgd", "Unknown optimizer.name '_deprecated_dpsgd': not an optax"),
        ("name", "scale_by_rprop", "Unknown optimizer.name 'scale_by_rprop': not an optax"),
        # a NamedTuple with a `learning_rate` field, not an optimizer
        ("name", "ScaleByZoomLinesearchState", "Unknown optimizer.name 'ScaleByZoomLinesearchSta"),
        ("kwargs", dict(weight_decay=0.1), "optimizer.kwargs.weight_decay is set from the config"),
        ("kwargs", dict(learning_rate=0.1), "optimizer.kwargs.learning_rate is set from the con"),
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


# A model's parameters: kernels and embeddings decay; biases, norm scales (and a stacked bias of
# scanned layers, two-dimensional but still a bias) do not.
PARAMS = {
    "embed": {"embedding": jnp.full((4, 3), 2.0)},
    "dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)},
    "norm": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)},
    "blocks": {"bias": jnp.full((2, 3), 2.0)},
}


def test_decay_mask_names_weight_matrices_and_embeddings_only():
    mask = optim.decay_mask(PARAMS)
    assert mask == {
        "embed": {"embedding": True},
        "dense": {"kernel": True, "bias": False},
        "norm": {"scale": False, "bias": False},
        "blocks": {"bias": False},
    }


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "sgd", "adam"])
def test_weight_decay_leaves_biases_and_norm_scales_unchanged(name):
    # With zero gradients the only change is weight decay: kernels and embeddings shrink,
    # biases and scales stay exactly as they are, whichever way the optimizer takes its decay.
    config = optimizer_config(
        name=name, schedule="constant", warmup_steps=0, learning_rate=0.1, weight_decay=0.5
    )
    optimizer, _ = optim.make_optimizer(config, num_steps=10)
    state = optimizer.init(PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = optimizer.update(zeros, state, PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    mask = optim.decay_mask(PARAMS)
    for path, decays in jax.tree_util.tree_leaves_with_path(mask):
        before = np.asarray(_get(PARAMS, path))
        after = np.asarray(_get(new, path))
        if decays:
            assert (after < before).all(), (name, path)
        else:
            np.testing.assert_array_equal(after, before, err_msg=f"{name} {path}")


def _get(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree


def test_adamw_is_optax_adamw_with_the_mask():
    # No project-written optimizer: the chain is optax's own, update for update.
    config = optimizer_config(
        name="adamw",
        kwargs=dict(b1=0.9, b2=0.95),
        schedule="constant",
        warmup_steps=0,
        learning_rate=0.01,
        weight_decay=0.1,
        grad_clip_norm=1.0,
    )
    ours, _ = optim.make_optimizer(config, num_steps=10)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(0.01, b1=0.9, b2=0.95, weight_decay=0.1, mask=optim.decay_mask),
    )
    params, ref_params = PARAMS, PARAMS
    state, ref_state = ours.init(params), reference.init(params)
    for step in range(3):
        grads = jax.tree.map(lambda p, s=step: jnp.cos(p * (s + 1)) * 3.0, params)
        updates, state = ours.update(grads, state, params)
        ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
        params = optax.apply_updates(params, updates)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)


def test_keyword_arguments_the_optimizer_does_not_take_are_left_out(caplog):
    config = optimizer_config(name="lion", kwargs=dict(b1=0.95, momentum=0.9))
    optimizer, _ = optim.make_optimizer(config, num_steps=10)
    assert "optax.lion takes no momentum; ignored." in caplog.text
    optimizer.init(PARAMS)  # b1 went through; momentum did not break the call


def test_a_run_with_lion_trains_the_tiny_mlp(tmp_path):
    # An optax optimizer our code does not mention anywhere, named on the command line.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config=configs/mlp.py:tiny",
            f"--workdir={tmp_path}",
            "--config.optimizer.name=lion",
            "--config.optimizer.learning_rate=1e-3",
            "--config.train.num_steps=100",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    scalars = dict(item.split("=") for item in result.stdout.split())
    # Chance is ln(10) = 2.30; lion at 1e-3 for 100 steps of 128 real MNIST images (the config's
    # SGD momentum left out with a warning) gets to about 0.46 over steps 51-100.
    assert float(scalars["train/loss"]) < 0.7
    assert float(scalars["eval/accuracy"]) > 0.85


def bare_config(**overrides) -> ml_collections.ConfigDict:
    """`optimizer_config` with none of the optimizer's own keyword arguments."""
    config = optimizer_config(**overrides)
    config.kwargs = ml_collections.ConfigDict()
    return config


def optax_optimizers() -> list[str]:
    """Every function in optax's namespace that takes a `learning_rate`, found when tests run."""
    names = []
    for name in dir(optax):
        function = getattr(optax, name)
        if not callable(function) or inspect.isclass(function):
            continue
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):  # builtins without a signature
            continue
        if "learning_rate" in parameters:
            names.append(name)
    return names


OPTIMIZERS = optax_optimizers()

# What make_optimizer refuses, and a piece of the one line that says why. Any other optimizer
# must run, so that a refusal of everything cannot pass these tests.
REFUSED_ALWAYS = {
    "_deprecated_dpsgd": "not an optax optimizer",  # private, and it needs per-example gradients
    # optax's building blocks: scale_by_rprop steps up the gradient (rprop negates it)
    "scale_by_learning_rate": "not an optax optimizer",
    "scale_by_rprop": "not an optax optimizer",
    "lbfgs": "needs the loss and a function computing it at every update (a line search)",
}
REFUSED_WITH_DECAY = {"novograd": "applies its own weight_decay to every parameter"}
REFUSED_WITH_SCHEDULE = dict.fromkeys(
    ["rprop", "sm3", "optimistic_adam"],
    "takes no learning-rate schedule, only a constant rate; set optimizer.schedule='constant' "
    "with optimizer.warmup_steps=0, or use another optimizer.",
)


def test_the_optimizers_are_found_in_optax():
    assert {"adamw", "sgd", "lion", "lars", "adadelta", "novograd", "rprop", "lbfgs"} <= set(
        OPTIMIZERS
    )
    assert len(OPTIMIZERS) >= 30  # 34 in optax 0.2.8


def assert_refused(config, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        optim.make_optimizer(config, num_steps=10)
    assert "\n" not in str(error.value)
    assert f"{config.name}" in str(error.value)


# A dense layer and a norm at 2.0. The kernel's gradients are small and of both signs, so that
# decay (0.5 * 2.0 = 1) turns the direction of each element even for sign-based optimizers; the
# bias's and scale's are not zero, so that decay leaking into an optimizer's statistics (its
# second moments, its per-layer norms) would show in their updates too.
DECAY_PARAMS = {
    "dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
    "norm": {"scale": jnp.full((4,), 2.0)},
}
GRADS = {
    "dense": {
        "kernel": 0.01 * jnp.array([[1.0, -1.0, 2.0, -2.0]] * 3),
        "bias": jnp.array([0.3, -0.2, 0.1, -0.4]),
    },
    "norm": {"scale": jnp.array([-0.1, 0.2, -0.3, 0.4])},
}


def two_steps(config) -> optax.Params:
    optimizer, _ = optim.make_optimizer(config, num_steps=10)
    params, state = DECAY_PARAMS, optimizer.init(DECAY_PARAMS)
    for _ in range(2):
        updates, state = optimizer.update(GRADS, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_reaches_kernels_and_never_biases_or_scales_or_is_refused(name):
    config = bare_config(name=name, schedule="constant", warmup_steps=0, weight_decay=0.5)
    refusal = REFUSED_ALWAYS.get(name, REFUSED_WITH_DECAY.get(name))
    if refusal is not None:
        assert_refused(config, refusal)
        return
    decayed = two_steps(config)
    config.weight_decay = 0.0
    plain = two_steps(config)
    for params in (decayed, plain):
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)), name
    # Bitwise the same with decay as without: it never reaches them, not even through statistics.
    np.testing.assert_array_equal(decayed["dense"]["bias"], plain["dense"]["bias"], err_msg=name)
    np.testing.assert_array_equal(decayed["norm"]["scale"], plain["norm"]["scale"], err_msg=name)
    # Decay pulls the kernel (2.0 everywhere) toward zero: all of it, if not every element (an
    # adaptive optimizer rescales L2 decay in front of it element by element).
    kernel, plain_kernel = decayed["dense"]["kernel"], plain["dense"]["kernel"]
    assert float(kernel.sum()) < float(plain_kernel.sum()), (name, kernel, plain_kernel)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_constant_rate_is_the_optimizers_own_or_is_refused(name):
    # A constant schedule without warmup: the same updates as the optax function called with
    # the number itself (the schedule where it takes one, the number where it takes none).
    config = bare_config(name=name, schedule="constant", warmup_steps=0)
    if name in REFUSED_ALWAYS:
        assert_refused(config, REFUSED_ALWAYS[name])
        return
    ours, _ = optim.make_optimizer(config, num_steps=10)
    function = getattr(optax, name)
    # No decay: adamw's and lion's own default is not 0.
    own_decay = (
        {"weight_decay": 0.0} if "weight_decay" in inspect.signature(function).parameters else {}
    )
    reference = function(0.1, **own_decay)
    state, ref_state = ours.init(DECAY_PARAMS), reference.init(DECAY_PARAMS)
    for _ in range(2):
        updates, state = ours.update(GRADS, state, DECAY_PARAMS)
        ref_updates, ref_state = reference.update(GRADS, ref_state, DECAY_PARAMS)
        # to float32's rounding: fromage computes its factors in Python from a number and in
        # float32 from a schedule
        jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5), updates, ref_updates)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_warmup_reaches_the_optimizer_or_is_refused(name):
    # Warmup starts at a learning rate of 0: an optimizer that honours the schedule moves nothing
    # on its first update, and something on its second (at 0.1 / 10).
    config = bare_config(name=name, schedule="cosine", warmup_steps=10)
    refusal = REFUSED_ALWAYS.get(name, REFUSED_WITH_SCHEDULE.get(name))
    if refusal is not None:
        assert_refused(config, refusal)
        return
    optimizer, _ = optim.make_optimizer(config, num_steps=100)
    state = optimizer.init(DECAY_PARAMS)
    first, state = optimizer.update(GRADS, state, DECAY_PARAMS)
    second, _ = optimizer.update(GRADS, state, DECAY_PARAMS)
    for leaf in jax.tree.leaves(first):
        np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(second)), name


def test_rprop_with_a_cosine_schedule_is_refused_in_one_line():
    config = optimizer_config(name="rprop", schedule="cosine", warmup_steps=10)
    with pytest.raises(ValueError) as error:
        optim.make_optimizer(config, num_steps=10)
    assert str(error.value) == (
        "optax.rprop takes no learning-rate schedule, only a constant rate; set "
        "optimizer.schedule='constant' with optimizer.warmup_steps=0, or use another optimizer."
    )


def test_rprop_with_a_constant_rate_steps_by_it():
    # optax's rprop moves nothing on its first update and then the learning rate against the
    # gradient's sign, whatever its size (growing by eta_plus=1.2 while the sign holds).
    config = bare_config(name="rprop", schedule="constant", warmup_steps=0)
    optimizer, schedule = optim.make_optimizer(config, num_steps=10)
    params, grads = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, -1e-3])}
    state = optimizer.init(params)
    steps = []
    for _ in range(3):
        updates, state = optimizer.update(grads, state, params)
        steps.append(updates["w"])
    np.testing.assert_allclose(steps, [[0, 0], [-0.1, 0.1], [-0.12, 0.12]], rtol=1e-6)
    np.testing.assert_allclose(schedule(5), 0.1, rtol=1e-6)  # what the loop logs


@pytest.mark.parametrize("name", ["adadelta", "lars"])
def test_an_own_mask_argument_of_another_name_gets_the_mask(name):
    # optax.adadelta and optax.lars call their mask weight_decay_mask: the same updates as the
    # function given decay_mask there by hand.
    config = bare_config(name=name, schedule="constant", warmup_steps=0, weight_decay=0.5)
    ours, _ = optim.make_optimizer(config, num_steps=10)
    reference = getattr(optax, name)(0.1, weight_decay=0.5, weight_decay_mask=optim.decay_mask)
    updates, _ = ours.update(GRADS, ours.init(DECAY_PARAMS), DECAY_PARAMS)
    ref_updates, _ = reference.update(GRADS, reference.init(DECAY_PARAMS), DECAY_PARAMS)
    jax.tree.map(np.testing.assert_array_equal, updates, ref_updates)
