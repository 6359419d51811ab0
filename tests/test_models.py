"""jaxmodels: exact parameter counts, shapes, masking invariants, dropout, mixed precision, the
Transformer's scanned and rematerialised layers, and the model table. The models are built with
their plain layers (`implementation="standard"`); tests/test_tuned.py checks the XLA:CPU forms
against them."""

from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import MODELS, LSTMCell, LSTMLayer, Transformer, build_model

# One small set of fields per model in MODELS, with an example input and the expected output shape.
STANDARD = dict(implementation="standard")
SMALL_FIELDS = {
    "mlp": dict(hidden_sizes=(16, 8), num_classes=3),
    "cnn": dict(conv_features=(4, 8), dense_features=16, num_classes=3, **STANDARD),
    "lstm": dict(
        num_layers=2,
        hidden_size=8,
        num_outputs=3,
        vocab_size=20,
        embed_dim=6,
        head_sizes=(5,),
        **STANDARD,
    ),
    "transformer": dict(
        vocab_size=16, num_layers=2, num_heads=2, width=8, mlp_dim=16, max_len=12, **STANDARD
    ),
    "seq2seq": dict(
        vocab_size=16, num_layers=2, num_heads=2, width=8, mlp_dim=16, max_len=12, **STANDARD
    ),
}
# Variants beyond SMALL_FIELDS: an LSTM over float features and the Transformer encoder classifier.
FEATURE_LSTM_FIELDS = dict(num_layers=1, hidden_size=8, num_outputs=4, **STANDARD)
ENCODER_FIELDS = dict(SMALL_FIELDS["transformer"], causal=False, num_classes=3)
EXPECTED_SHAPES = {
    "mlp": (2, 3),
    "cnn": (2, 3),
    "lstm": (2, 3),
    "transformer": (2, 7, 16),
    "seq2seq": (2, 5, 16),  # logits of the 5 decoder positions (tests/test_seq2seq.py: the rest)
}


def key(seed: int) -> jax.Array:
    """A PRNG key for init and dropout in these tests.

    XLA:CPU spends seconds in LLVM compiling the default threefry generator for some tiny
    multi-dimensional shapes (3-4 s for a (3, 3, 4, 8) conv kernel), which would dominate this
    suite. "rbg" keys compile in a fraction of that, and nothing checked here depends on the
    generator.
    """
    return jax.random.key(seed, impl="rbg")


def random_normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def random_tokens(seed: int, shape: tuple[int, ...], vocab_size: int) -> jax.Array:
    """Token ids in [1, vocab_size): no padding."""
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab_size, size=shape), jnp.int32)


def example_input(name: str) -> jax.Array | tuple[jax.Array, ...]:
    """A batch of 2 inputs that fits `SMALL_FIELDS[name]`: a tuple for a model of several inputs
    (`as_args` unpacks it)."""
    if name == "seq2seq":  # source ids, decoder input ids
        return random_tokens(1, (2, 7), vocab_size=16), random_tokens(2, (2, 5), vocab_size=16)
    if name == "mlp":
        return random_normal(1, (2, 4, 5))  # flattened to 20 features
    if name == "cnn":
        return random_normal(1, (2, 8, 8, 1))  # 8 -> 4 -> 2
    return random_tokens(
        1, (2, 7), vocab_size=16
    )  # fits both vocabularies (lstm 20, transformer 16)


def as_args(x) -> tuple:
    """A model's positional inputs: the tuple `example_input` gives, or one array."""
    return x if isinstance(x, tuple) else (x,)


def init_params(model: nn.Module, x: jax.Array) -> dict:
    return jax.jit(model.init, static_argnames="train")(key(0), *as_args(x), train=False)["params"]


def count_params(model: nn.Module, x: jax.Array) -> int:
    # eval_shape traces init without computing anything: counts cost no compile.
    shapes = jax.eval_shape(lambda: model.init(key(0), *as_args(x), train=False))["params"]
    return sum(leaf.size for leaf in jax.tree.leaves(shapes))


