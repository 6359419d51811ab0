"""Autoregressive decoding: sampling from causal language models and translating with
encoder-decoders, as functions of a model's `apply_fn` and parameters (`python -m train.sample` is
the command that runs them on a trained run; the tasks use them after training and in evaluation).

Two ways to run a decoder, one token at a time:

- With a key/value cache (`sample_tokens_cached`, `translate`): the model keeps the keys and values
  of the positions it has seen in Flax's `"cache"` collection (`decode=True`, see
  `jaxmodels.transformer`), so each new token costs one position. The Transformer decoder and
  `Seq2Seq` decode this way.
- Re-running a window (`sample_tokens`, `translate(..., cache=False)`): the model runs on the
  whole window of up to `context` tokens again for every token. Any causal model, the LSTM
  language model too; the cached forms are tested against it.

Tokens are drawn from the logits divided by `temperature` (0: the most likely token), keeping only
the `top_k` most likely tokens (0: all) and the smallest set of most likely tokens whose
probability reaches `top_p` (1: all).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

ApplyFn = Callable[..., Any]


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """One-line ValueErrors for sampling settings that mean nothing."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0: the most likely token).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0: no top-k filter).")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no nucleus filter).")


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """`logits` `[..., vocab]` with the tokens outside the top-k and the top-p nucleus at -inf.

    Top-k keeps the `top_k` largest logits (and any tied with the k-th); top-p then keeps the
    most likely tokens until their probability reaches `top_p`, the most likely one always. The
    softmax of the result is the renormalised distribution over the tokens kept.
    """
    if 0 < top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        descending = -jnp.sort(-logits, axis=-1)  # [..., vocab]
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the more likely tokens
        kept = mass_before < top_p  # the first token always: nothing comes before it
        smallest_kept = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
    return logits


