"""LSTM cell, a fast single-layer LSTM over a sequence, and a stacked LSTM model.

`LSTMCell` and `LSTMLayer` declare the same parameters (`input_kernel`, `recurrent_kernel`, `bias`),
so the cell can be applied step by step with a layer's parameters. The layer is faster: it computes
the input projection for all time steps in one matmul and only scans the recurrent matmul.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Carry = tuple[jax.Array, jax.Array]  # (c, h), each [batch, hidden_size]


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


def _lstm_step(recurrent_kernel: jax.Array, carry: Carry, input_gates: jax.Array):
    """One LSTM step given the input part of the gates, `x_t @ input_kernel + bias`.

    Args:
      recurrent_kernel: `[hidden_size, 4 * hidden_size]`.
      carry: `(c, h)`, each `[batch, hidden_size]`.
      input_gates: `[batch, 4 * hidden_size]`.

    Returns:
      `((c', h'), h')`.
    """
    c, h = carry
    gates = input_gates + h @ recurrent_kernel  # [batch, 4 * hidden_size]
    i, f, g, o = jnp.split(gates, 4, axis=-1)  # each [batch, hidden_size]
    c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
    h = nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h


class LSTMCell(nn.Module):
    """One LSTM time step: c' = sigmoid(f) * c + sigmoid(i) * tanh(g), h' = sigmoid(o) * tanh(c').

    Attributes:
      hidden_size: size of `c` and `h`.
    """

    hidden_size: int

    @nn.compact
    def __call__(self, carry: Carry, x_t: jax.Array) -> tuple[Carry, jax.Array]:
        """Advances the state by one step.

        Args:
          carry: `(c, h)`, each `[batch, hidden_size]`.
          x_t: inputs at this step, `[batch, features]`.

        Returns:
          `((c', h'), h')`, each `[batch, hidden_size]`.
        """
        input_kernel, recurrent_kernel, bias = _lstm_params(self, x_t.shape[-1], self.hidden_size)
        return _lstm_step(recurrent_kernel, carry, x_t @ input_kernel + bias)


class LSTMLayer(nn.Module):
    """An LSTM over a whole sequence, starting from a zero state.

    Attributes:
      hidden_size: size of `c` and `h`.
    """

    hidden_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Runs the LSTM over the time axis.

        Args:
          x: float inputs, `[batch, seq_len, features]`.

        Returns:
          hidden states at every step, `[batch, seq_len, hidden_size]`.
        """
        batch = x.shape[0]
        input_kernel, recurrent_kernel, bias = _lstm_params(self, x.shape[-1], self.hidden_size)
        # The input projection does not depend on the state: one big matmul for all steps keeps
        # only the small [batch, hidden] @ [hidden, 4 * hidden] matmul inside the sequential scan.
        input_gates = x @ input_kernel + bias  # [batch, seq_len, 4 * hidden_size]
        zeros = jnp.zeros((batch, self.hidden_size), input_gates.dtype)

        def step(carry: Carry, gates_t: jax.Array) -> tuple[Carry, jax.Array]:
            return _lstm_step(recurrent_kernel, carry, gates_t)

        # lax.scan runs over the leading axis, so scan time-major and swap back.
        _, h = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(input_gates, 0, 1))
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
        once per sequence from the output at the last valid step, `[batch, num_outputs]`.
      dropout_rate: dropout on the output of every LSTM layer (only when `train=True`).
    """

    num_layers: int
    hidden_size: int
    num_outputs: int
    vocab_size: int = 0
    embed_dim: int = 0
    head_sizes: Sequence[int] = ()
    per_step: bool = False
    dropout_rate: float = 0.0

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
        if self.vocab_size > 0:
            if self.embed_dim <= 0:
                raise ValueError(f"LSTM with vocab_size={self.vocab_size} needs embed_dim > 0")
            # A token model's sequence length is its number of non-padding tokens (padding at end).
            lengths = jnp.maximum(jnp.sum(x != 0, axis=1), 1)  # [batch]
            x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(x)  # [b, t, embed_dim]
        else:
            lengths = jnp.full((x.shape[0],), x.shape[1])  # [batch]

        for i in range(self.num_layers):
            x = LSTMLayer(self.hidden_size, name=f"lstm_{i}")(x)  # [batch, seq_len, hidden_size]
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

        if not self.per_step:
            # The LSTM is causal, so its output at step length - 1 has not seen the padding.
            last = (lengths - 1)[:, None, None]  # [batch, 1, 1]
            x = jnp.take_along_axis(x, last, axis=1)[:, 0]  # [batch, hidden_size]
        for i, size in enumerate(self.head_sizes):
            x = nn.relu(nn.Dense(size, name=f"head_{i}")(x))  # [..., size]
        return nn.Dense(self.num_outputs, name="logits")(x)  # [..., num_outputs]
