"""Command line: python -m train.serve FILE (--image=PNG | --text=SENTENCE | --prompt=TEXT)

Runs a model that `python -m train.export` wrote, with JAX and numpy alone: no Flax, no model code,
no training code, no data set. FILE is the .jaxexport file; the JSON beside it (FILE with the
suffix .json) says what the model takes.

    --image=digit.png        MNIST classifier: prints the digit and its probability
                             (white on black, as MNIST; resized to 28 x 28 if need be)
    --text="a sentence"      SST-2 classifier: prints positive or negative and its probability
    --prompt="ROMEO:"        language model: prints the prompt and --length=N more characters,
                             drawn at --temperature=T (0: the most likely) with --seed=S

The language model's export keeps no cache between calls: each new token re-runs the model on
the last window of text (as long as its training sequences), the whole window every time.
An image is read with numpy (.npy) or, for other formats, PIL (the project's pillow). Bad input
ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.export  # older JAX (0.7) does not import it with jax
import numpy as np

from train import cli  # the standard library alone


def load(path: str | pathlib.Path) -> tuple[jax.export.Exported, dict[str, Any]]:
    """The exported function in `path` and its metadata (the JSON beside it)."""
    path = pathlib.Path(path)
    meta_path = path.with_suffix(".json")
    for needed in (path, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} does not exist; write it with python -m train.export --workdir=DIR."
            )
    meta = json.loads(meta_path.read_text())
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as error:  # noqa: BLE001  flatbuffers and MLIR raise many error types
        why = f"{type(error).__name__}{version_hint(meta)}"
        raise ValueError(f"{path} is not a jax.export file JAX can read ({why}).") from None
    return exported, meta


def run(exported: jax.export.Exported, inputs: np.ndarray) -> np.ndarray:
    """The exported function on a batch of any size: float32 logits as numpy."""
    return np.asarray(exported.call(inputs), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


# --- Classifiers ------------------------------------------------------------------------------


def image_inputs(pixels: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """An image as the model's input: float32 [1, height, width, channels] in [0, 1].

    `pixels` are uint8 (0..255) or floats already in [0, 1], [height, width] or
    [height, width, channels], at the model's size.
    """
    _, height, width, channels = meta["input"]["shape"]
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape != (height, width, channels):
        raise ValueError(
            f"The image is {pixels.shape}; this model takes {(height, width, channels)}."
        )
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.float32) * np.float32(meta["input"]["pixel_scale"])
    return pixels.astype(meta["input"]["dtype"])[None]  # [1, height, width, channels]


def read_image(path: str | pathlib.Path, meta: dict[str, Any]) -> np.ndarray:
    """The pixels of an image file at the model's size: uint8 [height, width(, channels)], or
    whatever a .npy file holds."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image={path} does not exist.")
    if path.suffix == ".npy":
        return np.load(path)
    import PIL.Image  # only for image files: serving a text model needs no imaging library

    _, height, width, channels = meta["input"]["shape"]
    try:
        image = PIL.Image.open(path)
        image = image.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"--image={path} is not an image PIL can read ({error}).") from None
    if image.size != (width, height):
        image = image.resize((width, height), PIL.Image.BILINEAR)
    return np.asarray(image, np.uint8)


def text_inputs(text: str, meta: dict[str, Any]) -> np.ndarray:
    """A sentence as the word-level model's input: int32 [1, seq_len], padded at the end.

    Tokenised as in training: lowercase, split on whitespace; unknown words become <unk> and words
    past seq_len are dropped (SST-2's own text has spaces around punctuation: "it 's good .").
    """
    seq_len = meta["input"]["shape"][1]
    ids = {word: i for i, word in enumerate(meta["vocab"])}
    tokens = [ids.get(word, meta["unk_id"]) for word in text.lower().split()][:seq_len]
    inputs = np.full((1, seq_len), meta["pad_id"], np.int32)
    inputs[0, : len(tokens)] = tokens
    return inputs


def classify(exported: jax.export.Exported, inputs: np.ndarray, meta) -> list[tuple[str, float]]:
    """(label, probability) of the most likely class of each example of `inputs`."""
    probabilities = softmax(run(exported, inputs))  # [batch, classes]
    best = probabilities.argmax(axis=-1)
    return [(meta["labels"][i], float(p[i])) for i, p in zip(best, probabilities, strict=True)]


# --- Language model -------------------------------------------------------------------------------


def encode_characters(text: str, meta: dict[str, Any]) -> list[int]:
    """Character ids of `text`; a ValueError names characters the vocabulary lacks."""
    ids = {char: i for i, char in enumerate(meta["vocab"])}
    unknown = sorted({char for char in text if char not in ids})
    if unknown:
        raise ValueError(f"Characters {unknown} are not in the model's {len(ids)}-char vocabulary.")
    return [ids[char] for char in text]


