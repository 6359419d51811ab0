"""Input pipeline: TFDS-prepared ArrayRecord data read through grain, as fixed-shape numpy batches.

Three data sets, one kind of batch each (keys `inputs`, `targets`, `weights`):

    mnist             inputs float32 [b, 28, 28, 1], in [0, 1]  targets int32 [b]
    tiny_shakespeare  inputs int32 [b, seq_len] character ids   targets int32 [b, seq_len]
    glue/sst2         inputs int32 [b, seq_len] word ids        targets int32 [b], 0 or 1
    addition, ...     translation-style pairs, with `decoder_inputs` too (train/translation.py)

`weights` (float32) has the shape of `targets`. `b` is this process's share of the global
`data.batch_size`. Nothing here imports TensorFlow: tfds reads the ArrayRecord files with numpy
(`train.tfds_files` finds them and reads their records; PIL decodes MNIST's PNGs, once per split,
into memory); grain iterates over whole batches, reads them ahead and checkpoints the position.

How a training batch is made. Element k of a grain MapDataset is global batch k, never a single
example: positions k * B .. k * B + B - 1 (B = `data.batch_size`) of an endless stream in which
position p is example `permutation(p // n)[p % n]`, epoch e being its own permutation of the n
training examples, seeded with (seed, e) and cached while it is read. So every batch is full, epochs
follow one another without mixing, batches straddle epoch boundaries, and the same seed gives the
same batches. Process p computes and gathers only its rows [p * b, (p + 1) * b) of each global
batch from the split, which is decoded once into arrays (`train_examples`: MNIST images as float32,
text already cut into windows or tokenized). So processes read disjoint examples, their batches
concatenated in process order are exactly the single-process global batch, and the checkpointed
iterator state (one integer, `next_index`: the next global batch) means the same thing for any
process count. grain still iterates, checkpoints and (with `data.num_workers` threads) reads ahead.

Streamed instead of held (`data.in_memory`, see `in_memory`): MNIST and SST-2 splits larger
than `IN_MEMORY_MAX_BYTES` on disk (or with `data.in_memory=False`) are read on demand. The batches
are the same, position for position: only where the rows come from changes. Element r of a grain
data source (`_StreamedBatches`) is process r // K's rows of global batch r % K (K batches per
process), read from the ArrayRecord files at the batch's example indices and decoded when asked
for; a `grain.samplers.IndexSampler` sharded by process (`ShardOptions(process_index,
process_count)`: contiguous ranges of K) hands each process only its own elements, and a
`grain.DataLoader` decodes them in `data.num_workers` worker processes (0: in the training thread),
each reading ahead. The iterator's state is the same one integer, so checkpoints of either path
restore into the other, for any process or worker count. tiny_shakespeare (one example holding the
whole text, cut into windows) and the translation pairs stay in memory.

Why whole batches: grain shuffling, repeating and batching single example indices is one Python
element per example, and for a small model on a CPU that host work took longer than the train step
itself, which then waited on the host. Now `next()` slices the indices out of a cached permutation,
makes one grain element and gathers the rows from arrays decoded once. With `indices_only` (the
split held in device memory, see `train.parallel.compile_jit`) a batch is just its indices.
Measurements: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from absl import flags, logging
from grain.experimental import index_shuffle

from train import tfds_files, translation

Batch = dict[str, np.ndarray]

# One table: the data sets this pipeline knows, and how their examples become batches.
DATASETS = {
    "mnist": "image",
    "tiny_shakespeare": "characters",
    "glue/sst2": "words",
    "addition": "seq2seq",  # generated, no files (train/translation.py)
    "ted_hrlr_translate/pt_to_en": "seq2seq",
}
PAD_ID, UNK_ID = 0, 1  # word vocabularies only; the character vocabulary has neither
# Vocabularies come from the whole train split, whatever data.train_split: one vocabulary per
# data set, shared by every config that trains on it.
_VOCAB_SPLIT = "train"
# A TFDS data dir inside the package (tiny_shakespeare, 0.7 MB), read when the configured data dir
# has no copy of a data set it holds: `python -m train --config=configs/transformer.py` runs
# anywhere, offline, with nothing prepared. Written by `python -m train.prepare`.
EMBEDDED_DATA_DIR = str(pathlib.Path(__file__).resolve().parent / "embedded_data")
# `data.in_memory="auto"` streams a training split larger than this on disk (TFDS's count of the
# split's bytes). Decoded, a split takes more: MNIST's float32 images are 9x its 21 MB of PNGs.
IN_MEMORY_MAX_BYTES = 1 << 30
# The same for a text data set (characters): its in-memory path holds the text as a string and as
# int32 ids and every window start, so a 300 MB text peaked at 9.7 GB (streamed: 0.8 GB).
IN_MEMORY_MAX_TEXT_BYTES = 64 << 20
# The training order's permutation of an epoch is an array up to this many examples (128 MB of
# int64); a larger split (the windows of a text set of gigabytes) is permuted index by index.
PERMUTATION_MAX_EXAMPLES = 1 << 24
# The kinds of data set whose training split can be streamed (the translation pairs are small).
_STREAMABLE = ("image", "words", "characters")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the sampler need to know about a data set.

    Attributes:
      vocab_size: number of token ids (len(vocab)); 0 for images.
      num_classes: classes of a classifier; 0 for a language model.
      is_language_model: targets are the next token at every position.
      vocab: index -> token (a character, or a word with '<pad>' and '<unk>' at 0 and 1).
      word_level: tokens are whitespace-separated lowercase words (else single characters).
    """

    vocab_size: int
    num_classes: int
    is_language_model: bool
    vocab: tuple[str, ...] = ()
    word_level: bool = False
    _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(self.vocab)})

    @functools.cached_property
    def _table(self) -> np.ndarray:
        """Characters: code point -> id, -1 for a character outside the vocabulary (and in the
        last slot, where code points beyond the table go)."""
        table = np.full(max(map(ord, self.vocab)) + 2, -1, np.int32)
        table[[ord(c) for c in self.vocab]] = np.arange(len(self.vocab), dtype=np.int32)
        return table

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32 [num_tokens]; unknown words map to UNK_ID."""
        if not self.vocab:
            raise ValueError("This data set has no vocabulary: it is not text.")
        if self.word_level:
            return np.array([self._ids.get(w, UNK_ID) for w in text.lower().split()], np.int32)
        # Characters: one table lookup over the code points, not a Python loop over a 1M-char text.
        code_points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        table = self._table
        ids = table[np.minimum(code_points, len(table) - 1)]  # the last slot is -1: out of range
        if (ids < 0).any():
            unknown = sorted({text[i] for i in np.flatnonzero(ids < 0)[:100]})
            raise ValueError(
                f"Characters {unknown} are not in the {len(self.vocab)}-char vocabulary."
            )
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a 1-D sequence of ids; words are joined by spaces and '<pad>' is dropped."""
        tokens = [self.vocab[i] for i in np.asarray(ids, np.int64).reshape(-1)]
        if self.word_level:
            return " ".join(t for t in tokens if t != self.vocab[PAD_ID])
        return "".join(tokens)


