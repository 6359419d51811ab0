"""Optimizers and learning-rate schedules built from `config.optimizer`: optax SGD, our AdamW."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
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
    if config.name in ("adam", "adamw"):
        weight_decay = config.weight_decay if config.name == "adamw" else 0.0
        optimizer = adamw(schedule, config.b1, config.b2, weight_decay, config.grad_clip_norm)
        return optimizer, schedule
    if config.name != "sgd":
        raise ValueError(f"Unknown optimizer.name {config.name!r}; use 'sgd', 'adam' or 'adamw'.")
    optimizer = optax.sgd(schedule, momentum=config.momentum or None)
    if config.grad_clip_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer, schedule


class AdamWState(NamedTuple):
    """`count`: updates taken (int32); `mu`, `nu`: Adam's moments, shaped like the params."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def adamw(
    learning_rate: optax.Schedule,
    b1: float,
    b2: float,
    weight_decay: float = 0.0,
    clip_norm: float = 0.0,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam with decoupled weight decay and optional global-norm clipping, as one transformation.

    The same update as `optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(...))`
    (`optax.adam` when `weight_decay` is 0), equal within float32 round-off (tests/test_optim.py),
    written so that XLA compiles fewer and simpler kernels: the clipping factor is one scalar
    folded into each moment's update instead of a clipped copy of every gradient, and the squared
    norms of vectors (biases, norm scales) are summed a stack of one length at a time instead of
    one vector at a time. For the small Transformer's 76 arrays XLA:CPU fuses the update into 273
    kernels where the optax chain takes 503; it compiles in 0.8 s instead of 1.1 s and runs in
    16 ms instead of 27-31 ms (benchmarks/RESULTS.md). Each array's update is one jitted function,
    traced once per shape (12 for those 76 arrays). The state is this module's `AdamWState`.

    Args:
      learning_rate: the schedule, called with the number of updates taken so far.
      b1, b2: decay rates of the first and second moments.
      weight_decay: decoupled decay, times the learning rate, on every parameter; 0 for Adam.
      clip_norm: scale the gradients down to this global L2 norm when larger; 0 disables.
      eps: added to the root of the second moment.
    """

    def init(params: optax.Params) -> AdamWState:
        return AdamWState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update(grads, state: AdamWState, params=None):
        if weight_decay and params is None:
            raise ValueError(
                "adamw with weight_decay needs params: call update(grads, state, params)."
            )
        count = optax.safe_increment(state.count)
        learning_rate_now = learning_rate(state.count)  # as optax's schedule: 0-based
        correction1 = 1 - b1 ** count.astype(jnp.float32)
        correction2 = 1 - b2 ** count.astype(jnp.float32)
        scale = _clip_scale(grads, clip_norm) if clip_norm > 0 else jnp.float32(1)
        hyper = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        scalars = (scale, learning_rate_now, correction1, correction2)
        decayed = params if weight_decay else state.mu  # read only with weight decay
        structure = jax.tree.structure(grads)
        out = [
            _update_array(g, m, v, p, *scalars, **hyper)
            for g, m, v, p in zip(
                *(structure.flatten_up_to(t) for t in (grads, state.mu, state.nu, decayed)),
                strict=True,
            )
        ]
        columns = list(zip(*out, strict=True)) or [(), (), ()]  # () for a tree without arrays
        updates, mu, nu = (structure.unflatten(column) for column in columns)
        return updates, AdamWState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def _clip_scale(grads: optax.Updates, clip_norm: float) -> jax.Array:
    """min(1, clip_norm / global L2 norm of `grads`), in float32."""
    leaves = [g.astype(jnp.float32) for g in jax.tree.leaves(grads)]
    squares = [jnp.sum(jnp.square(g)) for g in leaves if g.ndim > 1]
    # Vectors (biases, norm scales) of one length are stacked and summed together: XLA:CPU
    # would otherwise emit three small kernels for each. Stacking along a new axis, rather than
    # concatenating, keeps the sum's order the same wherever the vectors are sharded (FSDP).
    by_length = {}
    for g in leaves:
        if g.ndim <= 1:
            by_length.setdefault(g.size, []).append(g.reshape(-1))
    squares += [jnp.sum(jnp.square(jnp.stack(group))) for group in by_length.values()]
    norm = jnp.sqrt(sum(squares))
    return jnp.where(norm < clip_norm, 1.0, clip_norm / norm)


# One array's update, jitted so that it is traced once per shape and dtype rather than once per
# array: the small Transformer's 76 arrays have 12 shapes. XLA inlines the calls.
@functools.partial(jax.jit, static_argnames=("b1", "b2", "eps", "weight_decay"))
def _update_array(g, m, v, p, scale, learning_rate, correction1, correction2, *, b1, b2, eps,
                  weight_decay):  # fmt: skip
    """(update, new first moment, new second moment) of one array."""
    g = g * scale.astype(g.dtype)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * jnp.square(g)
    u = (m / correction1.astype(m.dtype)) / (jnp.sqrt(v / correction2.astype(v.dtype)) + eps)
    if weight_decay:
        u = u + weight_decay * p
    return -learning_rate.astype(u.dtype) * u, m, v