def generate(
    exported: jax.export.Exported,
    prompt: Sequence[int],
    length: int,
    *,
    temperature: float,
    seed: int = 0,
) -> list[int]:
    """`prompt` followed by `length` token ids, one at a time.

    Each step runs the model on the last window of up to seq_len tokens, zero-padded at the end,
    and reads the logits at the window's last real token. temperature 0 takes the most likely
    token; otherwise one is drawn from softmax(logits / temperature) with numpy's generator.
    """
    if not prompt:
        raise ValueError("The prompt is empty; the model needs at least one token to go on from.")
    seq_len = exported.in_avals[0].shape[1]
    call = jax.jit(exported.call)  # one dispatch per token: half the time of exported.call's
    rng = np.random.default_rng(seed)
    tokens = list(prompt)
    window = np.zeros((1, seq_len), np.int32)  # [1, seq_len]
    for _ in range(length):
        visible = tokens[-seq_len:]
        window[:] = 0
        window[0, : len(visible)] = visible
        logits = np.asarray(call(window))[0, len(visible) - 1]  # [vocab]
        if temperature > 0:
            tokens.append(int(rng.choice(len(logits), p=softmax(logits / temperature))))
        else:
            tokens.append(int(logits.argmax()))
    return tokens


# --- Command line ---------------------------------------------------------------------------------


def answer_image(exported: jax.export.Exported, meta: dict[str, Any], args) -> str:
    inputs = image_inputs(read_image(args.image, meta), meta)
    with export_errors(args.file, meta):
        ((label, probability),) = classify(exported, inputs, meta)
    return f"{label} ({probability:.3f})"


def answer_text(exported: jax.export.Exported, meta: dict[str, Any], args) -> str:
    inputs = text_inputs(args.text, meta)
    with export_errors(args.file, meta):
        ((label, probability),) = classify(exported, inputs, meta)
    return f"{label} ({probability:.3f})"


def answer_prompt(exported: jax.export.Exported, meta: dict[str, Any], args) -> str:
    temperature = meta["sample_temperature"] if args.temperature is None else args.temperature
    if args.length < 0 or temperature < 0:
        raise ValueError(f"--length={args.length} and --temperature={temperature} must be >= 0.")
    prompt = encode_characters(args.prompt, meta)
    if not prompt:
        raise ValueError("--prompt is empty; the model needs at least one token to go on from.")
    with export_errors(args.file, meta):
        tokens = generate(exported, prompt, args.length, temperature=temperature, seed=args.seed)
    return "".join(meta["vocab"][i] for i in tokens)


# The export's `kind` (`train.tasks.Task.export_kind`) -> the flag that gives its input, and what
# answers it.
ANSWERS = {
    "image_classifier": ("image", answer_image),
    "text_classifier": ("text", answer_text),
    "language_model": ("prompt", answer_prompt),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m train.serve", description=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument("file", help="A .jaxexport file of python -m train.export.")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--image", help="MNIST classifier: an image file (PNG, ..., or .npy).")
    given.add_argument("--text", help="Sentiment classifier: a sentence.")
    given.add_argument("--prompt", help="Language model: the text to go on from.")
    parser.add_argument("--length", type=int, default=200, help="Tokens to generate.")
    parser.add_argument(
        "--temperature", type=float, help="0: the most likely token (default: the run's own)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the draws.")
    args = parser.parse_args(argv)
    try:
        exported, meta = load(args.file)
        print(answer(exported, meta, args))
    except (FileNotFoundError, ValueError, KeyError) as error:
        cli.fail(error)


def answer(exported: jax.export.Exported, meta: dict[str, Any], args: argparse.Namespace) -> str:
    """What the command line prints for `args`: a label and its probability, or the text."""
    if meta["kind"] not in ANSWERS:
        raise ValueError(
            f"{args.file} holds a {meta['kind']!r}, which this JAX serve cannot run; kinds it "
            f"runs: {', '.join(ANSWERS)}."
        )
    flag, answer_kind = ANSWERS[meta["kind"]]
    if getattr(args, flag) is None:
        raise ValueError(f"{args.file} holds a {meta['kind'].replace('_', ' ')}; use --{flag}.")
    return answer_kind(exported, meta, args)


@contextlib.contextmanager
def export_errors(file: str, meta: dict[str, Any]) -> Iterator[None]:
    """The export's own checks of its inputs, and a JAX too old for it, as one ValueError."""
    try:
        yield
    except (ValueError, TypeError, jax.errors.JaxRuntimeError) as error:
        raise ValueError(f"{file} does not run here: {error}{version_hint(meta)}") from None


def version_hint(meta: dict[str, Any]) -> str:
    """A note for an export made by a newer JAX than this one, which may fail to run it: JAX
    reads exports of its own and older versions, not necessarily of newer ones."""
    made, here = meta.get("jax_version", "0"), jax.__version__
    as_numbers = lambda version: [int(part) for part in version.split(".") if part.isdigit()]  # noqa: E731
    if as_numbers(here) >= as_numbers(made):
        return ""
    return f" (exported with JAX {made}, run with JAX {here}: serve with JAX {made} or newer)"


if __name__ == "__main__":
    main()
