"""Writes the test suite's real data, small slices of MNIST and SST-2, into tests/data/tfds.

    python tests/data/make_slices.py [--from_dir=DIR]

DIR is a TFDS data dir holding the full prepared data sets as ArrayRecord (default:
../shared/data/tensorflow_datasets_array_record; `python -m train.prepare mnist glue/sst2
--data_dir=DIR` writes an equal one). Each split of the slices holds the first examples of the
full split in TFDS's order, the records copied byte for byte, so `train[:1000]` of a slice is
`train[:1000]` of the full data set, and the configs' tiny variants (MNIST's train[:8192] and
test[:1000]) read the same examples from either. tiny_shakespeare is not here: the package
embeds the whole of it (train/embedded_data), and train/data.py reads that when a data dir has
none.
"""

import argparse
import pathlib
import shutil

import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "tfds"
SHARED = HERE.parents[2] / "shared" / "data" / "tensorflow_datasets_array_record"
SLICES = {  # data set: {split: examples kept}
    "mnist": {"train": 8192, "test": 1000},  # what configs/{mlp,cnn}.py:tiny read
    "glue/sst2": {"train": 4096, "validation": 872, "test": 256},  # validation: all of it
}


def write_slice(from_dir: pathlib.Path, name: str, counts: dict[str, int]) -> pathlib.Path:
    """The first `counts[split]` examples of each split of `name`, as a TFDS data set in OUT."""
    info = tfds.builder(name, data_dir=from_dir).info
    out = OUT / name / str(info.version)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    splits = []
    for split, count in counts.items():
        source = tfds.data_source(
            name,
            split=f"{split}[:{count}]",
            data_dir=from_dir,
            download=False,
            deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,  # records as stored
        )
        records = source.__getitems__(list(range(len(source))))
        template = info.splits[split].filename_template.replace(data_dir=out)
        path = template.sharded_filepath(shard_index=0, num_shards=1)
        file_adapters.ArrayRecordFileAdapter.write_examples(path, enumerate(records))
        splits.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[len(records)],
                num_bytes=sum(map(len, records)),  # as TFDS counts: serialized examples
                filename_template=template,
            )
        )
    info.set_splits(tfds.core.SplitDict(splits))
    info.write_to_directory(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from_dir", type=pathlib.Path, default=SHARED)
    args = parser.parse_args()
    for name, counts in SLICES.items():
        out = write_slice(args.from_dir, name, counts)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name}: {counts} -> {out.relative_to(HERE.parents[1])} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
