"""train.tasks: each config's task and its batch, and a fourth task (a regression head, defined
here and nowhere else) trained and evaluated by the same steps, compiled as the loop compiles
them."""

import dataclasses
import functools
import pathlib
import types
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from train import data, eval_step, parallel, state_from_module, tasks, train_step
from train.config import load_config
from train.state import create_train_state, example_inputs

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"

# Each config's task, and the fields of its batch of 2: {field: (shape, dtype)}.
EXPECTED = {
    "mlp": ("classification", {"inputs": ((2, 28, 28, 1), "float32"), "targets": ((2,), "int32")}),
    "cnn": ("classification", {"inputs": ((2, 28, 28, 1), "float32"), "targets": ((2,), "int32")}),
    "lstm": ("classification", {"inputs": ((2, 32), "int32"), "targets": ((2,), "int32")}),
    "transformer_classifier": (
        "classification",
        {"inputs": ((2, 32), "int32"), "targets": ((2,), "int32")},
    ),
    "transformer": (
        "language_model",
        {"inputs": ((2, 64), "int32"), "targets": ((2, 64), "int32")},
    ),
    "seq2seq": (
        "seq2seq",
        {
            "inputs": ((2, 8), "int32"),
            "decoder_inputs": ((2, 8), "int32"),
            "targets": ((2, 8), "int32"),
        },
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_has_its_task_and_batch(name):
    config = load_config(CONFIGS / f"{name}.py:tiny")
    task_name, fields = EXPECTED[name]
    task = tasks.for_config(config)
    assert task is tasks.TASKS[task_name] and task.name == task_name
    batch = task.example_batch(config, batch_size=2)
    weights_shape = fields["targets"][0]
    expected = {**fields, "weights": (weights_shape, "float32")}
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == expected
    # The real data's first batch has exactly these fields, shapes and dtypes.
    config.data.batch_size = 2
    real = next(data.train_iterator(config.data, seed=0))
    assert {k: (v.shape, v.dtype.name) for k, v in real.items()} == expected
    # The model's inputs: one array, or the encoder-decoder's two, of one example.
    model_fields = ("inputs", "decoder_inputs") if task_name == "seq2seq" else ("inputs",)
    inputs = task.example_inputs(config)
    assert [x.shape for x in inputs] == [(1, *fields[k][0][1:]) for k in model_fields]
    single = example_inputs(config)  # train.state's: the array itself for a model of one input
    assert (single if len(inputs) > 1 else (single,))[0].shape == inputs[0].shape
    # The state carries its task, static: not a leaf, but part of the tree's structure.
    state = jax.eval_shape(functools.partial(create_train_state, config), jax.random.key(0))
    assert state.task is task
    assert all(leaf is not task for leaf in jax.tree.leaves(state))


def test_a_model_of_another_task_is_refused_in_one_line():
    config = load_config(CONFIGS / "seq2seq.py:tiny")
    config.data.dataset = "mnist"
    with pytest.raises(ValueError, match="model.name='seq2seq' trains seq2seq data"):
        tasks.for_config(config)
    config = load_config(CONFIGS / "transformer.py:tiny")
    config.data.dataset = "addition"
    with pytest.raises(ValueError, match="addition is seq2seq data; train it with model.name="):
        tasks.for_config(config)


# --- A fourth task, defined here alone ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Regression(tasks.Task):
    """One float per example: the squared error, and the rows within 0.5 of their target."""

    name: ClassVar[str] = "regression"

    def example_batch(self, config, batch_size=1):
        return {
            "inputs": jnp.zeros((batch_size, 3), jnp.float32),
            "targets": jnp.zeros((batch_size,), jnp.float32),
            "weights": jnp.zeros((batch_size,), jnp.float32),
        }

    def sums(self, logits, batch, weights):
        error = logits - batch["targets"]  # [batch]
        return {
            "loss_sum": jnp.sum(error**2 * weights),
            "correct_sum": jnp.sum((jnp.abs(error) < 0.5) * weights),
            "count": jnp.sum(weights),
        }

    def eval_sums(self, state, batch, weights):
        predicted = state.apply_fn({"params": state.params}, batch["inputs"], train=False)
        return {"abs_error_sum": jnp.sum(jnp.abs(predicted - batch["targets"]) * weights)}


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[:, 0]  # [batch]


def regression_batch(size: int) -> dict[str, np.ndarray]:
    inputs = np.random.default_rng(0).normal(size=(size, 3)).astype(np.float32)
    targets = inputs @ np.array([1.0, -2.0, 0.5], np.float32) + 0.25
    return {"inputs": inputs, "targets": targets, "weights": np.ones(size, np.float32)}


def regression_state():
    inputs = Regression().example_inputs(None)
    optimizer = optax.sgd(0.1)
    return state_from_module(Linear(), jax.random.key(0), inputs, optimizer, task=Regression())


def test_a_fourth_task_is_scored_by_the_eval_step_by_hand():
    state = regression_state()  # all zero: predicts 0
    batch = {
        "inputs": np.ones((3, 3), np.float32),
        "targets": np.array([0.25, -2.0, 3.0], np.float32),
        "weights": np.array([1, 1, 0], np.float32),  # the last row is padding
    }
    sums = jax.device_get(jax.jit(eval_step)(state, batch))
    assert {k: float(v) for k, v in sums.items()} == {
        "loss_sum": 0.0625 + 4.0,
        "correct_sum": 1.0,
        "count": 2.0,
        "abs_error_sum": 2.25,
    }


def test_a_fourth_task_trains_through_the_loops_compiled_steps():
    mesh = parallel.make_mesh()  # every device: the batch split over them, sums added up
    state = regression_state()
    shardings = parallel.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    compiled = parallel.compile_jit(mesh, shardings)
    batch = compiled.put_batch(regression_batch(32))
    first = compiled.eval(state, batch)
    for _ in range(100):
        state, sums = compiled.train(state, batch, jax.random.key(0))
    last = compiled.eval(state, batch)
    assert int(state.step) == 100 and float(sums["count"]) == 32
    assert float(first["loss_sum"]) / 32 > 1.0
    assert float(last["loss_sum"]) / 32 < 1e-4 and float(last["correct_sum"]) == 32
    assert float(last["abs_error_sum"]) / 32 < 1e-2
    # Gradient accumulation sums micro-batches to the same update, for this task too.
    step, accumulated = (
        jax.jit(train_step),
        jax.jit(lambda s, b, r: train_step(s, b, r, grad_accum_steps=4)),
    )
    whole, _ = step(regression_state(), regression_batch(32), jax.random.key(0))
    parts, _ = accumulated(regression_state(), regression_batch(32), jax.random.key(0))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        whole.params,
        parts.params,
    )


@pytest.mark.parametrize("name", ["language_model", "seq2seq"])
def test_token_tasks_refuse_logits_short_of_the_vocabulary_in_one_line(name):
    task = tasks.TASKS[name]
    config = ml_collections.ConfigDict({"data": {"dataset": "some_text"}})
    info = types.SimpleNamespace(vocab_size=65)
    task.check_fits(config, jax.ShapeDtypeStruct((2, 8, 65), jnp.float32), info)  # fits
    for shape in [(2, 8, 64), (2, 65)]:  # too few ids; one score per sequence, not per position
        with pytest.raises(ValueError, match=r"^some_text .*65.*logits have shape") as error:
            task.check_fits(config, jax.ShapeDtypeStruct(shape, jnp.float32), info)
        assert "\n" not in str(error.value) and "model.vocab_size >= 65" in str(error.value)