def resolve_data_dir(data_config: ml_collections.ConfigDict) -> str:
    """The TFDS data dir `data.dataset` is read from.

    `data.data_dir`, else $TFDS_DATA_DIR, else tfds's default ~/tensorflow_datasets; but if that
    dir holds no prepared copy of the data set and the package embeds one (`EMBEDDED_DATA_DIR`),
    the embedded one.
    """
    data_dir = tfds_files.configured_data_dir(data_config.data_dir)
    dataset = data_config.dataset
    if _has_prepared_copy(data_dir, dataset) or not _has_prepared_copy(EMBEDDED_DATA_DIR, dataset):
        return data_dir
    _log_embedded(dataset, data_dir)
    return EMBEDDED_DATA_DIR


def _has_prepared_copy(data_dir: str, dataset: str) -> bool:
    """Whether `data_dir` holds `dataset` ('glue/sst2', or pinned: 'mnist:3.0.1'), any format."""
    name, _, version = dataset.partition(":")
    return any(pathlib.Path(data_dir, name).glob(f"{version or '*'}/dataset_info.json"))


@functools.cache  # once per data set and dir
def _log_embedded(dataset: str, data_dir: str) -> None:
    logging.info(
        "Data set %r is not prepared in %s: reading the copy embedded in the package, %s.",
        dataset,
        data_dir,
        EMBEDDED_DATA_DIR,
    )


def load_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
    """Vocabulary and label facts of `data.dataset`, built from its train split (cached).

    Reads `data.dataset`, `data.data_dir` and `data.vocab_size` (word vocabularies only).
    """
    return _load_info(data_config.dataset, resolve_data_dir(data_config), data_config.vocab_size)


def kind(data_config: ml_collections.ConfigDict) -> str:
    """How `data.dataset` is read: 'image', 'characters', 'words' or 'seq2seq' (see DATASETS;
    `train.tasks` maps each to a task). Reads no files, and looks for no data dir, for the data
    sets of DATASETS."""
    name = data_config.dataset.split(":")[0]
    if name in DATASETS:
        return DATASETS[name]
    return _kind(data_config.dataset, resolve_data_dir(data_config))


