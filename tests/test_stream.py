"""A streamed training split (data.in_memory=False) gives the in-memory path's batches, bitwise:
first batches, process shards, a stop and a resume, a whole run; and "auto" picks a path by size.

On the committed slices (tests/data/tfds: MNIST train[:8192], SST-2 train[:4096]), the embedded
tiny_shakespeare, and a text data set of many records written here by TFDS's own writer
(benchmarks/text_dataset.py)."""

import importlib.util
import json
import pathlib
import signal
import sys

import chex
import jax
import ml_collections
import numpy as np
import pytest

from train import data, loop
from train.config import load_config
from train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_config(data_dir: str, dataset: str, in_memory, **overrides) -> ml_collections.ConfigDict:
    """A data section like the configs' (in_memory as they declare it), on a small slice."""
    config = ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            data_dir=data_dir,
            train_split="train[:200]",  # batches of 48 straddle epochs from batch 4 on
            eval_split="test[:100]",
            batch_size=48,
            seq_len=0,
            vocab_size=0,
            num_workers=0,
            in_memory=ml_collections.FieldReference(in_memory, field_type=object),
        )
    )
    if dataset == "glue/sst2":
        config.update(eval_split="validation", seq_len=16, vocab_size=512)
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> str:
    """generated_text: ~1,200 records of 100-300 characters (some beyond ASCII, every 97th
    empty), so a window of 64 characters often spans two or three records."""
    path = REPO / "benchmarks" / "text_dataset.py"
    spec = importlib.util.spec_from_file_location("text_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    directory = tmp_path_factory.mktemp("text")
    module.write(directory, train_chars=250_000, record_chars=200, seed=1, accents=True)
    return str(directory)


def text_config(data_dir, in_memory, **overrides) -> ml_collections.ConfigDict:
    return data_config(
        data_dir,
        "generated_text",
        in_memory,
        **dict(train_split="train", eval_split="validation", seq_len=64) | overrides,
    )


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_batches_bitwise_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"inputs", "targets", "weights"}
        for key in x:
            assert (x[key].shape, x[key].dtype) == (y[key].shape, y[key].dtype), key
            assert x[key].tobytes() == y[key].tobytes(), key  # bitwise, NaN or not


@pytest.mark.parametrize("dataset", ["mnist", "glue/sst2"])
def test_streamed_batches_are_the_in_memory_ones(data_dir, dataset):
    held = data_config(data_dir, dataset, True)
    streamed = data_config(data_dir, dataset, False)
    assert data.in_memory(held) and not data.in_memory(streamed)
    expected = take(data.train_iterator(held, seed=3), 10)  # 10 * 48 = 2.4 epochs of 200
    got = take(data.train_iterator(streamed, seed=3), 10)
    assert_batches_bitwise_equal(got, expected)
    if dataset == "mnist":
        assert got[0]["inputs"].shape == (48, 28, 28, 1) and got[0]["inputs"].dtype == np.float32
    else:
        assert got[0]["inputs"].shape == (48, 16) and got[0]["inputs"].dtype == np.int32
    assert got[0]["targets"].shape == (48,) and got[0]["targets"].dtype == np.int32


@pytest.mark.parametrize("dataset", ["mnist", "glue/sst2"])
def test_two_processes_read_disjoint_shards_that_make_the_whole_batch(data_dir, dataset):
    config = data_config(data_dir, dataset, False, train_split="train[:96]", batch_size=48)
    if dataset == "glue/sst2":  # room enough that no two sentences of the 96 share their ids
        config.update(seq_len=64, vocab_size=16384)
    whole = take(data.train_iterator(config, seed=1), 2)  # one epoch of 96: no example twice
    shards = [
        take(data.train_iterator(config, seed=1, process_index=p, process_count=2), 2)
        for p in (0, 1)
    ]
    for step in range(2):
        for key in whole[step]:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            assert joined.tobytes() == whole[step][key].tobytes(), key
    # Disjoint: every row of the epoch is read by exactly one process (the slice has no
    # duplicate images or sentences).
    rows = [{row.tobytes() for batch in shard for row in batch["inputs"]} for shard in shards]
    assert len(rows[0]) == len(rows[1]) == 48
    assert not rows[0] & rows[1]
    assert rows[0] | rows[1] == {row.tobytes() for batch in whole for row in batch["inputs"]}


