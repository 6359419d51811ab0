"""The input pipeline on real data: shapes, vocabularies, seeds, shards, eval sums.

The data travel with the repository: the committed slices of MNIST and SST-2 (tests/data/tfds, the
first examples of each split in TFDS's order) and the package's embedded tiny_shakespeare. The few
checks against the full data sets and their raw files use ../shared/data and are skipped without it.
"""

import collections
import csv
import hashlib
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import data, parallel

REPO = pathlib.Path(__file__).resolve().parents[1]
# TFDS's tiny_shakespeare splits: 90%, 5% and 5% of the characters of char-rnn's input.txt
# (1115394 bytes, sha256 86c4e6aa...c565ed), as (characters, sha256 of their UTF-8 bytes).
SHAKESPEARE = {
    "train": (1003854, "a9e24e23a1ec77744dad26844bfd5a09b6e041954e1eef0000e7f24cba6db735"),
    "validation": (55770, "c64e90c160750d91a9d2d9b1ace5eab1a440f5a1701d32a8e97a179b7839f1c8"),
    "test": (55770, "8b5a8c8af45905547ad03b7aae6980a277a5dd78924a6e6ac64b75d63d7d40bd"),
}


def data_config(data_dir: str, dataset: str = "mnist", **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            data_dir=data_dir,
            train_split="train[:512]",
            eval_split="test[:1000]",
            batch_size=64,
            seq_len=0,
            vocab_size=0,
            num_workers=0,
            in_memory="auto",
        )
    )
    if dataset == "tiny_shakespeare":
        config.update(train_split="train", eval_split="validation", seq_len=32)
    if dataset == "glue/sst2":
        config.update(
            train_split="train[:2048]", eval_split="validation", seq_len=16, vocab_size=16384
        )
    config.update(overrides)
    return config


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def shakespeare_text(split: str = "train") -> str:
    """A split of the embedded tiny_shakespeare, read by tfds itself (one example per split)."""
    source = tfds.data_source(
        "tiny_shakespeare", split=split, data_dir=data.EMBEDDED_DATA_DIR, download=False
    )
    return source[0]["text"].decode("utf-8")


def sst2_sentences(data_dir: str, split: str = "train") -> list[str]:
    """Every sentence of an SST-2 split, in order, read by tfds itself."""
    source = tfds.data_source("glue/sst2", split=split, data_dir=data_dir, download=False)
    return [ex["sentence"].decode("utf-8") for ex in source.__getitems__(range(len(source)))]