def apply_fn(model: nn.Module) -> Callable[..., jax.Array]:
    apply = jax.jit(model.apply, static_argnames="train")
    return lambda variables, x, **kwargs: apply(variables, *as_args(x), **kwargs)


class Built(NamedTuple):
    model: nn.Module
    variables: dict
    apply: Callable[..., jax.Array]  # jitted model.apply; `train` is static


@pytest.fixture(scope="module")
def small() -> Callable[..., Built]:
    """`small(name, **fields)` builds the SMALL_FIELDS model, with `fields` overriding some of its
    fields, once per module and reuses its jitted apply.

    Init and compiles dominate this suite's time on CPU, so tests share them.
    """
    built = {}

    def get(name: str, **fields) -> Built:
        model = build_model(name, **dict(SMALL_FIELDS[name], **fields))
        # Modules compare by their fields, so a default passed explicitly finds the same entry.
        if model not in built:
            params = init_params(model, example_input(name))
            built[model] = Built(model, {"params": params}, apply_fn(model))
        return built[model]

    return get


def stack_blocks(params: dict, num_layers: int) -> dict:
    """Unrolled Transformer parameters (`block_0`, `block_1`, ...) in the scanned layout, where
    `blocks` holds every block parameter stacked along a new leading `num_layers` axis."""
    blocks = [params[f"block_{i}"] for i in range(num_layers)]
    rest = {name: value for name, value in params.items() if not name.startswith("block_")}
    return dict(rest, blocks=jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks))


