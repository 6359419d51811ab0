"""Autoregressive sampling from a trained causal language model (Transformer decoder or LSTM LM)."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def sample_tokens(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    prompt: jax.Array,
    rng: jax.Array,
    *,
    length: int,
    context: int,
    temperature: float = 1.0,
) -> jax.Array:
    """Draws `length` tokens after `prompt`, one at a time, re-running the model on a window.

    Args:
      apply_fn: the model's `apply`; called as apply_fn({'params': params}, tokens, train=False) and
        returning logits [batch, context, vocab]. The model must be causal: the zeros that fill
        the window beyond the current position cannot change the logits before it.
      params: the model parameters.
      prompt: int32 [batch, prompt_len], prompt_len >= 1.
      rng: PRNG key.
      length: number of tokens to draw.
      context: window length the model sees (its training sequence length).
      temperature: softmax temperature; 0 picks the most likely token.

    Returns:
      int32 [batch, prompt_len + length]: the prompt followed by the samples.
    """
    batch, prompt_len = prompt.shape
    total = prompt_len + length
    window = min(context, total)
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)

    def body(position, carry):
        tokens, rng = carry
        # The window ends at or after `position`; the token being predicted follows position - 1.
        start = jnp.clip(position - window, 0, total - window)
        visible = jax.lax.dynamic_slice_in_dim(tokens, start, window, axis=1)  # [batch, window]
        logits = apply_fn({"params": params}, visible, train=False)  # [batch, window, vocab]
        logits = jax.lax.dynamic_index_in_dim(logits, position - 1 - start, axis=1, keepdims=False)
        rng, draw_rng = jax.random.split(rng)
        if temperature > 0:
            next_token = jax.random.categorical(draw_rng, logits / temperature, axis=-1)
        else:
            next_token = jnp.argmax(logits, axis=-1)
        tokens = tokens.at[:, position].set(next_token.astype(jnp.int32))
        return tokens, rng

    tokens, _ = jax.lax.fori_loop(prompt_len, total, body, (tokens, rng))
    return tokens
