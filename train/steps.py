"""Pure train and eval steps. The caller compiles them (jax.jit over a mesh, or jax.pmap).

A batch is a dict of arrays: `inputs`, `targets` and optionally `weights` (the shape of `targets`);
a sequence-to-sequence batch also holds `decoder_inputs`, the model's second input. One
cross-entropy over the last axis of the logits serves classifiers (targets [batch]), language
models and encoder-decoders (targets [batch, seq_len]). Steps return sums and a count, never
means, so that averages stay exact over uneven batches, padded eval batches and devices.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from train import sample
from train.state import TrainState
from train.translation import BOS_ID, EOS_ID

Batch = dict[str, jax.Array]
# The metric sums a train step returns.
TRAIN_SUMS = ("loss_sum", "correct_sum", "count")
Metrics = dict[str, jax.Array]


def _weights(batch: Batch) -> jax.Array:
    if "weights" in batch:
        return batch["weights"].astype(jnp.float32)
    return jnp.ones(batch["targets"].shape, jnp.float32)


def model_inputs(batch: Batch) -> tuple[jax.Array, ...]:
    """The model's positional inputs: `(inputs,)`, or `(inputs, decoder_inputs)` for a
    sequence-to-sequence batch."""
    if "decoder_inputs" in batch:
        return batch["inputs"], batch["decoder_inputs"]
    return (batch["inputs"],)


def _sums(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> Metrics:
    """Weighted sums of loss and correct predictions. logits [..., classes], targets [...]."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(losses * weights),
        "correct_sum": jnp.sum(correct * weights),
        "count": jnp.sum(weights),
    }


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    axis_name: Any = None,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on the mean loss over the (global) batch.

    Args:
      state: the current TrainState.
      batch: `inputs` [batch, ...], `targets` [batch] or [batch, seq_len], optional `weights`,
        and `decoder_inputs` for an encoder-decoder (see the module docstring).
      rng: the run's base key; the step number is folded in here, so the loop passes the same key
        every step and a resumed run draws the same dropout masks.
      axis_name: set only under pmap/shard_map, where each device holds a slice of the batch and
        gradients and metrics are summed across devices.
      grad_accum_steps: split the batch into this many micro-batches, run them one after another
        and sum their gradients: the same update as the whole batch, with a fraction of the
        activation memory.

    Returns:
      (new state, metric sums: loss_sum, correct_sum, count).
    """
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    weights = _weights(batch)

    # The gradient of the loss *sum*; it is divided by the global weight only after the sums
    # over micro-batches and devices, so pmap and jit optimise the same objective (the mean
    # over the global batch) and micro-batches add up to the whole batch's mean. Dividing first
    # would need the global weight before the backward pass: one more cross-device reduction,
    # which XLA:CPU runs as a blocking wait on one of its worker threads while the other
    # device's forward pass waits for a thread, stalling steps on several CPU devices. Now every
    # reduction of the step comes after it.
    def grads_and_sums(params, micro_batch, micro_weights, micro_rng):
        def loss_fn(params):
            logits = state.apply_fn(
                {"params": params},
                *model_inputs(micro_batch),
                train=True,
                rngs={"dropout": micro_rng},
            )
            sums = _sums(logits, micro_batch["targets"], micro_weights)
            return sums["loss_sum"], sums

        return jax.grad(loss_fn, has_aux=True)(params)

    if grad_accum_steps == 1:
        grads, sums = grads_and_sums(state.params, batch, weights, rng)
    else:
        micro_batches = _split(dict(batch, weights=weights), grad_accum_steps)

        def accumulate(carry, index_and_micro_batch):
            index, micro_batch = index_and_micro_batch
            grads, sums = grads_and_sums(
                state.params, micro_batch, micro_batch["weights"], jax.random.fold_in(rng, index)
            )
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct_sum", "count")}
        zeros = (jax.tree.map(jnp.zeros_like, state.params), zero_sums)
        (grads, sums), _ = jax.lax.scan(
            accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches)
        )
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        sums = jax.lax.psum(sums, axis_name)
    scale = 1.0 / jnp.maximum(sums["count"], 1e-8)  # count: the global batch's summed weights
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    return state.apply_gradients(grads=grads), sums


def train_steps(
    state: TrainState,
    batches: Batch,
    rng: jax.Array,
    *,
    step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]] = train_step,
) -> tuple[TrainState, Metrics]:
    """Several optimizer steps in one call: `step` on each batch along the leading axis, in order.

    `batches` holds one batch per step, stacked: `[steps, batch, ...]`. A `lax.scan`, so the steps
    compile once and run back to back on the device without the host in between; for steps of a
    millisecond or less that host time is a large share (see `train.steps_per_call`). Each step
    folds its own step number into `rng`, as a step called alone does.

    Args:
      state: the current TrainState.
      batches: `[steps, ...]` stacked batches, as `step` takes them one at a time.
      rng: the run's base key, passed unchanged to every step.
      step: `(state, batch, rng) -> (state, metric sums)`; `train_step` with its keyword arguments
        bound (`functools.partial`), or a function that prepares the batch and calls it.

    Returns:
      (state after the last step, metric sums added over the steps).
    """
    state, sums = jax.lax.scan(lambda state, batch: step(state, batch, rng), state, batches)
    return state, jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)


def _split(batch: Batch, num_micro_batches: int) -> Batch:
    """[batch, ...] -> [num_micro_batches, batch / num_micro_batches, ...], rows taken strided.

    Micro-batch i holds rows i, i + n, i + 2n, ...: with the batch split over devices along its
    first axis, every micro-batch then has rows on every device.
    """
    size = batch["targets"].shape[0]
    if size % num_micro_batches:
        raise ValueError(
            f"A batch of {size} examples does not split into {num_micro_batches} micro-batches; "
            "make train.grad_accum_steps divide the per-device batch."
        )
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(-1, num_micro_batches, *x.shape[1:]), 0, 1), batch
    )


def eval_step(state: TrainState, batch: Batch, *, axis_name: Any = None) -> Metrics:
    """Metric sums of the model in eval mode (no dropout). Rows with weight 0 count for nothing.

    A sequence-to-sequence batch is also decoded greedily from its `inputs` alone, and scored
    against its targets (`greedy_sums`).
    """
    logits = state.apply_fn({"params": state.params}, *model_inputs(batch), train=False)
    sums = _sums(logits, batch["targets"], _weights(batch))
    if "decoder_inputs" in batch:
        sums.update(greedy_sums(state, batch))
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def greedy_sums(state: TrainState, batch: Batch) -> Metrics:
    """Sums of an encoder-decoder's greedy decoding (`train.sample.translate`, with its cache)
    against the targets: `greedy_correct_sum`, the weighted target tokens it gets right (of
    `count`, as `eval_step` sums it), `sequence_correct_sum`, the rows whose every weighted token
    is right (the end token included), and `sequence_count`, the rows with any weight.
    """
    targets, weights = batch["targets"], _weights(batch)  # [batch, seq_len]
    predicted = sample.translate(
        state.apply_fn,
        state.params,
        batch["inputs"],
        length=targets.shape[1],
        bos_id=BOS_ID,
        eos_id=EOS_ID,
    )
    correct = predicted == targets
    row_correct = jnp.all(correct | (weights == 0), axis=1)  # [batch]
    is_row = jnp.any(weights > 0, axis=1)  # padded rows of the last eval batch are not
    return {
        "greedy_correct_sum": jnp.sum(correct * weights),
        "sequence_correct_sum": jnp.sum(row_correct & is_row, dtype=jnp.float32),
        "sequence_count": jnp.sum(is_row, dtype=jnp.float32),
    }
