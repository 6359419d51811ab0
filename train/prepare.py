"""Prepares data sets as TFDS ArrayRecord shards, without TensorFlow.

    python -m train.prepare mnist glue/sst2 tiny_shakespeare [--data_dir=DIR] [--manual_dir=DIR]

writes each data set to DIR/<name>/<version> (default DIR: $TFDS_DATA_DIR, else
~/tensorflow_datasets, as for `python -m train`), in the form `tfds.data_source` reads. Where
there is a network it downloads the original files from the URLs TFDS registers; where there is
none, `--manual_dir` names local copies of them, in DIR itself or in DIR/<name> (DIR/glue_sst2
for glue/sst2), so `--manual_dir=../shared/data/raw` serves all three. A data set already prepared
in the data dir is left as it is.

How. TFDS's builders of these three data sets need TensorFlow to prepare them (tiny_shakespeare
reads its text with tf.io.gfile, mnist extracts with it and encodes its images with
tf.image.encode_png, and `glue` is not even registered without TensorFlow), though TFDS reads
ArrayRecord without it. So this runs TFDS's own `download_and_prepare` on the registered builder
(its download manager, which finds the files in --manual_dir or downloads them and checks both
against the sha256 TFDS registers; its feature encoding, key-hash shuffle, ArrayRecord writer and
dataset_info.json), on a subclass of the registered builder that implements only
`_split_generators`, the hook TFDS's guide to writing a data set has a builder implement, with one
that reads the same files without TensorFlow and yields the same keys and examples
(`_SPLIT_GENERATORS`).

What comes out is what TFDS writes with TensorFlow (checked against the copies in ../shared/data
that TFDS's builders prepared with it): the same examples in the same order, the same
dataset_info.json and features.json. For tiny_shakespeare the very same files. For mnist the same
stored records, each image's PNG bytes included (see `_encode_png`), and for glue/sst2 too; a
record's bytes can differ only in the order of its features, which protobuf leaves open (two
TensorFlow builds differ alike).

glue/sst2's original file is GLUE's SST-2.zip (7.4 MB, sha256 registered by TFDS). --manual_dir
may hold that zip, or just the three files the builder reads from it, SST-2/train.tsv, dev.tsv and
test.tsv. The TSVs cannot be checked against the zip's registered sha256 (that hashes the whole
zip, with the raw treebank files the builder never reads), so they are checked against their own
sha256 (`_SST2_TSV_SHA256`, the TSVs as GLUE's zip holds them). Their one trace in the metadata:
dataset_info.json records no downloadSize, since nothing was downloaded.

Not tested here, for want of a network and of the original zip: downloading, and glue/sst2 from
SST-2.zip (TFDS's download manager, then Python's zipfile).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pathlib
import struct
import tempfile
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from train import cli, tfds_files

_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
_MNIST_FILES = {  # split: (images, labels), as TFDS's MNIST builder names them
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SST2_SPLITS = {"train": "train", "validation": "dev", "test": "test"}  # split: TSV file stem
_SST2_TSV_SHA256 = {
    "train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    "test.tsv": "69a938605609b3e6663b4487918fe1565eb293734e6e520d0366d1d412fd2a13",
}


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> str:
    """Prepares data set `name` in `data_dir` as TFDS ArrayRecord shards.

    Args:
      name: 'mnist', 'glue/sst2' or 'tiny_shakespeare'.
      data_dir: a TFDS data dir; the data set goes to data_dir/<name>/<version>. One that is
        already there is left as it is.
      manual_dir: local copies of the original files (in manual_dir or manual_dir/<name>, '/'
        read as '_'), checked against their sha256; None downloads them into data_dir/downloads.

    Returns:
      The dir of the prepared data set, data_dir/<name>/<version>.

    Raises:
      ValueError: an unknown data set, or a file whose sha256 is not the registered one.
      FileNotFoundError: --manual_dir lacks a file.
      ConnectionError: a file could not be downloaded.
    """
    if name not in _SPLIT_GENERATORS:
        raise ValueError(f"Unknown data set {name!r}. Known: {DATASETS}")
    builder = _builder(name, data_dir, make_splits=None)
    if (builder.data_path / "dataset_info.json").exists():
        return os.fspath(builder.data_path)
    if builder.data_path.exists():  # TFDS would take it as prepared
        raise FileExistsError(
            f"{builder.data_path} holds no dataset_info.json (an interrupted copy?); delete it "
            f"and prepare {name} again."
        )
    files = _manual_files(name, builder, manual_dir) if manual_dir else None
    with tempfile.TemporaryDirectory() as scratch:
        make_splits = functools.partial(
            _SPLIT_GENERATORS[name], files=files, scratch=pathlib.Path(scratch)
        )
        builder = _builder(name, data_dir, make_splits)
        builder.download_and_prepare(
            # Downloads are kept (and reused) in data_dir/downloads; local copies are not copied.
            download_dir=os.path.join(data_dir, "downloads") if files is None else scratch,
            download_config=tfds.download.DownloadConfig(
                manual_dir=files.dir if files else None, try_download_gcs=False
            ),
            file_format="array_record",
        )
    return os.fspath(builder.data_path)


def _builder(name: str, data_dir: str, make_splits: Callable | None) -> tfds.core.DatasetBuilder:
    """TFDS's registered builder of `name`, writing ArrayRecord into `data_dir`, its examples made
    by `make_splits(builder, dl_manager)` (one of `_SPLIT_GENERATORS`; None: only for its paths).

    The builder is a subclass of the registered one that implements `_split_generators`, the hook
    TFDS documents for a builder to say how it makes its splits (a GeneratorBasedBuilder is meant
    to be subclassed so). Everything else is the registered builder's: name, version, config,
    features, the checksums TFDS registers, the metadata in dataset_info.json.
    """
    if name == "glue/sst2":
        # By its class: without TensorFlow, tfds.builder_cls does not know glue.
        registered, config = tfds.text.Glue, {"config": "sst2"}
    else:
        registered, config = tfds.builder_cls(name), {}

    class WithoutTensorFlow(registered, skip_registration=True):
        # TFDS finds a builder's checksums and metadata files next to the module of its class, and
        # records that module in dataset_info.json: the registered builder's, as if it were it.
        __module__ = registered.__module__
        name = registered.name

        def _split_generators(self, dl_manager):
            return make_splits(self, dl_manager)

    return WithoutTensorFlow(data_dir=data_dir, file_format="array_record", **config)


# --- The original files ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Files:
    """Where --manual_dir holds a data set's original files; `sst2_tsvs`: SST-2's TSVs, no zip."""

    dir: pathlib.Path
    sst2_tsvs: bool = False


def _urls(name: str, builder: tfds.core.DatasetBuilder) -> list[str]:
    """The URLs of the original files that `name`'s builder downloads."""
    if name == "mnist":
        files = [f for pair in _MNIST_FILES.values() for f in pair]
        return [urllib.parse.urljoin(builder.URL, f) for f in files]
    if name == "tiny_shakespeare":
        return [_SHAKESPEARE_URL]
    return [builder.builder_config.data_url]  # glue/sst2: SST-2.zip


