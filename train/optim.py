"""optax optimizers and learning-rate schedules built from `config.optimizer`."""

import ml_collections
import optax


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


def make_optimizer(
    config: ml_collections.ConfigDict, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns the optimizer named by `config.name` (sgd, adam, adamw) and its schedule."""
    schedule = make_schedule(config, num_steps)
    if config.name == "sgd":
        optimizer = optax.sgd(schedule, momentum=config.momentum or None)
    elif config.name == "adam":
        optimizer = optax.adam(schedule, b1=config.b1, b2=config.b2)
    elif config.name == "adamw":
        optimizer = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay
        )
    else:
        raise ValueError(f"Unknown optimizer.name {config.name!r}; use 'sgd', 'adam' or 'adamw'.")
    if config.grad_clip_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer, schedule