def in_memory(data_config: ml_collections.ConfigDict) -> bool:
    """Whether the training split is decoded whole into memory (True) or streamed (False).

    `data.in_memory`: True, False, or "auto": in memory unless the data set can be streamed (all
    but the translation pairs: see `_STREAMABLE`) and its training split is larger than
    `IN_MEMORY_MAX_BYTES` on disk (`IN_MEMORY_MAX_TEXT_BYTES` for a text data set).
    """
    setting, dataset = data_config.in_memory, data_config.dataset
    if not (isinstance(setting, bool) or setting == "auto"):
        raise ValueError(f"data.in_memory={setting!r} must be True, False or 'auto'.")
    data_dir = resolve_data_dir(data_config)
    streamable = _kind(dataset, data_dir) in _STREAMABLE
    if setting is False and not streamable:
        raise ValueError(
            f"data.in_memory=False, but {dataset!r} is not streamed (only "
            f"{sorted(k for k, v in DATASETS.items() if v in _STREAMABLE)} and text data sets "
            "are); set it to 'auto'."
        )
    if setting != "auto":
        return setting
    if not streamable:
        return True
    kind = _kind(dataset, data_dir)
    limit = IN_MEMORY_MAX_TEXT_BYTES if kind == "characters" else IN_MEMORY_MAX_BYTES
    return split_bytes(dataset, data_dir, data_config.train_split) <= limit


def split_bytes(dataset: str, data_dir: str, split: str) -> int:
    """A split's bytes on disk, from TFDS's dataset info; for a slice ('train[:10%]'), its share
    of the examples times the data set's mean bytes per example."""
    info = tfds_files.builder(dataset, data_dir).info
    if split in info.splits.keys():
        return int(info.splits[split].num_bytes)
    num_examples = len(tfds_files.source(dataset, data_dir, split))
    total = sum(s.num_examples for s in info.splits.values())
    return num_examples * int(info.dataset_size) // max(total, 1)


def train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    indices_only: bool = False,
) -> grain.DatasetIterator:
    """An endless, seeded stream of this process's training batches over `data.train_split`.

    The split is decoded whole into memory or streamed as `in_memory(data_config)` says; the
    batches and the iterator states are the same either way.

    Global batch k holds examples at positions k * batch_size .. k * batch_size + batch_size - 1 of
    an endless stream: epoch after epoch, each a new permutation of the split, with no gap at an
    epoch boundary, so every batch is full. grain iterates whole batches (element k is global batch
    k; one grain element per example costs far more host time, see the module docstring).
    `get_state()`/`set_state()` save and restore the position (one integer: the next global batch).

    Args:
      data_config: `config.data`.
      seed: shuffle seed (>= 0); the same seed gives the same batches.
      process_index: this process, in [0, process_count).
      process_count: processes sharing each global batch of `data.batch_size` examples.
      indices_only: yield `{"indices": int32 [b]}`, the rows of `train_examples(data_config)` that
        make up the batch, instead of the batch itself (for a split held in device memory).

    Returns:
      A grain iterator of dicts: `inputs`, `targets` and `weights` (float32 ones), each
      [batch_size // process_count, ...] as in the module docstring; or `indices`.
    """
    global_batch_size = data_config.batch_size
    batch_size = _process_batch_size(global_batch_size, process_index, process_count)
    if not in_memory(data_config):
        if indices_only:
            raise ValueError(
                "data.on_device needs the training split in memory, but it is streamed "
                "(data.in_memory); set data.on_device=False."
            )
        return _StreamIterator(
            functools.partial(_stream_loader, data_config, seed, process_index, process_count)
        )
    # Batches of indices read nothing but the split's size: take it from the arrays the devices
    # hold, so the device path never builds the host's float32 copy of MNIST.
    examples = device_examples(data_config)[0] if indices_only else train_examples(data_config)
    example_indices = _shuffled_stream(len(examples["targets"]), seed)
    first_row = process_index * batch_size

    def read_global_batch(batch_index: int) -> Batch:
        start = batch_index * global_batch_size + first_row  # this process's first stream position
        indices = example_indices(start, batch_size)
        if indices_only:
            return {"indices": indices.astype(np.int32)}
        batch = {k: np.take(v, indices, axis=0) for k, v in examples.items()}
        if "weights" not in batch:
            batch["weights"] = np.ones(batch["targets"].shape, np.float32)
        return batch

    if indices_only:  # a few microseconds a batch: no read-ahead threads needed
        return _BatchIterator(read_global_batch)
    # Endless in practice: stream positions stay below 2**63, as int64 numpy arrays need.
    num_batches = sys.maxsize // global_batch_size
    dataset = grain.MapDataset.range(num_batches).map(read_global_batch)
    return iter(dataset.to_iter_dataset(_read_options(data_config.num_workers)))


class _BatchIterator(grain.DatasetIterator):
    """Global batch k = `read(k)` for k = 0, 1, ...; the state is grain's own `{"next_index": k}`.

    For batches of indices only. grain's map-dataset iterator spends more Python per element than
    the rest of the host's work per step when a step gathers its batch from device memory; this
    one calls `read` and counts. A grain `DatasetIterator`, so grain's
    orbax checkpoint handler saves and restores it like the batch iterator, with the same state.
    """

    def __init__(self, read: Callable[[int], Batch]):
        super().__init__()
        self._read, self._next_index = read, 0

    def __next__(self) -> Batch:
        batch = self._read(self._next_index)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, int]) -> None:
        self._next_index = int(state["next_index"])


