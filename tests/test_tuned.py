"""jaxmodels.tuned: each XLA:CPU form equals its plain counterpart, in values and gradients within
float32 round-off, component by component and as whole models (`implementation="cpu"` against
`"standard"`, with the same parameters)."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import (
    SMALL_FIELDS,
    H,
    as_args,
    example_input,
    init_params,
    key,
    random_normal,
)

from jaxmodels import SelfAttention, build_model, tuned
from jaxmodels.cnn import Conv
from jaxmodels.lstm import lstm_step
from jaxmodels.tuned import (
    _activate_gates,
    attend,
    causal_attention,
    lstm_sequence,
    max_pool_2x2,
)

ENCODER = dict(SMALL_FIELDS["transformer"], causal=False, num_classes=3)
MODEL_CASES = {
    "cnn": SMALL_FIELDS["cnn"],
    "lstm": SMALL_FIELDS["lstm"],
    "transformer": SMALL_FIELDS["transformer"],
    "transformer-encoder": ENCODER,
    "transformer-remat": dict(SMALL_FIELDS["transformer"], remat=True),
    # One block a side: self-attention, cross-attention over padded sources.
    "seq2seq": dict(SMALL_FIELDS["seq2seq"], num_layers=1),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_cpu_implementation_equals_the_standard_one(case):
    name = case.split("-")[0]
    fields = MODEL_CASES[case]
    standard = build_model(name, **dict(fields, implementation="standard"))
    cpu = standard.clone(implementation="cpu")
    x = example_input(name)
    if case == "transformer-encoder":
        x = x.at[1, 4:].set(0)  # padding in the second row
    if case == "seq2seq":
        x = (x[0].at[1, 4:].set(0), x[1])  # source padding in the second row
    params = init_params(standard, x)  # jitted: an eager init dispatches op by op
    # The same parameter tree: checkpoints move between the two implementations.
    cpu_shapes = jax.eval_shape(lambda: cpu.init(key(0), *as_args(x), train=False))["params"]
    assert jax.tree.map(jnp.shape, cpu_shapes) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda p: p + 0.1 * random_normal(7, p.shape), params)  # biases too
    cotangent = None

    def outputs_and_grads(model):
        nonlocal cotangent

        def loss(params):
            logits = model.apply({"params": params}, *as_args(x), train=False)
            return (logits * cotangent).sum(), logits

        if cotangent is None:
            shape = jax.eval_shape(
                lambda: model.apply({"params": params}, *as_args(x), train=False)
            ).shape
            cotangent = random_normal(8, shape)
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    logits, grads = outputs_and_grads(standard)
    cpu_logits, cpu_grads = outputs_and_grads(cpu)
    scale = float(jnp.abs(logits).max())
    np.testing.assert_allclose(cpu_logits, logits, rtol=0, atol=1e-5 * scale)

    def close(path, got, expected):
        scale = float(jnp.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * scale, err_msg=str(path))

    jax.tree_util.tree_map_with_path(close, cpu_grads, grads)


def test_auto_picks_cpu_forms_on_the_cpu_backend_only(monkeypatch):
    assert tuned.use_tuned("auto") is (jax.default_backend() == "cpu")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert tuned.use_tuned("auto") is False
    assert tuned.use_tuned("cpu") is True and tuned.use_tuned("standard") is False
    with pytest.raises(ValueError, match="Unknown model.implementation 'fast'"):
        tuned.use_tuned("fast")


@pytest.mark.parametrize("num_chunks", [7, 4, 3, 2])
def test_chunked_causal_attention_matches_full_scores(num_chunks):
    # Chunks skip only key blocks whose weights are exactly 0, so the outputs agree to round-off;
    # 7 positions in chunks of 1, 2, 3 or 4 cover even, uneven (3, 3, 1) and (4, 3) splits.
    q, k, v = (random_normal(seed, (2, 3, 7, 4)) for seed in (1, 2, 3))  # [b, heads, t, d]
    full = causal_attention(q, k, v, num_chunks=1)
    np.testing.assert_allclose(causal_attention(q, k, v, num_chunks), full, rtol=1e-6, atol=1e-6)
    # And full scores are the textbook masked softmax.
    scores = np.einsum("bhqd,bhkd->bhqk", q, k)
    scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(full, np.einsum("bhqk,bhkd->bhqd", weights, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias_shape", [(5, 5), (2, 1, 1, 5), (2, 4, 5, 5)])
def test_attention_backward_pass_matches_autodiff_of_a_plain_softmax(bias_shape):
    # `attend` writes its backward pass out; it must give autodiff's gradients for every bias
    # shape the layers pass: a [q, k] mask, a padding mask, a per-head mask.
    q, k, v = (random_normal(seed, (2, 4, 5, 3)) for seed in (1, 2, 3))  # [b, heads, t, d]
    bias = np.where(random_normal(4, bias_shape) > -0.5, 0.0, -1e9).astype(np.float32)

    def plain(q, k, v, bias):
        weights = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) + bias, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", weights, v)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, bias) * random_normal(5, q.shape))

    np.testing.assert_allclose(attend(q, k, v, bias), plain(q, k, v, bias), rtol=1e-6, atol=1e-6)
    grads = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(q, k, v)
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), grads, want)


class TextbookAttention(nn.Module):
    """Self-attention as usually written: Dense q/k/v, slices, a masked softmax, Dense out."""

    num_heads: int
    width: int

    @nn.compact
    def __call__(self, x, mask):
        batch, seq_len, _ = x.shape
        head_dim = self.width // self.num_heads
        qkv = nn.Dense(3 * self.width, name="qkv")(x).reshape(batch, seq_len, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, seq_len, heads, head_dim]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        if mask is None:
            mask = np.tril(np.ones((seq_len, seq_len), bool))
        weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq_len, self.width)
        return nn.Dense(self.width, name="out")(out)


@pytest.mark.parametrize("implementation", ["standard", "cpu"])
@pytest.mark.parametrize("num_heads", [3, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
def test_self_attention_matches_textbook_dense_layers(causal, num_heads, implementation):
    # The one attention layer, with either kernel (the plain one, and the heads-major one with its
    # hand-written backward pass), must declare and initialise the parameters of two nn.Dense
    # layers and compute the textbook function.
    x = random_normal(1, (2, 7, 12))  # [batch, seq_len, width]
    mask = None if causal else random_normal(2, (2, 1, 7, 7)) > -0.5  # [batch, 1, q, k]
    if mask is not None:
        mask = mask | np.eye(7, dtype=bool)  # every query sees at least itself
    ours = SelfAttention(num_heads=num_heads, width=12, implementation=implementation)
    textbook = TextbookAttention(num_heads=num_heads, width=12)
    params = nn.unbox(ours.init(key(0), x, mask)["params"])  # without the logical axis names
    jax.tree.map(np.testing.assert_array_equal, params, textbook.init(key(0), x, mask)["params"])
    params = jax.tree.map(lambda p: p + random_normal(3, p.shape), params)  # nonzero biases too
    np.testing.assert_allclose(
        ours.apply({"params": params}, x, mask),
        textbook.apply({"params": params}, x, mask),
        rtol=1e-5,
        atol=1e-5,
    )
    # And the same gradients (attention's backward pass is written by hand), for every parameter
    # and the input.
    weights = random_normal(4, x.shape)  # a random cotangent for the outputs

    def grads(module):
        def loss(params, x):
            return (module.apply({"params": params}, x, mask) * weights).sum()

        return jax.grad(loss, argnums=(0, 1))(params, x)

    def close(got, expected):  # round-off relative to the largest entry of each gradient: the
        # k bias gets none (it shifts every score of a row alike), so its entries are round-off
        scale = float(jnp.abs(expected).max())
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)

    jax.tree.map(close, grads(ours), grads(textbook))


def test_lstm_gates_are_three_sigmoids_and_a_tanh():
    gates = 4 * random_normal(3, (2, 4 * H))  # [batch, 4 * hidden]: i, f, g, o
    i, f, g, o = np.split(np.asarray(gates, np.float64), 4, axis=-1)
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    expected = np.concatenate([sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)], axis=-1)
    np.testing.assert_allclose(jax.jit(_activate_gates)(gates), expected, rtol=0, atol=5e-7)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 3e-2)])
def test_lstm_sequence_gradients_match_autodiff(dtype, tolerance):
    # The hand-written backward pass against autodiff of the plain input projection and scan.
    features = 5
    args = (
        random_normal(0, (6, 3, features)).astype(
            dtype
        ),  # x, time-major [seq_len, batch, features]
        (random_normal(4, (features, 4 * H)) * 0.5).astype(dtype),  # input kernel
        (random_normal(1, (H, 4 * H)) * 0.5).astype(dtype),  # recurrent kernel
        random_normal(2, (4 * H,)).astype(dtype),  # bias
    )
    weights = random_normal(3, (6, 3, H))  # a random cotangent for the outputs

    def plain(x, input_kernel, recurrent_kernel, bias):  # LSTMLayer's standard scan
        carry = (jnp.zeros((3, H)), jnp.zeros((3, H), dtype))
        params = (input_kernel, recurrent_kernel, bias)
        return jax.lax.scan(partial(lstm_step, params), carry, x)[1]

    def loss(sequence, *args):
        return (sequence(*args).astype(jnp.float32) * weights).sum()

    # Same function as the plain scan, summed in another order: round-off only. h lies in (-1, 1).
    np.testing.assert_allclose(
        np.asarray(lstm_sequence(*args), np.float32),
        np.asarray(plain(*args), np.float32),
        atol=tolerance,
        rtol=0,
    )
    expected = jax.grad(partial(loss, plain), argnums=(0, 1, 2, 3))(*args)
    got = jax.grad(partial(loss, lstm_sequence), argnums=(0, 1, 2, 3))(*args)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype == jnp.dtype(dtype)
        scale = float(jnp.abs(e.astype(jnp.float32)).max())
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(e, np.float32), atol=tolerance * scale
        )


@pytest.mark.parametrize("kernel_size, in_features", [((3, 3), 1), ((3, 3), 5), ((5, 3), 2)])
@pytest.mark.parametrize("implementation", ["standard", "cpu"])
def test_patch_conv_matches_nn_conv(kernel_size, in_features, implementation):
    # The CNN's one convolution layer, with XLA's convolution or tuned.patch_conv.
    x = random_normal(1, (2, 6, 7, in_features))
    patch_conv = Conv(4, kernel_size, implementation=implementation)
    params = patch_conv.init(key(0), x)["params"]
    conv = nn.Conv(4, kernel_size, padding="SAME")
    # The same parameter tree, so checkpoints and parameter counts are those of nn.Conv.
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, conv.init(key(0), x)["params"]
    )
    params = jax.tree.map(lambda p: random_normal(2, p.shape), params)  # a non-zero bias too
    expected = conv.apply({"params": params}, x)
    np.testing.assert_allclose(patch_conv.apply({"params": params}, x), expected, atol=1e-5)

    def grads(module):
        return jax.grad(lambda p: (module.apply({"params": p}, x) ** 2).sum())(params)

    jax.tree.map(
        partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-4), grads(patch_conv), grads(conv)
    )
    with pytest.raises(ValueError, match="odd kernel_size"):
        tuned.patch_conv(x, jnp.zeros((2, 3, in_features, 4)), jnp.zeros(4))


def test_max_pool_matches_nn_max_pool():
    x = random_normal(0, (2, 8, 6, 3))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    with pytest.raises(ValueError, match=r"\(2, 7, 6, 3\)"):
        max_pool_2x2(jnp.zeros((2, 7, 6, 3)))
