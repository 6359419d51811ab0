"""python -m train.prepare: TFDS ArrayRecord data from the original files, without TensorFlow.

The runs over whole data sets compare with ../shared/data (raw files and the copies TFDS's own
builders prepared with TensorFlow) and are skipped without it; CI has it.
"""

import hashlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from train import data, prepare, tfds_files

REPO = pathlib.Path(__file__).resolve().parents[1]
RAW = tfds.decode.DeserializeMethod.RAW_BYTES
# Python's zlib may be zlib-ng's (other, equally valid deflate bytes): then only pixels can match.
REFERENCE_ZLIB = not hasattr(zlib, "ZLIBNG_VERSION")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python *args` from the repository root, in this environment updated with `env`."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def records(name: str, data_dir, split: str) -> list[tf_example_pb2.Example]:
    """Every example of a split, in order, as the stored tf.train.Example protos."""
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False, deserialize_method=RAW
    )
    return [tf_example_pb2.Example.FromString(r) for r in source.__getitems__(range(len(source)))]


def assert_same_records(ours: list, theirs: list, what: str) -> None:
    """Equal lists of examples, failing with the first differing index (not a 60000-line diff)."""
    assert len(ours) == len(theirs), what
    differ = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    assert differ is None, f"{what}: example {differ} differs"


def split_sizes(version_dir: pathlib.Path) -> dict[str, tuple[list[str], str]]:
    info = json.loads((version_dir / "dataset_info.json").read_text())
    return {s["name"]: (s["shardLengths"], s["numBytes"]) for s in info["splits"]}


def sha256s(folder: pathlib.Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}


# --- Whole data sets, against ../shared/data ------------------------------------------------------


def test_mnist_from_raw_files_holds_the_shared_copy_and_trains(shared_data_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    result = run(
        "-m",
        "train.prepare",
        "mnist",
        f"--manual_dir={shared_data_dir / 'raw' / 'mnist'}",
        f"--data_dir={data_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert f"mnist: train 60000, test 10000 examples in {data_dir}/mnist/3.0.1" in result.stdout
    ours = data_dir / "mnist" / "3.0.1"
    theirs = shared_data_dir / "tensorflow_datasets_array_record" / "mnist" / "3.0.1"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert split_sizes(ours) == split_sizes(theirs)  # counts, and bytes of the serialized records
    for name in ("dataset_info.json", "features.json"):
        assert (ours / name).read_text() == (theirs / name).read_text()

    for split in ("train", "test"):
        # Every example, in order, as stored: the same label and the same PNG bytes as
        # TensorFlow's; with another zlib, the same pixels as the pipeline decodes them.
        if REFERENCE_ZLIB:
            ours_split = records("mnist", data_dir, split)
            assert_same_records(ours_split, records("mnist", theirs.parents[1], split), split)
        else:
            for ours_or_theirs in zip(
                data._image_pixels("mnist", str(data_dir), split),
                data._image_pixels("mnist", str(theirs.parents[1]), split),
                strict=True,
            ):
                np.testing.assert_array_equal(*ours_or_theirs)

    workdir = tmp_path / "run"
    result = run(
        "-m",
        "train",
        "--config=configs/cnn.py:tiny",
        "--config.train.num_steps=20",
        f"--workdir={workdir}",
        env={"TFDS_DATA_DIR": str(data_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert reports[-1]["step"] == 20
    assert all(math.isfinite(r["train/loss"]) for r in reports)
    assert math.isfinite(reports[-1]["eval/loss"])


def test_sst2_and_shakespeare_hold_the_shared_copies_without_tensorflow(
    shared_data_dir, tmp_path, run_python
):
    data_dir = tmp_path / "tfds"
    # All of ../shared/data/raw at once: each data set's files from its own subdir.
    code = (
        "import sys; from train import prepare; prepare.main(sys.argv[1:]); "
        "print('{\"tensorflow\": %s}' % str('tensorflow' in sys.modules).lower())"
    )
    args = ("glue/sst2", "tiny_shakespeare", f"--manual_dir={shared_data_dir / 'raw'}")
    assert run_python(code, *args, f"--data_dir={data_dir}") == {"tensorflow": False}
    shared = shared_data_dir / "tensorflow_datasets_array_record"

    # tiny_shakespeare: the very files TFDS wrote with TensorFlow (one feature: no map order).
    folder = pathlib.Path("tiny_shakespeare", "1.0.0")
    assert sha256s(data_dir / folder) == sha256s(shared / folder)

    # glue/sst2: every example, in order; the records' bytes may differ only by the order of the
    # features inside them, which protobuf leaves open (two TensorFlow builds differ too).
    folder = pathlib.Path("glue", "sst2", "2.0.0")
    assert split_sizes(data_dir / folder) == split_sizes(shared / folder)
    for split, count in (("train", 67349), ("validation", 872), ("test", 1821)):
        ours = records("glue/sst2", data_dir, split)
        assert len(ours) == count
        assert_same_records(ours, records("glue/sst2", shared, split), split)
    # From the three TSVs rather than GLUE's zip: nothing was downloaded (the shared copy, made
    # from a re-packed zip, records that zip's 1573302 bytes).
    info = json.loads((data_dir / folder / "dataset_info.json").read_text())
    assert "downloadSize" not in info
    for name in ("features.json", "label.labels.txt"):
        assert (data_dir / folder / name).read_text() == (shared / folder / name).read_text()


def test_embedded_copy_is_the_shared_copy(shared_data_dir):
    folder = pathlib.Path("tiny_shakespeare", "1.0.0")
    embedded = pathlib.Path(data.EMBEDDED_DATA_DIR) / folder
    assert sha256s(embedded) == sha256s(
        shared_data_dir / "tensorflow_datasets_array_record" / folder
    )


# --- Without ../shared ----------------------------------------------------------------------------


def test_png_bytes_are_tensorflows(data_dir):
    # The committed MNIST slice holds PNGs that tf.image.encode_png wrote (TFDS's own builder).
    for split, count in (("train", 8192), ("test", 1000)):
        examples = records("mnist", data_dir, split)
        pngs = [ex.features.feature["image"].bytes_list.value[0] for ex in examples]
        pixels = np.stack([np.asarray(PIL.Image.open(io.BytesIO(png))) for png in pngs])
        ours = prepare._encode_png(pixels[..., None], chunk=3000)  # the last chunk partial
        assert len(ours) == len(pngs) == count
        if REFERENCE_ZLIB:
            assert ours == pngs
        decoded = np.stack([np.asarray(PIL.Image.open(io.BytesIO(png))) for png in ours])
        np.testing.assert_array_equal(decoded, pixels)


def test_a_changed_file_is_one_line_naming_it(tmp_path):
    manual = tmp_path / "raw"
    manual.mkdir()
    (manual / "input.txt").write_text("Not quite Shakespeare.\n")
    result = run(
        "-m",
        "train.prepare",
        "tiny_shakespeare",
        f"--manual_dir={manual}",
        f"--data_dir={tmp_path / 'tfds'}",
    )
    assert result.returncode == 2
    digest = hashlib.sha256(b"Not quite Shakespeare.\n").hexdigest()
    # Libraries' own warnings aside (grain's at import with an older jaxlib, such as Colab's).
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING:absl:")]
    assert lines == [
        f"error: {manual / 'input.txt'} has sha256 {digest}, not "
        f"86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed, the one TFDS "
        f"registers for {prepare._SHAKESPEARE_URL}: it is not the original file; replace it with "
        f"the original."
    ]
    assert not (tmp_path / "tfds").exists()  # checked before anything is written


def test_a_missing_file_or_data_set_is_one_line(tmp_path, capsys):
    def error_of(*args: str) -> str:
        with pytest.raises(SystemExit) as exit:
            prepare.main([*args, f"--data_dir={tmp_path / 'tfds'}"])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = error_of("mnist", f"--manual_dir={empty}")
    assert err.startswith(f"error: mnist: {empty / 'train-images-idx3-ubyte.gz'} does not exist")
    assert "--manual_dir must hold train-images-idx3-ubyte.gz, the file of https://" in err
    assert "(or SST-2's train.tsv, dev.tsv and test.tsv)" in error_of(
        "glue/sst2", f"--manual_dir={empty}"
    )
    assert error_of("cifar10") == (
        "error: Unknown data set 'cifar10'. Known: ['glue/sst2', 'mnist', 'tiny_shakespeare']\n"
    )
    assert "usage: python -m train.prepare NAME..." in error_of()
    assert not (tmp_path / "tfds").exists()


def test_missing_data_errors_name_prepare_for_what_it_prepares():
    # train.tfds_files names `python -m train.prepare` in its errors for these data sets only.
    assert prepare.DATASETS == sorted(tfds_files.PREPARABLE)


def test_sst2_tsvs_are_checked_against_their_own_sha256(tmp_path):
    manual = tmp_path / "glue_sst2"
    manual.mkdir()
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        (manual / name).write_text("sentence\tlabel\nfine .\t1\n")
    with pytest.raises(ValueError, match=r"train.tsv has sha256 .* that of GLUE's SST-2.zip's"):
        prepare.prepare("glue/sst2", str(tmp_path / "tfds"), str(tmp_path))  # finds the subdir


def test_shakespeare_from_a_local_copy(tmp_path):
    # The embedded text is the original: write it back out as input.txt and prepare from it.
    # (The split points: TFDS cuts at 90% and 95% of the characters, which these lengths meet.)
    texts = [
        tfds.data_source("tiny_shakespeare", split=s, data_dir=data.EMBEDDED_DATA_DIR)[0]["text"]
        for s in ("train", "validation", "test")
    ]
    manual = tmp_path / "raw"
    manual.mkdir()
    (manual / "input.txt").write_bytes(b"".join(texts))
    path = prepare.prepare("tiny_shakespeare", str(tmp_path / "tfds"), str(manual))
    embedded = pathlib.Path(data.EMBEDDED_DATA_DIR) / "tiny_shakespeare" / "1.0.0"
    assert sha256s(pathlib.Path(path)) == sha256s(embedded)  # byte for byte
    assert sorted(p.name for p in (tmp_path / "tfds").iterdir()) == ["tiny_shakespeare"]
    # Prepared already: left as it is.
    assert prepare.prepare("tiny_shakespeare", str(tmp_path / "tfds"), None) == path


def test_missing_mnist_names_the_prepare_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(
        "-m",
        "train",
        "--config=configs/cnn.py:tiny",
        f"--workdir={tmp_path / 'run'}",
        env={"TFDS_DATA_DIR": str(empty)},
    )
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [
        f"error: Data set 'mnist' is not prepared in data dir {empty}. Prepare it: python -m "
        f"train.prepare mnist --data_dir={empty} (or point data.data_dir or TFDS_DATA_DIR at a dir "
        f"that holds it)."
    ]