class _StreamIterator(grain.DatasetIterator):
    """Streamed training batches (`_stream_loader`), with the in-memory iterator's state:
    `{"next_index": k}`, the next global batch. `set_state` starts a new loader at batch k."""

    def __init__(self, make_loader: Callable[[int], grain.DataLoader]):
        super().__init__()
        self._make_loader, self._next_index, self._batches = make_loader, 0, None

    def __next__(self) -> Batch:
        if self._batches is None:  # started on the first batch: a restore starts no workers twice
            self._batches = iter(self._make_loader(self._next_index))
        batch = next(self._batches)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, int]) -> None:
        self._next_index, self._batches = int(state["next_index"]), None


def _stream_loader(
    data_config: ml_collections.ConfigDict,
    seed: int,
    process_index: int,
    process_count: int,
    first_batch: int,
) -> grain.DataLoader:
    """A grain DataLoader of this process's rows of global batches first_batch, first_batch + 1,
    ...: each read from the ArrayRecord files and decoded in one of `data.num_workers` worker
    processes (0: in the calling thread), two batches ahead per worker."""
    num_workers = data_config.num_workers
    if num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers} must be >= 0.")
    dataset, data_dir = data_config.dataset, resolve_data_dir(data_config)
    split = data_config.train_split
    kind = _kind(dataset, data_dir)
    info = _load_info(dataset, data_dir, data_config.vocab_size) if kind != "image" else None
    starts = None  # characters: where each record's text starts in the split's text
    if kind == "characters":
        # Examples are the windows the in-memory path cuts from the whole text (whole ones only).
        starts = _text_layout(dataset, data_dir, split)[0]
        num_examples = max(int(starts[-1]) - 1, 0) // _check_seq_len(data_config.seq_len, dataset)
    else:
        num_examples = len(tfds_files.source(dataset, data_dir, split))
    _check_has_training_examples(num_examples, dataset, split, data_dir)
    if kind == "words":
        _check_seq_len(data_config.seq_len, dataset)
    source = _StreamedBatches(
        dataset=dataset,
        data_dir=data_dir,
        split=split,
        kind=kind,
        seq_len=data_config.seq_len,
        info=info,
        starts=starts,
        num_examples=num_examples,
        seed=seed,
        global_batch_size=data_config.batch_size,
        process_count=process_count,
        first_batch=first_batch,
        # Endless in practice, stream positions below 2**63 as int64 numpy arrays need.
        num_batches=sys.maxsize // (data_config.batch_size * process_count) - first_batch,
    )
    if num_workers and not flags.FLAGS.is_parsed():
        # grain's worker processes read its absl flags; outside `python -m train` (a notebook, a
        # test) nothing has parsed them, and reading one would raise. Their defaults hold.
        flags.FLAGS.mark_as_parsed()
    shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        len(source), shard_options=shard, shuffle=False, num_epochs=1
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        worker_count=num_workers,
        worker_buffer_size=2,
        # Within a worker, one thread reads one batch ahead (not grain's default 16 threads and
        # 500 elements, which here would be 500 batches); in the training thread, none.
        read_options=grain.ReadOptions(
            num_threads=min(num_workers, 1), prefetch_buffer_size=min(num_workers, 1)
        ),
    )


