"""The TFDS data dir and the data sets prepared in it, as train.data, train.translation and
train.prepare all need them.

    configured_data_dir  where data sets live: data.data_dir, $TFDS_DATA_DIR or tfds's default
    builder              the prepared builder of a data set (its info: features, splits, keys)
    source               a split's random-access source (ArrayRecord)
    records              a split's stored records, serialized tf.train.Example bytes, in order
    bytes_feature        one bytes feature of every record of a split, in order
    example_message      the protobuf class that parses a record

A data set that is missing, not prepared, or prepared in a form that has no random access is a
one-line FileNotFoundError naming the fix: `python -m train.prepare NAME` for the data sets that
command makes (`PREPARABLE`). Nothing here imports TensorFlow: tfds reads ArrayRecord with numpy,
and records are parsed with protobuf.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# The data sets `python -m train.prepare` makes (its split generators; tests/test_prepare.py checks
# that the two lists agree). Errors about the others point at a TFDS data dir instead.
PREPARABLE = ("glue/sst2", "mnist", "tiny_shakespeare")
_READ_CHUNK = 4096  # examples per batched read when a whole split is read


def configured_data_dir(data_dir: str | os.PathLike | None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else tfds's default ~/tensorflow_datasets."""
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(os.fspath(data_dir))


def first_line(error: BaseException) -> str:
    """The first line of an error's message (tfds's and TFDS's errors run to many lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def builder(dataset: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The prepared tfds builder of `dataset`; a one-line FileNotFoundError if there is none."""
    # tfds raises DatasetNotFoundError (a ValueError) listing the whole catalogue, and an
    # AssertionError for an unknown version of a known data set ('mnist:9.9.9').
    try:
        found = tfds.builder(dataset, data_dir=data_dir)
    except (ValueError, KeyError, AssertionError) as err:
        raise _not_found(dataset, data_dir, f"is not found ({first_line(err)})") from None
    if not found.is_prepared():
        raise _not_found(dataset, data_dir, "is not prepared")
    return found


def source(dataset: str, data_dir: str, split: str, **kwargs) -> Sequence:
    """tfds's random-access source of one split; one-line errors for missing data or splits.

    `kwargs` go to `tfds.data_source` (`deserialize_method`, `decoders`).
    """
    prepared = builder(dataset, data_dir)
    try:
        return tfds.data_source(dataset, split=split, data_dir=data_dir, download=False, **kwargs)
    except NotImplementedError:  # prepared, but as TFRecord, which has no random access
        why = f"is prepared as {prepared.info.file_format.value}, not ArrayRecord,"
        raise _not_found(dataset, data_dir, why, elsewhere=True) from None
    except (ValueError, KeyError) as err:
        splits = {name: info.num_examples for name, info in prepared.info.splits.items()}
        raise ValueError(
            f"Split {split!r} of data set {dataset!r} in data dir {data_dir} is not valid "
            f"({first_line(err)}). Splits: {splits}; slices look like 'train[:2048]'."
        ) from None


def records(dataset: str, data_dir: str, split: str) -> list[bytes]:
    """Every stored record of a split (a serialized tf.train.Example), in order, read in chunks."""
    raw_bytes = tfds.decode.DeserializeMethod.RAW_BYTES
    raw = source(dataset, data_dir, split, deserialize_method=raw_bytes)
    read = []
    for start in range(0, len(raw), _READ_CHUNK):
        read.extend(raw.__getitems__(list(range(start, min(start + _READ_CHUNK, len(raw))))))
    return read


def bytes_feature(dataset: str, data_dir: str, split: str, feature: str) -> list[bytes]:
    """One bytes feature of every example of a split, in order.

    Parses the stored records with protobuf (`example_message`), several times faster than tfds's
    generic numpy decoding, which runs Python per feature of every example (SST-2's 67349 training
    sentences: 0.3 s against 3.3 s).
    """
    parse = example_message().FromString
    return [
        parse(r).features.feature[feature].bytes_list.value[0]
        for r in records(dataset, data_dir, split)
    ]


def iter_bytes_feature(dataset: str, data_dir: str, split: str, feature: str) -> Iterator[bytes]:
    """`bytes_feature`'s values one at a time, read a chunk of records at a time: for a split too
    large to hold."""
    parse = example_message().FromString
    raw_bytes = tfds.decode.DeserializeMethod.RAW_BYTES
    raw = source(dataset, data_dir, split, deserialize_method=raw_bytes)
    for start in range(0, len(raw), _READ_CHUNK):
        for record in raw.__getitems__(list(range(start, min(start + _READ_CHUNK, len(raw))))):
            yield parse(record).features.feature[feature].bytes_list.value[0]


@functools.cache  # one message class per process
def example_message() -> type:
    """The protobuf message class of a serialized tf.train.Example, as TFDS stores examples.

    Built with protobuf's public descriptor API from the fields of TensorFlow's example.proto and
    feature.proto that these records use, since tfds ships its generated module only as an
    internal one: Example {Features features = 1}, Features {map<string, Feature> feature = 1},
    Feature {one of BytesList bytes_list = 1, FloatList float_list = 2, Int64List int64_list = 3},
    each list {repeated value = 1} (packed or not: protobuf reads both).
    """
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="train/tf_example.proto", package="train")

    def add(message, name: str, number: int, kind: int, type_name: str | None = None, *, repeated):
        label = field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL
        message.field.add(name=name, number=number, label=label, type=kind, type_name=type_name)

    for name, kind in (("BytesList", field.TYPE_BYTES), ("FloatList", field.TYPE_FLOAT)):
        add(proto.message_type.add(name=name), "value", 1, kind, repeated=True)
    add(proto.message_type.add(name="Int64List"), "value", 1, field.TYPE_INT64, repeated=True)
    feature = proto.message_type.add(name="Feature")
    for number, name in enumerate(("bytes_list", "float_list", "int64_list"), start=1):
        list_type = ".train." + name.title().replace("_", "")  # .train.BytesList, ...
        add(feature, name, number, field.TYPE_MESSAGE, list_type, repeated=False)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")  # a map is a repeated key-value entry
    entry.options.map_entry = True
    add(entry, "key", 1, field.TYPE_STRING, repeated=False)
    add(entry, "value", 2, field.TYPE_MESSAGE, ".train.Feature", repeated=False)
    add(features, "feature", 1, field.TYPE_MESSAGE, ".train.Features.FeatureEntry", repeated=True)
    example = proto.message_type.add(name="Example")
    add(example, "features", 1, field.TYPE_MESSAGE, ".train.Features", repeated=False)
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: nothing registered process-wide
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("train.Example"))


def _not_found(dataset: str, data_dir: str, why: str, elsewhere: bool = False) -> FileNotFoundError:
    """A one-line error naming the command that prepares `dataset` in `data_dir` (`elsewhere`:
    in another dir, since `data_dir` holds a copy in a form this pipeline cannot read)."""
    name = dataset.split(":")[0]
    if name not in PREPARABLE:
        fix = "Point data.data_dir or TFDS_DATA_DIR at a TFDS data dir that holds it as ArrayRecord"
    elif elsewhere:
        fix = (
            f"Prepare it as ArrayRecord in another dir: python -m train.prepare {name} "
            f"--data_dir=DIR, and point data.data_dir or TFDS_DATA_DIR at DIR"
        )
    else:
        fix = (
            f"Prepare it: python -m train.prepare {name} --data_dir={data_dir} (or point "
            f"data.data_dir or TFDS_DATA_DIR at a dir that holds it)"
        )
    return FileNotFoundError(f"Data set {dataset!r} {why} in data dir {data_dir}. {fix}.")
