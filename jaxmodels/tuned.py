"""Faster forms of the models' layers for XLA:CPU, chosen by a model's `implementation` field.

Every model in this package is written in plain Flax first (`nn.Conv`, `nn.Dense`,
`jax.nn.dot_product_attention`, a scan over an LSTM cell). This module holds the forms that run
faster on XLA:CPU but need a special layout or a hand-written gradient. Each declares exactly the
parameters of its plain counterpart, so checkpoints move freely between the two, and each is tested
equal to it in values and gradients within float32 round-off (tests/test_tuned.py):

    plain                                   here
    nn.Conv + nn.max_pool                   PatchConv (one matmul over image patches) + max_pool_2x2
    LSTM: lax.scan of the cell              lstm_sequence (fused recurrence, hand-written backward)
    SelfAttention + dot_product_attention   HeadsMajorSelfAttention + causal_attention (query
                                            chunks that skip masked keys, hand-written backward)
    unrolled TransformerBlocks              apply_unrolled_blocks (one jitted block for all layers)

`implementation` is "standard" (the plain layers everywhere), "cpu" (these forms everywhere) or
"auto" (these forms when JAX's default backend is the CPU, the plain ones on GPU and TPU). How much
each form buys, measured on the machines we had: benchmarks/RESULTS.md.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmodels.dense import DenseParams

IMPLEMENTATIONS = ("auto", "standard", "cpu")


def use_tuned(implementation: str) -> bool:
    """Whether a model with this `implementation` field runs the forms of this module."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown model.implementation {implementation!r}; use one of {list(IMPLEMENTATIONS)}."
        )
    if implementation == "auto":
        return jax.default_backend() == "cpu"
    return implementation == "cpu"


# --- Convolution and pooling ----------------------------------------------------------------------


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2))` for even height and width, as a reshape and a max.

    XLA:CPU compiles the generic reduce_window (and its scatter in the backward pass) to slow
    kernels; a max over two reshaped axes is a plain reduction.

    Args:
      x: `[batch, height, width, channels]` with even height and width.

    Returns:
      `[batch, height // 2, width // 2, channels]`.
    """
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width, got input shape {x.shape}")
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    return x.max(axis=(2, 4))  # [batch, height / 2, width / 2, channels]


class PatchConv(nn.Module):
    """`nn.Conv(features, kernel_size, padding="SAME")` computed as one matmul over image patches.

    Declares the same parameters (`kernel` `[kh, kw, in, out]`, lecun-normal; `bias` `[out]`,
    zeros). The kh * kw shifted copies of the padded input are stacked along the channel axis,
    `[batch, h, w, kh * kw * in]`, and multiplied by the kernel reshaped to `[kh * kw * in, out]`:
    one large matmul forward and two backward, which XLA:CPU runs faster than its convolution
    kernels. The patches take kh * kw times the input's memory, small for MNIST-sized maps.

    Attributes:
      features: output channels.
      kernel_size: odd `(kh, kw)`.
      dtype: computation dtype; parameters stay float32.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves `x` `[batch, height, width, in]` into `[batch, height, width, features]`."""
        kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"PatchConv needs an odd kernel_size for SAME padding, got {(kh, kw)}")
        batch, height, width, in_features = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, in_features, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = jnp.dtype(self.dtype)
        padded = jnp.pad(x.astype(dtype), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        # Channel order (i, j, c) matches the kernel's [kh, kw, in] order once reshaped.
        patches = jnp.concatenate(
            [padded[:, i : i + height, j : j + width] for i in range(kh) for j in range(kw)],
            axis=-1,
        )  # [batch, height, width, kh * kw * in]
        y = patches @ kernel.reshape(kh * kw * in_features, self.features).astype(dtype)
        return y + bias.astype(dtype)  # [batch, height, width, features]


# --- LSTM -----------------------------------------------------------------------------------------


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

    One tanh over all gates with per-column constants instead of three sigmoids and a tanh over
    four slices: XLA:CPU fuses it into one pass over the gates, once per time step.
    """
    scale, shift = _gate_constants(gates.shape[-1] // 4)
    return scale * jnp.tanh(scale * gates) + shift


def _cell_update(c: jax.Array, gates: jax.Array, dtype):
    """`(c', h', activations)` from the state `c` (float32) and the summed gates."""
    acts = _activate_gates(gates.astype(jnp.float32))  # nonlinearities and the c update: float32
    i, f, g, o = jnp.split(acts, 4, axis=-1)  # each [batch, hidden_size]
    c = f * c.astype(jnp.float32) + i * g
    h = (o * jnp.tanh(c)).astype(dtype)
    return c, h, acts


@jax.custom_vjp
def lstm_sequence(
    x: jax.Array, input_kernel: jax.Array, recurrent_kernel: jax.Array, bias: jax.Array
) -> jax.Array:
    """One LSTM layer over a time-major sequence from a zero state, with a hand-written VJP.

    Computes what `jaxmodels.lstm.LSTMLayer`'s plain scan of the cell computes. The input
    projection does not depend on the state, so it is one large matmul over all steps, and only
    the small `[batch, hidden] @ [hidden, 4 * hidden]` matmul runs inside the scan.

    Autodiff of a scan stores a dozen intermediates per step and runs two small matmuls per step.
    Here the forward scan stores h, c and the activated gates; the backward scan runs only the
    `[batch, 4H] @ [4H, H]` matmul per step and saves the pre-activation gate gradients. Both
    kernels' gradients are then one large matmul over all steps, `sum_t [x_t, h_{t-1}]^T dgates_t`,
    and the bias gradient is their sum.

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
    input_gates = x @ input_kernel + bias  # [seq_len, batch, 4 * hidden]
    batch, hidden = x.shape[1], recurrent_kernel.shape[0]

    # The scan carries h transposed, [hidden, batch], and the recurrent matmul contracts its
    # leading axis: the same products and sums as `h @ W`, but XLA:CPU then runs its
    # multi-threaded matmul instead of the single-threaded library kernel it picks for `h @ W`.
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
    """The state each step started from: zeros, then the state after the previous step."""
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
    # for all steps at once, so each step of the sequential scan below is a few multiply-adds
    # and one matmul.
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


# --- Attention ------------------------------------------------------------------------------------

_MASKED = float(np.finfo(np.float32).min)  # added to a masked score: exp() of it is exactly 0
# Causal attention's query chunks: two skip a quarter of the score matrix; more chunks skip more
# but give XLA more, smaller operations.
QUERY_CHUNKS = 2


@jax.custom_vjp
def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Softmax attention of queries over keys with an additive score bias, heads-major.

    The softmax runs in float32. Masked positions carry the most negative float32 in `bias`: their
    weight is exactly 0, and a row whose keys are all masked averages them uniformly, as
    `jax.nn.dot_product_attention` does. The backward pass is written out (`_attend_backward`) so
    that its matmuls read operands in the layout XLA:CPU's fast matmul wants; `bias` gets no
    gradient.

    Args:
      q: `[batch, heads, q_len, head_dim]`, already scaled by `head_dim ** -0.5`.
      k, v: `[batch, heads, k_len, head_dim]`.
      bias: float32, broadcastable to `[batch, heads, q_len, k_len]`; 0 or `_MASKED`.

    Returns:
      `[batch, heads, q_len, head_dim]` in the dtype of `v`.
    """
    return _attend_forward(q, k, v, bias)[0]


def _batched_dot(a: jax.Array, b: jax.Array, a_axis: int, b_axis: int) -> jax.Array:
    """Contracts `a_axis` of `a` with `b_axis` of `b`, batched over the leading batch and heads."""
    return jax.lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0, 1), (0, 1))))


