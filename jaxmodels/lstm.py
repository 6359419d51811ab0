"""LSTM cell, a fast single-layer LSTM over a sequence, and a stacked LSTM model.

`LSTMCell` and `LSTMLayer` declare the same parameters (`input_kernel`, `recurrent_kernel`, `bias`),
so the cell can be applied step by step with a layer's parameters. The layer is faster: it computes
the input projection for all time steps in one matmul and only scans the recurrent matmul.

Mixed precision: parameters are always float32; `dtype` is the computation dtype of the matmuls
and of `h`, while the cell state `c` and the gate nonlinearities stay float32 (see `_lstm_step`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _gate_constants(hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column `(scale, shift)` of the stacked gates i, f, g, o for `_activate_gates`.

    sigmoid(x) = 0.5 * tanh(0.5 * x) + 0.5, so every gate is `scale * tanh(scale * x) + shift`:
    scale 0.5 and shift 0.5 for the sigmoid gates i, f, o, and scale 1, shift 0 for tanh(g).
    """
    scale = np.full(4 * hidden_size, 0.5, np.float32)
    shift = np.full(4 * hidden_size, 0.5, np.float32)
    scale[2 * hidden_size : 3 * hidden_size] = 1.0
    shift[2 * hidden_size : 3 * hidden_size] = 0.0
    return scale, shift


