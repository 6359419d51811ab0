"""Helpers the text models share: word dropout on token ids, pooling over real positions."""

import jax
import jax.numpy as jnp


def word_dropout(rng: jax.Array, tokens: jax.Array, rate: float, unk_id: int) -> jax.Array:
    """Replaces each non-padding token (id != 0) by `unk_id` with probability `rate`.

    A text classifier trained this way cannot lean on a few rare words it has learnt by heart.

    Args:
      rng: a PRNG key.
      tokens: int token ids `[batch, seq_len]`, 0 for padding.
      rate: the probability of replacing a token, in [0, 1].
      unk_id: the unknown-word id.

    Returns:
      int token ids of the same shape; padding stays padding.
    """
    drop = jax.random.bernoulli(rng, rate, tokens.shape)
    return jnp.where(drop & (tokens != 0), unk_id, tokens)


def pool(x: jax.Array, valid: jax.Array, how: str) -> jax.Array:
    """Reduces `x` over its sequence axis, counting only the valid positions.

    Args:
      x: `[batch, seq_len, features]`; padded positions may hold any values.
      valid: bool `[batch, seq_len, 1]`, True at real positions.
      how: "max" (each feature's maximum) or "mean".

    Returns:
      `[batch, features]` in `x`'s dtype; a row with no valid position pools to 0.
    """
    if how == "max":
        pooled = jnp.where(valid, x, -jnp.inf).max(axis=1)
        return jnp.where(valid.any(axis=1), pooled, 0.0).astype(x.dtype)
    # Summed in float32: a bfloat16 sum over the sequence would round at every addition.
    total = jnp.where(valid, x.astype(jnp.float32), 0.0).sum(axis=1)
    return (total / jnp.maximum(valid.sum(axis=1), 1)).astype(x.dtype)