def all_equations(jaxpr) -> Iterator:
    """Every equation of `jaxpr` and of the jaxprs nested in it (jit, scan, remat bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr as `.jaxpr`
                if hasattr(sub, "eqns"):
                    yield from all_equations(sub)


def test_every_model_has_a_test_case():
    assert set(SMALL_FIELDS) == set(MODELS) == set(EXPECTED_SHAPES)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_and_dtype(name, small):
    model = small(name)
    logits = model.apply(model.variables, example_input(name), train=False)
    assert logits.shape == EXPECTED_SHAPES[name]
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


# Hand-worked parameter counts. Dense: inputs*outputs + outputs; LSTM layer: 4 gates of size H.
H = 8  # LSTM hidden size in the cases below
D = 8  # Transformer width in the cases below
BLOCK = (
    2 * D  # attn LayerNorm scale + bias
    + (D * 3 * D + 3 * D)  # fused qkv
    + (D * D + D)  # attention output
    + 2 * D  # mlp LayerNorm
    + (D * 16 + 16)  # mlp_in (mlp_dim 16)
    + (16 * D + D)  # mlp_out
)  # = 600
PARAM_COUNTS = [
    pytest.param(
        "mlp", SMALL_FIELDS["mlp"], jnp.zeros((1, 4, 5)),
        (4 * 5) * 16 + 16  # hidden_0
        + 16 * 8 + 8  # hidden_1
        + 8 * 3 + 3,  # logits
        id="mlp",
    ),
    pytest.param(
        "cnn", SMALL_FIELDS["cnn"], jnp.zeros((1, 8, 8, 1)),
        3 * 3 * 1 * 4 + 4  # conv_0
        + 3 * 3 * 4 * 8 + 8  # conv_1
        + (2 * 2 * 8) * 16 + 16  # dense on the 8 -> 4 -> 2 feature map
        + 16 * 3 + 3,  # logits
        id="cnn",
    ),
    pytest.param(
        "cnn", {}, jnp.zeros((1, 28, 28, 1)),
        3 * 3 * 1 * 32 + 32  # conv_0 = 320
        + 3 * 3 * 32 * 64 + 64  # conv_1 = 18496
        + (7 * 7 * 64) * 128 + 128  # dense on 28 -> 14 -> 7 = 401536
        + 128 * 10 + 10,  # logits = 1290; total 421642
        id="cnn-mnist-defaults",
    ),
    pytest.param(
        "lstm", SMALL_FIELDS["lstm"], jnp.ones((1, 7), jnp.int32),
        20 * 6  # embed
        + 6 * 4 * H + H * 4 * H + 4 * H  # lstm_0: input_kernel, recurrent_kernel, bias
        + H * 4 * H + H * 4 * H + 4 * H  # lstm_1
        + H * 5 + 5  # head_0
        + 5 * 3 + 3,  # logits
        id="lstm-tokens",
    ),
    pytest.param(
        "lstm", dict(SMALL_FIELDS["lstm"], bidirectional=True), jnp.ones((1, 7), jnp.int32),
        20 * 6  # embed
        + 2 * (6 * 4 * H + H * 4 * H + 4 * H)  # lstm_0 and lstm_0_backward
        + 2 * (2 * H * 4 * H + H * 4 * H + 4 * H)  # lstm_1 and its backward, on 2H features
        + 2 * H * 5 + 5  # head_0 on both directions' H
        + 5 * 3 + 3,  # logits
        id="lstm-bidirectional",
    ),
    pytest.param(
        "lstm", dict(FEATURE_LSTM_FIELDS, per_step=True),
        jnp.zeros((1, 5, 3)),
        3 * 4 * H + H * 4 * H + 4 * H  # lstm_0 on 3 features
        + H * 4 + 4,  # logits
        id="lstm-features",
    ),
    pytest.param(
        "transformer", SMALL_FIELDS["transformer"], jnp.ones((1, 7), jnp.int32),
        16 * D  # token_embed
        + 12 * D  # pos_embed (max_len 12)
        + 2 * BLOCK  # two blocks
        + 2 * D  # final LayerNorm
        + D * 16 + 16,  # lm_head over the 16-token vocabulary
        id="transformer-decoder",
    ),
    pytest.param(
        "transformer", dict(SMALL_FIELDS["transformer"], scan_layers=True),
        jnp.ones((1, 7), jnp.int32),
        16 * D + 12 * D + 2 * BLOCK + 2 * D + D * 16 + 16,  # as unrolled: the same parameters
        id="transformer-decoder-scanned",
    ),
    pytest.param(
        "transformer", ENCODER_FIELDS,
        jnp.ones((1, 7), jnp.int32),
        16 * D + 12 * D + 2 * BLOCK + 2 * D  # as the decoder, without the LM head
        + D * 3 + 3,  # classifier
        id="transformer-encoder",
    ),
    pytest.param(
        "transformer",  # the model of configs/transformer.py:small
        dict(vocab_size=65, num_layers=4, num_heads=4, width=128, mlp_dim=512, max_len=64),
        jnp.ones((1, 64), jnp.int32),
        65 * 128 + 64 * 128  # token_embed 8320, pos_embed 8192
        + 4 * (
            2 * 128 + 128 * 384 + 384  # attention LayerNorm, qkv = 49792
            + 128 * 128 + 128  # out = 16512
            + 2 * 128 + 128 * 512 + 512 + 512 * 128 + 128  # MLP LayerNorm, in, out = 131968
        )  # 198272 a block
        + 2 * 128 + 128 * 65 + 65,  # final LayerNorm, lm_head = 8641; total 818241
        id="transformer-small-config",
    ),
]  # fmt: skip


@pytest.mark.parametrize("name, fields, x, expected", PARAM_COUNTS)
def test_param_count(name, fields, x, expected):
    assert count_params(build_model(name, **fields), x) == expected


@pytest.mark.parametrize(
    "name, fields, x, expected",
    [
        ("lstm", dict(SMALL_FIELDS["lstm"], num_outputs=20, per_step=True), (2, 7), (2, 7, 20)),
        ("lstm", FEATURE_LSTM_FIELDS, (2, 5, 3), (2, 4)),
        ("lstm", dict(FEATURE_LSTM_FIELDS, per_step=True), (2, 5, 3), (2, 5, 4)),
        ("transformer", ENCODER_FIELDS, (2, 7), (2, 3)),
    ],
    ids=["lstm-lm", "lstm-features-classifier", "lstm-features-per-step", "transformer-encoder"],
)
def test_variant_output_shapes(name, fields, x, expected):
    # Token inputs when the model has a vocabulary, else float features; shapes only, no compile.
    x = jnp.ones(x, jnp.int32 if "vocab_size" in fields else jnp.float32)
    model = build_model(name, **fields)
    logits = jax.eval_shape(lambda: model.init_with_output(key(0), x, train=False)[0])
    assert (logits.shape, logits.dtype) == (expected, jnp.float32)


def test_lstm_tokens_need_embed_dim():
    model = build_model("lstm", num_layers=1, hidden_size=4, num_outputs=2, vocab_size=10)
    with pytest.raises(ValueError, match="embed_dim"):
        jax.eval_shape(lambda: model.init(key(0), jnp.ones((1, 3), jnp.int32), train=False))


@pytest.mark.parametrize(
    "fields",
    [dict(scan_layers=True), dict(scan_layers=False), dict(implementation="cpu")],
    ids=["scan", "unrolled", "cpu-chunked"],
)
def test_transformer_decoder_is_causal(fields, small):
    model = small("transformer", **fields)
    tokens = example_input("transformer")  # [2, 7]
    logits = model.apply(model.variables, tokens, train=False)  # [2, 7, 16]

    t = 3
    shifted = tokens % 15 + 1  # a different id in [1, 16) at every position
    later_changed = tokens.at[:, t + 1 :].set(shifted[:, t + 1 :])
    changed_logits = model.apply(model.variables, later_changed, train=False)
    # Masked positions get exactly zero attention weight, so earlier positions are bit-identical.
    np.testing.assert_array_equal(changed_logits[:, : t + 1], logits[:, : t + 1])
    assert not np.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])

    # Changing token t itself must change the prediction at t (else the check above proves nothing).
    token_changed = tokens.at[:, t].set(shifted[:, t])
    new_logits = model.apply(model.variables, token_changed, train=False)
    np.testing.assert_array_equal(new_logits[:, :t], logits[:, :t])
    assert (np.abs(new_logits[:, t] - logits[:, t]).max(axis=-1) > 1e-4).all()


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_transformer_encoder_ignores_padding(scan_layers, small):
    encoder = small("transformer", causal=False, num_classes=3, scan_layers=scan_layers)
    variables, apply = encoder.variables, encoder.apply
    tokens = jnp.array([[5, 3, 9, 2, 7, 0, 0], [4, 4, 1, 0, 0, 0, 0]])  # lengths 5 and 3
    logits = apply(variables, tokens, train=False)  # [2, 3]
    assert logits.shape == (2, 3)
    more_padding = jnp.pad(tokens, ((0, 0), (0, 5)))  # [2, 12]
    np.testing.assert_allclose(apply(variables, more_padding, train=False), logits, atol=1e-5)
    # A real token does count.
    assert not np.allclose(apply(variables, tokens.at[1, 2].set(8), train=False)[1], logits[1])


def test_transformer_rejects_bad_inputs_and_modes():
    fields = SMALL_FIELDS["transformer"]
    with pytest.raises(ValueError, match="exceeds max_len=12"):
        Transformer(**fields).init(key(0), jnp.ones((1, 13), jnp.int32), train=False)
    for bad_mode in (dict(causal=False), dict(causal=True, num_classes=3)):
        with pytest.raises(ValueError, match="num_classes"):
            Transformer(**fields, **bad_mode).init(key(0), jnp.ones((1, 4), jnp.int32), train=False)


@pytest.mark.parametrize(
    "mode", [{}, dict(causal=False, num_classes=3)], ids=["decoder", "encoder"]
)
def test_transformer_scan_matches_unrolled(mode, small):
    scanned = small("transformer", **mode, scan_layers=True)
    unrolled = small("transformer", **mode)  # scan_layers=False is the default
    params = nn.unbox(unrolled.variables["params"])  # plain arrays, as a train state holds them
    stacked = stack_blocks(params, num_layers=2)
    # The stacked unrolled parameters are exactly the scanned model's layout.
    scanned_params = nn.unbox(scanned.variables["params"])
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned_params)
    assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (2, D, 3 * D)  # [layers, in, out]

    tokens = jnp.array([[5, 3, 9, 2, 7, 0, 0], [4, 4, 1, 0, 0, 0, 0]])  # padding for the encoder
    np.testing.assert_allclose(
        scanned.apply({"params": stacked}, tokens, train=False),
        unrolled.apply({"params": params}, tokens, train=False),
        rtol=1e-5,
        atol=1e-5,
    )


def test_transformer_remat_gives_same_outputs_and_grads(small):
    # The scanned layout only: each gradient compile costs about a second on CPU, and the unrolled
    # layout wraps the same function in nn.remat. Dropout is on, so the check covers the recomputed
    # blocks drawing the same dropout masks as the forward pass.
    base = small("transformer", scan_layers=True).model.clone(dropout_rate=0.5)
    params = small("transformer", scan_layers=True).variables["params"]
    tokens = example_input("transformer")

    def outputs_and_grads(model: nn.Module):
        def loss(params):
            logits = model.apply({"params": params}, tokens, train=True, rngs={"dropout": key(1)})
            return logits.sum(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return logits, grads

    logits, grads = outputs_and_grads(base)
    remat_logits, remat_grads = outputs_and_grads(base.clone(remat=True))
    np.testing.assert_allclose(remat_logits, logits, rtol=1e-6, atol=1e-6)
    # Gradients of a sum of logits reach hundreds; remat changes XLA's order of float32 sums
    # (1.5e-5 apart seen with JAX 0.7), while another dropout mask would differ by whole units.
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-4), remat_grads, grads)


def test_transformer_scan_traces_one_block_whatever_the_depth():
    tokens = jnp.ones((2, 7), jnp.int32)

    def num_equations(num_layers: int, scan_layers: bool) -> int:
        fields = dict(SMALL_FIELDS["transformer"], num_layers=num_layers, scan_layers=scan_layers)
        model = build_model("transformer", **fields)
        variables = jax.eval_shape(lambda: model.init(key(0), tokens, train=False))
        jaxpr = jax.make_jaxpr(partial(model.apply, train=False))(variables, tokens).jaxpr
        return sum(1 for _ in all_equations(jaxpr))

    assert num_equations(2, scan_layers=True) == num_equations(6, scan_layers=True)
    assert num_equations(6, scan_layers=False) > 2 * num_equations(2, scan_layers=False)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_computation(name, small):
    base = small(name)
    model = base.model.clone(dtype="bfloat16")
    x = example_input(name)
    params = base.variables["params"]

    # The same float32 parameters: same tree, shapes (so the same count) and dtype as float32.
    shapes = jax.eval_shape(lambda: model.init(key(0), *as_args(x), train=False))["params"]
    assert jax.tree.map(lambda p: (p.shape, p.dtype), shapes) == jax.tree.map(
        lambda p: (p.shape, jnp.dtype(jnp.float32)), params
    )

    # float32 logits, close to the float32 model's (bfloat16 keeps about 3 significant digits).
    logits = apply_fn(model)(base.variables, x, train=False)
    expected = base.apply(base.variables, x, train=False)
    assert logits.dtype == jnp.float32
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=5e-2 * scale)
    assert not np.array_equal(logits, expected)  # it did compute in a lower precision

    # Every matmul and conv runs on bfloat16 operands, in the backward pass too (only traced),
    # but for the gradient of attention's scores: jax.nn.dot_product_attention keeps the scores
    # in float32, so their gradient reaches q and k in float32.
    def loss(params):
        return model.apply({"params": params}, *as_args(x), train=False).sum()

    def operand_dtypes(function) -> set[str]:
        jaxpr = jax.make_jaxpr(function)(params).jaxpr
        return {
            str(var.aval.dtype)
            for eqn in all_equations(jaxpr)
            if eqn.primitive.name in ("dot_general", "conv_general_dilated")
            for var in eqn.invars
        }

    assert operand_dtypes(loss) == {"bfloat16"}
    if name not in ("transformer", "seq2seq"):  # both attend with dot_product_attention
        assert operand_dtypes(jax.grad(loss)) == {"bfloat16"}


def test_lstm_cell_state_stays_float32():
    cell = LSTMCell(hidden_size=H, dtype="bfloat16")
    carry = (jnp.zeros((3, H)), jnp.zeros((3, H), jnp.bfloat16))  # (c, h)
    (c, h), h_out = jax.eval_shape(
        lambda: cell.init_with_output(key(0), carry, jnp.zeros((3, 5)))[0]
    )
    assert (c.dtype, h.dtype, h_out.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    assert c.shape == h.shape == (3, H)


def test_lstm_layer_matches_cell_loop():
    x = random_normal(1, (3, 6, 5))  # [batch, seq_len, features]
    layer = LSTMLayer(hidden_size=H, implementation="standard")
    params = jax.jit(layer.init)(key(0), x)["params"]
    assert {k: v.shape for k, v in params.items()} == {
        "input_kernel": (5, 4 * H),
        "recurrent_kernel": (H, 4 * H),
        "bias": (4 * H,),
    }
    # Non-zero bias so the check covers where the bias is added.
    params = dict(params, bias=random_normal(2, (4 * H,)))
    outputs = jax.jit(layer.apply)({"params": params}, x)  # [3, 6, H]

    cell = LSTMCell(hidden_size=H)
    carry = (jnp.zeros((3, H)), jnp.zeros((3, H)))
    expected = []
    for t in range(x.shape[1]):
        carry, h = cell.apply({"params": params}, carry, x[:, t])
        expected.append(h)
    np.testing.assert_allclose(outputs, jnp.stack(expected, axis=1), atol=1e-5)


def test_lstm_classifier_uses_only_valid_tokens(small):
    model = small("lstm")
    tokens = jnp.array([[5, 3, 9, 2, 7, 0, 0], [4, 4, 1, 0, 0, 0, 0]])  # lengths 5 and 3
    logits = model.apply(model.variables, tokens, train=False)
    more_padding = jnp.pad(tokens, ((0, 0), (0, 4)))  # [2, 11]
    np.testing.assert_allclose(
        model.apply(model.variables, more_padding, train=False), logits, atol=1e-5
    )
    # The last valid token does count.
    new_logits = model.apply(model.variables, tokens.at[1, 2].set(8), train=False)
    assert not np.allclose(new_logits[1], logits[1])


@pytest.mark.parametrize("implementation", ["standard", "cpu"])
def test_bidirectional_lstm_reads_each_sentence_both_ways_and_ignores_padding(implementation):
    model = build_model("lstm", **dict(SMALL_FIELDS["lstm"], bidirectional=True,
                                       implementation=implementation))  # fmt: skip
    tokens = jnp.array([[5, 3, 9, 2, 7, 0, 0], [4, 4, 1, 0, 0, 0, 0]])  # lengths 5 and 3
    variables = model.init(key(0), tokens, train=False)
    logits = model.apply(variables, tokens, train=False)  # [2, 3]
    more_padding = jnp.pad(tokens, ((0, 0), (0, 4)))  # [2, 11]
    np.testing.assert_allclose(model.apply(variables, more_padding, train=False), logits, atol=1e-5)
    # The backward direction alone: a change to the first token still moves the pooled
    # backward half, and a reversed sentence swaps the two halves' inputs.
    backward = variables["params"]["lstm_0_backward"]
    assert backward["input_kernel"].shape == (6, 4 * 8)
    for t in (0, 2):  # the first and the last valid token of the second sentence both count
        changed = model.apply(variables, tokens.at[1, t].set(8), train=False)
        assert not np.allclose(changed[1], logits[1]), t
    np.testing.assert_allclose(changed[0], logits[0], atol=1e-6)  # the other sentence is alone


@pytest.mark.parametrize(
    "name,fields", [("lstm", SMALL_FIELDS["lstm"]), ("transformer", ENCODER_FIELDS)]
)
def test_word_dropout_replaces_only_real_tokens_by_unk_in_training(name, fields):
    tokens = jnp.array([[5, 3, 9, 2, 7, 0, 0], [4, 4, 6, 0, 0, 0, 0]])
    plain = build_model(name, **fields)
    variables = plain.init(key(0), tokens, train=False)  # word dropout adds no parameters

    def logits(rate, x, train, seed=3):
        model = build_model(name, **dict(fields, word_dropout_rate=rate))
        return model.apply(variables, x, train=train, rngs={"dropout": key(seed)})

    # Evaluation is untouched.
    np.testing.assert_array_equal(
        logits(0.5, tokens, False), plain.apply(variables, tokens, train=False)
    )
    # At rate 1 every real token is <unk> (1) and the padding stays padding.
    all_unk = jnp.where(tokens != 0, 1, 0)
    np.testing.assert_allclose(
        logits(1.0, tokens, True), plain.apply(variables, all_unk, train=False), atol=1e-6
    )
    # At rate 0.5 the result is neither, and it changes with the dropout key.
    half = logits(0.5, tokens, True)
    assert not np.allclose(half, plain.apply(variables, tokens, train=False))
    assert not np.allclose(half, plain.apply(variables, all_unk, train=False))
    assert not np.allclose(half, logits(0.5, tokens, True, seed=4))


def test_lstm_under_pmap_and_grad(small):
    model = small("lstm")
    tokens = random_tokens(1, (4, 2, 7), vocab_size=20)  # [devices, batch, seq_len]
    tokens = tokens.at[:, :, 5:].set(0)  # some padding
    pmapped = jax.pmap(lambda v, x: model.model.apply(v, x, train=False), in_axes=(None, 0))
    outputs = pmapped(model.variables, tokens)  # [devices, batch, num_outputs]
    for device_tokens, device_outputs in zip(tokens, outputs, strict=True):
        expected = model.apply(model.variables, device_tokens, train=False)
        np.testing.assert_allclose(device_outputs, expected, atol=1e-6)

    def loss(params):
        return model.model.apply({"params": params}, tokens[0], train=False).sum()

    grads = jax.jit(jax.grad(loss))(model.variables["params"])
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(grad)).all() and np.abs(grad).max() > 0, path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dropout(name, small):
    base = small(name)
    model = base.model.clone(dropout_rate=0.5)  # same parameters as the base model
    apply = apply_fn(model)
    x = example_input(name)
    first = apply(base.variables, x, train=True, rngs={"dropout": key(1)})
    second = apply(base.variables, x, train=True, rngs={"dropout": key(2)})
    assert not np.allclose(first, second)
    # Evaluation needs no rng and is deterministic: it matches the model without dropout.
    np.testing.assert_array_equal(
        apply(base.variables, x, train=False), base.apply(base.variables, x, train=False)
    )


def test_lstm_embedding_dropout(small):
    name = "lstm"
    base = small(name)
    model = base.model.clone(embedding_dropout_rate=0.5)  # same parameters as the base model
    x = example_input(name)
    first = model.apply(base.variables, x, train=True, rngs={"dropout": key(1)})
    second = model.apply(base.variables, x, train=True, rngs={"dropout": key(2)})
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(
        model.apply(base.variables, x, train=False), base.apply(base.variables, x, train=False)
    )


def test_build_model_unknown_name():
    with pytest.raises(KeyError, match=r"Unknown model 'nope'\. Known: \['cnn', 'lstm', 'mlp'"):
        build_model("nope")


def test_build_model_unknown_field():
    with pytest.raises(TypeError) as info:
        build_model("mlp", hidden_sizes=(4,), num_classes=2, num_layer=3)
    message = str(info.value)
    assert "\n" not in message
    assert "'mlp'" in message and "['num_layer']" in message
    assert "['dropout_rate', 'dtype', 'hidden_sizes', 'num_classes']" in message


def test_build_model_returns_configured_module():
    model = build_model("cnn", num_classes=7)
    assert isinstance(model, MODELS["cnn"]) and model.num_classes == 7


@pytest.mark.parametrize("pooling", ["last", "max", "mean"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_pooling_reduces_the_last_layer_over_valid_steps_only(pooling, bidirectional):
    fields = dict(SMALL_FIELDS["lstm"], head_sizes=(), pooling=pooling, bidirectional=bidirectional)
    model = build_model("lstm", **fields)
    tokens = jnp.array([[5, 3, 9, 2, 7, 0, 0], [4, 4, 6, 0, 0, 0, 0]])  # lengths 5 and 3
    variables = model.init(key(0), tokens, train=False)
    logits, state = model.apply(
        variables, tokens, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    layers = state["intermediates"]
    h = layers["lstm_1"]["__call__"][0]  # [2, 7, 8]: the last layer's outputs
    if bidirectional:
        back = layers["lstm_1_backward"]["__call__"][0]  # on each sentence reversed in length
        back = jnp.stack(
            [jnp.concatenate([b[:n][::-1], b[n:]]) for b, n in zip(back, (5, 3), strict=True)]
        )
        h = jnp.concatenate([h, back], axis=-1)  # [2, 7, 16]
    pooled = []
    for h_i, n in zip(np.asarray(h), (5, 3), strict=True):
        valid = h_i[:n]  # the steps of real tokens
        if pooling == "max":
            pooled.append(valid.max(axis=0))
        elif pooling == "mean":
            pooled.append(valid.mean(axis=0))
        elif bidirectional:  # forward at the last token, backward at the first
            pooled.append(np.concatenate([valid[-1, :8], valid[0, 8:]]))
        else:
            pooled.append(valid[-1])
    dense = variables["params"]["logits"]
    expected = np.stack(pooled) @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    # Padding never enters: outputs at padded steps are not zero, so a pool over them would move.
    assert np.abs(np.asarray(h)[1, 3:]).min() > 0
    more_padding = jnp.pad(tokens, ((0, 0), (0, 4)))
    np.testing.assert_allclose(model.apply(variables, more_padding, train=False), logits, atol=1e-6)


def test_lstm_pooling_name_is_checked():
    model = build_model("lstm", **dict(SMALL_FIELDS["lstm"], pooling="attention"))
    with pytest.raises(ValueError, match="Unknown LSTM pooling 'attention'; use last, max or mean"):
        model.init(key(0), jnp.ones((1, 4), jnp.int32), train=False)


def test_word_dropout_is_refused_for_the_decoder_lm():
    model = build_model("transformer", **dict(SMALL_FIELDS["transformer"], word_dropout_rate=0.1))
    with pytest.raises(ValueError, match="word_dropout_rate is for the encoder classifier"):
        model.init(key(0), jnp.ones((1, 4), jnp.int32), train=False)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_encoder_pooling_reduces_the_final_outputs_over_real_tokens_only(pooling):
    model = build_model("transformer", **dict(ENCODER_FIELDS, pooling=pooling))
    tokens = jnp.array([[5, 3, 9, 2, 7, 0, 0], [4, 4, 6, 0, 0, 0, 0]])  # lengths 5 and 3
    variables = model.init(key(0), tokens, train=False)
    logits, state = model.apply(
        variables, tokens, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    x = np.asarray(state["intermediates"]["final_norm"]["__call__"][0])  # [2, 7, 8]
    reduce = np.max if pooling == "max" else np.mean
    pooled = np.stack([reduce(x_i[:n], axis=0) for x_i, n in zip(x, (5, 3), strict=True)])
    dense = variables["params"]["classifier"]
    expected = pooled @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(reduce(x[1], axis=0), pooled[1])  # padding would have moved it


def test_encoder_pooling_name_is_checked():
    model = build_model("transformer", **dict(ENCODER_FIELDS, pooling="cls"))
    with pytest.raises(ValueError, match="Unknown Transformer pooling 'cls'; use mean or max"):
        model.init(key(0), jnp.ones((1, 4), jnp.int32), train=False)