def _activate_gates(gates: jax.Array) -> jax.Array:
    """sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) of float32 `[..., 4 * hidden]` stacked gates.

    One tanh over all gates with per-column constants (see `_gate_constants`) instead of three
    sigmoids and a tanh over four slices: XLA:CPU fuses it into a single pass over the gates, and
    the recurrence runs one such pass per time step (the forward scan of one benchmark layer, 100
    steps of batch 64 x 128 units: 26.2 -> 14.2 ms, against 11.6 ms for its matmuls alone). Agrees
    with `jax.nn.sigmoid` to float32 round-off (2.4e-7 in that test).
    """
    scale, shift = _gate_constants(gates.shape[-1] // 4)
    return scale * jnp.tanh(scale * gates) + shift


def _lstm_update(recurrent_kernel: jax.Array, carry: Carry, input_gates: jax.Array):
    """One LSTM step given the input part of the gates, `x_t @ input_kernel + bias`.

    The matmul runs in the dtype of `recurrent_kernel` (the computation dtype). The cell state `c`
    stays float32 whatever that dtype: it is a running sum over the whole sequence
    (c' = sigmoid(f) * c + ...), so rounding it to bfloat16's 8-bit mantissa at every step would
    lose small updates and let the error build up along the sequence. `h` is recomputed from `c`
    at every step, lies in (-1, 1) and only feeds matmuls, so it is kept in the computation dtype.

    Args:
      recurrent_kernel: `[hidden_size, 4 * hidden_size]`, in the computation dtype.
      carry: `(c, h)`, each `[batch, hidden_size]`; `c` float32.
      input_gates: `[batch, 4 * hidden_size]`.

    Returns:
      `(c', h', activations)`: `c'` float32, `h'` in the dtype of `recurrent_kernel`, and the
      float32 gate activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o), stacked like the gates
      `[batch, 4 * hidden_size]` (what the backward pass of `lstm_sequence` needs).
    """
    c, h = carry
    dtype = recurrent_kernel.dtype
    gates = input_gates + h.astype(dtype) @ recurrent_kernel  # [batch, 4 * hidden_size]
    return _cell_update(c, gates, dtype)


def _cell_update(c: jax.Array, gates: jax.Array, dtype):
    """`(c', h', activations)` of `_lstm_update` from the state `c` and the summed gates."""
    acts = _activate_gates(gates.astype(jnp.float32))  # nonlinearities and the c update: float32
    i, f, g, o = jnp.split(acts, 4, axis=-1)  # each [batch, hidden_size]
    c = f * c.astype(jnp.float32) + i * g
    h = (o * jnp.tanh(c)).astype(dtype)
    return c, h, acts


def _lstm_step(recurrent_kernel: jax.Array, carry: Carry, input_gates: jax.Array):
    """`_lstm_update` as a scan body: `((c', h'), h')`."""
    c, h, _ = _lstm_update(recurrent_kernel, carry, input_gates)
    return (c, h), h


@jax.custom_vjp
def lstm_sequence(
    x: jax.Array, input_kernel: jax.Array, recurrent_kernel: jax.Array, bias: jax.Array
) -> jax.Array:
    """A whole LSTM layer over a time-major sequence from a zero state, with a hand-written VJP.

    Computes what `x @ input_kernel + bias` followed by a `jax.lax.scan` of `_lstm_step` computes.
    The input projection does not depend on the state, so it is one large matmul over all steps,
    and only the small `[batch, hidden] @ [hidden, 4 * hidden]` matmul runs inside the scan.

    The backward pass is written by hand because autodiff of that scan stores a dozen
    intermediates per step and runs two small matmuls per step (the gradient of `h` and the
    step's share of the recurrent kernel's gradient). Here the forward scan stores three arrays
    per step (h, c and the activated gates); the backward scan runs only the
    `[batch, 4H] @ [4H, H]` matmul per step and saves the pre-activation gate gradients. Both
    kernels' gradients are then one large matmul over all steps, `sum_t [x_t, h_{t-1}]^T dgates_t`,
    which reads the gate gradients once, and the bias gradient is their sum. Against autodiff of
    the input projection plus a hand-written VJP of the recurrence alone, the benchmark LSTM step
    (3 x 128 units, 100 steps, batch 64) went from 155 to 140 ms (two interleaved pairs of runs).

    Args:
      x: time-major inputs `[seq_len, batch, features]` in the computation dtype.
      input_kernel: `[features, 4 * hidden]` in the computation dtype.
      recurrent_kernel: `[hidden, 4 * hidden]` in the computation dtype.
      bias: `[4 * hidden]` in the computation dtype.

    Returns:
      `h` at every step, `[seq_len, batch, hidden]` in the computation dtype.
    """
    return _sequence_forward(x, input_kernel, recurrent_kernel, bias)[0]


def _sequence_forward(x, input_kernel, recurrent_kernel, bias):
    """(h of every step, residuals for the backward pass)."""
    dtype = recurrent_kernel.dtype
    for name, array in (("x", x), ("input_kernel", input_kernel), ("bias", bias)):
        if array.dtype != dtype:
            raise ValueError(
                f"lstm_sequence: {name} is {array.dtype}, the recurrent kernel {dtype}"
            )
    input_gates = x @ input_kernel + bias  # [seq_len, batch, 4 * hidden]
    batch, hidden = x.shape[1], recurrent_kernel.shape[0]

    # The scan carries h transposed, [hidden, batch], and the recurrent matmul reads it as
    # `h_t^T W` with the contraction over its leading axis. Same products and sums as `h @ W`, but
    # XLA:CPU runs a dot whose left operand contracts its leading axis with its own multi-threaded
    # matmul instead of the single-threaded library kernel it picks for `h @ W`: one benchmark
    # layer's forward scan (100 steps, batch 64, 128 units) 14.0 -> 11.1 ms. Transposing the small
    # h each step costs less than that; on GPU and TPU the transpose is free to fold into the dot.
    def step(carry, gates_t: jax.Array):
        c, h_t = carry
        gates = gates_t + jnp.einsum("hb,hg->bg", h_t, recurrent_kernel)  # [batch, 4 * hidden]
        c, h, acts = _cell_update(c, gates, dtype)
        return (c, h.T), (h, c, acts)

    carry = (jnp.zeros((batch, hidden), jnp.float32), jnp.zeros((hidden, batch), dtype))
    _, (hs, cs, acts) = jax.lax.scan(step, carry, input_gates)
    return hs, (x, input_kernel, recurrent_kernel, hs, cs, acts)


def _sequence_backward(residuals, d_hs: jax.Array):
    x, input_kernel, recurrent_kernel, hs, cs, acts = residuals
    dtype = recurrent_kernel.dtype
    d_gates = _gate_gradients(recurrent_kernel, cs, acts, d_hs)  # [seq_len, batch, 4 * hidden]
    h_prev = _started_from(hs)  # [seq_len, batch, hidden]
    inputs = jnp.concatenate([x, h_prev], axis=-1)  # [seq_len, batch, features + hidden]
    d_kernels = jnp.einsum("tbk,tbg->kg", inputs, d_gates, preferred_element_type=jnp.float32)
    features = x.shape[-1]
    d_input_kernel = d_kernels[:features].astype(dtype)
    d_recurrent_kernel = d_kernels[features:].astype(dtype)
    d_bias = jnp.sum(d_gates, axis=(0, 1), dtype=jnp.float32).astype(dtype)
    d_x = d_gates @ input_kernel.T  # [seq_len, batch, features]
    return d_x, d_input_kernel, d_recurrent_kernel, d_bias


def _started_from(states: jax.Array) -> jax.Array:
    """The state each step started from: zeros, then the state after the previous step.

    `states` is the state after every step, `[seq_len, ...]`; the result has the same shape.
    """
    return jnp.concatenate([jnp.zeros_like(states[:1]), states[:-1]])


def _gate_gradients(recurrent_kernel, cs, acts, d_hs: jax.Array) -> jax.Array:
    """The gradients of the pre-activation gates at every step, in the computation dtype."""
    dtype = recurrent_kernel.dtype
    c_prev = _started_from(cs)  # [seq_len, batch, hidden]

    # With dc and dh the gradients reaching c_t and h_t, the gate gradients are
    #   d_gates = (1 - act) * (act + offset) * [dc * g, dc * c_prev, dc * i, dh * tanh(c)]
    # (d act / d gate = act * (1 - act) for the sigmoid gates, offset 0, and 1 - act**2 for
    # tanh(g), offset 1) and dc = dc_next * f_next + dh * o * (1 - tanh(c)**2), where f_next is
    # the forget gate of step t + 1. Everything that does not depend on dc or dh is computed here
    # for all steps at once, so each step of the sequential scan below is a few multiply-adds,
    # the [batch, 4H] @ [4H, H] matmul and the store of its gate gradients: one benchmark layer's
    # backward scan 24.7 -> 21.8 ms.
    scale, shift = _gate_constants(recurrent_kernel.shape[0])
    i, f, g, o = jnp.split(acts, 4, axis=-1)  # each [seq_len, batch, hidden], float32
    tanh_c = jnp.tanh(cs)
    dc_per_dh = o * (1 - tanh_c**2)
    partner = jnp.concatenate([g, c_prev, i, tanh_c], axis=-1)  # [seq_len, batch, 4 * hidden]
    d_gates_per_d = (1 - acts) * (acts + (scale - shift)) * partner

    def step(carry, xs):
        dh_next, dc_next = carry  # float32 gradients reaching h_t (from step t + 1) and c_t
        dh_out, dc_per_dh_t, d_gates_per_d_t, forget_t = xs
        dh = dh_out.astype(jnp.float32) + dh_next
        dc = dc_next + dh * dc_per_dh_t
        d_gates = d_gates_per_d_t * jnp.concatenate([dc, dc, dc, dh], axis=-1)
        dh_prev = (d_gates.astype(dtype) @ recurrent_kernel.T).astype(jnp.float32)
        return (dh_prev, dc * forget_t), d_gates  # gradients reaching h and c of t - 1

    zeros = jnp.zeros(cs.shape[1:], jnp.float32)
    xs = (d_hs, dc_per_dh, d_gates_per_d, f)
    _, d_gates = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
    return d_gates.astype(dtype)  # [seq_len, batch, 4 * hidden]


lstm_sequence.defvjp(_sequence_forward, _sequence_backward)


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
        input_kernel, recurrent_kernel, bias = (p.astype(self.dtype) for p in params)
        input_gates = x_t.astype(self.dtype) @ input_kernel + bias  # [batch, 4 * hidden_size]
        return _lstm_step(recurrent_kernel, carry, input_gates)


class LSTMLayer(nn.Module):
    """An LSTM over a whole sequence, starting from a zero state.

    Attributes:
      hidden_size: size of `c` and `h`.
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters and `c` stay float32.
    """

    hidden_size: int
    dtype: str = "float32"

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
        input_kernel, recurrent_kernel, bias = (p.astype(self.dtype) for p in params)
        # `lstm_sequence` scans over the leading axis, so it runs time-major. Swap the layer's
        # input and output (features and hidden wide), never the 4 x hidden wide gates: a
        # quarter of the bytes moved (lstm benchmark step 207 ms against 218 ms, interleaved A/B).
        x_by_time = jnp.swapaxes(x.astype(self.dtype), 0, 1)  # [seq_len, batch, features]
        h = lstm_sequence(x_by_time, input_kernel, recurrent_kernel, bias)  # [seq, batch, hidden]
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
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters and the cell states stay
        float32 and the logits are returned as float32.
    """

    num_layers: int
    hidden_size: int
    num_outputs: int
    vocab_size: int = 0
    embed_dim: int = 0
    head_sizes: Sequence[int] = ()
    per_step: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"

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
        if self.vocab_size > 0:
            if self.embed_dim <= 0:
                raise ValueError(f"LSTM with vocab_size={self.vocab_size} needs embed_dim > 0")
            # A token model's sequence length is its number of non-padding tokens (padding at end).
            lengths = jnp.maximum(jnp.sum(x != 0, axis=1), 1)  # [batch]
            embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=dtype, name="embed")
            x = embed(x)  # [batch, seq_len, embed_dim]
        else:
            lengths = jnp.full((x.shape[0],), x.shape[1])  # [batch]

        for i in range(self.num_layers):
            x = LSTMLayer(self.hidden_size, self.dtype, name=f"lstm_{i}")(x)  # [b, seq_len, hidden]
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

        if not self.per_step:
            # The LSTM is causal, so its output at step length - 1 has not seen the padding.
            last = (lengths - 1)[:, None, None]  # [batch, 1, 1]
            x = jnp.take_along_axis(x, last, axis=1)[:, 0]  # [batch, hidden_size]
        for i, size in enumerate(self.head_sizes):
            x = nn.relu(nn.Dense(size, dtype=dtype, name=f"head_{i}")(x))  # [..., size]
        logits = nn.Dense(self.num_outputs, dtype=dtype, name="logits")(x)
        return logits.astype(jnp.float32)  # [..., num_outputs]
