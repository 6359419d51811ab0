"""Optimizers from `config.optimizer`: any optax optimizer by name, with a schedule, clipping and
weight decay on weight matrices and embeddings only.

    config.optimizer.name           an optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs         its own keyword arguments (b1, b2, momentum, ...)
    config.optimizer.learning_rate  the schedule's peak; schedule, warmup_steps, end_learning_rate
    config.optimizer.grad_clip_norm optax.clip_by_global_norm before the optimizer; 0 disables
    config.optimizer.weight_decay   on weight matrices and embeddings, never biases or norm scales

An optimizer that cannot honour these (decay it cannot keep off biases, a schedule it cannot take,
an update that needs more than gradients) is refused with a one-line ValueError.
"""

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

# Keyword arguments in which optax optimizers take weight decay of their own (`weight_decay`: adamw,
# lion, lamb, lars, ...; `weight_decay_rate`: adafactor), and the mask that keeps it off parameters.
OWN_DECAY_ARGUMENTS = ("weight_decay", "weight_decay_rate")
OWN_MASK_ARGUMENTS = ("mask", "weight_decay_mask")

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
    # Left out: private names; optax's building blocks (`scale_by_rprop` steps up the gradient,
    # `optax.rprop` negates it); classes (a line search's state has a `learning_rate` field too).
    public = name.isidentifier() and not name.startswith(("_", "scale_by_"))
    function = getattr(optax, name, None) if public else None
    if (
        not callable(function)
        or inspect.isclass(function)
        or "learning_rate" not in _parameters(function)
    ):
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
    `--config.optimizer.name=lion` works on a config written for adamw.

    Weight decay reaches `decay_mask`'s parameters only, one of three ways:
    - the optimizer's own decay argument with its own mask argument, whatever they are called
      (`weight_decay` with `mask`: adamw, lion, lamb, adan, ..., decoupled from the gradient;
      with `weight_decay_mask`: lars and adadelta, which add it to the gradient;
      `weight_decay_rate` with `weight_decay_mask`: adafactor);
    - `optax.add_decayed_weights` in front of an optimizer that has no decay of its own: L2
      regularisation, added to the gradient before the optimizer rescales it (sgd, adam, ...);
    - refused (weight_decay > 0 only) for an optimizer whose own decay takes no mask (novograd:
      it adds decay to the normalised gradient, so decay in front of it would mean something
      else, and its own would reach biases and scales).
    An optimizer that cannot take a schedule (rprop, sm3, optimistic_adam) gets the constant rate
    where the schedule is constant without warmup, and is refused otherwise; one whose update
    needs more than gradients (lbfgs's line search) is refused.

    Args:
      config: `config.optimizer`.
      num_steps: the run's length, for the schedule.

    Returns:
      (the GradientTransformation, the learning-rate schedule).

    Raises:
      ValueError: one line naming the optimizer, what it cannot do and the fix.
    """
    function = optax_function(config.name)
    schedule = make_schedule(config, num_steps)
    kwargs = _own_kwargs(config, function)

    decay_in_front = None
    decay_argument = _first_of(OWN_DECAY_ARGUMENTS, function)
    mask_argument = _first_of(OWN_MASK_ARGUMENTS, function)
    if decay_argument is not None and mask_argument is None and config.weight_decay:
        raise ValueError(
            f"optax.{config.name} applies its own weight_decay to every parameter, biases and "
            "norm scales included (it takes no mask); set optimizer.weight_decay=0 or use "
            "another optimizer."
        )
    # Passed even without decay, since an optimizer's own default may decay (adamw's is 1e-4),
    # unless that default is None (adafactor's: no decay transformation at all, kept so).
    default = _default(function, decay_argument)
    if decay_argument is not None and (config.weight_decay or default is not None):
        kwargs[decay_argument] = config.weight_decay
        if mask_argument is not None:
            kwargs[mask_argument] = decay_mask
    elif decay_argument is None and config.weight_decay:
        decay_in_front = optax.add_decayed_weights(config.weight_decay, mask=decay_mask)

    learning_rate = _learning_rate(config, function, kwargs, schedule, num_steps)
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if decay_in_front is not None:
        parts.append(decay_in_front)
    parts.append(function(learning_rate, **kwargs))
    return (parts[0] if len(parts) == 1 else optax.chain(*parts)), schedule


def _own_kwargs(config: ml_collections.ConfigDict, function) -> dict:
    """`config.kwargs` that `function` takes, as optax expects them."""
    kwargs = {k: v for k, v in config.kwargs.items() if v is not None}
    reserved = sorted(set(kwargs) & {"learning_rate", *OWN_DECAY_ARGUMENTS, *OWN_MASK_ARGUMENTS})
    if reserved:
        raise ValueError(
            f"optimizer.kwargs.{reserved[0]} is set from the config's own fields; use "
            "optimizer.learning_rate or optimizer.weight_decay (masked by train.optim.decay_mask)."
        )
    accepted = _parameters(function)
    ignored = sorted(set(kwargs) - accepted)
    if ignored:
        logging.warning("optax.%s takes no %s; ignored.", config.name, ", ".join(ignored))
    # Sequences from a config (lists after a JSON round trip) as optax expects them.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items() if k in accepted}


def _learning_rate(
    config: ml_collections.ConfigDict,
    function,
    kwargs: dict,
    schedule: optax.Schedule,
    num_steps: int,
) -> optax.ScalarOrSchedule:
    """`schedule` where the optimizer runs with one, else the constant rate it stands for.

    Whether it runs is found by building it and tracing one `init` and `update` on two tiny
    abstract parameters (no computation): optax's functions take a schedule in their signatures
    even where they fail on one, at build time (sm3) or in `init` (rprop).
    """
    name = config.name
    if _fails(lambda: function(schedule, **kwargs)) is None:
        return schedule
    error = _fails(lambda: function(config.learning_rate, **kwargs))
    if error is None:
        if config.schedule == "constant" and min(config.warmup_steps, num_steps) == 0:
            return config.learning_rate
        raise ValueError(
            f"optax.{name} takes no learning-rate schedule, only a constant rate; set "
            "optimizer.schedule='constant' with optimizer.warmup_steps=0, or use another optimizer."
        )
    if _fails(lambda: function(config.learning_rate, **kwargs), needs_loss=True) is None:
        raise ValueError(
            f"optax.{name} needs the loss and a function computing it at every update (a line "
            "search), which the training step does not pass; use another optimizer."
        )
    text = " ".join(str(error).split())
    raise ValueError(f"optax.{name} does not run from a config ({text}); use another optimizer.")


def _fails(
    build: Callable[[], optax.GradientTransformation], needs_loss: bool = False
) -> Exception | None:
    """The error of building an optimizer and tracing one step on tiny parameters, or None."""
    params = {
        "kernel": jax.ShapeDtypeStruct((2, 2), jnp.float32),
        "bias": jax.ShapeDtypeStruct((2,), jnp.float32),
    }

    def step(params):
        optimizer = build()
        state = optimizer.init(params)
        grads = params
        if not needs_loss:
            return optimizer.update(grads, state, params)

        def value_fn(params):
            return sum(jnp.sum(x**2) for x in jax.tree.leaves(params))

        value = value_fn(params)
        return optimizer.update(grads, state, params, value=value, grad=grads, value_fn=value_fn)

    try:
        jax.eval_shape(step, params)
    except Exception as error:  # whatever optax raises, the caller turns it into one line
        return error
    return None


def _first_of(names: tuple[str, ...], function) -> str | None:
    accepted = _parameters(function)
    return next((name for name in names if name in accepted), None)


def _default(function, argument: str | None):
    if argument is None:
        return None
    return inspect.signature(function).parameters[argument].default


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)