@dataclasses.dataclass
class _StreamedBatches:
    """A grain data source: element r is process r // num_batches's rows of global batch
    first_batch + r % num_batches, read from the split's ArrayRecord files and decoded on demand.

    Rows and decoding are those of the in-memory path (`_shuffled_stream`, `_decode_image_records`,
    `_sentence_batch`, `_window_batch`), so the batches are bitwise the same. A text's window is
    cut from the one or few records it spans (`_text_windows`). Pickled into grain's worker
    processes: the open files and the cached permutations are made again there, on first use.
    """

    dataset: str
    data_dir: str
    split: str
    kind: str  # 'image', 'words' or 'characters'
    seq_len: int
    info: DatasetInfo | None = dataclasses.field(repr=False)  # the vocabulary (text)
    starts: np.ndarray | None = dataclasses.field(repr=False)  # characters: see `_text_layout`
    num_examples: int
    seed: int
    global_batch_size: int
    process_count: int
    first_batch: int
    num_batches: int  # per process
    _opened: tuple | None = dataclasses.field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.process_count * self.num_batches

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": None}

    def _open(self) -> tuple:
        if self._opened is None:  # a race only opens the same files twice
            if self.kind != "words":  # the stored records, parsed and decoded here
                raw = tfds.decode.DeserializeMethod.RAW_BYTES
                records = tfds_files.source(
                    self.dataset, self.data_dir, self.split, deserialize_method=raw
                )
                features = tfds_files.builder(self.dataset, self.data_dir).info.features
                shape = features["image"].shape if self.kind == "image" else None
                records = (records, shape)
            else:
                records = (tfds_files.source(self.dataset, self.data_dir, self.split), None)
            self._opened = (*records, _shuffled_stream(self.num_examples, self.seed))
        return self._opened

    def __getitem__(self, record_key: int) -> Batch:
        records, image_shape, example_indices = self._open()
        process_index, batch = divmod(int(record_key), self.num_batches)
        batch_size = self.global_batch_size // self.process_count
        start = (self.first_batch + batch) * self.global_batch_size + process_index * batch_size
        indices = example_indices(start, batch_size)
        if self.kind == "words":
            return _sentence_batch(records, self.info, self.seq_len, indices)
        if self.kind == "characters":
            return _text_windows(records, self.starts, self.info, self.seq_len, indices)
        read = records.__getitems__([int(i) for i in indices])
        pixels, labels = _decode_image_records(read, image_shape)
        images = pixels.astype(np.float32)
        images *= _PIXEL_SCALE  # as _image_arrays does: bitwise the same
        return {"inputs": images, "targets": labels, "weights": np.ones(len(labels), np.float32)}


def train_examples(data_config: ml_collections.ConfigDict) -> Batch:
    """Every example of `data.train_split` as arrays with a leading example axis (cached).

    `inputs` and `targets` exactly as training batches hold them (MNIST images decoded to float32,
    windows of character ids, SST-2 sentences as padded word ids): a training batch is these
    arrays gathered at the batch's indices. Read-only; MNIST's is 188 MB, the others a few MB.
    """
    examples = _split_examples(
        data_config.dataset,
        resolve_data_dir(data_config),
        data_config.train_split,
        data_config.seq_len,
        data_config.vocab_size,
        training=True,
    )
    if "decoder_inputs" in examples:  # seq2seq: padded targets, whose weights are not all ones
        return dict(examples)
    return {"inputs": examples["inputs"], "targets": examples["targets"]}


def _decode_images(batch: Batch) -> Batch:
    return {**batch, "inputs": _pixels_to_float(batch["inputs"])}


def device_examples(
    data_config: ml_collections.ConfigDict,
) -> tuple[Batch, Callable[[Batch], Batch] | None]:
    """The training split as device memory holds it, and how rows gathered from it become a batch.

    Returns `(examples, decode)`: `inputs` and `targets` with a leading example axis, and None or a
    function (traced inside the train step) that turns rows gathered from `examples` into exactly
    the rows of `train_examples`. MNIST's images stay uint8 and `decode` converts them as the host
    does, so the batches are bitwise the same, with a quarter of the bytes to hold and to gather
    per step.
    """
    dataset, split, data_dir = (
        data_config.dataset,
        data_config.train_split,
        resolve_data_dir(data_config),
    )
    if _kind(dataset, data_dir) != "image":
        return train_examples(data_config), None
    pixels, labels = _image_pixels(dataset, data_dir, split)
    _check_has_training_examples(len(labels), dataset, split, data_dir)
    return {"inputs": pixels, "targets": labels}, _decode_images


