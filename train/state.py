"""The train state: one immutable pytree holding step, params and optimizer state."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax.training import train_state

import jaxmodels
from train import optim

# Flax's TrainState holds `step`, `params`, `opt_state` as pytree leaves and `apply_fn`, `tx` as
# static fields; `apply_gradients` returns a new state. None of our models keeps batch statistics.
TrainState = train_state.TrainState


def build_model(config: ml_collections.ConfigDict):
    """The Flax module named by `config.model.name`, with every other `config.model` field."""
    fields = config.model.to_dict()
    name = fields.pop("name")
    return jaxmodels.build_model(name, **fields)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> jax.Array:
    """Zeros shaped like one batch of model inputs for `config.data.dataset`, for initialisation."""
    if config.data.dataset == "mnist":
        return jnp.zeros((batch_size, 28, 28, 1), jnp.float32)  # [batch, height, width, channels]
    return jnp.zeros((batch_size, config.data.seq_len), jnp.int32)  # [batch, seq_len] token ids


def create_train_state(
    config: ml_collections.ConfigDict, rng: jax.Array, inputs: Any = None
) -> TrainState:
    """Initialises the model and optimizer named by `config`.

    Args:
      config: a full config (`model`, `data`, `optimizer`, `train` sections).
      rng: a PRNG key for parameter initialisation.
      inputs: an example batch of model inputs; defaults to `example_inputs(config)`.

    Returns:
      A TrainState at step 0. Pure, so it can be jitted with output shardings.
    """
    model = build_model(config)
    if inputs is None:
        inputs = example_inputs(config)
    params = model.init(rng, inputs, train=False)["params"]
    optimizer, _ = optim.make_optimizer(config.optimizer, config.train.num_steps)
    return TrainState.create(apply_fn=model.apply, params=params, tx=optimizer)
