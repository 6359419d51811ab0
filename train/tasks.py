"""What differs between tasks, in one object per task; the rest of `train` asks it.

    classification   inputs [b, ...] (images, or word ids [b, seq_len])  targets int32 [b]
    language_model   inputs int32 [b, seq_len] character ids  targets int32 [b, seq_len], the next
    seq2seq          inputs and decoder_inputs int32 [b, seq_len]  targets int32 [b, seq_len]

A task says what its batch holds (`example_batch`: zeros of every field, for initialising and
compiling), which of those fields the model takes (`model_inputs`), how logits are scored
(`sums`, and `eval_sums`: the extra metrics of an evaluation, greedy decoding for seq2seq), whether
the model fits the data (`check_fits`), what a run writes after training (`after_training`: samples
of a language model, translations of a seq2seq model), how `python -m train.sample` decodes
(`decoder`), and what `python -m train.export` writes for `python -m train.serve`
(`export_kind`, `export_metadata`). The train state carries its task as a static field
(`TrainState.task`), so the pure steps in `train.steps` ask it without importing this module.

A task is a frozen dataclass without fields: hashable and equal to any other instance of its class,
so it is part of the state's tree structure as `apply_fn` is. `TASKS` holds one of each by name;
`for_config` picks the task of a config from the data set's kind (`train.data.kind`), and checks
that `model.name` can train it. A new task is one class here (naming the `train.data` kinds it
trains on), one entry in `TASKS` and a config; a task of your own, with your own data and loop,
needs neither the entry nor a config: `train.state_from_module(..., task=YourTask())`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging

from train import data, decode, translation

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# `train.data` scales MNIST's uint8 pixels to [0, 1] by this factor; a served image must be too.
PIXEL_SCALE = 1 / 255


@dataclasses.dataclass(frozen=True)
class Task:
    """A model of `inputs` trained on the cross-entropy of its logits against `targets`: the
    plain task, which classification and language modelling share (and a module of your own,
    `train.state_from_module`, gets). Subclasses change what differs."""

    name: ClassVar[str] = "task"
    data_kinds: ClassVar[tuple[str, ...]] = ()  # the `train.data` kinds of its data sets
    model_names: ClassVar[tuple[str, ...]] = ()  # models that train only this task; () any model
    logits_rank: ClassVar[int] = 2  # of the logits the data needs: [batch, classes]
    decodes: ClassVar[bool] = False  # whether python -m train.sample can decode with it
    sample_temperature: ClassVar[float] = 1.0  # python -m train.sample's default
    # What an evaluation reports besides loss and accuracy: name -> (sum, count) of `eval_sums`
    # (`train.metrics.summarize`).
    eval_averages: ClassVar[dict[str, tuple[str, str]]] = {}

    # --- The batch and the model ------------------------------------------------------------------

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int = 1) -> Batch:
        """Zeros shaped and typed like a batch of `config.data` (only shapes matter)."""
        return {
            "inputs": jnp.zeros((batch_size, config.data.seq_len), jnp.int32),
            "targets": jnp.zeros((batch_size,), jnp.int32),
            "weights": jnp.zeros((batch_size,), jnp.float32),
        }

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        """The model's positional inputs, taken from `batch`."""
        return (batch["inputs"],)

    def example_inputs(self, config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple:
        """Zeros shaped like the model's positional inputs, for initialisation."""
        return self.model_inputs(self.example_batch(config, batch_size))

    # --- The steps (pure, under jit or pmap) ------------------------------------------------------

    def sums(self, logits: jax.Array, batch: Batch, weights: jax.Array) -> Metrics:
        """Weighted sums of loss and correct predictions (`train.steps.TRAIN_SUMS`): `loss_sum`,
        `correct_sum`, `count`. logits [..., classes], targets and weights [...]."""
        targets = batch["targets"]
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), targets
        )
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(losses * weights),
            "correct_sum": jnp.sum(correct * weights),
            "count": jnp.sum(weights),
        }

    def eval_sums(self, state: Any, batch: Batch, weights: jax.Array) -> Metrics:
        """Sums an evaluation adds to `sums` (`train.metrics.summarize` averages them); none."""
        del state, batch, weights
        return {}

    # --- The loop ---------------------------------------------------------------------------------

    def check_fits(
        self, config: ml_collections.ConfigDict, logits: jax.ShapeDtypeStruct, info: Any
    ) -> None:
        """A one-line ValueError if `logits` (the shapes of the model's output on
        `example_inputs`) cannot cover the data's classes or vocabulary (`info`)."""
        if logits.ndim != 2 or logits.shape[-1] < info.num_classes:
            raise ValueError(
                f"{config.data.dataset} has {info.num_classes} classes, but the model's logits "
                f"have shape {logits.shape}; use a classifier with {info.num_classes} outputs."
            )

    def after_training(
        self,
        config: ml_collections.ConfigDict,
        state: Any,
        info: Any,
        rng: jax.Array,
        workdir: pathlib.Path,
    ) -> list[str]:
        """What a finished run writes besides its checkpoints (the lines written); nothing."""
        del config, state, info, rng, workdir
        return []

    # --- The commands -----------------------------------------------------------------------------

    def decodes_with_cache(self, apply_fn: Callable) -> bool:
        """Whether `decoder` can keep a key/value cache for the model of `apply_fn`."""
        del apply_fn
        return False

    def decoder(
        self,
        config: ml_collections.ConfigDict,
        apply_fn: Callable,
        ids: np.ndarray,
        *,
        num_samples: int,
        length: int,
        cache: bool,
        settings: dict[str, Any],
    ) -> tuple[Callable, jax.Array, int]:
        """For `python -m train.sample`: (function(params, inputs, rng) -> int32 tokens, its
        inputs from the prompt's `ids`, the tokens it draws per row); only where `decodes`."""
        del config, apply_fn, ids, num_samples, length, cache, settings
        raise NotImplementedError(f"A {self.name} model does not decode.")

    def decoded_text(self, info: Any, tokens: np.ndarray) -> str:
        """The text `python -m train.sample` prints for the rows of `tokens`."""
        return "\n\n".join(info.decode(row) for row in tokens)

    def export_kind(self, info: Any) -> str | None:
        """The `kind` of model `python -m train.export` writes (`train.serve` reads it); None:
        not exportable."""
        del info
        return None

    def export_metadata(
        self, config: ml_collections.ConfigDict, info: Any, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """`meta` (what `train.export` writes for every model) and what serving this task needs."""
        del config, info
        return meta


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """One class per example: MNIST images (`mnist`) or sentences of word ids (`glue/sst2`)."""

    name: ClassVar[str] = "classification"
    data_kinds: ClassVar[tuple[str, ...]] = ("image", "words")

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int = 1) -> Batch:
        batch = super().example_batch(config, batch_size)
        if data.kind(config.data) == "image":  # [batch, height, width, channels] in [0, 1]
            batch["inputs"] = jnp.zeros((batch_size, 28, 28, 1), jnp.float32)
        return batch

    def export_kind(self, info: Any) -> str:
        return "text_classifier" if info.vocab else "image_classifier"

    def export_metadata(
        self, config: ml_collections.ConfigDict, info: Any, meta: dict[str, Any]
    ) -> dict[str, Any]:
        meta = {**meta, "labels": label_names(config.data, info.num_classes)}
        if not info.vocab:  # uint8 pixels times this: [0, 1]
            meta["input"] = {**meta["input"], "pixel_scale": PIXEL_SCALE}
        return meta


