"""Optimizers from `config.optimizer`: any optax optimizer by name, with a schedule, clipping and
weight decay on weight matrices and embeddings only.

    config.optimizer.name           an optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs         its own keyword arguments (b1, b2, momentum, ...)
    config.optimizer.learning_rate  the schedule's peak; schedule, warmup_steps, end_learning_rate
    config.optimizer.grad_clip_norm optax.clip_by_global_norm before the optimizer; 0 disables
    config.optimizer.weight_decay   on weight matrices and embeddings, never biases or norm scales
"""

import inspect

import jax
import ml_collections
import optax
from absl import logging

# Parameters that weight decay leaves alone, by name: biases and normalisation scales. Their
# size is set by the data, not by capacity, and decaying them only bends the fit.
NO_DECAY_NAMES = frozenset({"bias", "scale"})


def make_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then constant or cosine decay to the last step."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, num_steps)
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
            boundaries=[warmup],
        )
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1),
            end_value=config.end_learning_rate,
        )
    raise ValueError(f"Unknown optimizer.schedule {config.schedule!r}; use 'constant' or 'cosine'.")


def decay_mask(params: optax.Params) -> optax.Params:
    """True for the parameters weight decay applies to: arrays of two or more axes (kernels,
    embeddings) that are not named in `NO_DECAY_NAMES` (a stacked `[layers, features]` bias stays
    undecayed)."""

    def decays(path, leaf) -> bool:
        name = getattr(path[-1], "key", getattr(path[-1], "name", None)) if path else None
        return leaf.ndim >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def optax_function(name: str):
    """The optax optimizer function called `name` (e.g. `optax.adamw`)."""
    function = getattr(optax, name, None) if name.isidentifier() else None
    if not callable(function) or "learning_rate" not in _parameters(function):
        raise ValueError(
            f"Unknown optimizer.name {name!r}: not an optax optimizer; use one such as 'sgd', "
            "'adam', 'adamw', 'lion' or 'adafactor'."
        )
    return function


def make_optimizer(
    config: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax optimizer `config.name` with its schedule, clipping and weight decay.

    `config.kwargs` entries the function does not take are left out with a warning, so that
    `--config.optimizer.name=lion` works on a config written for adamw. Weight decay goes to the
    optimizer's own argument where it has one (`weight_decay`: decoupled, as in adamw and lion;
    `weight_decay_rate`: adafactor), masked by `decay_mask`; otherwise it is added to the gradient
    before the optimizer (L2 regularisation, as for SGD).

    Args:
      config: `config.optimizer`.
      num_steps: the run's length, for the schedule.

    Returns:
      (the GradientTransformation, the learning-rate schedule).
    """
    function = optax_function(config.name)
    schedule = make_schedule(config, num_steps)
    accepted = _parameters(function)
    kwargs = {k: v for k, v in config.kwargs.items() if v is not None}
    ignored = sorted(set(kwargs) - accepted)
    if ignored:
        logging.warning("optax.%s takes no %s; ignored.", config.name, ", ".join(ignored))
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    # Sequences from a config (lists after a JSON round trip) as optax expects them.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}

    decay_before = None
    if "weight_decay" in accepted:  # always: optax.adamw's own default is not 0
        kwargs["weight_decay"] = config.weight_decay
        if "mask" in accepted:
            kwargs["mask"] = decay_mask
    elif config.weight_decay and "weight_decay_rate" in accepted:
        kwargs.update(weight_decay_rate=config.weight_decay, weight_decay_mask=decay_mask)
    elif config.weight_decay:
        decay_before = optax.add_decayed_weights(config.weight_decay, mask=decay_mask)

    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if decay_before is not None:
        parts.append(decay_before)
    parts.append(function(schedule, **kwargs))
    return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)