def next_token(
    logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """One token per row of `logits` `[batch, vocab]`: int32 `[batch]`.

    temperature 0 takes the most likely token; else a draw from softmax(logits / temperature),
    filtered by `filter_logits`.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def uses_cache(apply_fn: ApplyFn) -> bool:
    """Whether `apply_fn`, a module's `apply`, belongs to a causal model that decodes with a cache:
    one whose `__call__` takes `decode` (the Transformer decoder; `Seq2Seq` decodes with its
    `decode` method, which `translate` calls)."""
    module = getattr(apply_fn, "__self__", None)
    return module is not None and "decode" in inspect.signature(module.__call__).parameters


def init_cache(apply_fn: ApplyFn, params: Any, *args: Any, method: str | None = None) -> Any:
    """An empty `"cache"` collection for decoding: zeros shaped by a call on `args`.

    The first call with `decode=True` creates the cache at the shapes of its inputs (the decoder
    tokens give its batch size and length); `jax.eval_shape` finds them without computing.

    Args:
      apply_fn: the model's `apply`.
      params: the model parameters.
      *args: the model's inputs at full length, e.g. zeros `[batch, length]` of token ids.
      method: the model method to call (`"decode"` for `Seq2Seq`); None: `__call__`.

    Returns:
      The cache pytree, all zeros (so every counter starts at position 0).
    """

    def create():
        _, variables = apply_fn(
            {"params": params}, *args, train=False, decode=True, mutable=["cache"], method=method
        )
        return variables["cache"]

    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(create))


def sample_tokens(
    apply_fn: ApplyFn,
    params: Any,
    prompt: jax.Array,
    rng: jax.Array,
    *,
    length: int,
    context: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
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
      temperature, top_k, top_p: how tokens are drawn (see `next_token`).

    Returns:
      int32 [batch, prompt_len + length]: the prompt followed by the samples.
    """
    batch, prompt_len = prompt.shape
    total = prompt_len + length
    window = min(context, total)
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
    draw = functools.partial(next_token, temperature=temperature, top_k=top_k, top_p=top_p)

    def body(position, carry):
        tokens, rng = carry
        # The window ends at or after `position`; the token being predicted follows position - 1.
        start = jnp.clip(position - window, 0, total - window)
        visible = jax.lax.dynamic_slice_in_dim(tokens, start, window, axis=1)  # [batch, window]
        logits = apply_fn({"params": params}, visible, train=False)  # [batch, window, vocab]
        logits = jax.lax.dynamic_index_in_dim(logits, position - 1 - start, axis=1, keepdims=False)
        rng, draw_rng = jax.random.split(rng)
        tokens = tokens.at[:, position].set(draw(logits, draw_rng))
        return tokens, rng

    tokens, _ = jax.lax.fori_loop(prompt_len, total, body, (tokens, rng))
    return tokens


def sample_tokens_cached(
    apply_fn: ApplyFn,
    params: Any,
    prompt: jax.Array,
    rng: jax.Array,
    *,
    length: int,
    context: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """`sample_tokens` with a key/value cache: each new token costs the model one position.

    The prompt goes through the model in one call; then each drawn token is fed alone. While
    prompt and samples fit in `context` tokens this draws exactly what `sample_tokens` draws (the
    same logits up to float round-off, the same random numbers). Beyond that, positions past the
    model's `context` were never trained, so once the cache holds `context` tokens it starts over
    from the last `context // 2` of them (one call over them): every token is then drawn from the
    last `context // 2` to `context` tokens, where `sample_tokens` sees exactly `context`.

    Args:
      apply_fn: the `apply` of a model that takes `decode=True` (the Transformer decoder).
      params, prompt, rng, length, context, temperature, top_k, top_p: as `sample_tokens`.

    Returns:
      int32 [batch, prompt_len + length]: the prompt followed by the samples.
    """
    batch, prompt_len = prompt.shape
    if length == 0:
        return prompt.astype(jnp.int32)
    total = prompt_len + length
    cache_len = min(context, total)
    keep = max(cache_len // 2, 1)  # tokens kept when a full cache starts over
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
    empty = init_cache(apply_fn, params, jnp.zeros((batch, cache_len), jnp.int32))
    draw = functools.partial(next_token, temperature=temperature, top_k=top_k, top_p=top_p)

    def feed(cache, new_tokens):
        """(logits after the last of `new_tokens` [batch, n], the cache holding them too)."""
        logits, variables = apply_fn(
            {"params": params, "cache": cache},
            new_tokens,
            train=False,
            decode=True,
            mutable=["cache"],
        )
        return logits[:, -1], variables["cache"]  # [batch, vocab]

    first = min(prompt_len, cache_len)  # a prompt longer than the cache: its end
    logits, cache = feed(empty, tokens[:, prompt_len - first : prompt_len])

    def body(position, carry):  # draws token `position`, then feeds it
        tokens, cache, filled, logits, rng = carry
        rng, draw_rng = jax.random.split(rng)  # the same draws as sample_tokens
        token = draw(logits, draw_rng)  # [batch]
        tokens = tokens.at[:, position].set(token)

        def append():
            return feed(cache, token[:, None]), filled + 1

        def start_over():  # the cache is full: its last `keep` tokens, and the new one
            window = jax.lax.dynamic_slice_in_dim(tokens, position + 1 - keep, keep, axis=1)
            return feed(empty, window), jnp.int32(keep)

        if total <= context:  # the cache never fills
            (logits, cache), filled = append()
        else:
            (logits, cache), filled = jax.lax.cond(filled < cache_len, append, start_over)
        return tokens, cache, filled, logits, rng

    carry = (tokens, cache, jnp.int32(first), logits, rng)
    tokens, _, _, logits, rng = jax.lax.fori_loop(prompt_len, total - 1, body, carry)
    _, draw_rng = jax.random.split(rng)
    return tokens.at[:, total - 1].set(draw(logits, draw_rng))  # the last token: nothing to feed


def translate(
    apply_fn: ApplyFn,
    params: Any,
    inputs: jax.Array,
    rng: jax.Array | None = None,
    *,
    length: int,
    bos_id: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    cache: bool = True,
) -> jax.Array:
    """Decodes a target for every source row with an encoder-decoder (`jaxmodels.Seq2Seq`).

    The source is encoded once; the decoder starts from `bos_id` and draws one token at a time,
    with its keys and values cached (`cache=True`) or re-running on all tokens so far. A row
    that has drawn `eos_id` is finished: 0 (padding) follows.

    Args:
      apply_fn: the model's `apply`, with methods `encode` and `decode`.
      params: the model parameters.
      inputs: int32 source ids `[batch, source_len]`, 0 after the source.
      rng: PRNG key; None for greedy decoding (temperature 0).
      length: tokens to decode, at most the model's `max_len`.
      bos_id, eos_id: the start and end tokens.
      temperature, top_k, top_p: how tokens are drawn (see `next_token`); 0: greedy.
      cache: decode with the key/value cache.

    Returns:
      int32 `[batch, length]`: the target, its EOS, then 0.
    """
    batch = inputs.shape[0]
    rng = jax.random.key(0) if rng is None else rng  # greedy decoding draws nothing from it
    encoded = apply_fn({"params": params}, inputs, train=False, method="encode")
    tokens = jnp.zeros((batch, length + 1), jnp.int32).at[:, 0].set(bos_id)  # BOS, then targets
    draw = functools.partial(next_token, temperature=temperature, top_k=top_k, top_p=top_p)
    decoder_cache = None
    if cache:
        decoder_inputs = jnp.zeros((batch, length), jnp.int32)
        decoder_cache = init_cache(
            apply_fn, params, encoded, inputs, decoder_inputs, method="decode"
        )

    def logits_after(position, tokens, decoder_cache):
        """The logits that predict token `position + 1` [batch, vocab], and the cache."""
        if cache:
            token = jax.lax.dynamic_slice_in_dim(tokens, position, 1, axis=1)  # [batch, 1]
            logits, variables = apply_fn(
                {"params": params, "cache": decoder_cache},
                encoded,
                inputs,
                token,
                train=False,
                decode=True,
                mutable=["cache"],
                method="decode",
            )
            return logits[:, 0], variables["cache"]
        # Causal: the zeros after `position` do not change its logits.
        logits = apply_fn(
            {"params": params}, encoded, inputs, tokens[:, :length], train=False, method="decode"
        )
        return jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False), None

    def body(position, carry):
        tokens, decoder_cache, finished, rng = carry
        logits, decoder_cache = logits_after(position, tokens, decoder_cache)
        rng, draw_rng = jax.random.split(rng)
        token = jnp.where(finished, 0, draw(logits, draw_rng))  # [batch]
        tokens = tokens.at[:, position + 1].set(token)
        return tokens, decoder_cache, finished | (token == eos_id), rng

    carry = (tokens, decoder_cache, jnp.zeros(batch, bool), rng)
    tokens, *_ = jax.lax.fori_loop(0, length, body, carry)
    return tokens[:, 1:]