@dataclasses.dataclass(frozen=True)
class LanguageModel(Task):
    """The next token at every position of a window of characters (`tiny_shakespeare`, or any
    prepared data set of text records)."""

    name: ClassVar[str] = "language_model"
    data_kinds: ClassVar[tuple[str, ...]] = ("characters",)
    logits_rank: ClassVar[int] = 3  # [batch, seq_len, vocab]
    decodes: ClassVar[bool] = True

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int = 1) -> Batch:
        tokens = jnp.zeros((batch_size, config.data.seq_len), jnp.int32)  # [batch, seq_len]
        weights = jnp.zeros(tokens.shape, jnp.float32)
        return {"inputs": tokens, "targets": tokens, "weights": weights}

    def check_fits(
        self, config: ml_collections.ConfigDict, logits: jax.ShapeDtypeStruct, info: Any
    ) -> None:
        check_token_logits(
            logits,
            info.vocab_size,
            f"{config.data.dataset} is a language-model data set of {info.vocab_size} tokens",
            f"use a per-step model with model.vocab_size >= {info.vocab_size}",
        )

    def after_training(self, config, state, info, rng, workdir) -> list[str]:
        """Samples `train.sample_lines` texts; logs them and writes samples.txt.

        A model that decodes with a key/value cache (the Transformer decoder) does; others re-run
        their window for every token.
        """
        num_lines = config.train.sample_lines
        prompt = jnp.asarray(np.tile(info.encode("\n")[:1], (num_lines, 1)), jnp.int32)
        cached = decode.uses_cache(state.apply_fn)
        draw = jax.jit(
            functools.partial(
                decode.sample_tokens_cached if cached else decode.sample_tokens,
                state.apply_fn,
                length=config.train.sample_length,
                context=config.data.seq_len,
                temperature=config.train.sample_temperature,
            )
        )
        tokens = np.asarray(jax.device_get(draw(state.params, prompt, rng)))
        texts = [info.decode(row[1:]) for row in tokens]
        if jax.process_index() == 0:
            blocks = [f"--- sample {i} ---\n{text}\n" for i, text in enumerate(texts)]
            (workdir / "samples.txt").write_text("".join(blocks))
            for text in texts:
                logging.info("Sample:\n%s", text)
        return texts

    def decodes_with_cache(self, apply_fn: Callable) -> bool:
        return decode.uses_cache(apply_fn)

    def decoder(self, config, apply_fn, ids, *, num_samples, length, cache, settings):
        sampler = decode.sample_tokens_cached if cache else decode.sample_tokens
        function = functools.partial(
            sampler, apply_fn, length=length, context=config.data.seq_len, **settings
        )
        return function, jnp.asarray(np.tile(ids, (num_samples, 1))), length

    def export_kind(self, info: Any) -> str:
        return "language_model"

    def export_metadata(
        self, config: ml_collections.ConfigDict, info: Any, meta: dict[str, Any]
    ) -> dict[str, Any]:
        return {**meta, "sample_temperature": config.train.sample_temperature}


