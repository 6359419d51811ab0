"""Sampling: exact tokens from a hand-built model, sliding window included; top-k and top-p by
hand; the key/value cache against the window re-run on a real Transformer."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import Transformer
from train import loop, sample
from train.config import load_config
from train.sample import filter_logits, next_token, sample_tokens, sample_tokens_cached

REPO = pathlib.Path(__file__).resolve().parents[1]

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


# --- Filters, and the key/value cache against the window ------------------------------------------

PROBS = np.array([0.5, 0.3, 0.15, 0.05], np.float32)


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [(0, 1.0, 4), (2, 1.0, 2), (0, 0.75, 2), (0, 0.85, 3), (3, 0.75, 2), (0, 0.4, 1), (9, 1.0, 4)],
)
def test_filters_keep_the_most_likely_tokens_and_renormalise(top_k, top_p, kept):
    # Top-p keeps tokens while the mass of the more likely ones is below p: 0 and 0.5 < 0.75, but
    # 0.8 is not; below 0.85 as well, 0.95 not. top_k larger than the vocabulary keeps all.
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (2, 1))))  # [2, 4]
    filtered = np.asarray(filter_logits(logits, top_k=top_k, top_p=top_p))
    assert np.isneginf(filtered[:, kept:]).all() and np.isfinite(filtered[:, :kept]).all()
    expected = PROBS[:kept] / PROBS[:kept].sum()
    np.testing.assert_allclose(jax.nn.softmax(filtered, axis=-1)[:, :kept], [expected] * 2, 1e-6)


def test_draws_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray(np.tile(PROBS, (20_000, 1))))
    draws = next_token(logits, jax.random.key(0), temperature=1.0, top_k=3, top_p=0.85)
    frequencies = np.bincount(np.asarray(draws), minlength=4) / len(draws)
    np.testing.assert_allclose(frequencies, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.01)


LM_FIELDS = dict(vocab_size=VOCAB + 9, num_layers=2, num_heads=2, width=16, mlp_dim=32, max_len=12)


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def lm(request):
    """(apply, params) of a small Transformer decoder LM with spread-out random weights."""
    model = Transformer(**LM_FIELDS, scan_layers=request.param, implementation="standard")
    params = model.init(jax.random.key(0), jnp.ones((1, 12), jnp.int32), train=False)["params"]
    # Larger weights spread the logits, so that no greedy choice is a near-tie that round-off
    # between the cached and the full computation could flip.
    return model.apply, jax.tree.map(lambda p: 4.0 * p, params)


PROMPT = jnp.array([[3, 7, 1], [5, 5, 2]], jnp.int32)


def draw_both(apply, params, **settings):
    window = jax.jit(lambda p, x, r: sample_tokens(apply, p, x, r, **settings))
    cached = jax.jit(lambda p, x, r: sample_tokens_cached(apply, p, x, r, **settings))
    rng = jax.random.key(7)
    return np.asarray(window(params, PROMPT, rng)), np.asarray(cached(params, PROMPT, rng))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_cached_sampling_draws_what_the_window_draws(lm, temperature):
    # Prompt and samples fit in the context: the same logits and the same random numbers.
    window, cached = draw_both(*lm, length=9, context=12, temperature=temperature)
    np.testing.assert_array_equal(cached, window)
    np.testing.assert_array_equal(cached[:, :3], PROMPT)
    assert len(np.unique(cached[:, 3:])) > 3


def test_top_k_of_1_is_greedy(lm):
    greedy = draw_both(*lm, length=9, context=12, temperature=0.0)
    top_1 = draw_both(*lm, length=9, context=12, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top_1[0], greedy[0])  # the window
    np.testing.assert_array_equal(top_1[1], greedy[1])  # the cache


def test_cache_past_the_context_starts_over_from_its_last_half(lm):
    apply, params = lm
    context, length = 6, 15
    tokens = np.asarray(
        jax.jit(
            lambda p: sample_tokens_cached(
                apply, p, PROMPT, jax.random.key(0), length=length, context=context, temperature=0
            )
        )(params)
    )
    # By hand: the cache holds tokens [start, p) when token p is drawn; once it holds `context`
    # tokens, the next feed starts over from the last context // 2 = 3 tokens.
    full = jax.jit(lambda p, x: apply({"params": p}, x, train=False))
    expected = np.asarray(PROMPT).tolist()
    start = 0
    for position in range(3, 3 + length):
        window = jnp.asarray([row[start:position] for row in expected])
        next_tokens = np.argmax(full(params, window)[:, -1], axis=-1)
        for row, token in zip(expected, next_tokens, strict=True):
            row.append(int(token))
        if position - start == context:  # full: the feed of this token starts over
            start = position + 1 - context // 2
    np.testing.assert_array_equal(tokens, expected)
    assert start > 6  # it did start over, twice


# --- python -m train.sample -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A workdir of the tiny Transformer LM (tiny_shakespeare), trained for a few steps."""
    workdir = tmp_path_factory.mktemp("lm")
    config = load_config(REPO / "configs" / "transformer.py:tiny")
    config.train.num_steps = config.train.checkpoint_every = config.train.eval_every = 4
    config.train.log_every, config.train.sample_lines = 4, 0
    loop.train_and_evaluate(config, workdir)
    return workdir


def sample_cli(*arguments):
    return subprocess.run(
        [sys.executable, "-m", "train.sample", *arguments],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_sample_command_continues_the_prompt(lm_run, capsys):
    result = sample_cli(
        f"--workdir={lm_run}", "--prompt=ROMEO:", "--length=40", "--temperature=0.8",
        "--top_k=40", "--top_p=0.95", "--num_samples=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Two samples of 6 + 40 characters (newlines among them), a blank line between them.
    out = result.stdout
    assert len(out) == 46 + 2 + 46 + 1 and out[46:48] == "\n\n" and out[-1] == "\n"
    assert out.startswith("ROMEO:") and out[48:].startswith("ROMEO:")
    (timing,) = [line for line in result.stderr.splitlines() if "tokens/s" in line]
    assert "Checkpoint step 4: 2 x 40 tokens" in timing and "key/value cache" in timing

    # Greedy, in this process: the window re-run gives the same text (all fits in its context).
    outputs = []
    for flags in ([], ["--no_cache"]):
        sample.main(
            [f"--workdir={lm_run}", "--prompt=ROMEO:", "--length=40", "--temperature=0", *flags]
        )
        outputs.append(capsys.readouterr())
    assert outputs[0].out == outputs[1].out and outputs[0].out.startswith("ROMEO:")
    assert "re-running the window" in outputs[1].err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--prompt=ROMEO:"], "config.json does not exist; pass the --workdir of a run"),
        (["--top_p=0"], "top_p=0.0 must be in (0, 1]"),
        (["--temperature=-1"], "temperature=-1.0 must be >= 0"),
        (["--prompt=ROMEO\u00e9"], "are not in the 65-char vocabulary"),
        (["--length=zero"], "argument --length: invalid int value: 'zero'"),
    ],
    ids=["no-run", "top-p", "temperature", "prompt", "length"],
)
def test_sample_command_bad_input_is_one_line(lm_run, tmp_path, capsys, arguments, message):
    workdir = tmp_path if "config.json" in message else lm_run
    with pytest.raises(SystemExit) as exit_status:
        sample.main([f"--workdir={workdir}", *arguments])
    assert exit_status.value.code == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and message in err, err
    assert out == ""
