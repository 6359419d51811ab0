"""orbax checkpoints of the whole run: train state, base RNG and the grain iterator, in one step.

orbax writes each step into a temporary folder and renames it when complete, so a crash during a
save leaves the earlier steps as they were. A step that cannot be read is moved aside (never
deleted) and the next older one is tried.
"""

import functools
import pathlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def make_manager(directory: pathlib.Path, *, keep: int) -> ocp.CheckpointManager:
    """A CheckpointManager that saves asynchronously and keeps the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,  # remove what a save cut short by a crash left behind
    )
    return ocp.CheckpointManager(
        directory.absolute(),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
    )


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` is better: losses and perplexities, not accuracies."""
    return metric.endswith("loss") or metric.endswith("perplexity")


def make_best_manager(directory: pathlib.Path, metric: str) -> ocp.CheckpointManager:
    """A CheckpointManager keeping only the parameters of the step with the best `metric`.

    orbax keeps the best step by the metrics saved with each step (their metadata), so a resumed
    run goes on comparing against the best of the steps before the stop.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda scalars: scalars[metric],
        best_mode="min" if lower_is_better(metric) else "max",
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        directory.absolute(),
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    )


def save_best(
    manager: ocp.CheckpointManager, step: int, params: Any, scalars: dict[str, float]
) -> None:
    """Offers step `step`'s parameters to `manager` (`make_best_manager`) with its metrics.

    The same layout as a run's checkpoints (`<step>/state` holding `params`), so `train.trained`
    reads both alike. A step already there (a resumed run repeating an evaluation) is skipped.
    """
    if step in manager.all_steps():
        return
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})),
        metrics={name: float(value) for name, value in scalars.items()},
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any) -> None:
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


def restore_newest(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any
) -> tuple[int, Any] | None:
    """Restores the newest readable step; returns (step, state), or None if there is none.

    Unreadable steps (truncated or missing files) are reported in one line each, moved aside to
    `<step>.corrupt` and skipped. A readable step whose parameters or optimizer state have other
    names or shapes than `abstract_state`'s belongs to another model or optimizer: that is a
    ValueError, and nothing moves.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        check_layout(manager, step, abstract_state)
        try:
            return step, restore(manager, step, abstract_state, data_iterator)
        except Exception as error:  # noqa: BLE001  orbax and tensorstore raise many error types
            path = pathlib.Path(manager.directory) / str(step)
            aside = path.with_name(f"{step}.corrupt")
            path.rename(aside)
            manager.reload()
            logging.error(
                "Checkpoint step %d is unreadable (%s); moved it to %s and trying an older step.",
                step,
                error_line(error),
                aside,
            )
    return None


def check_layout(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
    """Raises ValueError if step `step` holds parameters or optimizer state of other names or
    shapes than `abstract_state` (a dict with `params` and `opt_state`)."""
    try:
        saved = manager.item_metadata(step)["state"]
        saved = {"params": saved["params"], "opt_state": saved["opt_state"]}
    except Exception:  # noqa: BLE001  unreadable metadata: let the restore report it
        return
    for part, what, fix in (
        ("params", "another model", "the config it was trained with"),
        ("opt_state", "another optimizer's state", "the optimizer it was trained with"),
    ):
        wanted, found = _shapes(abstract_state[part]), _shapes(saved[part])
        if wanted != found:
            differ = sorted(
                k for k in wanted.keys() | found.keys() if wanted.get(k) != found.get(k)
            )
            name = differ[0]
            raise ValueError(
                f"Checkpoint step {step} in {manager.directory} holds {what}: {part} entry {name} "
                f"is {_shape_text(found.get(name))} there and {_shape_text(wanted.get(name))} in "
                f"this config ({len(differ)} differ); use another --workdir or {fix}."
            )


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of `tree`'s arrays. A path names each key, field or index alike, since the
    checkpoint's metadata holds a NamedTuple's fields as a dict and a tuple as a list."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    keystr = functools.partial(jax.tree_util.keystr, simple=True, separator="/")
    return {keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else f"shaped {shape}"


def error_line(error: BaseException) -> str:
    """One line for a failed restore: the root cause (tensorstore's names the array and file)."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].split(" [tensorstore_spec=")[0]


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays with their shardings: the target of a restore, so
    a checkpoint comes back laid out as this run wants it, whatever wrote it."""

    def abstract(x):
        if isinstance(x, np.ndarray | np.generic):  # host values come back as host values
            return np.zeros_like(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(abstract, tree)
