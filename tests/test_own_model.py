"""A researcher's own model trains through our steps and loop unchanged: a Flax NNX model wrapped
with `flax.nnx.bridge.ToLinen`, on real MNIST batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import bridge

from train import data, eval_step, loop, state_from_module, train_step
from train.config import load_config
from train.metrics import read_metrics


class NNXClassifier(nnx.Module):
    """An MLP written in Flax NNX, with dropout: nothing of jaxmodels in it."""

    def __init__(self, features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(28 * 28, features, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.reshape(x.shape[0], -1)  # [batch, 784]
        x = self.dropout(nnx.relu(self.hidden(x)), deterministic=not train)
        return self.out(x)  # [batch, num_classes]


def real_batch(size: int) -> dict:
    config = load_config("configs/mlp.py:tiny")
    examples = data.train_examples(config.data)
    return {k: jnp.asarray(v[:size]) for k, v in examples.items()}


def test_nnx_model_trains_through_train_step_and_eval_step():
    model = bridge.ToLinen(NNXClassifier, args=(64, 10))
    state = state_from_module(model, jax.random.key(0), jnp.zeros((1, 28, 28, 1)), optax.adam(3e-3))
    # The NNX layers' parameters, as a linen tree: 784*64 + 64 + 64*10 + 10 of them.
    assert sum(p.size for p in jax.tree.leaves(state.params)) == 784 * 64 + 64 + 64 * 10 + 10
    batch = real_batch(256)
    step, evaluate = jax.jit(train_step), jax.jit(eval_step)
    first = evaluate(state, batch)
    for _ in range(30):
        state, _ = step(state, batch, jax.random.key(1))
    last = evaluate(state, batch)
    first_loss = float(first["loss_sum"] / first["count"])
    last_loss = float(last["loss_sum"] / last["count"])
    assert first_loss > 2.0  # about ln(10) at the start
    assert last_loss < 0.3 * first_loss, (first_loss, last_loss)
    # Dropout draws from our step's key: two keys give two updates.
    a, _ = step(state, batch, jax.random.key(2))
    b, _ = step(state, batch, jax.random.key(3))
    assert not np.allclose(a.params["hidden"]["kernel"], b.params["hidden"]["kernel"])


def test_own_module_runs_the_whole_loop(tmp_path):
    config = load_config("configs/mlp.py:tiny")
    config.train.update(num_steps=50, log_every=25, eval_every=50, checkpoint_every=25)
    model = bridge.ToLinen(NNXClassifier, args=(64, 10))
    state, scalars = loop.train_and_evaluate(config, tmp_path, model=model)
    assert int(state.step) == 50 and "hidden" in state.params
    assert scalars["eval/accuracy"] > 0.8
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [25, 50]
