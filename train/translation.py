"""Translation-style data for the encoder-decoder (`jaxmodels.Seq2Seq`), as `train.data` reads it.

Two kinds of data set, both of kind "seq2seq" in `train.data.DATASETS`:

    addition                     generated here, offline: "123+45" -> "168", characters
    ted_hrlr_translate/pt_to_en  TFDS, where prepared (ArrayRecord): sentence pairs, UTF-8 bytes

Their examples become four arrays of `data.seq_len` columns, which `train.data` batches, shuffles
and checkpoints like every other data set:

    inputs          int32    the source ids, then 0 (padding)
    decoder_inputs  int32    BOS_ID, then the target: what the decoder reads (teacher forcing)
    targets         int32    the target, then EOS_ID, then 0: what it must predict
    weights         float32  1 on the target and its EOS, 0 on padding

Training splits drop the pairs that do not fit in `seq_len` (source longer than `seq_len`, or
target longer than `seq_len - 1`); evaluation splits keep every pair, cut to `seq_len`.

The addition problems are every `a+b` with `0 <= a, b < 1000`, in one fixed shuffled order.
`validation` is its first 1,000 problems and `test` the next 1,000: random problems, mostly of two
3-digit numbers. `train` holds 100,000 of the others, so no held-out problem is ever trained on:
55,000 more in that order, and 5,000 for each of the 9 pairs of operand lengths (1 to 3 digits
each). A uniform draw holds a 1-digit operand in 2% of problems, and models trained on such draws
alone got most of their held-out errors there; problems of the short pairs (a 1-digit plus a
1-digit number has 100) repeat. A split may be sliced as in TFDS: `train[:1024]`,
`validation[500:]`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np

from train import tfds_files

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # the first ids of every vocabulary here
_SPECIALS = ("<pad>", "<bos>", "<eos>")

ADDITION = "addition"
ADDITION_CHARACTERS = "0123456789+"
ADDITION_MAX_OPERAND = 1000  # operands 0..999: sources up to 7 characters, sums up to 4
ADDITION_SPLITS = {"validation": 1_000, "test": 1_000, "train": 100_000}  # problems in each
_ADDITION_UNIFORM = 55_000  # training problems in the shuffled order; the rest by operand lengths
_ADDITION_SEED = 0


@dataclasses.dataclass(frozen=True)
class Seq2SeqInfo:
    """The vocabulary of a translation-style data set (for the loop, the sampler and you).

    Ids 0, 1 and 2 are padding, start (BOS) and end (EOS); then either one id per character of
    `characters`, or, when `characters` is empty, one id per byte (UTF-8 text: 259 ids).

    Attributes:
      vocab_size: number of token ids.
      characters: the characters after the three special ids; "" for bytes.
      num_classes: 0, as `train.data.DatasetInfo` has it (no classes).
      is_language_model: False, as `train.data.DatasetInfo` has it.
    """

    vocab_size: int
    characters: str = ""
    num_classes: int = 0
    is_language_model: bool = False

    def encode(self, text: str) -> np.ndarray:
        """The ids of `text`, int32 `[num_tokens]`, without BOS or EOS."""
        if not self.characters:
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + len(_SPECIALS)
        unknown = sorted(set(text) - set(self.characters))
        if unknown:
            raise ValueError(f"Characters {unknown} are not in the vocabulary {self.characters!r}.")
        return np.array([self.characters.index(c) + len(_SPECIALS) for c in text], np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ids up to the first EOS; padding and BOS are dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        ids = [i - len(_SPECIALS) for i in ids if i >= len(_SPECIALS)]
        if not self.characters:
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.characters[i] for i in ids)


def load_info(dataset: str) -> Seq2SeqInfo:
    """The vocabulary of `dataset`: characters for addition, bytes for TFDS translation sets."""
    if dataset == ADDITION:
        characters = ADDITION_CHARACTERS
        return Seq2SeqInfo(vocab_size=len(_SPECIALS) + len(characters), characters=characters)
    return Seq2SeqInfo(vocab_size=len(_SPECIALS) + 256)


def split_examples(
    dataset: str, data_dir: str, split: str, seq_len: int, training: bool
) -> dict[str, np.ndarray]:
    """Every pair of a split as the four arrays of the module docstring, `[pairs, seq_len]` each.

    Args:
      dataset: `addition`, or a TFDS translation data set prepared in `data_dir`.
      data_dir: the TFDS data dir (unused for addition).
      split: a split name, optionally sliced: `train[:1024]`.
      seq_len: tokens per source and per target row.
      training: drop pairs that do not fit (else cut them to `seq_len`).
    """
    if seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len} must be at least 2 for {dataset}.")
    info = load_info(dataset)
    if dataset == ADDITION:
        sources, targets = _addition_pairs(split)
    else:
        sources, targets = _tfds_pairs(dataset, data_dir, split)
    sources = [info.encode(text) for text in sources]
    targets = [info.encode(text) for text in targets]
    if training:
        fits = [
            len(s) <= seq_len and len(t) < seq_len for s, t in zip(sources, targets, strict=True)
        ]
        if dataset == ADDITION and not all(fits):
            raise ValueError(
                f"data.seq_len={seq_len} is too short for addition: its problems need 7 source "
                "tokens and 5 target tokens (4 digits and EOS); set data.seq_len >= 7."
            )
        sources = [s for s, keep in zip(sources, fits, strict=True) if keep]
        targets = [t for t, keep in zip(targets, fits, strict=True) if keep]
    return _pad_pairs(sources, targets, seq_len)


def _pad_pairs(
    sources: list[np.ndarray], targets: list[np.ndarray], seq_len: int
) -> dict[str, np.ndarray]:
    """The four padded arrays of the module docstring; rows longer than `seq_len` are cut."""
    num_pairs = len(sources)
    inputs = np.zeros((num_pairs, seq_len), np.int32)  # [pairs, seq_len]
    decoder_inputs = np.zeros((num_pairs, seq_len), np.int32)
    shifted = np.zeros((num_pairs, seq_len), np.int32)  # the target, then EOS
    weights = np.zeros((num_pairs, seq_len), np.float32)
    for row, (source, target) in enumerate(zip(sources, targets, strict=True)):
        source = source[:seq_len]
        inputs[row, : len(source)] = source
        with_bos = np.concatenate([[BOS_ID], target])[:seq_len]
        with_eos = np.concatenate([target, [EOS_ID]])[:seq_len]
        decoder_inputs[row, : len(with_bos)] = with_bos
        shifted[row, : len(with_eos)] = with_eos
        weights[row, : len(with_eos)] = 1.0
    return {
        "inputs": inputs,
        "decoder_inputs": decoder_inputs,
        "targets": shifted,
        "weights": weights,
    }


def _parse_split(split: str, sizes: dict[str, int]) -> tuple[str, slice]:
    """`train[:1024]` -> ("train", slice(None, 1024)); a one-line ValueError for anything else."""
    match = re.fullmatch(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?", split)
    if not match or match.group(1) not in sizes:
        raise ValueError(
            f"Split {split!r} of data set {ADDITION!r} is not valid. Splits: {sizes}; slices look "
            "like 'train[:2048]'."
        )
    name, start, stop = match.groups()
    return name, slice(int(start) if start else None, int(stop) if stop else None)


@functools.cache
def _addition_problems(split: str) -> np.ndarray:
    """The problems of an addition split (see the module docstring), as indices `a * 1000 + b`."""
    order = np.random.default_rng(_ADDITION_SEED).permutation(ADDITION_MAX_OPERAND**2)
    held_out = ADDITION_SPLITS["validation"] + ADDITION_SPLITS["test"]
    if split == "validation":
        return order[: ADDITION_SPLITS["validation"]]
    if split == "test":
        return order[ADDITION_SPLITS["validation"] : held_out]
    uniform = order[held_out : held_out + _ADDITION_UNIFORM]
    rest = order[held_out + _ADDITION_UNIFORM :]
    a, b = np.divmod(rest, ADDITION_MAX_OPERAND)
    extra_digits = lambda n: (n >= 10).astype(np.int64) + (n >= 100)  # noqa: E731  0, 1 or 2
    lengths = 3 * extra_digits(a) + extra_digits(b)  # the pair of operand lengths, 0..8
    per_length = (ADDITION_SPLITS["train"] - _ADDITION_UNIFORM) // 9
    # np.resize repeats the problems of a pair of lengths that has fewer than `per_length`.
    balanced = [np.resize(rest[lengths == pair], per_length) for pair in range(9)]
    return np.concatenate([uniform, *balanced])


def _addition_pairs(split: str) -> tuple[list[str], list[str]]:
    """The (source, target) texts of an addition split: `["123+45", ...]`, `["168", ...]`."""
    name, rows = _parse_split(split, ADDITION_SPLITS)
    problems = _addition_problems(name)[rows]
    a, b = np.divmod(problems, ADDITION_MAX_OPERAND)
    return [f"{x}+{y}" for x, y in zip(a, b, strict=True)], [str(s) for s in a + b]


def _tfds_pairs(dataset: str, data_dir: str, split: str) -> tuple[list[str], list[str]]:
    """The (source, target) texts of a TFDS translation split, in the order of its
    `supervised_keys` (`("pt", "en")` for ted_hrlr_translate/pt_to_en)."""
    try:
        builder = tfds_files.builder(dataset, data_dir)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Translation data set {dataset!r} is not prepared in data dir {data_dir}; prepare "
            f"it as ArrayRecord on a machine with internet (tfds.builder({dataset!r}, "
            "data_dir=..., file_format='array_record').download_and_prepare()) and point "
            "data.data_dir or TFDS_DATA_DIR at that dir."
        ) from None
    source_key, target_key = builder.info.supervised_keys
    return tuple(
        [text.decode("utf-8") for text in tfds_files.bytes_feature(dataset, data_dir, split, key)]
        for key in (source_key, target_key)
    )
