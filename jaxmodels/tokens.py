"""Helpers for token-id inputs shared by the text models."""

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