@dataclasses.dataclass(frozen=True)
class Seq2Seq(Task):
    """A target sequence for a source sequence, by an encoder-decoder (`jaxmodels.Seq2Seq`):
    the translation-style pairs of `train.translation`. Evaluation also decodes greedily."""

    name: ClassVar[str] = "seq2seq"
    data_kinds: ClassVar[tuple[str, ...]] = ("seq2seq",)
    model_names: ClassVar[tuple[str, ...]] = ("seq2seq",)
    logits_rank: ClassVar[int] = 3  # [batch, seq_len, vocab]
    decodes: ClassVar[bool] = True
    sample_temperature: ClassVar[float] = 0.0
    eval_averages: ClassVar[dict[str, tuple[str, str]]] = {
        "greedy_token_accuracy": ("greedy_correct_sum", "count"),
        "sequence_accuracy": ("sequence_correct_sum", "sequence_count"),
    }

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int = 1) -> Batch:
        tokens = jnp.zeros((batch_size, config.data.seq_len), jnp.int32)  # [batch, seq_len]
        weights = jnp.zeros(tokens.shape, jnp.float32)
        return {"inputs": tokens, "decoder_inputs": tokens, "targets": tokens, "weights": weights}

    def model_inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        """The source ids and the decoder's inputs (the target after BOS: teacher forcing)."""
        return batch["inputs"], batch["decoder_inputs"]

    def eval_sums(self, state: Any, batch: Batch, weights: jax.Array) -> Metrics:
        """Sums of greedy decoding (`train.decode.translate`, with its cache) against the targets:
        `greedy_correct_sum`, the weighted target tokens it gets right (of `count`, as `sums`
        counts them), `sequence_correct_sum`, the rows whose every weighted token is right (the
        end token included), and `sequence_count`, the rows with any weight.
        """
        targets = batch["targets"]  # [batch, seq_len]
        predicted = decode.translate(
            state.apply_fn,
            state.params,
            batch["inputs"],
            length=targets.shape[1],
            bos_id=translation.BOS_ID,
            eos_id=translation.EOS_ID,
        )
        correct = predicted == targets
        row_correct = jnp.all(correct | (weights == 0), axis=1)  # [batch]
        is_row = jnp.any(weights > 0, axis=1)  # padded rows of the last eval batch are not
        return {
            "greedy_correct_sum": jnp.sum(correct * weights),
            "sequence_correct_sum": jnp.sum(row_correct & is_row, dtype=jnp.float32),
            "sequence_count": jnp.sum(is_row, dtype=jnp.float32),
        }

    def check_fits(
        self, config: ml_collections.ConfigDict, logits: jax.ShapeDtypeStruct, info: Any
    ) -> None:
        check_token_logits(
            logits,
            info.vocab_size,
            f"{config.data.dataset} has {info.vocab_size} token ids",
            f"set model.vocab_size >= {info.vocab_size}",
        )

    def after_training(self, config, state, info, rng, workdir) -> list[str]:
        """Translates the first `train.sample_lines` sources of the eval split with the cached
        decoder; logs and writes samples.txt, a line `source -> output (target: target)` each."""
        batch = next(data.eval_batches(config.data))
        num_lines = min(config.train.sample_lines, len(batch["inputs"]))
        draw = jax.jit(
            functools.partial(
                decode.translate,
                state.apply_fn,
                length=config.data.seq_len,
                bos_id=translation.BOS_ID,
                eos_id=translation.EOS_ID,
                temperature=config.train.sample_temperature,
            )
        )
        sources, targets = batch["inputs"][:num_lines], batch["targets"][:num_lines]
        outputs = np.asarray(jax.device_get(draw(state.params, jnp.asarray(sources), rng)))
        lines = [
            f"{info.decode(source)} -> {info.decode(output)} (target: {info.decode(target)})"
            for source, output, target in zip(sources, outputs, targets, strict=True)
        ]
        if jax.process_index() == 0:
            (workdir / "samples.txt").write_text("".join(line + "\n" for line in lines))
            logging.info("Translations:\n%s", "\n".join(lines))
        return lines

    def decodes_with_cache(self, apply_fn: Callable) -> bool:
        return True  # `translate` caches the decoder's keys and values

    def decoder(self, config, apply_fn, ids, *, num_samples, length, cache, settings):
        if len(ids) > config.data.seq_len:
            raise ValueError(
                f"--prompt is {len(ids)} tokens; this run's sources are at most "
                f"data.seq_len={config.data.seq_len}."
            )
        source = np.zeros((num_samples, config.data.seq_len), np.int32)
        source[:, : len(ids)] = ids
        length = min(length, config.model.max_len)
        function = functools.partial(
            decode.translate,
            apply_fn,
            length=length,
            bos_id=translation.BOS_ID,
            eos_id=translation.EOS_ID,
            cache=cache,
            **settings,
        )
        return function, jnp.asarray(source), length

    def decoded_text(self, info: Any, tokens: np.ndarray) -> str:
        return "\n".join(info.decode(row) for row in tokens)