def _manual_files(name: str, builder: tfds.core.DatasetBuilder, manual_dir: str) -> _Files:
    """Checks the original files in `manual_dir` (or its subdir for `name`) before any work.

    TFDS checks them too, but in a many-line error after it has started; this names the file.
    """
    root = pathlib.Path(manual_dir).expanduser()
    folder = root / name.replace("/", "_")
    folder = folder if folder.is_dir() else root
    if name == "glue/sst2" and all((folder / tsv).exists() for tsv in _SST2_TSV_SHA256):
        for tsv, sha256 in _SST2_TSV_SHA256.items():
            _check_sha256(folder / tsv, sha256, "that of GLUE's SST-2.zip's SST-2/" + tsv)
        return _Files(folder, sst2_tsvs=True)
    for url in _urls(name, builder):
        expected = builder.url_infos[url]
        path = folder / expected.filename
        if not path.exists():
            also = " (or SST-2's train.tsv, dev.tsv and test.tsv)" if name == "glue/sst2" else ""
            raise FileNotFoundError(
                f"{name}: {path} does not exist{also}: --manual_dir must hold {expected.filename}, "
                f"the file of {url}, in {root} or {root / name.replace('/', '_')}."
            )
        _check_sha256(path, expected.checksum, f"the one TFDS registers for {url}")
    return _Files(folder)


def _check_sha256(path: pathlib.Path, expected: str, whose: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{path} has sha256 {digest.hexdigest()}, not {expected}, {whose}: it is not the "
            f"original file; replace it with the original."
        )