def _attend_forward(q, k, v, bias):
    scores = _batched_dot(q, k, 3, 3)  # [batch, heads, q_len, k_len]
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1)  # float32
    return _batched_dot(probs.astype(v.dtype), v, 3, 2), (q, k, v, probs)


def _attend_backward(residuals, d_out: jax.Array):
    q, k, v, probs = residuals
    dtype = v.dtype
    d_probs = _batched_dot(d_out, v, 3, 3).astype(jnp.float32)  # [batch, heads, q_len, k_len]
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_q = _batched_dot(d_scores.astype(dtype), k, 3, 2)

    # d_v = probs^T d_out and d_k = d_scores^T q contract over the queries, the second-to-last
    # axis of probs and d_scores. XLA:CPU's library matmul wants the contracted axis last, so the
    # transposes are written out and kept: a barrier stops XLA folding them back into the matmuls,
    # which would then run on its slower batched path.
    def transposed(x):
        return jax.lax.optimization_barrier(jnp.swapaxes(x, 2, 3).astype(dtype))

    d_v = _batched_dot(transposed(probs), d_out, 3, 2)
    d_k = _batched_dot(transposed(d_scores), q, 3, 2)
    return d_q, d_k, d_v, None


attend.defvjp(_attend_forward, _attend_backward)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, num_chunks: int = QUERY_CHUNKS
) -> jax.Array:
    """Causal attention that skips most of the masked upper triangle of the score matrix.

    Queries are split into `num_chunks` chunks; the chunk ending at position `stop` only scores
    keys `[0, stop)`, since every later key is masked for all of its queries. With n equal chunks
    this computes (n + 1) / 2n of the full score matrix, and the result equals full masked
    attention up to float32 round-off (the skipped weights are exactly 0).

    Args:
      q, k, v: `[batch, heads, seq_len, head_dim]`; q already scaled.
      num_chunks: query chunks; 1 scores the full matrix at once.

    Returns:
      `[batch, heads, seq_len, head_dim]` in the dtype of `v`.
    """
    seq_len = q.shape[2]
    chunk = -(-seq_len // max(num_chunks, 1))  # ceil: at most num_chunks chunks
    outs = []
    for start in range(0, seq_len, chunk):
        stop = min(start + chunk, seq_len)
        # A numpy constant: query i (absolute position) sees key j iff j <= i.
        visible = np.arange(stop)[None, :] <= np.arange(start, stop)[:, None]  # [q_len, stop]
        bias = np.where(visible, 0.0, _MASKED).astype(np.float32)
        outs.append(attend(q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], bias))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def _to_heads(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`[batch, seq_len, width] x [width, heads, head_dim] -> [batch, heads, seq_len, head_dim]`."""
    return jax.lax.dot_general(x, kernel, (((2,), (0,)), ((), ()))).transpose(0, 2, 1, 3)


class HeadsMajorSelfAttention(nn.Module):
    """`jaxmodels.transformer.SelfAttention`, computed heads-major.

    The same parameters (`qkv`: a Dense of 3 * width whose columns are q, k, v, each heads x
    head_dim; `out`: a Dense of width). The projections produce q, k and v directly as
    `[batch, heads, seq_len, head_dim]` and read the attention output in that layout, instead of
    a `[batch, seq_len, 3 * width]` projection sliced into q, k and v and transposed around the
    attention matmuls; on XLA:CPU every slice and transpose was a copy.

    Attributes:
      num_heads: number of heads; must divide `width`.
      width: model width (input and output size).
      dtype: computation dtype; parameters stay float32.
    """

    num_heads: int
    width: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        """`x` `[batch, seq_len, width]`; `mask` None (causal) or bool, broadcastable to
        `[batch, num_heads, seq_len, seq_len]`, True where a query may attend to a key."""
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        heads, head_dim = self.num_heads, self.width // self.num_heads
        dtype = jnp.dtype(self.dtype)
        x = x.astype(dtype)
        qkv = DenseParams(x.shape[-1], 3 * self.width, ("embed", "heads"), name="qkv")
        qkv_kernel, qkv_bias = (p.astype(dtype) for p in qkv())
        q_kernel, k_kernel, v_kernel = qkv_kernel.reshape(
            x.shape[-1], 3, heads, head_dim
        ).transpose(1, 0, 2, 3)  # each [width, heads, head_dim]
        q_bias, k_bias, v_bias = qkv_bias.reshape(3, heads, 1, head_dim)
        # Scaling q's kernel and bias is cheaper than scaling q or the [seq_len, seq_len] scores.
        scale = head_dim**-0.5
        q = _to_heads(x, q_kernel * scale) + q_bias * scale
        k = _to_heads(x, k_kernel) + k_bias  # each [batch, heads, seq_len, head_dim]
        v = _to_heads(x, v_kernel) + v_bias
        if mask is None:
            out = causal_attention(q, k, v)
        else:
            out = attend(q, k, v, jnp.where(mask, 0.0, _MASKED).astype(jnp.float32))
        out_dense = DenseParams(self.width, self.width, ("heads", None), name="out")
        out_kernel, out_bias = (p.astype(dtype) for p in out_dense())
        out_kernel = out_kernel.reshape(heads, head_dim, self.width)
        # [batch, heads, seq_len, head_dim] x [heads, head_dim, width] -> [batch, seq_len, width]
        return jax.lax.dot_general(out, out_kernel, (((1, 3), (0, 1)), ((), ()))) + out_bias


# --- Unrolled Transformer blocks ------------------------------------------------------------------


def apply_unrolled_blocks(
    parent: nn.Module, block: nn.Module, x: jax.Array, mask, *, train: bool, remat: bool
) -> jax.Array:
    """The blocks `block_0`, `block_1`, ... of `parent` applied through one jitted block function.

    The blocks have the same shapes, so the jitted function traces once (and its derivative
    once) and every layer reuses that trace: tracing time no longer grows with depth, while XLA
    still compiles every layer. `parent` must already hold the blocks' parameters (not while
    initialising); `block` is an unbound block whose fields are used.
    """
    for i in range(parent.num_layers):
        params = parent.variables["params"][f"block_{i}"]
        rng = parent.make_rng("dropout") if train and block.dropout_rate > 0 else None
        x = _apply_block(block, train, remat, params, x, mask, rng)
    return x


@partial(jax.jit, static_argnums=(0, 1, 2))
def _apply_block(block, train: bool, remat: bool, params, x, mask, rng):
    """`block` applied with `params`; cached by the block's fields and the shapes."""

    def apply(params, x, mask, rng):
        rngs = {} if rng is None else {"dropout": rng}
        return block.apply({"params": params}, x, mask, train=train, rngs=rngs)

    if remat:  # keep only the block's input for the backward pass
        apply = jax.checkpoint(apply)
    return apply(params, x, mask, rng)