def raw_sst2_rows(shared_data_dir: pathlib.Path, name: str) -> list[dict]:
    """GLUE's SST-2 TSV file `name`, read as TFDS reads it."""
    with open(shared_data_dir / "raw" / "glue_sst2" / name, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


# --- Config plumbing ------------------------------------------------------------------------------


def test_resolve_data_dir_prefers_config_then_env_then_default(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
    assert data.resolve_data_dir(data_config("/from/config")) == "/from/config"
    assert data.resolve_data_dir(data_config(None)) == "/from/env"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.resolve_data_dir(data_config(None)) == str(
        pathlib.Path.home() / "tensorflow_datasets"
    )


def test_embedded_shakespeare_when_the_data_dir_has_none(tmp_path, data_dir):
    empty, own = tmp_path / "empty", tmp_path / "own"
    empty.mkdir()
    (own / "tiny_shakespeare" / "1.0.0").mkdir(parents=True)
    (own / "tiny_shakespeare" / "1.0.0" / "dataset_info.json").write_text("{}")
    resolve = data.resolve_data_dir
    # No copy of its own, or no dir at all: the package's. A copy of its own always wins.
    assert resolve(data_config(str(empty), "tiny_shakespeare")) == data.EMBEDDED_DATA_DIR
    assert resolve(data_config(str(tmp_path / "nowhere"), "tiny_shakespeare")) == (
        data.EMBEDDED_DATA_DIR
    )
    assert resolve(data_config(str(own), "tiny_shakespeare")) == str(own)
    assert resolve(data_config(str(empty), "tiny_shakespeare:1.0.0")) == data.EMBEDDED_DATA_DIR
    assert resolve(data_config(str(own), "tiny_shakespeare:1.0.0")) == str(own)
    # The package embeds no MNIST: the configured dir stays, to fail with the prepare command.
    assert resolve(data_config(str(empty), "mnist")) == str(empty)
    assert resolve(data_config(data_dir, "mnist")) == data_dir

    # Read through the pipeline from the empty dir: the whole original text.
    config = data_config(str(empty), "tiny_shakespeare", batch_size=128, seq_len=64)
    assert data.load_info(config).vocab_size == 65
    assert sum(b["weights"].sum() for b in data.eval_batches(config)) == 55770 - 1


def test_embedded_shakespeare_is_the_original_text():
    for split, (length, sha256) in SHAKESPEARE.items():
        text = shakespeare_text(split)
        assert len(text) == length
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == sha256, split
    assert shakespeare_text().startswith("First Citizen:\nBefore we proceed any further, hear me")


# --- MNIST ----------------------------------------------------------------------------------------


def test_mnist_info_and_train_batches(data_dir):
    config = data_config(data_dir, train_split="train[:256]", batch_size=128)
    info = data.load_info(config)
    assert (info.vocab_size, info.num_classes, info.is_language_model, info.vocab) == (
        0,
        10,
        False,
        (),
    )

    first, second = take(data.train_iterator(config, seed=0), 2)
    assert first["inputs"].shape == (128, 28, 28, 1) and first["inputs"].dtype == np.float32
    assert first["targets"].shape == (128,) and first["targets"].dtype == np.int32
    np.testing.assert_array_equal(first["weights"], np.ones(128, np.float32))
    assert 0.0 <= first["inputs"].min() and first["inputs"].max() == 1.0

    # Two batches are one epoch of 256 examples: each exactly once, whatever the order.
    source = tfds.data_source("mnist", split="train[:256]", data_dir=data_dir, download=False)
    examples = source.__getitems__(list(range(256)))
    labels = np.array([ex["label"] for ex in examples])
    pixels = np.array([ex["image"].sum() for ex in examples])
    epoch = {k: np.concatenate([first[k], second[k]]) for k in first}
    np.testing.assert_array_equal(np.sort(epoch["targets"]), np.sort(labels))
    np.testing.assert_array_equal(
        np.sort(np.round(epoch["inputs"].sum(axis=(1, 2, 3)) * 255).astype(np.int64)),
        np.sort(pixels),
    )


def test_mnist_eval_counts_every_example_once(data_dir):
    config = data_config(data_dir, batch_size=384)
    batches = list(data.eval_batches(config))
    assert len(batches) == 3  # ceil(1000 / 384)
    assert all(
        b["inputs"].shape == (384, 28, 28, 1) and b["weights"].shape == (384,) for b in batches
    )
    assert sum(b["weights"].sum() for b in batches) == 1000
    last = batches[-1]
    np.testing.assert_array_equal(last["weights"][:232], 1.0)  # 1000 - 2 * 384 real rows
    np.testing.assert_array_equal(last["weights"][232:], 0.0)
    assert not last["inputs"][232:].any() and not last["targets"][232:].any()

    # Two processes: disjoint row blocks of the same global batches, the same number of steps.
    shards = [list(data.eval_batches(config, process_index=p, process_count=2)) for p in (0, 1)]
    assert [len(s) for s in shards] == [3, 3]
    assert [sum(b["weights"].sum() for b in s) for s in shards] == [576, 424]  # 3*192, 192+192+40
    for step, whole in enumerate(batches):
        for key in whole:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key])

    assert_batches_equal(list(data.eval_batches(config)), batches)  # a second pass is the same


# --- tiny_shakespeare -----------------------------------------------------------------------------


def test_shakespeare_vocab_and_round_trip(data_dir):
    info = data.load_info(data_config(data_dir, "tiny_shakespeare"))
    text = shakespeare_text()
    assert info.vocab_size == 65 and info.num_classes == 0 and info.is_language_model
    assert info.vocab == tuple(sorted(set(text)))
    assert info.vocab[:3] == ("\n", " ", "!")
    ids = info.encode(text[:100])
    assert ids.dtype == np.int32 and ids.shape == (100,)
    assert ids[0] == info.vocab.index(text[0])
    assert info.decode(ids) == text[:100]
    with pytest.raises(ValueError, match="not in the 65-char vocabulary"):
        info.encode("caf\u00e9")


