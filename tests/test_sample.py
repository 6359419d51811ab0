"""Sampling from a causal LM: exact tokens from a hand-built model, sliding window included."""

import jax
import jax.numpy as jnp
import numpy as np

from train.sample import sample_tokens

VOCAB = 7


def count_up(variables, tokens, train):
    """A causal 'model' whose most likely next token is (current token + 1) mod VOCAB.

    It also checks causality of the sampler: position t's logits depend on token t alone.
    """
    del variables, train
    return 10.0 * jax.nn.one_hot((tokens + 1) % VOCAB, VOCAB)  # [batch, window, vocab]


def test_greedy_sampling_counts_up_past_the_context_window():
    prompt = jnp.array([[3], [5]], jnp.int32)
    tokens = sample_tokens(
        count_up, {}, prompt, jax.random.key(0), length=12, context=4, temperature=0.0
    )
    expected = (np.array([[3], [5]]) + np.arange(13)) % VOCAB
    np.testing.assert_array_equal(tokens, expected)


def test_sampling_with_temperature_is_seeded():
    prompt = jnp.zeros((3, 2), jnp.int32)
    flat = lambda v, t, train: jnp.zeros(t.shape + (VOCAB,))  # noqa: E731  uniform logits
    a = sample_tokens(flat, {}, prompt, jax.random.key(1), length=20, context=8)
    b = sample_tokens(flat, {}, prompt, jax.random.key(1), length=20, context=8)
    c = sample_tokens(flat, {}, prompt, jax.random.key(2), length=20, context=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (3, 22) and int(a.min()) >= 0 and int(a.max()) < VOCAB
    np.testing.assert_array_equal(a[:, :2], 0)