def eval_batches(
    data_config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """One pass over `data.eval_split`, in order, as fixed-shape batches.

    The last global batch is padded with zeros and weight 0, so summing `weights`-weighted values
    over all batches of all processes counts each example (each target token, for language models)
    exactly once. Every process yields the same number of batches, as multi-host steps require.
    The split is decoded once and kept in memory, so later passes are cheap.

    Args:
      data_config: `config.data`.
      process_index: this process, in [0, process_count).
      process_count: processes sharing each global batch of `data.batch_size` examples.

    Returns:
      An iterator of dicts like `train_iterator`'s; `weights` is [b, seq_len] for language models
      (1 for real target tokens) and [b] for classifiers.
    """
    batch_size = _process_batch_size(data_config.batch_size, process_index, process_count)
    examples = _split_examples(
        data_config.dataset,
        resolve_data_dir(data_config),
        data_config.eval_split,
        data_config.seq_len,
        data_config.vocab_size,
        training=False,
    )
    num_examples = len(examples["targets"])
    num_batches = -(-num_examples // data_config.batch_size)

    def batches() -> Iterator[Batch]:
        for step in range(num_batches):
            start = step * data_config.batch_size + process_index * batch_size
            yield {
                k: _pad_rows(v[start : start + batch_size], batch_size) for k, v in examples.items()
            }

    return batches()


# --- Reading splits -------------------------------------------------------------------------------


def _kind(dataset: str, data_dir: str) -> str:
    """'image', 'characters', 'words' or 'seq2seq' (see DATASETS); any other prepared data set
    whose examples hold a `text` feature is read as characters, as tiny_shakespeare is."""
    name = dataset.split(":")[0]  # allow a pinned version: 'mnist:3.0.1'
    if name not in DATASETS:
        features = tfds_files.builder(dataset, data_dir).info.features  # or FileNotFoundError
        if (
            isinstance(features, tfds.features.FeaturesDict)
            and "text" in features
            and isinstance(features["text"], tfds.features.Text)
        ):
            return "characters"
        raise ValueError(
            f"Data set {dataset!r} (in {data_dir}) has no input pipeline here. "
            f"Known: {sorted(DATASETS)}"
        )
    return DATASETS[name]


@functools.lru_cache(maxsize=8)
def _text_layout(dataset: str, data_dir: str, split: str) -> tuple[np.ndarray, str]:
    """Where each record's text starts in the split's text, and the characters it uses.

    Returns `(starts, characters)`: int64 [records + 1], record r holding characters
    starts[r]:starts[r + 1] of the records' texts concatenated (starts[-1]: the length), and the
    sorted characters of that text. One pass over the records, a chunk at a time: a streamed split
    is never held whole.
    """
    lengths, seen = [], np.zeros(128, bool)  # seen: code points below 128; others in `more`
    more: set[str] = set()
    for text in tfds_files.iter_bytes_feature(dataset, data_dir, split, "text"):
        raw = np.frombuffer(text, np.uint8)
        if raw.size and raw.max() < 128:  # ASCII: a byte is a character
            seen[raw] = True
            lengths.append(raw.size)
        else:
            decoded = text.decode("utf-8")
            more.update(decoded)
            lengths.append(len(decoded))
    starts = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    characters = more | {chr(c) for c in np.flatnonzero(seen)}
    return starts, "".join(sorted(characters))


def _text_windows(
    records: Sequence, starts: np.ndarray, info: DatasetInfo, seq_len: int, indices: np.ndarray
) -> Batch:
    """Windows `indices` of a text split (as `_window_batch` cuts them from the whole text), each
    from the records it spans, read from `records` (stored records, as bytes)."""
    first = np.searchsorted(starts, np.asarray(indices) * seq_len, side="right") - 1
    last = np.searchsorted(starts, np.asarray(indices) * seq_len + seq_len, side="right") - 1
    needed = sorted({r for a, b in zip(first, last, strict=True) for r in range(a, b + 1)})
    parse = tfds_files.example_message().FromString
    texts = [records[r] for r in needed]  # a few records: faster than one threaded __getitems__
    ids = {
        r: info.encode(parse(raw).features.feature["text"].bytes_list.value[0].decode("utf-8"))
        for r, raw in zip(needed, texts, strict=True)
    }
    windows = np.empty((len(first), seq_len + 1), np.int32)
    for row, a, b, index in zip(windows, first, last, indices, strict=True):
        span = np.concatenate([ids[r] for r in range(a, b + 1)])
        offset = int(index) * seq_len - int(starts[a])
        row[:] = span[offset : offset + seq_len + 1]
    return {
        "inputs": np.ascontiguousarray(windows[:, :-1]),
        "targets": np.ascontiguousarray(windows[:, 1:]),
        "weights": np.ones((len(windows), seq_len), np.float32),
    }


@functools.lru_cache(maxsize=8)
def _split_text(dataset: str, data_dir: str, split: str) -> str:
    """The `text` of a split's examples, concatenated (tiny_shakespeare: one example per split)."""
    return b"".join(tfds_files.bytes_feature(dataset, data_dir, split, "text")).decode("utf-8")


@functools.lru_cache(maxsize=8)
def _load_info(dataset: str, data_dir: str, vocab_size: int) -> DatasetInfo:
    kind = _kind(dataset, data_dir)
    if kind == "seq2seq":
        return translation.load_info(dataset)
    if kind == "image":
        num_classes = tfds_files.builder(dataset, data_dir).info.features["label"].num_classes
        return DatasetInfo(vocab_size=0, num_classes=num_classes, is_language_model=False)
    if kind == "characters":
        vocab = tuple(_text_layout(dataset, data_dir, _VOCAB_SPLIT)[1])
        return DatasetInfo(
            vocab_size=len(vocab), num_classes=0, is_language_model=True, vocab=vocab
        )
    if vocab_size < 3:
        raise ValueError(
            f"data.vocab_size={vocab_size} must leave room for <pad>, <unk> and words."
        )
    sentences = tfds_files.bytes_feature(dataset, data_dir, _VOCAB_SPLIT, "sentence")
    counts = collections.Counter(b"\n".join(sentences).decode("utf-8").lower().split())
    # Most frequent first, ties alphabetical: the same vocabulary on every machine.
    words = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - 2]
    vocab = ("<pad>", "<unk>", *words)
    num_classes = tfds_files.builder(dataset, data_dir).info.features["label"].num_classes
    return DatasetInfo(
        vocab_size=len(vocab),
        num_classes=num_classes,
        is_language_model=False,
        vocab=vocab,
        word_level=True,
    )


# --- Examples to batches --------------------------------------------------------------------------


def _shuffled_stream(num_examples: int, seed: int) -> Callable[[int, int], np.ndarray]:
    """The endless training order: a function (start, count) -> example indices, int64 [count].

    Position p of the stream is example `permutation(p // num_examples)[p % num_examples]`: each
    epoch is a fresh permutation seeded with (seed, epoch), so a position's example depends on
    nothing but the seed and the position. A range of positions is a slice of one permutation,
    or of a few consecutive ones where it crosses epoch boundaries. Up to
    `PERMUTATION_MAX_EXAMPLES` examples an epoch's permutation is a numpy array; above it (the
    windows of a text set of gigabytes), grain's `index_shuffle` computes each position's example
    on demand, so memory does not grow with the data set.
    """

    # Two epochs: the one being read and the next, which a batch (or a read-ahead thread) may reach
    # first. A permutation is made once per epoch, a small cost beside the epoch's batches.
    @functools.lru_cache(maxsize=2)
    def permutation(epoch: int) -> np.ndarray | int:
        rng = np.random.default_rng([seed, epoch])
        if num_examples > PERMUTATION_MAX_EXAMPLES:
            return int(rng.integers(2**31))  # index_shuffle's seed for this epoch
        order = rng.permutation(num_examples)
        order.flags.writeable = False  # shared by the batches of an epoch
        return order

    def example_indices(start: int, count: int) -> np.ndarray:
        indices = np.empty(count, np.int64)
        stop = start + count
        for epoch in range(start // num_examples, (stop - 1) // num_examples + 1):
            epoch_start = epoch * num_examples
            lo, hi = max(start, epoch_start), min(stop, epoch_start + num_examples)
            order = permutation(epoch)
            if isinstance(order, int):
                indices[lo - start : hi - start] = [
                    index_shuffle(i, max_index=num_examples - 1, seed=order, rounds=4)
                    for i in range(lo - epoch_start, hi - epoch_start)
                ]
            else:
                indices[lo - start : hi - start] = order[lo - epoch_start : hi - epoch_start]
        return indices

    return example_indices


@functools.lru_cache(maxsize=4)
def _image_arrays(dataset: str, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of a split, decoded once: float32 [n, 28, 28, 1] in [0, 1], int32 [n].

    Pixels are converted to float32 once: four times the host memory of the uint8 pixels, but each
    host batch is then a gather alone, not a gather and a conversion. Device memory holds the uint8
    pixels (see `device_examples`).
    """
    pixels, labels = _image_pixels(dataset, data_dir, split)
    images = pixels.astype(np.float32)
    images *= _PIXEL_SCALE  # in place: no second float32 copy; as _pixels_to_float does
    images.flags.writeable = False  # cached and shared
    return images, labels


# A multiplication, not a division by 255: under jit, XLA:CPU's `pixels / 255` differed from
# numpy's by one ulp on some pixels, while the same float32 multiplication rounds identically in
# both, which keeps host and device batches bitwise equal (tests/test_data.py).
_PIXEL_SCALE = np.float32(1 / 255)


def _pixels_to_float(pixels):
    """uint8 pixels -> float32 in [0, 1], in the step (jax): the host's conversion, bit for bit."""
    return pixels.astype(np.float32) * _PIXEL_SCALE


@functools.lru_cache(maxsize=4)
def _image_pixels(dataset: str, data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every image and label of a split, decoded once: uint8 [n, 28, 28, 1], int32 [n].

    Decoding each PNG once here, instead of in every batch in the training thread (many times a
    small model's step), leaves a batch costing one gather. Parsing the stored tf.train.Example and
    calling PIL directly, as here, is about twice as fast as tfds's own numpy decoding.
    """
    shape = tfds_files.builder(dataset, data_dir).info.features["image"].shape  # (28, 28, 1)
    pixels, labels = _decode_image_records(tfds_files.records(dataset, data_dir, split), shape)
    pixels.flags.writeable = labels.flags.writeable = False  # cached and shared
    return pixels, labels


def _decode_image_records(
    records: Sequence[bytes], shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Stored records (serialized tf.train.Example) -> uint8 pixels [n, *shape], int32 labels."""
    pixels = np.empty((len(records), *shape), np.uint8)  # [n, 28, 28, 1]
    labels = np.empty(len(records), np.int32)
    parse = tfds_files.example_message().FromString
    for i, record in enumerate(records):
        feature = parse(record).features.feature
        png = feature["image"].bytes_list.value[0]
        pixels[i] = np.asarray(PIL.Image.open(io.BytesIO(png))).reshape(shape)
        labels[i] = feature["label"].int64_list.value[0]
    return pixels, labels


def _window_batch(ids: np.ndarray, seq_len: int, indices: np.ndarray) -> Batch:
    # Window i is ids[i * seq_len : i * seq_len + seq_len + 1]: inputs and targets shifted by one.
    starts = np.asarray(indices)[:, None] * seq_len  # [b, 1]
    windows = ids[starts + np.arange(seq_len + 1)]  # [b, seq_len + 1]
    return {
        "inputs": np.ascontiguousarray(windows[:, :-1]),
        "targets": np.ascontiguousarray(windows[:, 1:]),
        "weights": np.ones((len(windows), seq_len), np.float32),
    }


def _sentence_batch(
    source: Sequence, info: DatasetInfo, seq_len: int, indices: np.ndarray
) -> Batch:
    examples = source.__getitems__([int(i) for i in indices])
    inputs = np.zeros((len(examples), seq_len), np.int32)  # [b, seq_len], PAD_ID after the sentence
    for row, ex in zip(inputs, examples, strict=True):
        ids = info.encode(ex["sentence"].decode("utf-8"))[:seq_len]
        row[: len(ids)] = ids
    return {
        "inputs": inputs,
        "targets": np.array([ex["label"] for ex in examples], np.int32),
        "weights": np.ones(len(examples), np.float32),
    }


def _check_seq_len(seq_len: int, dataset: str) -> int:
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len} must be positive for {dataset}.")
    return seq_len


def _check_has_training_examples(
    num_examples: int, dataset: str, split: str, data_dir: str
) -> None:
    if num_examples < 1:
        raise ValueError(
            f"Split {split!r} of {dataset!r} in {data_dir} holds no training examples."
        )


@functools.lru_cache(maxsize=8)
def _split_examples(
    dataset: str, data_dir: str, split: str, seq_len: int, vocab_size: int, training: bool
) -> Batch:
    """Every example of a split as arrays with a leading example axis (read-only, cached).

    `inputs`, `targets` and `weights`. For training, text is cut into whole windows only and the
    split must not be empty; for evaluation a last partial window is kept (zero-padded, weight 0)
    so that no target token is dropped, and a split without labels is refused.
    """
    kind = _kind(dataset, data_dir)
    if kind == "image":
        images, labels = _image_arrays(dataset, data_dir, split)  # read-only already: no copy
        weights = np.ones(len(labels), np.float32)
        examples = {"inputs": images, "targets": labels, "weights": weights}
    elif kind == "characters":
        _check_seq_len(seq_len, dataset)
        info = _load_info(dataset, data_dir, vocab_size)
        ids = info.encode(_split_text(dataset, data_dir, split))
        num_targets = max(len(ids) - 1, 0)
        if training:  # whole windows only
            num_windows = num_targets // seq_len
        else:  # a last partial window too, zero-padded, weight 0 beyond the text
            num_windows = -(-num_targets // seq_len)
            ids = np.pad(ids, (0, num_windows * seq_len + 1 - len(ids)))
        examples = _window_batch(ids, seq_len, np.arange(num_windows))
        positions = np.arange(num_windows * seq_len).reshape(num_windows, seq_len)
        examples["weights"] = (positions < num_targets).astype(np.float32)  # [windows, seq_len]
    elif kind == "seq2seq":
        examples = translation.split_examples(dataset, data_dir, split, seq_len, training)
    else:
        _check_seq_len(seq_len, dataset)
        source = tfds_files.source(dataset, data_dir, split)
        examples = _sentence_batch(
            source, _load_info(dataset, data_dir, vocab_size), seq_len, np.arange(len(source))
        )
        if not training and (examples["targets"] < 0).any():
            raise ValueError(
                f"Split {split!r} of {dataset!r} has no labels (label -1; GLUE hides test labels); "
                f"set data.eval_split to 'validation'."
            )
    if training:
        _check_has_training_examples(len(examples["targets"]), dataset, split, data_dir)
    for array in examples.values():
        array.flags.writeable = False  # cached: a caller must not change what the next use sees
    return examples


# --- Small helpers --------------------------------------------------------------------------------


def _process_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})."
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"data.batch_size={global_batch_size} must be a positive multiple of the "
            f"{process_count} processes that share it."
        )
    return global_batch_size // process_count


def _read_options(num_workers: int) -> grain.ReadOptions:
    """`num_workers` threads that read whole batches ahead; 0 reads in the calling thread."""
    if num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers} must be >= 0.")
    return grain.ReadOptions(num_threads=num_workers, prefetch_buffer_size=2 * num_workers)


def _pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """A fresh copy of `array` with zero rows appended up to `size` rows."""
    out = np.zeros((size, *array.shape[1:]), array.dtype)
    out[: len(array)] = array
    return out