def test_shakespeare_train_windows(data_dir):
    config = data_config(data_dir, "tiny_shakespeare", batch_size=16, seq_len=32)
    info = data.load_info(config)
    text = shakespeare_text()
    (batch,) = take(data.train_iterator(config, seed=3), 1)
    for key in ("inputs", "targets"):
        assert batch[key].shape == (16, 32) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["weights"], np.ones((16, 32), np.float32))
    np.testing.assert_array_equal(
        batch["inputs"][:, 1:], batch["targets"][:, :-1]
    )  # shifted by one
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
        window = info.decode(inputs) + info.decode(targets[-1:])  # seq_len + 1 characters
        assert text.find(window) % 32 == 0  # a window starts at a multiple of seq_len


def test_shakespeare_eval_counts_every_target_token(data_dir):
    config = data_config(data_dir, "tiny_shakespeare", batch_size=128, seq_len=64)
    batches = list(data.eval_batches(config))
    assert len(batches) == 7  # ceil(ceil(55769 / 64) / 128) = ceil(872 / 128)
    assert all(b["weights"].shape == (128, 64) and b["targets"].shape == (128, 64) for b in batches)
    assert sum(b["weights"].sum() for b in batches) == 55770 - 1  # every character but the first


# --- glue/sst2 ------------------------------------------------------------------------------------


def test_sst2_vocab_matches_training_sentences(data_dir):
    sentences = sst2_sentences(data_dir)
    assert len(sentences) == 4096  # the slice: train[:4096]
    counts = collections.Counter(word for s in sentences for word in s.lower().split())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    info = data.load_info(data_config(data_dir, "glue/sst2", vocab_size=1000))
    assert info.vocab == ("<pad>", "<unk>", *[w for w, _ in ranked[:998]])
    assert (info.vocab_size, info.num_classes, info.is_language_model) == (1000, 2, False)
    assert [info.vocab.index(w) for w in (",", "the", "a", "and", "of", ".")] == [2, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(info.encode("The film , zzzunseenzzz ."), [3, 17, 2, 1, 7])
    assert info.vocab[17] == "film"
    assert info.decode([3, 17, 7, 0, 0]) == "the film ."
    # The full vocabulary: every training word fits in 16384 entries.
    assert data.load_info(data_config(data_dir, "glue/sst2")).vocab_size == len(counts) + 2 == 7001


def test_sst2_full_vocabulary_matches_raw_tsv(shared_data_dir):
    full_dir = str(shared_data_dir / "tensorflow_datasets_array_record")
    rows = raw_sst2_rows(shared_data_dir, "train.tsv")
    counts = collections.Counter(word for row in rows for word in row["sentence"].lower().split())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    info = data.load_info(data_config(full_dir, "glue/sst2", vocab_size=1000))
    assert info.vocab == ("<pad>", "<unk>", *[w for w, _ in ranked[:998]])
    assert [info.vocab.index(w) for w in ("the", ",", "a", "and", "of", ".")] == [2, 3, 4, 5, 6, 7]
    assert data.load_info(data_config(full_dir, "glue/sst2")).vocab_size == len(counts) + 2 == 14818


def test_slices_are_the_first_examples_of_the_full_sets(shared_data_dir, data_dir):
    # What tests/data/make_slices.py writes: each split's first examples, the records unchanged.
    full_dir = shared_data_dir / "tensorflow_datasets_array_record"
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    for name, splits in {
        "mnist": ("train", "test"),
        "glue/sst2": ("train", "validation", "test"),
    }.items():
        for split in splits:
            piece = tfds.data_source(
                name, split=split, data_dir=data_dir, download=False, deserialize_method=raw
            )
            whole = tfds.data_source(
                name,
                split=f"{split}[:{len(piece)}]",
                data_dir=full_dir,
                download=False,
                deserialize_method=raw,
            )
            assert len(whole) == len(piece)
            assert piece.__getitems__(range(len(piece))) == whole.__getitems__(range(len(whole)))


def test_sst2_train_batches(data_dir):
    config = data_config(data_dir, "glue/sst2", batch_size=32, seq_len=16)
    (batch,) = take(data.train_iterator(config, seed=0), 1)
    assert batch["inputs"].shape == (32, 16) and batch["inputs"].dtype == np.int32
    assert batch["targets"].shape == (32,) and batch["targets"].dtype == np.int32
    assert set(batch["targets"].tolist()) == {0, 1}
    real = batch["inputs"] != 0
    assert (real[:, :-1] >= real[:, 1:]).all()  # padding only at the end
    sentences = {" ".join(s.lower().split()[:16]) for s in sst2_sentences(data_dir, "train[:2048]")}
    info = data.load_info(config)
    assert all(info.decode(row) in sentences for row in batch["inputs"])


def test_sst2_eval_needs_labels(data_dir):
    config = data_config(data_dir, "glue/sst2", batch_size=100)
    batches = list(data.eval_batches(config))
    assert len(batches) == 9 and sum(b["weights"].sum() for b in batches) == 872
    targets = np.concatenate([b["targets"] for b in batches])[:872]
    np.testing.assert_array_equal(np.bincount(targets), [428, 444])  # dev.tsv's label counts
    with pytest.raises(ValueError, match="no labels") as err:
        data.eval_batches(data_config(data_dir, "glue/sst2", eval_split="test"))
    assert "\n" not in str(err.value)


# --- Determinism, checkpoints, shards -------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mnist", "tiny_shakespeare", "glue/sst2"])
def test_same_seed_same_batches_and_state_restores(dataset, data_dir):
    config = data_config(data_dir, dataset, batch_size=32)
    assert_batches_equal(
        take(data.train_iterator(config, seed=7), 3), take(data.train_iterator(config, seed=7), 3)
    )
    other = next(data.train_iterator(config, seed=8))
    assert not np.array_equal(other["inputs"], next(data.train_iterator(config, seed=7))["inputs"])

    iterator = data.train_iterator(config, seed=7)
    take(iterator, 2)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    expected = take(iterator, 2)
    restored = data.train_iterator(config, seed=7)
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), expected)


