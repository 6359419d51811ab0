"""The train state: one immutable pytree holding step, params and optimizer state."""

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from flax import struct
from flax.training import train_state

import jaxmodels
from train import optim, tasks


class TrainState(train_state.TrainState):
    """Flax's TrainState: `step`, `params`, `opt_state` as pytree leaves and `apply_fn`, `tx` as
    static fields; `apply_gradients` returns a new state. None of our models keeps batch
    statistics. Plus `task`, static too: what a batch holds and how the steps score the model's
    output (`train.tasks`); by default the plain cross-entropy of `model(inputs)`."""

    task: tasks.Task = struct.field(pytree_node=False, default=tasks.PLAIN)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The Flax module named by `config.model.name`, with every other `config.model` field."""
    fields = config.model.to_dict()
    name = fields.pop("name")
    return jaxmodels.build_model(name, **fields)


def example_inputs(
    config: ml_collections.ConfigDict, batch_size: int = 1
) -> jax.Array | tuple[jax.Array, ...]:
    """Zeros shaped like one batch of model inputs of `config`'s task, for initialisation; the
    tuple of them for a model of several inputs (the encoder-decoder's)."""
    inputs = tasks.for_config(config).example_inputs(config, batch_size)
    return inputs if len(inputs) > 1 else inputs[0]


def state_from_module(
    model: nn.Module,
    rng: jax.Array,
    inputs: Any,
    optimizer: optax.GradientTransformation,
    task: tasks.Task = tasks.PLAIN,
) -> TrainState:
    """A TrainState at step 0 for any Flax linen module, e.g. one of your own.

    The steps call `model.apply({"params": params}, inputs, train=..., rngs={"dropout": ...})`
    and read logits from it, so the module takes `inputs` and a keyword `train`. A Flax NNX
    model takes part through `flax.nnx.bridge.ToLinen`.

    Args:
      model: an unbound Flax module.
      rng: a PRNG key for parameter initialisation.
      inputs: an example batch of model inputs (zeros will do: only shapes matter), or a tuple of
        them for a model of several inputs (an encoder-decoder's `(inputs, decoder_inputs)`).
      optimizer: any optax GradientTransformation.
      task: what a batch holds and how the steps score the model (`train.tasks`); the default
        takes `batch["inputs"]` and the cross-entropy against `batch["targets"]`.

    Returns:
      A TrainState; pure, so it can be jitted with output shardings.
    """
    # Plain arrays from here on (checkpoints, optimizers, steps); the layout that the boxes of
    # annotated layers (`nn.with_logical_partitioning`) name comes from `param_logical_axes`.
    params = nn.unbox(init_params(model, rng, inputs))
    return TrainState.create(apply_fn=model.apply, params=params, tx=optimizer, task=task)


def init_params(model: nn.Module, rng: jax.Array, inputs: Any) -> Any:
    """`model`'s initial params, as `model.init` gives them: a layer annotated with logical axis
    names holds an `nn.Partitioned` box around its array."""
    # A "dropout" stream too: Flax NNX layers take their rng streams when they are built.
    rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1)}
    return model.init(rngs, *as_tuple(inputs), train=False)["params"]


def param_logical_axes(
    config: ml_collections.ConfigDict, inputs: Any = None, *, model: nn.Module | None = None
) -> Any:
    """The logical axis names of the params of the model `config` names (or `model`), nothing
    computed: a PartitionSpec of names per parameter (e.g. `("embed", "mlp")` for the
    Transformer's `mlp_in` kernel), `PartitionSpec()` for one declared without names.
    `parallel.state_shardings` maps them to mesh axes."""
    model = build_model(config) if model is None else model
    inputs = example_inputs(config) if inputs is None else inputs
    boxed = jax.eval_shape(lambda rng: init_params(model, rng, inputs), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def as_tuple(inputs: Any) -> tuple:
    """`inputs` as the tuple of a model's positional inputs: a tuple stays, an array becomes one."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def create_train_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    inputs: Any = None,
    *,
    model: nn.Module | None = None,
) -> TrainState:
    """Initialises the model and optimizer named by `config`.

    Args:
      config: a full config (`model`, `data`, `optimizer`, `train` sections).
      rng: a PRNG key for parameter initialisation.
      inputs: an example batch of model inputs; defaults to `example_inputs(config)`.
      model: a module to use instead of the one `config.model` names.

    Returns:
      A TrainState at step 0. Pure, so it can be jitted with output shardings.
    """
    model = build_model(config) if model is None else model
    inputs = example_inputs(config) if inputs is None else inputs
    optimizer, _ = optim.make_optimizer(config.optimizer, config.train.num_steps)
    return state_from_module(model, rng, inputs, optimizer, tasks.for_config(config))