def _download(
    name: str, builder: tfds.core.DatasetBuilder, dl_manager, urls: list[str]
) -> list[pathlib.Path]:
    """TFDS's download manager: the checked file from --manual_dir, or downloaded and checked."""
    try:
        return [pathlib.Path(dl_manager.download(url)) for url in urls]
    except (OSError, tfds.download.DownloadError) as error:
        files = ", ".join(builder.url_infos[url].filename for url in urls)
        why = tfds_files.first_line(error)
        raise ConnectionError(
            f"{name}: could not download {', '.join(urls)} ({why}). Without a network, pass "
            f"--manual_dir=DIR with local copies of {files}."
        ) from None
    except download_manager.NonMatchingChecksumError as error:
        raise ValueError(f"{name}: {tfds_files.first_line(error)}") from None


# --- Split generators: each builder's own, less TensorFlow ----------------------------------------
# Each returns {split: iterator of (key, example)} with the keys and examples the builder's
# `_split_generators` and `_generate_examples` give; TFDS shuffles by key hash and writes them.

_Examples = Iterator[tuple[object, dict]]


def _shakespeare_splits(builder, dl_manager, *, files, scratch) -> dict[str, _Examples]:
    """As the builder: the text's first 90% of characters, then half each of the rest."""
    del files, scratch
    (path,) = _download("tiny_shakespeare", builder, dl_manager, [_SHAKESPEARE_URL])
    text = path.read_bytes().decode("utf-8")  # tf.io.gfile 'r': utf-8, no newline translation
    i = int(len(text) * 0.9)
    train, rest = text[:i], text[i:]
    j = int(len(rest) * 0.5)
    texts = {"train": train, "validation": rest[:j], "test": rest[j:]}
    return {split: builder._generate_examples(split, text) for split, text in texts.items()}


def _mnist_splits(builder, dl_manager, *, files, scratch) -> dict[str, _Examples]:
    """As the builder: key = position in the original file; the image as TensorFlow's PNG."""
    del files, scratch
    paths = iter(_download("mnist", builder, dl_manager, _urls("mnist", builder)))
    return {split: _mnist_examples(next(paths), next(paths)) for split in _MNIST_FILES}


def _mnist_examples(images_path: pathlib.Path, labels_path: pathlib.Path) -> _Examples:
    images = gzip.decompress(images_path.read_bytes())  # IDX: 16-byte header, then pixels
    count, height, width = struct.unpack(">III", images[4:16])
    pixels = np.frombuffer(images, np.uint8, offset=16).reshape(count, height, width, 1)
    labels = np.frombuffer(gzip.decompress(labels_path.read_bytes()), np.uint8, offset=8)
    for index, (png, label) in enumerate(zip(_encode_png(pixels), labels, strict=True)):
        yield index, {"image": png, "label": int(label)}


def _sst2_splits(builder, dl_manager, *, files, scratch) -> dict[str, _Examples]:
    """As the builder: its own `_generate_examples` over the three TSV files."""
    if files is not None and files.sst2_tsvs:
        folder = files.dir
    else:  # SST-2.zip, from --manual_dir or downloaded; TSVs under SST-2/
        (zip_path,) = _download("glue/sst2", builder, dl_manager, _urls("glue/sst2", builder))
        folder = scratch / "SST-2"
        with zipfile.ZipFile(zip_path) as archive:
            for stem in _SST2_SPLITS.values():
                archive.extract(f"SST-2/{stem}.tsv", scratch)
    return {
        split: builder._generate_examples(data_file=os.fspath(folder / f"{stem}.tsv"), split=stem)
        for split, stem in _SST2_SPLITS.items()
    }


_SPLIT_GENERATORS: dict[str, Callable[..., dict[str, _Examples]]] = {
    "glue/sst2": _sst2_splits,
    "mnist": _mnist_splits,
    "tiny_shakespeare": _shakespeare_splits,
}
DATASETS = sorted(_SPLIT_GENERATORS)  # what this prepares: tfds_files.PREPARABLE


# --- PNG as TensorFlow writes it ------------------------------------------------------------------


