"""Command line: python -m train.export --workdir=DIR [--out=FILE] [--step=N] [--platforms=cpu,cuda]

Serialises a trained run's prediction function with `jax.export`, its parameters inside, for a
batch of any size:

    classifier (mlp, cnn on MNIST; lstm on SST-2)  inputs [batch, ...] -> logits [batch, classes]
    language model (transformer)                    tokens int32 [batch, seq_len]
                                                      -> next-token logits [batch, seq_len, vocab]

Position t of a language model's logits scores the token after position t; the window is the
training `data.seq_len`, and a shorter text is zero-padded at the end (the model is causal, so the
padding changes nothing before it). FILE (default DIR/export/model.jaxexport) gets a JSON beside it,
FILE with the suffix .json, that says how to feed the function: the input's shape and dtype, the
labels, the vocabulary of a text model and the kind of model. `python -m train.serve FILE` runs it
with nothing but JAX and numpy. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.export  # older JAX (0.7) does not import it with jax
import numpy as np

from train import cli, data, tasks, trained
from train.state import example_inputs


def export_model(
    run: trained.Trained, platforms: Sequence[str] | None = None
) -> jax.export.Exported:
    """The run's prediction function, `inputs -> logits`, exported for any batch size.

    Args:
      run: a loaded run (`train.trained.load`).
      platforms: where the export may run ('cpu', 'cuda', 'rocm', 'tpu'); None: JAX's default
        backend. A model whose `implementation` is 'auto' is exported with the XLA:CPU forms of
        `jaxmodels.tuned` for ('cpu',) alone and with the plain layers otherwise (the same
        function; the plain layers run everywhere).

    Returns:
      The `jax.export.Exported`; its one argument is shaped like `input_spec(run.config)` with a
      symbolic batch dimension.
    """
    platforms = tuple(platforms or (jax.default_backend(),))
    model = run.model
    if getattr(model, "implementation", None) == "auto":
        model = model.clone(implementation="cpu" if platforms == ("cpu",) else "standard")
    params = run.params

    def predict(inputs: jax.Array) -> jax.Array:
        return model.apply({"params": params}, inputs, train=False)  # params become constants

    check_exportable(run)
    shape, dtype = input_spec(run.config)
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *shape[1:]), dtype)
    return jax.export.export(jax.jit(predict), platforms=platforms)(spec)


def check_exportable(run: trained.Trained) -> None:
    """A one-line ValueError unless `run`'s task exports (a classifier or a language model) and its
    model takes one input and gives the logits the task needs."""
    task = tasks.for_config(run.config)
    example = jax.eval_shape(lambda: example_inputs(run.config))
    logits = None
    if task.export_kind(run.info) and isinstance(example, jax.ShapeDtypeStruct):
        apply = lambda x: run.model.apply({"params": run.params}, x, train=False)  # noqa: E731
        logits = jax.eval_shape(apply, example)
    if getattr(logits, "ndim", None) != task.logits_rank:
        raise ValueError(
            f"python -m train.export exports classifiers and language models; model "
            f"{run.config.model.name!r} on {run.config.data.dataset!r} is neither."
        )


def input_spec(config) -> tuple[tuple[int, ...], np.dtype]:
    """(shape of a batch of one, dtype) of the model's inputs."""
    example = jax.eval_shape(lambda: example_inputs(config))
    return tuple(example.shape), np.dtype(example.dtype)


def kind_of(run: trained.Trained) -> str | None:
    """'image_classifier', 'text_classifier' or 'language_model' (`train.serve` reads it), as the
    run's task exports it; None: it does not."""
    return tasks.for_config(run.config).export_kind(run.info)


def metadata(run: trained.Trained, exported: jax.export.Exported) -> dict[str, Any]:
    """What `train.serve` needs to turn raw input into the exported function's argument."""
    shape, dtype = input_spec(run.config)
    meta: dict[str, Any] = {
        "kind": kind_of(run),
        "model": run.config.model.name,
        "dataset": run.config.data.dataset,
        "step": run.step,
        "input": {"shape": [None, *shape[1:]], "dtype": dtype.name},
        "output": {"shape": [None, *exported.out_avals[0].shape[1:]], "dtype": "float32"},
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
    }
    if run.info.vocab:
        meta["vocab"] = list(run.info.vocab)
        meta["word_level"] = run.info.word_level
    if run.info.word_level:
        meta["pad_id"], meta["unk_id"] = data.PAD_ID, data.UNK_ID
    # The task's own: a classifier's labels (and an image's pixel scale), a language model's
    # sampling temperature.
    return tasks.for_config(run.config).export_metadata(run.config, run.info, meta)


def write(run: trained.Trained, out: pathlib.Path, platforms: Sequence[str] | None = None):
    """Writes `run`'s export to `out` and its metadata beside it (suffix .json); returns both."""
    out = pathlib.Path(out)
    meta_path = out.with_suffix(".json")
    if meta_path == out:
        raise ValueError(f"--out={out} would be overwritten by its own metadata; use .jaxexport.")
    exported = export_model(run, platforms)
    serialized = exported.serialize()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(serialized)
    meta_path.write_text(json.dumps(metadata(run, exported), indent=1) + "\n")
    return out, meta_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m train.export", description=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument("--workdir", required=True, help="A run's workdir (python -m train).")
    parser.add_argument("--out", help="Output file (default: WORKDIR/export/model.jaxexport).")
    parser.add_argument(
        "--step",
        type=cli.checkpoint_step,
        help="Checkpoint step, or 'best' (train.keep_best) (default: the newest).",
    )
    parser.add_argument(
        "--platforms", help="Comma-separated: cpu, cuda, rocm, tpu (default: this backend)."
    )
    args = parser.parse_args(argv)
    platforms = args.platforms.split(",") if args.platforms else None
    if platforms and not set(platforms) <= {"cpu", "cuda", "rocm", "tpu"}:
        cli.fail(f"--platforms={args.platforms}: use some of cpu, cuda, rocm, tpu.")
    out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "export" / "model.jaxexport")
    try:
        run = trained.load(args.workdir, args.step)
        out, meta_path = write(run, out, platforms)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        cli.fail(error)
    print(f"Exported step {run.step} ({kind_of(run)}) to {out} and {meta_path}")


if __name__ == "__main__":
    main()
