"""Writes a generated text data set of any size with TFDS's own writer, for streaming benchmarks.

    python benchmarks/text_dataset.py --data_dir=/tmp/text --train_mb=3000 [--record_chars=8192]

`generated_text/1.0.0` in DATA_DIR, ArrayRecord, one `text` feature: a train split of about
TRAIN_MB megabytes and a validation split of 1 MB, each record a passage of tiny_shakespeare
(the package's embedded copy) starting at a random character, of RECORD_CHARS characters on
average. Prepared by TFDS's `download_and_prepare` (its example encoding, shuffle and ArrayRecord
writer), as `python -m train.prepare` prepares the real data sets. Train on it with
`--config.data.dataset=generated_text --config.data.data_dir=DATA_DIR`: any data set of `text`
records is read as characters, and streamed (`data.in_memory`) above 1 GiB.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import data, tfds_files  # noqa: E402

NAME = "generated_text"


class GeneratedText(tfds.core.GeneratorBasedBuilder):
    """Random passages of tiny_shakespeare as `text` records (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(  # defaults: how tfds.builder opens it once prepared, to read it
        self, *, train_chars=0, record_chars=8192, seed=0, accents=False, **kwargs
    ):
        self.train_chars, self.record_chars = train_chars, record_chars
        self.seed, self.accents = seed, accents
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples(self.train_chars, self.seed),
            "validation": self._generate_examples(1 << 20, self.seed + 1),
        }

    def _generate_examples(self, num_chars: int, seed: int):
        text = "".join(
            t.decode("utf-8")
            for t in tfds_files.bytes_feature(
                "tiny_shakespeare", data.EMBEDDED_DATA_DIR, "train", "text"
            )
        )
        if self.accents:  # characters beyond ASCII, as real text has
            text = text.replace(" the ", " thé ").replace(" and ", " änd ")
        rng = np.random.default_rng(seed)
        written, key = 0, 0
        while written < num_chars:
            length = int(rng.integers(self.record_chars // 2, self.record_chars * 3 // 2 + 1))
            start = int(rng.integers(0, len(text) - length))
            passage = "" if self.accents and key % 97 == 5 else text[start : start + length]
            yield key, {"text": passage}
            written, key = written + length, key + 1


def write(
    data_dir: str | pathlib.Path,
    *,
    train_chars: int,
    record_chars: int = 8192,
    seed: int = 0,
    accents: bool = False,
) -> None:
    """Prepares `generated_text` in `data_dir` (a no-op if it is there already).

    TFDS's shuffler spills a split over 1 GB to temporary files through TensorFlow's file API,
    which the stack does not install; its in-memory limit is raised instead, so a split of N GB
    takes about N GB of memory while it is written (the training that reads it does not).
    """
    shuffle.MAX_MEM_BUFFER_SIZE = max(shuffle.MAX_MEM_BUFFER_SIZE, 2 * train_chars + (1 << 30))
    builder = GeneratedText(
        train_chars=train_chars,
        record_chars=record_chars,
        seed=seed,
        accents=accents,
        data_dir=str(data_dir),
        file_format="array_record",
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--train_mb", type=float, required=True, help="train split, in MB")
    parser.add_argument("--record_chars", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(
        args.data_dir,
        train_chars=int(args.train_mb * 1e6),
        record_chars=args.record_chars,
        seed=args.seed,
    )
    info = tfds_files.builder(NAME, args.data_dir).info
    for name, split in info.splits.items():
        print(f"{name}: {split.num_examples} records, {split.num_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