# The plain task, for a module of your own (`train.state_from_module`'s default).
PLAIN = Task()
# One of each task, by name.
TASKS: dict[str, Task] = {
    task.name: task for task in (Classification(), LanguageModel(), Seq2Seq())
}


def for_config(config: ml_collections.ConfigDict) -> Task:
    """The task of `config`: the one whose `data_kinds` hold the kind of `data.dataset`.

    Raises a one-line ValueError where `model.name` trains only another task (the encoder-decoder
    trains only seq2seq), or the task takes only models other than `model.name`.
    """
    kind, name, dataset = data.kind(config.data), config.model.name, config.data.dataset
    task = next(task for task in TASKS.values() if kind in task.data_kinds)
    owner = next((t for t in TASKS.values() if name in t.model_names), task)
    if owner is not task:
        datasets = sorted(k for k, v in data.DATASETS.items() if v in owner.data_kinds)
        raise ValueError(
            f"model.name={name!r} trains {owner.name} data, one of {datasets}; got "
            f"data.dataset={dataset!r}."
        )
    if task.model_names and name not in task.model_names:
        raise ValueError(
            f"{dataset} is {task.name} data; train it with model.name={task.model_names[0]!r}, "
            f"as configs/{task.model_names[0]}.py does."
        )
    return task


def check_token_logits(
    logits: jax.ShapeDtypeStruct, vocab_size: int, data: str, advice: str
) -> None:
    """A one-line ValueError (`data`, then `advice`) unless `logits` are `[batch, seq_len, n]`
    with n >= `vocab_size`: one score per token id at every position."""
    if logits.ndim != 3 or logits.shape[-1] < vocab_size:
        raise ValueError(f"{data}, but the model's logits have shape {logits.shape}; {advice}.")


def label_names(data_config: ml_collections.ConfigDict, num_classes: int) -> list[str]:
    """The data set's class names from its tfds metadata ('0'..'9', 'negative'/'positive')."""
    builder = tfds.builder(data_config.dataset, data_dir=data.resolve_data_dir(data_config))
    names = list(builder.info.features["label"].names)
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]