def test_each_process_reads_only_its_own_records(data_dir, monkeypatch):
    # The sampler sharded by process hands process p only elements [p * K, (p + 1) * K) of the
    # data source, K = the batches per process; element p * K + k is its rows of global batch k.
    asked = []
    read = data._StreamedBatches.__getitem__
    monkeypatch.setattr(
        data._StreamedBatches, "__getitem__", lambda self, key: asked.append(key) or read(self, key)
    )
    config = data_config(data_dir, "mnist", False)
    num_batches = sys.maxsize // (48 * 2)  # K
    for p in (0, 1):
        asked.clear()
        take(data.train_iterator(config, seed=0, process_index=p, process_count=2), 3)
        assert asked == [p * num_batches + k for k in range(3)]


@pytest.mark.parametrize("dataset", ["mnist", "glue/sst2"])
def test_a_resumed_stream_goes_on_with_the_uninterrupted_batches(data_dir, dataset):
    config = data_config(data_dir, dataset, False)
    uninterrupted = take(data.train_iterator(config, seed=5), 9)
    stopped = data.train_iterator(config, seed=5)
    take(stopped, 5)
    state = json.loads(json.dumps(stopped.get_state()))  # what the checkpoint stores
    assert state == {"next_index": 5}  # the in-memory iterator's state, the same integer
    resumed = data.train_iterator(config, seed=5)
    resumed.set_state(state)
    assert_batches_bitwise_equal(take(resumed, 4), uninterrupted[5:])
    # A state saved by the in-memory path restores into the streamed one, and back.
    held = data.train_iterator(data_config(data_dir, dataset, True), seed=5)
    held.set_state(state)
    assert_batches_bitwise_equal(take(held, 4), uninterrupted[5:])


@pytest.mark.parametrize("order", ["array", "index_shuffle"])
def test_a_text_split_streams_the_windows_the_whole_text_is_cut_into(text_dir, order, monkeypatch):
    if order == "index_shuffle":  # the order of a text set of gigabytes, here over a small one
        monkeypatch.setattr(data, "PERMUTATION_MAX_EXAMPLES", 100)
    held, streamed = text_config(text_dir, True), text_config(text_dir, False)
    assert data.in_memory(held) and not data.in_memory(streamed)
    starts, characters = data._text_layout("generated_text", text_dir, "train")
    assert starts[0] == 0 and (np.diff(starts) >= 0).all() and (np.diff(starts) == 0).any()
    assert (
        "é" in characters and "ä" in characters and data.load_info(held).vocab == tuple(characters)
    )
    num_windows = (int(starts[-1]) - 1) // 64
    assert num_windows > data.PERMUTATION_MAX_EXAMPLES or order == "array"
    assert len(data.train_examples(held)["inputs"]) == num_windows  # the same examples
    # 2 epochs and a bit, so batches straddle epoch boundaries.
    num_batches = 2 * num_windows // 48 + 2
    expected = take(data.train_iterator(held, seed=4), num_batches)
    got = take(data.train_iterator(streamed, seed=4), num_batches)
    assert_batches_bitwise_equal(got, expected)
    assert got[0]["inputs"].shape == got[0]["targets"].shape == (48, 64)
    text = "".join(data.load_info(held).decode(row) for row in got[0]["inputs"][:1])
    assert len(text) == 64


def test_a_text_stream_shards_by_process_and_resumes(text_dir):
    config = text_config(text_dir, False)
    whole = take(data.train_iterator(config, seed=6), 5)
    shards = [
        take(data.train_iterator(config, seed=6, process_index=p, process_count=2), 5)
        for p in (0, 1)
    ]
    for k in range(5):
        for key in ("inputs", "targets"):
            joined = np.concatenate([shards[0][k][key], shards[1][k][key]])
            assert joined.tobytes() == whole[k][key].tobytes()
    stopped = data.train_iterator(config, seed=6)
    take(stopped, 3)
    resumed = data.train_iterator(config, seed=6)
    resumed.set_state(stopped.get_state())
    assert_batches_bitwise_equal(take(resumed, 2), whole[3:])


def test_worker_processes_give_the_same_batches(data_dir):
    config = data_config(data_dir, "mnist", False)
    expected = take(data.train_iterator(config, seed=2), 6)
    config.num_workers = 2  # batches come from the two in turn
    workers = data.train_iterator(config, seed=2)
    workers.set_state({"next_index": 1})  # a restore with another worker count than the save's
    assert_batches_bitwise_equal(take(workers, 5), expected[1:])
    assert workers.get_state() == {"next_index": 6}


