"""Pure train and eval steps. The caller compiles them (jax.jit over a mesh, or jax.pmap).

A batch is a dict of arrays: `inputs`, `targets` and optionally `weights` (the shape of `targets`),
and whatever else the state's task reads (`state.task`, see `train.tasks`: a sequence-to-sequence
batch also holds `decoder_inputs`, the model's second input). The task says which fields the model
takes and scores its logits; every task of `train.tasks` takes the cross-entropy over the last axis
of the logits (targets [batch] for classifiers, [batch, seq_len] for language models and
encoder-decoders). Steps return sums and a count, never means, so that averages stay exact over
uneven batches, padded eval batches and devices.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from train.state import TrainState

Batch = dict[str, jax.Array]
# The metric sums a train step returns (`state.task.sums`).
TRAIN_SUMS = ("loss_sum", "correct_sum", "count")
Metrics = dict[str, jax.Array]


def _weights(batch: Batch) -> jax.Array:
    if "weights" in batch:
        return batch["weights"].astype(jnp.float32)
    return jnp.ones(batch["targets"].shape, jnp.float32)


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
        and what else `state.task` reads (see the module docstring).
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
    task = state.task  # static: which fields the model takes, how its logits are scored

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
                *task.model_inputs(micro_batch),
                train=True,
                rngs={"dropout": micro_rng},
            )
            sums = task.sums(logits, micro_batch, micro_weights)
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

        zero_sums = {k: jnp.zeros((), jnp.float32) for k in TRAIN_SUMS}
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

    The task may add sums of its own (`state.task.eval_sums`): a sequence-to-sequence batch is
    also decoded greedily from its `inputs` alone, and scored against its targets.
    """
    task, weights = state.task, _weights(batch)
    logits = state.apply_fn({"params": state.params}, *task.model_inputs(batch), train=False)
    sums = task.sums(logits, batch, weights)
    sums.update(task.eval_sums(state, batch, weights))
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums
