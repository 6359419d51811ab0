"""The encoder-decoder: its parameters counted by hand, a causal decoder and an encoder that sees
the whole source, decoding with and without the cache, the generated addition data, greedy
evaluation metrics computed by hand, and the tiny config on the command line, stopped and
resumed bitwise."""

import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import Seq2Seq, build_model
from train import loop, metrics, sample, steps, tasks, translation
from train.config import load_config
from train.metrics import read_metrics
from train.sample import translate
from train.state import TrainState

REPO = pathlib.Path(__file__).resolve().parents[1]
D, MLP, VOCAB, MAX_LEN = 8, 16, 16, 10  # width, mlp_dim, vocabulary, max_len of the small model
FIELDS = dict(vocab_size=VOCAB, num_layers=2, num_heads=2, width=D, mlp_dim=MLP, max_len=MAX_LEN)
SOURCE = np.array([[5, 3, 9, 2, 7, 0], [4, 4, 11, 0, 0, 0]], np.int32)  # lengths 5 and 3
TARGET = np.array([[1, 6, 8, 3, 12], [1, 9, 9, 14, 2]], np.int32)  # decoder inputs, BOS first


@pytest.fixture(scope="module")
def small():
    """(model, params, jitted apply) of the small Seq2Seq, float32, plain init."""
    model = Seq2Seq(**FIELDS)
    params = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), SOURCE, TARGET, train=False
    )["params"]
    # Larger weights than the init's spread the logits, so that no greedy choice below is a
    # near-tie that round-off could flip.
    params = jax.tree.map(lambda p: p * 4.0, params)
    return model, params, jax.jit(model.apply, static_argnames=("train", "method"))


def test_param_count_by_hand():
    dense = lambda inputs, outputs: inputs * outputs + outputs  # noqa: E731
    norm = 2 * D  # LayerNorm scale and bias
    mlp = dense(D, MLP) + dense(MLP, D)
    encoder_block = norm + dense(D, 3 * D) + dense(D, D) + norm + mlp  # = 600
    decoder_block = (
        norm + dense(D, 3 * D) + dense(D, D)  # causal self-attention: fused qkv, out
        + norm + dense(D, D) + dense(D, 2 * D) + dense(D, D)  # cross: query, key_value, out
        + norm + mlp
    )  # fmt: skip  # = 904
    expected = (
        VOCAB * D  # token_embed, shared by source and target
        + MAX_LEN * D + 2 * encoder_block + norm  # encoder positions, blocks, final norm
        + MAX_LEN * D + 2 * decoder_block + norm  # decoder positions, blocks, final norm
        + dense(D, VOCAB)  # lm_head
    )  # fmt: skip
    assert (encoder_block, decoder_block, expected) == (600, 904, 3472)
    model = build_model("seq2seq", **FIELDS)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), SOURCE, TARGET, train=False))
    params = shapes["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == expected
    assert params["decoder_blocks_1"]["cross_attn"]["key_value"]["kernel"].shape == (D, 2 * D)
    assert params["encoder_positions"]["embedding"].shape == (MAX_LEN, D)


def test_decoder_is_causal(small):
    model, params, apply = small
    logits = apply({"params": params}, SOURCE, TARGET, train=False)  # [2, 5, 16]
    assert logits.shape == (2, 5, VOCAB) and logits.dtype == jnp.float32
    t = 2
    later_changed = TARGET.copy()
    later_changed[:, t + 1 :] = TARGET[:, t + 1 :] % 13 + 3  # other ids after position t
    changed = apply({"params": params}, SOURCE, later_changed, train=False)
    # Masked positions get exactly zero attention weight: earlier positions are bit-identical.
    np.testing.assert_array_equal(changed[:, : t + 1], logits[:, : t + 1])
    assert (np.abs(changed[:, t + 1 :] - logits[:, t + 1 :]).max(axis=-1) > 1e-3).all()


def test_encoder_sees_the_whole_source_and_ignores_padding(small):
    model, params, apply = small
    encoded = apply({"params": params}, SOURCE, train=False, method="encode")  # [2, 6, D]
    logits = apply({"params": params}, SOURCE, TARGET, train=False)
    # The last real source token changes the encoding of the first source position (not causal)
    # and the logits of the first target position.
    last_changed = SOURCE.copy()
    last_changed[0, 4], last_changed[1, 2] = 8, 6
    changed = apply({"params": params}, last_changed, train=False, method="encode")
    assert (np.abs(changed[:, 0] - encoded[:, 0]).max(axis=-1) > 1e-3).all()
    changed_logits = apply({"params": params}, last_changed, TARGET, train=False)
    assert (np.abs(changed_logits[:, 0] - logits[:, 0]).max(axis=-1) > 1e-3).all()
    # More padding (id 0) after the source changes nothing.
    padded = np.pad(SOURCE, ((0, 0), (0, 3)))
    np.testing.assert_allclose(
        apply({"params": params}, padded, TARGET, train=False), logits, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_cached_and_uncached_decoding_give_the_same_tokens(small, temperature):
    model, params, _ = small
    settings = dict(length=MAX_LEN, bos_id=1, eos_id=2, temperature=temperature)
    rng = jax.random.key(3)
    sources = np.concatenate([SOURCE, SOURCE[:, ::-1]])  # 4 rows, some padding first
    cached = jax.jit(lambda p, x, r: translate(model.apply, p, x, r, **settings))(
        params, sources, rng
    )
    uncached = jax.jit(lambda p, x, r: translate(model.apply, p, x, r, cache=False, **settings))(
        params, sources, rng
    )
    np.testing.assert_array_equal(cached, uncached)
    assert cached.shape == (4, MAX_LEN) and len(np.unique(np.asarray(cached))) > 3


def copy_source_model(variables, *args, train, method=None, decode=False, mutable=False):
    """A hand-built encoder-decoder's `apply` that translates a source into itself and EOS (2).

    `encode` returns the source ids. Decoder position t predicts source token t, or EOS where
    the source has ended, whatever the decoder reads; with `decode=True` the positions are
    counted in a cache, as the real model counts them.
    """
    del train
    if method == "encode":
        return args[0]
    encoded, decoder_inputs = (args[0], args[1]) if method is None else (args[0], args[2])
    batch, length = decoder_inputs.shape
    start = variables.get("cache", {}).get("position", 0) if decode else 0
    positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
    source = jnp.take_along_axis(jnp.pad(encoded, ((0, 0), (0, 16))), positions, axis=1)
    logits = 10.0 * jax.nn.one_hot(jnp.where(source == 0, 2, source), VOCAB)
    if decode:
        return logits, {"cache": {"position": jnp.asarray(start + length, jnp.int32)}}
    return logits


@pytest.mark.parametrize("cache", [True, False])
def test_translation_stops_at_eos_and_pads_after_it(cache):
    sources = np.array([[5, 3, 9, 4, 7, 0], [4, 4, 11, 0, 0, 0], [0] * 6], np.int32)
    out = translate(copy_source_model, {}, sources, length=8, bos_id=1, eos_id=2, cache=cache)
    expected = [[5, 3, 9, 4, 7, 2, 0, 0], [4, 4, 11, 2, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(out, expected)


def test_eval_step_scores_greedy_decoding_by_hand():
    # Rows: right; one token wrong; EOS too early; the padding row of a last eval batch.
    batch = {
        "inputs": np.array([[5, 3, 0], [4, 4, 0], [6, 0, 0], [0, 0, 0]], np.int32),
        "decoder_inputs": np.array([[1, 5, 3, 0], [1, 4, 5, 0], [1, 6, 7, 0], [0] * 4], np.int32),
        "targets": np.array([[5, 3, 2, 0], [4, 5, 2, 0], [6, 7, 2, 0], [0] * 4], np.int32),
        "weights": np.array([[1, 1, 1, 0]] * 3 + [[0] * 4], np.float32),
    }
    state = TrainState(
        step=0,
        apply_fn=copy_source_model,
        params={},
        tx=None,
        opt_state=None,
        task=tasks.TASKS["seq2seq"],
    )
    sums = jax.device_get(steps.eval_step(state, batch))
    # Teacher forcing: 3 + 2 + 2 right (row 3 predicts EOS at its last target position, since
    # its source has ended); greedy decoding: 3 + 2 + 1 (row 3 ended with EOS at position 1, so
    # 0 follows). Whole sequences right: row 1 of the 3 real rows.
    assert {k: float(v) for k, v in sums.items() if k != "loss_sum"} == {
        "correct_sum": 7.0,
        "count": 9.0,
        "greedy_correct_sum": 6.0,
        "sequence_correct_sum": 1.0,
        "sequence_count": 3.0,
    }
    scalars = metrics.summarize(sums, "eval", tasks.TASKS["seq2seq"].eval_averages)
    assert scalars["eval/accuracy"] == pytest.approx(7 / 9)
    assert scalars["eval/greedy_token_accuracy"] == pytest.approx(6 / 9)
    assert scalars["eval/sequence_accuracy"] == pytest.approx(1 / 3)


def test_addition_data_is_exact_and_held_out_problems_are_never_trained_on():
    info = translation.load_info("addition")
    assert info.vocab_size == 14
    np.testing.assert_array_equal(info.encode("12+9"), [4, 5, 13, 12])
    assert info.decode([4, 5, 13, 12, 2, 7, 0]) == "12+9"  # up to EOS
    examples = translation.split_examples("addition", "", "train[:3]", 8, training=True)
    for row in range(3):
        source = info.decode(examples["inputs"][row])
        a, b = map(int, source.split("+"))
        target = examples["targets"][row]
        length = len(str(a + b))
        assert info.decode(target) == str(a + b) and target[length] == translation.EOS_ID
        np.testing.assert_array_equal(examples["weights"][row], np.arange(8) <= length)
        decoder_inputs = examples["decoder_inputs"][row]  # BOS, the target, then padding
        np.testing.assert_array_equal(decoder_inputs[: length + 1], [1, *target[:length]])
        assert not decoder_inputs[length + 1 :].any()

    splits = {
        name: translation._addition_problems(name) for name in ("train", "validation", "test")
    }
    assert {name: len(problems) for name, problems in splits.items()} == {
        "train": 100_000,
        "validation": 1_000,
        "test": 1_000,
    }
    train, validation, test = (
        set(splits[name].tolist()) for name in ("train", "validation", "test")
    )
    assert not train & validation and not train & test and not validation & test
    # 5 of the 9 pairs of operand lengths hold a 1-digit operand: 25,000 problems, and about 2% of
    # the 55,000 drawn uniformly. 1.2% of the validation problems have one.
    a, b = np.divmod(splits["train"], 1000)
    assert 0.26 <= np.mean((a < 10) | (b < 10)) <= 0.262
    with pytest.raises(ValueError, match="data.seq_len=6 is too short for addition"):
        translation.split_examples("addition", "", "train[:1000]", 6, training=True)
    with pytest.raises(ValueError, match="Split 'dev' of data set 'addition' is not valid"):
        translation.split_examples("addition", "", "dev", 8, training=True)


def test_translation_data_set_not_prepared_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        translation.split_examples(
            "ted_hrlr_translate/pt_to_en", str(tmp_path), "train", 64, training=True
        )
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("Translation data set 'ted_hrlr_translate/pt_to_en' is not prepared")


def cli(workdir, *overrides):
    return subprocess.Popen(
        [sys.executable, "-m", "train", "--config=configs/seq2seq.py:tiny",
         f"--workdir={workdir}", *overrides],
        cwd=REPO, env=dict(os.environ), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_tiny_config_trains_from_the_command_line(tmp_path, capsys):
    process = cli(tmp_path)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    reports = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in reports] == [50, 100, 150, 200]
    for report in reports:
        assert all(math.isfinite(v) for v in report.values()), report
    final = reports[-1]
    for name in ("eval/accuracy", "eval/greedy_token_accuracy", "eval/sequence_accuracy"):
        assert 0.0 <= final[name] <= 1.0
    assert final["train/loss"] < 0.8 * reports[0]["train/loss"]
    assert final["eval/greedy_token_accuracy"] > 0.3  # chance is 1 in 14
    lines = (tmp_path / "samples.txt").read_text().splitlines()
    assert len(lines) == 4 and all(" -> " in line and "(target: " in line for line in lines)
    assert "eval/sequence_accuracy=" in stdout

    # python -m train.sample translates a source with the run's newest checkpoint (greedy).
    sample.main([f"--workdir={tmp_path}", "--prompt=12+34"])
    out, err = capsys.readouterr()
    assert re.fullmatch(r"\d{1,8}\n", out), out  # digits up to EOS, at most data.seq_len
    assert "Checkpoint step 200: 1 x 8 tokens" in err and "key/value cache" in err
    with pytest.raises(SystemExit):
        sample.main([f"--workdir={tmp_path}", "--prompt=12-34"])
    assert (
        "error: Characters ['-'] are not in the vocabulary '0123456789+'."
        in capsys.readouterr().err
    )


def short_config():
    """The tiny seq2seq config on 512 problems, a report every step, dropout on."""
    config = load_config(REPO / "configs" / "seq2seq.py:tiny")
    config.data.train_split = "train[:512]"  # 16 steps an epoch
    config.data.eval_split = "validation[:64]"
    config.model.dropout_rate = 0.1  # resumed runs must draw the same dropout masks too
    config.train.num_steps = 24
    config.train.log_every = 1
    config.train.eval_every = 24
    config.train.checkpoint_every = 8
    config.train.sample_lines = 0
    return config


def test_sigterm_then_resume_is_bitwise_equal(tmp_path, monkeypatch):
    reference, _ = loop.train_and_evaluate(short_config(), tmp_path / "reference")
    check_finite = metrics.check_finite

    def check_then_signal(scalars, first_step, last_step):  # the host side of each report
        if last_step == 16:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the loop stops after a step
        return check_finite(scalars, first_step, last_step)

    monkeypatch.setattr(metrics, "check_finite", check_then_signal)
    stopped, _ = loop.train_and_evaluate(short_config(), tmp_path / "stopped")
    assert int(stopped.step) == 17  # mid-epoch: the iterator's position matters
    monkeypatch.setattr(metrics, "check_finite", check_finite)
    resumed, _ = loop.train_and_evaluate(short_config(), tmp_path / "stopped")

    assert int(resumed.step) == 24
    chex.assert_trees_all_equal(jax.device_get(reference.params), jax.device_get(resumed.params))
    want = read_metrics(tmp_path / "reference" / "metrics.jsonl")
    got = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 25))
    assert [r["train/loss"] for r in got] == [r["train/loss"] for r in want]
    assert got[-1]["eval/sequence_accuracy"] == want[-1]["eval/sequence_accuracy"]
