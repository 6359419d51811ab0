"""LSTM cell, an LSTM layer (a scan of the cell over time) and a stacked LSTM model.

`LSTMCell` and `LSTMLayer` declare the same parameters (`input_kernel`, `recurrent_kernel`, `bias`;
the four gates stacked in the order i, f, g, o), so the cell can be applied step by step with a
layer's parameters.

Mixed precision: parameters are always float32; `dtype` is the computation dtype of the matmuls
and of `h`, while the cell state `c` and the gate nonlinearities stay float32: `c` is a running
sum over the whole sequence, and rounding it to bfloat16 at every step would lose small updates.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels import tuned
from jaxmodels.tokens import pool, word_dropout

Carry = tuple[jax.Array, jax.Array]  # (c, h), each [batch, hidden_size]; c float32, h in dtype


def _lstm_params(module: nn.Module, num_features: int, hidden_size: int):
    """Declares the LSTM parameters on `module`; gates are stacked in the order i, f, g, o."""
    input_kernel = module.param(
        "input_kernel", nn.initializers.lecun_normal(), (num_features, 4 * hidden_size)
    )
    recurrent_kernel = module.param(
        "recurrent_kernel", nn.initializers.orthogonal(), (hidden_size, 4 * hidden_size)
    )
    bias = module.param("bias", nn.initializers.zeros_init(), (4 * hidden_size,))
    return input_kernel, recurrent_kernel, bias


def lstm_step(params, carry: Carry, x_t: jax.Array) -> tuple[Carry, jax.Array]:
    """One LSTM step: c' = sigmoid(f) * c + sigmoid(i) * tanh(g), h' = sigmoid(o) * tanh(c').

    Args:
      params: `(input_kernel, recurrent_kernel, bias)` in the computation dtype.
      carry: `(c, h)`, each `[batch, hidden]`; `c` float32.
      x_t: inputs at this step, `[batch, features]`.

    Returns:
      `((c', h'), h')`; `c'` float32, `h'` in the computation dtype.
    """
    input_kernel, recurrent_kernel, bias = params
    c, h = carry
    dtype = recurrent_kernel.dtype
    gates = x_t.astype(dtype) @ input_kernel + h.astype(dtype) @ recurrent_kernel + bias
    i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)  # each [batch, hidden]
    c = jax.nn.sigmoid(f) * c.astype(jnp.float32) + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(dtype)
    return (c, h), h


class LSTMCell(nn.Module):
    """One LSTM time step: c' = sigmoid(f) * c + sigmoid(i) * tanh(g), h' = sigmoid(o) * tanh(c').

    Attributes:
      hidden_size: size of `c` and `h`.
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters and `c` stay float32.
    """

    hidden_size: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, carry: Carry, x_t: jax.Array) -> tuple[Carry, jax.Array]:
        """Advances the state by one step.

        Args:
          carry: `(c, h)`, each `[batch, hidden_size]`.
          x_t: inputs at this step, `[batch, features]`.

        Returns:
          `((c', h'), h')`, each `[batch, hidden_size]`; `c'` float32, `h'` in `dtype`.
        """
        params = _lstm_params(self, x_t.shape[-1], self.hidden_size)
        return lstm_step(tuple(p.astype(self.dtype) for p in params), carry, x_t)


class LSTMLayer(nn.Module):
    """An LSTM over a whole sequence, starting from a zero state: `lstm_step` scanned over time.

    Attributes:
      hidden_size: size of `c` and `h`.
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters and `c` stay float32.
      implementation: "standard" (the scan of `lstm_step`), "cpu" (`jaxmodels.tuned`'s fused
        recurrence with its own backward pass: the same parameters and function) or "auto"
        (cpu on a CPU backend).
    """

    hidden_size: int
    dtype: str = "float32"
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Runs the LSTM over the time axis.

        Args:
          x: float inputs, `[batch, seq_len, features]`.

        Returns:
          hidden states at every step, `[batch, seq_len, hidden_size]` in `dtype`.
        """
        params = _lstm_params(self, x.shape[-1], self.hidden_size)
        # Cast once here, not inside the scan, so each step's matmul reads `dtype` weights.
        params = tuple(p.astype(self.dtype) for p in params)
        x_by_time = jnp.swapaxes(x.astype(self.dtype), 0, 1)  # [seq_len, batch, features]
        if tuned.use_tuned(self.implementation):
            h = tuned.lstm_sequence(x_by_time, *params)  # [seq_len, batch, hidden]
        else:
            batch = x.shape[0]
            carry = (
                jnp.zeros((batch, self.hidden_size), jnp.float32),
                jnp.zeros((batch, self.hidden_size), jnp.dtype(self.dtype)),
            )
            _, h = jax.lax.scan(lambda carry, x_t: lstm_step(params, carry, x_t), carry, x_by_time)
        return jnp.swapaxes(h, 0, 1)  # [batch, seq_len, hidden_size]


class LSTM(nn.Module):
    """Stacked LSTM: a sequence classifier, or (with `per_step`) a per-step predictor such as an LM.

    Attributes:
      num_layers: number of stacked `LSTMLayer`s.
      hidden_size: hidden size of every layer.
      num_outputs: number of output logits (classes, or the vocabulary size for an LM).
      vocab_size: if > 0, inputs are int token ids `[batch, seq_len]` with 0 as padding (at the
        end), embedded with `nn.Embed(vocab_size, embed_dim)`; if 0, inputs are float features
        `[batch, seq_len, features]`.
      embed_dim: embedding size; must be > 0 when `vocab_size > 0`.
      head_sizes: widths of the Dense + relu layers between the LSTM and the output layer.
      per_step: if True, predict at every step `[batch, seq_len, num_outputs]`; if False, predict
        once per sequence, `[batch, num_outputs]`, from the outputs that `pooling` picks.
      pooling: how a sequence classifier reduces the last layer's outputs over its valid steps:
        "last" (the output at the last token), "max" (each feature's maximum) or "mean".
      bidirectional: if True, every layer also runs a second LSTM (`lstm_{i}_backward`) over each
        sequence reversed within its length, and the two outputs are concatenated; a sequence is
        then classified, with `pooling="last"`, from the forward output at its last token and
        the backward output at its first. Sequence classification only (`per_step=False`).
      dropout_rate: dropout on the output of every LSTM layer (only when `train=True`).
      embedding_dropout_rate: dropout on the embedded tokens, before the first layer.
      word_dropout_rate: token models, training only: each non-padding token is replaced by
        `unk_id` with this probability, so the classifier cannot lean on a few rare words.
      unk_id: the id of the unknown-word token (the data layer's `<unk>`).
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters and the cell states stay
        float32 and the logits are returned as float32.
      implementation: "standard", "cpu" or "auto" (see `LSTMLayer`).
    """

    num_layers: int
    hidden_size: int
    num_outputs: int
    vocab_size: int = 0
    embed_dim: int = 0
    head_sizes: Sequence[int] = ()
    per_step: bool = False
    pooling: str = "last"
    bidirectional: bool = False
    dropout_rate: float = 0.0
    embedding_dropout_rate: float = 0.0
    word_dropout_rate: float = 0.0
    unk_id: int = 1
    dtype: str = "float32"
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Runs the model.

        Args:
          x: int token ids `[batch, seq_len]` if `vocab_size > 0`, else float features
            `[batch, seq_len, features]`.
          train: enables dropout (rng stream `"dropout"`).

        Returns:
          float32 logits, `[batch, seq_len, num_outputs]` if `per_step` else `[batch, num_outputs]`.
        """
        dtype = jnp.dtype(self.dtype)
        if self.bidirectional and self.per_step:
            raise ValueError("A bidirectional LSTM classifies whole sequences: set per_step=False.")
        if self.pooling not in ("last", "max", "mean"):
            raise ValueError(f"Unknown LSTM pooling {self.pooling!r}; use last, max or mean.")
        if self.vocab_size > 0:
            if self.embed_dim <= 0:
                raise ValueError(f"LSTM with vocab_size={self.vocab_size} needs embed_dim > 0")
            # A token model's sequence length is its number of non-padding tokens (padding at end).
            lengths = jnp.maximum(jnp.sum(x != 0, axis=1), 1)  # [batch]
            if train and self.word_dropout_rate > 0:
                x = word_dropout(self.make_rng("dropout"), x, self.word_dropout_rate, self.unk_id)
            embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=dtype, name="embed")
            x = embed(x)  # [batch, seq_len, embed_dim]
            x = nn.Dropout(self.embedding_dropout_rate, deterministic=not train)(x)
        else:
            lengths = jnp.full((x.shape[0],), x.shape[1])  # [batch]
        # Position t of a sequence reversed within its length (padding stays at the end); the
        # reversal is its own inverse.
        positions = jnp.arange(x.shape[1])[None, :]  # [1, seq_len]
        reverse = jnp.where(
            positions < lengths[:, None], lengths[:, None] - 1 - positions, positions
        )

        def reversed_in_length(h: jax.Array) -> jax.Array:  # [batch, seq_len, features]
            return jnp.take_along_axis(h, reverse[:, :, None], axis=1)

        for i in range(self.num_layers):
            layer = LSTMLayer(self.hidden_size, self.dtype, self.implementation, name=f"lstm_{i}")
            h = layer(x)  # [batch, seq_len, hidden_size]
            if self.bidirectional:
                backward = LSTMLayer(
                    self.hidden_size, self.dtype, self.implementation, name=f"lstm_{i}_backward"
                )
                h_back = reversed_in_length(backward(reversed_in_length(x)))  # aligned with x
                h = jnp.concatenate([h, h_back], axis=-1)  # [batch, seq_len, 2 * hidden_size]
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(h)

        if not self.per_step:
            x = self._pool(x, lengths)  # [batch, features]
        for i, size in enumerate(self.head_sizes):
            x = nn.relu(nn.Dense(size, dtype=dtype, name=f"head_{i}")(x))  # [..., size]
        logits = nn.Dense(self.num_outputs, dtype=dtype, name="logits")(x)
        return logits.astype(jnp.float32)  # [..., num_outputs]

    def _pool(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        """Reduces `[batch, seq_len, features]` over each sequence's first `lengths` steps."""
        if self.pooling in ("max", "mean"):
            valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]  # [batch, seq_len]
            return pool(x, valid[..., None], self.pooling)
        # The LSTM is causal, so its output at step length - 1 has not seen the padding; the
        # backward one has read the whole sequence at step 0.
        last = (lengths - 1)[:, None, None]  # [batch, 1, 1]
        forward_last = jnp.take_along_axis(x, last, axis=1)[:, 0]  # [batch, features]
        if not self.bidirectional:
            return forward_last  # [batch, hidden_size]
        backward_first = x[:, 0, self.hidden_size :]
        return jnp.concatenate([forward_last[:, : self.hidden_size], backward_first], axis=-1)
