"""orbax checkpoints of the whole run: train state, base RNG and the grain iterator, in one step."""

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def make_manager(directory: pathlib.Path, *, keep: int) -> ocp.CheckpointManager:
    """A CheckpointManager that saves asynchronously and keeps the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iterator: Any,
) -> None:
    """Starts an async save of `state` (a pytree of global arrays) and the data iterator's position.

    The iterator's state is written synchronously, here, so it matches `step` exactly; the arrays
    are copied to host memory and written in the background while training goes on.
    """
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        ),
    )


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iterator: Any
) -> Any:
    """Restores step `step` onto the shapes and shardings of `abstract_state`.

    `data_iterator` is moved to its saved position in place. Returns the restored state.
    """
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
    )
    return restored["state"]


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves carrying `sharding`: the target of a restore."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