@pytest.mark.parametrize("dataset", ["mnist", "tiny_shakespeare", "glue/sst2"])
def test_index_batches_gather_the_host_batches(dataset, data_dir):
    # What the loop does with data.on_device: the split once, then batches of row indices.
    config = data_config(data_dir, dataset, batch_size=32)
    examples = data.train_examples(config)
    assert set(examples) == {"inputs", "targets"}
    assert not any(v.flags.writeable for v in examples.values())  # cached and shared
    batches = take(data.train_iterator(config, seed=3), 3)
    index_batches = take(data.train_iterator(config, seed=3, indices_only=True), 3)
    for batch, index_batch in zip(batches, index_batches, strict=True):
        assert index_batch.keys() == {"indices"} and index_batch["indices"].dtype == np.int32
        gathered = {k: v[index_batch["indices"]] for k, v in examples.items()}
        gathered["weights"] = np.ones(batch["targets"].shape, np.float32)
        assert_batches_equal([gathered], [batch])
    # Its position is the batch iterator's, in the same form, so checkpoints mean the same.
    index_iterator = data.train_iterator(config, seed=3, indices_only=True)
    batch_iterator = data.train_iterator(config, seed=3)
    take(index_iterator, 2), take(batch_iterator, 2)
    assert index_iterator.get_state() == batch_iterator.get_state() == {"next_index": 2}
    restored = data.train_iterator(config, seed=3, indices_only=True)
    restored.set_state(json.loads(json.dumps(index_iterator.get_state())))
    assert_batches_equal(take(restored, 2), take(index_iterator, 2))

    # In device memory (data.device_examples): rows gathered and decoded under jit, as the step
    # does, are bit for bit the host's rows. MNIST is held as uint8, a quarter of float32's bytes.
    stored, decode = data.device_examples(config)
    assert stored.keys() == {"inputs", "targets"}
    if dataset == "mnist":
        assert stored["inputs"].dtype == np.uint8 and decode is not None
        assert stored["inputs"].nbytes * 4 == examples["inputs"].nbytes
    else:
        assert decode is None and all(stored[k] is examples[k] for k in stored)
    decode = decode or (lambda batch: batch)

    @jax.jit
    def gather(stored, indices):  # as the train step does (train.parallel.compile_jit)
        return decode(parallel.gather_rows(stored, indices))

    for index_batch in index_batches:
        on_device = jax.device_get(gather(stored, index_batch["indices"]))
        for k, v in on_device.items():
            host = examples[k][index_batch["indices"]]
            assert v.dtype == host.dtype
            np.testing.assert_array_equal(v, host)


def example_ids(batches: list[dict], data_dir: str, split: str) -> np.ndarray:
    """Which example of an MNIST split each row of `batches` is, int [num_batches * b]."""
    images, _ = data._image_arrays("mnist", data_dir, split)
    row_of = {image.tobytes(): i for i, image in enumerate(images)}
    assert len(row_of) == len(images)  # no duplicate images, so a row names its example
    return np.array([row_of[image.tobytes()] for b in batches for image in b["inputs"]])


def test_every_epoch_is_a_fresh_permutation_and_batches_straddle_epochs(data_dir):
    # 100 examples in batches of 24: 25 batches are exactly 6 epochs, and batch 4 holds the last
    # 4 examples of epoch 0 and the first 20 of epoch 1.
    split = "test[:100]"
    config = data_config(data_dir, "mnist", train_split=split, batch_size=24)
    batches = take(data.train_iterator(config, seed=5), 25)
    assert all(b["inputs"].shape == (24, 28, 28, 1) for b in batches)  # every batch full
    ids = example_ids(batches, data_dir, split).reshape(6, 100)  # [epoch, position in epoch]
    for epoch in ids:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(100))  # each example once
    assert len({tuple(epoch) for epoch in ids}) == 6  # a different order every epoch
    # The documented order: epoch e is default_rng([seed, e]).permutation(num_examples).
    expected = [np.random.default_rng([5, e]).permutation(100) for e in range(6)]
    np.testing.assert_array_equal(ids, expected)
    _, labels = data._image_arrays("mnist", data_dir, split)
    np.testing.assert_array_equal(
        batches[4]["targets"], labels[np.r_[expected[0][96:], expected[1][:20]]]
    )

    other = example_ids(take(data.train_iterator(config, seed=6), 25), data_dir, split)
    assert (other != ids.reshape(-1)).mean() > 0.9  # another seed, another order

    # Process shards: row blocks of the same global batches, also across the epoch boundaries.
    for process_count in (2, 3):
        shards = [
            take(
                data.train_iterator(config, seed=5, process_index=p, process_count=process_count),
                25,
            )
            for p in range(process_count)
        ]
        for step, whole in enumerate(batches):
            for key in whole:
                joined = np.concatenate([shard[step][key] for shard in shards])
                np.testing.assert_array_equal(joined, whole[key], err_msg=f"{step} {key}")


def test_batch_larger_than_the_split_spans_several_epochs(data_dir):
    config = data_config(data_dir, "mnist", train_split="test[:10]", batch_size=24)
    ids = example_ids(take(data.train_iterator(config, seed=0), 5), data_dir, "test[:10]")
    expected = [
        np.random.default_rng([0, e]).permutation(10) for e in range(12)
    ]  # 5 * 24 = 12 * 10
    np.testing.assert_array_equal(ids.reshape(12, 10), expected)


def test_state_is_the_next_global_batch_for_any_process_count(data_dir):
    config = data_config(data_dir, "mnist", train_split="test[:100]", batch_size=24)
    threaded_config = data_config(
        data_dir, "mnist", train_split="test[:100]", batch_size=24, num_workers=2
    )
    iterator = data.train_iterator(config, seed=2)
    take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    assert state == {"next_index": 7}
    expected = take(iterator, 3)  # batches 7-9: positions 168-239, across the epoch 1/2 boundary

    threaded = data.train_iterator(threaded_config, seed=2)
    threaded.set_state(state)
    assert_batches_equal(take(threaded, 3), expected)
    shards = []
    for p in (0, 1):  # a checkpoint of a 1-process run, restored by 2 processes
        shard = data.train_iterator(config, seed=2, process_index=p, process_count=2)
        shard.set_state(state)
        shards.append(take(shard, 3))
    for step, whole in enumerate(expected):
        for key in whole:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, whole[key])