def _encode_png(images: np.ndarray, chunk: int = 4096) -> list[bytes]:
    """8-bit grayscale images [n, height, width, 1] as the PNG bytes tf.image.encode_png gives.

    TFDS stores MNIST's images as PNG. PIL's PNGs hold the same pixels, but differ in bytes from
    TensorFlow's (libpng's) in three ways, each reproduced here so the shards are the same files
    a TensorFlow build writes: libpng picks each row's filter by the least sum of the filtered
    bytes read as signed (first best of None, Sub, Up, Average, Paeth); it deflates with level 6,
    memLevel 9 and the Z_FILTERED strategy; and for small images it writes the smallest window
    size that fits the data into the zlib header. Checked byte for byte on all 70000 MNIST
    images; a zlib other than Python's reference one may give other (equally valid) bytes.
    """
    count, height, width, channels = images.shape
    if images.dtype != np.uint8 or channels != 1:
        raise ValueError(f"Only 8-bit grayscale images, not {images.dtype} {images.shape}.")
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    end = _png_chunk(b"IEND", b"")
    pngs = []
    for start in range(0, count, chunk):  # chunks: the filters hold 5 copies of the images
        for rows in _filtered_rows(images[start : start + chunk, :, :, 0]):
            compressor = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
            stream = bytearray(compressor.compress(rows.tobytes()) + compressor.flush())
            _shrink_zlib_window(stream, rows.size)
            pngs.append(b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", stream) + end)
    return pngs


def _filtered_rows(pixels: np.ndarray) -> np.ndarray:
    """libpng's filtered rows of uint8 images [n, h, w]: uint8 [n, h, 1 + w], filter type first."""
    x = pixels.astype(np.int16)
    padded = np.pad(x, ((0, 0), (1, 0), (1, 0)))  # zeros above the first row and left of column 0
    left, up, up_left = padded[:, 1:, :-1], padded[:, :-1, 1:], padded[:, :-1, :-1]
    # Paeth: the neighbour nearest to left + up - up_left, preferring left, then up.
    to_left, to_up, to_up_left = (
        np.abs(up - up_left),
        np.abs(left - up_left),
        np.abs(left + up - 2 * up_left),
    )
    paeth = np.where(
        (to_left <= to_up) & (to_left <= to_up_left),
        left,
        np.where(to_up <= to_up_left, up, up_left),
    )
    predictions = (0, left, up, (left + up) >> 1, paeth)  # None, Sub, Up, Average, Paeth
    filtered = np.stack([(x - p).astype(np.uint8) for p in predictions])  # [5, n, h, w], mod 256
    cost = np.abs(filtered.view(np.int8).astype(np.int16)).sum(axis=-1, dtype=np.int32)
    best = np.argmin(cost, axis=0)  # [n, h]; ties go to the first filter, as in libpng
    rows = np.take_along_axis(filtered, best[None, :, :, None], axis=0)[0]  # [n, h, w]
    return np.concatenate([best[:, :, None].astype(np.uint8), rows], axis=-1)


def _shrink_zlib_window(stream: bytearray, data_size: int) -> None:
    """libpng's optimize_cmf: the zlib header's window size, halved while the data still fits."""
    if data_size > 16384:
        return
    cmf = stream[0]
    window_log = cmf >> 4  # log2(window size) - 8
    half_window = 1 << (window_log + 7)
    if data_size > half_window:
        return
    while True:
        half_window >>= 1
        window_log -= 1
        if not (window_log > 0 and data_size <= half_window):
            break
    cmf = (cmf & 0x0F) | (window_log << 4)
    flags = stream[1] & 0xE0
    stream[0], stream[1] = cmf, flags + 0x1F - ((cmf << 8) + flags) % 0x1F  # header % 31 == 0


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


# --- Command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m train.prepare",
        usage="%(prog)s NAME... [--data_dir=DIR] [--manual_dir=DIR]",
        description="Prepares TFDS data sets as ArrayRecord shards, without TensorFlow.",
    )
    parser.add_argument("names", nargs="+", metavar="NAME", help=" ".join(DATASETS))
    parser.add_argument(
        "--data_dir",
        help="TFDS data dir to write (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)",
    )
    parser.add_argument(
        "--manual_dir",
        help="local copies of the original files, in DIR or DIR/<name> (glue/sst2: DIR/glue_sst2);"
        " default: download them",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in _SPLIT_GENERATORS]
    if unknown:
        cli.fail(f"Unknown data set {unknown[0]!r}. Known: {DATASETS}")
    data_dir = tfds_files.configured_data_dir(args.data_dir)
    tfds.disable_progress_bar()
    for name in args.names:
        try:
            path = prepare(name, data_dir, args.manual_dir)
        except (ValueError, OSError) as error:
            cli.fail(str(error))
        splits = tfds.builder_from_directory(path).info.splits
        counts = ", ".join(f"{split} {info.num_examples}" for split, info in splits.items())
        print(f"{name}: {counts} examples in {path}", flush=True)


if __name__ == "__main__":
    main()
