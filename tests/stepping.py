"""Training a few steps by hand, as the loop does, for the tests that compare layouts."""

from collections.abc import Callable

import jax

from train import data, loop


def losses_and_params(config, mesh, compile_steps: Callable, num_steps: int = 4):
    """Per-step losses of `config` from a fresh state on `mesh`, with the steps that
    `compile_steps(state_shardings)` gives, and the final params (on the host). Every layout
    sees the same batches (seed 0) and step key."""
    state, shardings = loop.init_state(config, mesh, jax.random.key(0))
    compiled = compile_steps(shardings)
    run_state, losses = compiled.to_run(state), []
    iterator = data.train_iterator(config.data, seed=0)
    for _ in range(num_steps):
        batch = compiled.put_batch(next(iterator))
        run_state, sums = compiled.train(run_state, batch, jax.random.key(3))
        losses.append(float(sums["loss_sum"] / sums["count"]))
    return losses, jax.device_get(compiled.from_run(run_state).params)