def test_reshuffles_each_epoch(data_dir):
    config = data_config(data_dir, "mnist", train_split="train[:64]", batch_size=64)
    first, second = take(data.train_iterator(config, seed=0), 2)
    np.testing.assert_array_equal(np.sort(first["targets"]), np.sort(second["targets"]))
    assert not np.array_equal(first["targets"], second["targets"])


def test_process_shards_split_the_global_batch(data_dir):
    config = data_config(data_dir, "mnist", batch_size=64)
    whole = take(data.train_iterator(config, seed=1), 2)
    shards = [
        take(data.train_iterator(config, seed=1, process_index=p, process_count=2), 2)
        for p in (0, 1)
    ]
    for step in range(2):
        assert shards[0][step]["inputs"].shape == (32, 28, 28, 1)
        images = [s[step]["inputs"].reshape(32, -1) for s in shards]
        # Disjoint: no image of process 0 is in process 1's batch (train[:512] has no duplicates).
        assert not (images[0][:, None, :] == images[1][None, :, :]).all(axis=-1).any()
        for key in whole[step]:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        data.train_iterator(config, seed=1, process_index=0, process_count=3)


def test_worker_threads_give_the_same_batches(data_dir):
    config = data_config(data_dir, "glue/sst2", batch_size=32)
    threaded = data_config(data_dir, "glue/sst2", batch_size=32, num_workers=2)
    assert_batches_equal(
        take(data.train_iterator(config, seed=0), 4), take(data.train_iterator(threaded, seed=0), 4)
    )


# --- Errors ---------------------------------------------------------------------------------------


def test_missing_dataset_is_one_line_naming_the_prepare_command(data_dir, tmp_path):
    empty = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError) as err:
        data.train_iterator(data_config(empty, "mnist"), seed=0)
    assert str(err.value) == (
        f"Data set 'mnist' is not prepared in data dir {empty}. Prepare it: python -m "
        f"train.prepare mnist --data_dir={empty} (or point data.data_dir or TFDS_DATA_DIR at a "
        f"dir that holds it)."
    )
    with pytest.raises(FileNotFoundError, match="python -m train.prepare glue/sst2 --data_dir="):
        data.load_info(data_config(empty, "glue/sst2"))

    with pytest.raises(FileNotFoundError) as err:
        data.load_info(data_config(data_dir, "no_such_dataset"))
    assert data_dir in str(err.value) and "\n" not in str(err.value)

    # Prepared, but as TFRecord (no random access): prepare it elsewhere, not here again.
    tfrecord = tmp_path / "tfrecord" / "mnist" / "3.0.1"
    tfrecord.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json"):
        text = (pathlib.Path(data_dir) / "mnist" / "3.0.1" / name).read_text()
        (tfrecord / name).write_text(text.replace('"array_record"', '"tfrecord"'))
    with pytest.raises(FileNotFoundError) as err:
        data.train_iterator(data_config(str(tmp_path / "tfrecord"), "mnist"), seed=0)
    assert "is prepared as tfrecord, not ArrayRecord" in str(err.value)
    assert "in another dir: python -m train.prepare mnist --data_dir=DIR" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("split", ["validation", "train[:abc]"])
def test_bad_split_is_one_line(split, data_dir):
    with pytest.raises(ValueError, match="Splits: ") as err:
        data.train_iterator(data_config(data_dir, "mnist", train_split=split), seed=0)
    assert data_dir in str(err.value) and "\n" not in str(err.value)


def test_training_path_does_not_import_tensorflow():
    # A fresh interpreter, so other test files cannot have imported TensorFlow already.
    code = textwrap.dedent(
        """
        import sys
        import ml_collections
        from train import data

        for name, split, seq_len in [
            ("mnist", "test[:64]", 0),
            ("tiny_shakespeare", "validation", 8),
            ("glue/sst2", "validation[:64]", 8),
        ]:
            config = ml_collections.ConfigDict(dict(
                dataset=name, data_dir=None, train_split=split, eval_split=split, batch_size=8,
                seq_len=seq_len, vocab_size=64, num_workers=0, in_memory="auto",
            ))
            data.load_info(config)
            next(data.train_iterator(config, seed=0))
            next(data.eval_batches(config))
        print("tensorflow" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False"