def test_auto_holds_the_small_slices_and_streams_above_the_threshold(data_dir, monkeypatch):
    for dataset in ("mnist", "glue/sst2"):
        assert data.in_memory(data_config(data_dir, dataset, "auto"))
    text = data_config(None, "tiny_shakespeare", "auto", train_split="train", seq_len=32)
    assert data.in_memory(text)
    # The bytes "auto" compares: TFDS's count for a whole split, a share of the data set's
    # bytes for a slice (tests/data/tfds/mnist: 2895722 bytes over 9192 examples).
    assert data.split_bytes("mnist", data_dir, "train") == 2580366
    assert data.split_bytes("mnist", data_dir, "train[:200]") == 200 * 2895722 // 9192
    monkeypatch.setattr(data, "IN_MEMORY_MAX_BYTES", 200 * 2895722 // 9192 - 1)
    assert not data.in_memory(data_config(data_dir, "mnist", "auto"))
    assert data.in_memory(data_config(data_dir, "mnist", "auto", train_split="train[:199]"))
    # tiny_shakespeare (1 MB) streams above the text threshold, as any text data set.
    monkeypatch.setattr(data, "IN_MEMORY_MAX_BYTES", 0)
    assert data.in_memory(text)  # text has its own threshold, lower: its in-memory form is large
    monkeypatch.setattr(data, "IN_MEMORY_MAX_TEXT_BYTES", 0)
    assert not data.in_memory(text)


def test_an_order_too_long_for_an_array_is_permuted_index_by_index(monkeypatch):
    def epochs(num_examples, seed, chunks):  # 3 epochs read in chunks of the given sizes
        stream, start, read = data._shuffled_stream(num_examples, seed), 0, []
        for count in chunks:
            read.append(stream(start, count))
            start += count
        return np.concatenate(read).reshape(3, num_examples)

    arrays = epochs(11, 5, [33])
    monkeypatch.setattr(data, "PERMUTATION_MAX_EXAMPLES", 10)
    lazy = epochs(11, 5, [33])
    for order in (arrays, lazy):  # each epoch a permutation of the examples, a new one each time
        assert (np.sort(order, axis=1) == np.arange(11)).all()
        assert len({tuple(epoch) for epoch in order}) == 3
    assert not (lazy == arrays).all()  # another permutation above the size: index_shuffle's
    # The same order however it is read (batches straddling epochs), and from the seed alone.
    np.testing.assert_array_equal(epochs(11, 5, [4, 9, 13, 7]), lazy)
    assert not (epochs(11, 6, [33]) == lazy).all()


def test_settings_that_cannot_stream_are_one_line_errors(data_dir):
    pairs = data_config(None, "addition", False, train_split="train", seq_len=8)
    with pytest.raises(ValueError, match=r"^data.in_memory=False, but 'addition' is not"):
        data.train_iterator(pairs, seed=0)
    with pytest.raises(ValueError, match=r"^data.in_memory='yes' must be True, False or 'auto'"):
        data.in_memory(data_config(data_dir, "mnist", "yes"))
    with pytest.raises(ValueError, match=r"^data.on_device needs the training split in memory"):
        data.train_iterator(data_config(data_dir, "mnist", False), seed=0, indices_only=True)


def mlp_config(in_memory) -> ml_collections.ConfigDict:
    config = load_config(REPO / "configs" / "mlp.py:tiny")
    assert config.data.in_memory == "auto"  # the configs' default
    config.data.in_memory = in_memory
    config.data.on_device = False  # the reference: host batches; streamed, on_device is moot
    config.data.train_split = "train[:1024]"
    config.data.eval_split = "test[:256]"
    config.model.dropout_rate = 0.1
    config.train.update(num_steps=20, log_every=5, eval_every=10, checkpoint_every=10)
    config.train.steps_per_call = 1
    return config


def test_a_streamed_run_stopped_and_resumed_ends_as_an_in_memory_run(tmp_path):
    reference, _ = loop.train_and_evaluate(mlp_config(True), tmp_path / "held")

    def stop_after_7(moment, at_step):
        if moment == "step" and at_step == 7:
            signal.raise_signal(signal.SIGTERM)

    streamed = mlp_config(False)
    streamed.data.on_device = True  # falls back to host batches: the split is not held
    stopped, _ = loop.train_and_evaluate(streamed, tmp_path / "streamed", on_event=stop_after_7)
    assert int(stopped.step) == 7
    resumed, _ = loop.train_and_evaluate(streamed, tmp_path / "streamed")
    assert int(resumed.step) == 20
    chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(reference.params))

    def reports(workdir):
        rows = read_metrics(workdir / "metrics.jsonl")
        return [{k: v for k, v in row.items() if k != "train/steps_per_second"} for row in rows]

    assert [r["step"] for r in reports(tmp_path / "streamed")] == [5, 10, 15, 20]
    assert reports(tmp_path / "streamed") == reports(tmp_path / "held")  # losses bitwise
