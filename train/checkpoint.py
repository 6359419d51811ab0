"""orbax checkpoints of the whole run: train state, base RNG and the grain iterator, in one step.

orbax writes each step into a temporary folder and renames it when complete, so a crash during a
save leaves the earlier steps as they were. A restore never gives up progress on a guess: a step
that fails to restore is moved aside to `<step>.corrupt` (never deleted), and the next older one
tried, only when the step's own records prove it damaged (`find_damage`: a file they list is
missing or shorter than recorded, or a record fails to decode). Any other failure (an I/O error,
out of memory, a checkpoint layout from another version of the code) stops the run with a
one-line `RestoreError` and moves nothing. In a multi-process run process 0 judges and moves; the
others follow its verdict.
"""

import functools
import json
import pathlib
import re
import urllib.parse
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from jax.experimental import multihost_utils


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


class RestoreError(RuntimeError):
    """A checkpoint step that could not be restored and shows no damage: the run stops and every
    step stays where it is. The message is one line naming the step, the directory and the error."""


def restore_newest(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any
) -> tuple[int, Any] | None:
    """Restores the newest readable step; returns (step, state), or None if there is none.

    A step whose restore fails is looked at on disk (`find_damage`, and tensorstore's DATA_LOSS,
    its word for contents that fail to decode). Only a step found damaged is reported in one line,
    moved aside to `<step>.corrupt` (never deleted) and skipped. Any other failure (an I/O error,
    out of memory, a layout this code does not know) raises `RestoreError` and moves nothing. A
    step whose parameters or optimizer state have other names or shapes than `abstract_state`'s
    belongs to another model or optimizer: that is a ValueError, and nothing moves.

    With several processes every one restores (orbax's restore is collective); process 0 judges a
    failure and moves the folder, and the others follow its verdict.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        check_layout(manager, step, abstract_state)
        restored, failure = None, None
        try:
            restored = restore(manager, step, abstract_state, data_iterator)
        except Exception as error:  # noqa: BLE001  judged below, together with the other processes
            failure = error
        if not _on_any_process(failure is not None):
            return step, restored
        moved, line = (
            _set_aside_if_damaged(manager, step, failure)
            if jax.process_index() == 0
            else (False, _failure_line(manager, step, failure, judged_by_process_0=True))
        )
        if not _as_process_0_says(moved):
            raise RestoreError(line) from failure
        manager.reload()
    return None


def find_damage(step_dir: pathlib.Path) -> str | None:
    """Damage in checkpoint folder `step_dir` that its own records prove, in one line, or None.

    Proof is a file the checkpoint lists that is missing or shorter than recorded, or a record
    that fails to decode: `state/_METADATA` and grain's `data/process_<i>-of-<n>.json` must be
    JSON, with a file for each of the n processes; an OCDBT checkpoint (orbax's default) must have
    its manifest `state/manifest.ocdbt`, which lists B-tree nodes, which list the byte ranges of
    every array chunk in the data files (`d/<name>`): each node must decode and every file must
    reach the last byte recorded in it. An OSError other than a missing file propagates: it says
    nothing about the checkpoint.
    """
    state_dir, data_dir = step_dir / "state", step_dir / "data"
    try:
        items = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # not needed to restore
        items = {}
    for item in items:
        if not (step_dir / item).is_dir():
            return f"{step_dir / item} is missing; {step_dir / '_CHECKPOINT_METADATA'} lists it"
    metadata, damage = _read_json(state_dir / "_METADATA")
    if damage:
        return damage
    if (metadata or {}).get("use_ocdbt") or (state_dir / "manifest.ocdbt").exists():
        damage = _ocdbt_damage(state_dir)
        if damage:
            return damage
    if data_dir.is_dir():
        return _iterator_damage(data_dir)
    return None


# How tensorstore words contents that fail to decode: its status DATA_LOSS (a failed checksum, a
# manifest or B-tree node cut short) and the compressors' own errors (a chunk's zstd, zlib, ...
# stream). It reports I/O errors, missing keys and unknown layouts otherwise; a format newer than
# the installed tensorstore ("Maximum supported version is ...") is not damage either.
DECODE_FAILURES = ("DATA_LOSS", "Error decoding", "decompress", "compressed stream")
NEWER_FORMAT = "supported version"


def decode_failure(error: BaseException | None) -> str | None:
    """The line of the error in `error`'s chain that says a checkpoint's contents fail to decode
    (`DECODE_FAILURES`), or None."""
    while error is not None:
        text = str(error)
        if any(word in text for word in DECODE_FAILURES) and NEWER_FORMAT not in text:
            return error_line(error)
        error = error.__cause__ or error.__context__
    return None


def _set_aside_if_damaged(
    manager: ocp.CheckpointManager, step: int, failure: BaseException | None
) -> tuple[bool, str]:
    """Moves step `step` to `<step>.corrupt` if it is damaged (logged in one line).

    Returns (whether it moved, the one-line error to raise if it did not)."""
    path = pathlib.Path(manager.directory) / str(step)
    try:
        damage = find_damage(path) or decode_failure(failure)
    except Exception as error:  # noqa: BLE001  reading it failed again (I/O): no verdict
        logging.warning("Could not look for damage in %s: %s", path, error_line(error))
        damage = None
    if damage is None:
        return False, _failure_line(manager, step, failure, judged_by_process_0=False)
    aside = path.with_name(f"{step}.corrupt")
    number = 1
    while aside.exists():  # an earlier run set aside a step of the same number
        number += 1
        aside = path.with_name(f"{step}.corrupt-{number}")
    try:
        path.rename(aside)
    except OSError as error:
        return False, (
            f"Checkpoint step {step} in {manager.directory} is damaged ({damage}) but could not "
            f"be moved aside ({error_line(error)}); move {path} away and run again."
        )
    logging.error(
        "Checkpoint step %d is damaged (%s); moved it to %s and trying an older step.",
        step,
        damage,
        aside,
    )
    return True, ""


def _failure_line(
    manager: ocp.CheckpointManager,
    step: int,
    failure: BaseException | None,
    judged_by_process_0: bool,
) -> str:
    """The one line of a `RestoreError` for step `step`."""
    path = pathlib.Path(manager.directory) / str(step)
    if failure is None:
        what = "it was restored here but failed on another process (see that process's log)"
    else:
        root = _root(failure)  # MemoryError() and the like have no message of their own
        what = f"{type(root).__name__}: {error_line(root)}" if str(root) else type(root).__name__
    verdict = "process 0 found no damage in it" if judged_by_process_0 else "it shows no damage"
    return (
        f"Could not restore checkpoint step {step} in {manager.directory} ({what}); "
        f"{verdict}, so nothing was moved: fix the cause and run again, or move {path} aside "
        f"to resume from the step before."
    )


def _on_any_process(flag: bool) -> bool:
    """`flag` of this process, or-ed over all processes (each gets the same answer)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _as_process_0_says(flag: bool) -> bool:
    """Process 0's `flag`, on every process."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


def _read_json(path: pathlib.Path) -> tuple[Any, str | None]:
    """(the JSON in `path`, None), (None, None) if there is no such file, or (None, why) if it
    fails to decode."""
    try:
        return json.loads(path.read_bytes()), None
    except FileNotFoundError:
        return None, None
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError alike
        return None, f"{path} does not decode as JSON: {error_line(error)}"


def _iterator_damage(data_dir: pathlib.Path) -> str | None:
    """Damage in grain's iterator states: one `process_<i>-of-<n>.json` for each of n processes,
    each JSON. (A run of another process count finds none of its own: no damage.)"""
    found = {}
    for path in data_dir.glob("process_*-of-*.json"):
        match = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", path.name)
        if match:
            found[path] = (int(match[1]), int(match[2]))
    if not found:
        return f"{data_dir} holds no data iterator state (process_<i>-of-<n>.json)"
    for count in sorted({n for _, n in found.values()}):
        have = {i for i, n in found.values() if n == count}
        missing = sorted(set(range(count)) - have)
        if missing:
            name = f"process_{missing[0]}-of-{count}.json"
            return f"{data_dir / name} is missing ({len(have)} of the {count} are there)"
    for path in sorted(found):
        _, damage = _read_json(path)
        if damage:
            return damage
    return None


def _ocdbt_damage(state_dir: pathlib.Path) -> str | None:
    """Damage in the OCDBT database in `state_dir`: its manifest and every B-tree node must
    decode, and every file they point into must reach the last byte they record in it."""
    manifest_path = state_dir / "manifest.ocdbt"
    if not manifest_path.exists():
        return f"{manifest_path} is missing; {state_dir / '_METADATA'} records an OCDBT checkpoint"
    store = ts.KvStore.open({"driver": "file", "path": f"{state_dir}/"}).result()
    manifest, damage = _dump(store, None, manifest_path)
    if damage or not manifest.get("versions"):
        return damage
    root = manifest["versions"][-1].get("root", {}).get("location")  # the newest version
    nodes, ends = [root] if root else [], {}
    while nodes:
        location = nodes.pop()
        path, end = _location(state_dir, location)
        damage = _too_short(path, end, manifest_path)
        if damage:
            return damage
        node, damage = _dump(store, location, path)
        if damage:
            return damage
        for entry in node.get("entries", []):
            for value in entry.values():
                if isinstance(value, str) and value.startswith("btreenode:"):
                    nodes.append(value)
                elif isinstance(value, str) and value.startswith("value:"):
                    path, end = _location(state_dir, value)
                    ends[path] = max(ends.get(path, 0), end)
    for path, end in sorted(ends.items()):
        damage = _too_short(path, end, manifest_path)
        if damage:
            return damage
    return None


def _dump(store: Any, location: str | None, path: pathlib.Path) -> tuple[Any, str | None]:
    """(tensorstore's decoding of the OCDBT manifest or node at `location`, None), or (None, why)
    if it fails to decode. Other errors (I/O) propagate as OSError."""
    try:
        return ts.ocdbt.dump(store, location).result(), None
    except Exception as error:  # noqa: BLE001  tensorstore raises ValueError for any status
        if decode_failure(error):
            return None, f"{path} does not decode: {decode_failure(error)}"
        raise OSError(f"reading {path}: {error_line(error)}") from error


def _location(state_dir: pathlib.Path, location: str) -> tuple[pathlib.Path, int]:
    """The file and the end of the byte range of an OCDBT location,
    `<kind>:<base path>:<relative path>:<offset>:<length>`."""
    _, base, relative, offset, length = location.split(":")
    path = state_dir / urllib.parse.unquote(base) / urllib.parse.unquote(relative)
    return path, int(offset) + int(length)


def _too_short(path: pathlib.Path, end: int, index: pathlib.Path) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing; {index} lists it"
    if size < end:
        return f"{path} is {size} bytes long; {index} records data up to byte {end}"
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
        differ = shape_differences(saved[part], abstract_state[part])
        if differ:
            name, there, here = differ[0]
            raise ValueError(
                f"Checkpoint step {step} in {manager.directory} holds {what}: {part} entry {name} "
                f"is {_shape_text(there)} there and {_shape_text(here)} in this config "
                f"({len(differ)} differ); use another --workdir or {fix}."
            )


Shape = tuple[int, ...]


def shape_differences(found: Any, wanted: Any) -> list[tuple[str, Shape | None, Shape | None]]:
    """Where two trees of arrays (or of a checkpoint's metadata) differ in names or shapes.

    Returns `(path, shape in found, shape in wanted)` for each such entry, by path, None where an
    entry is absent; [] when the two agree. A path ('params/dense/kernel', 'opt_state/0/count')
    names each key, field or index alike, since a checkpoint's metadata holds a NamedTuple's fields
    as a dict and a tuple as a list.
    """
    found, wanted = _shapes(found), _shapes(wanted)
    paths = sorted(p for p in found.keys() | wanted.keys() if found.get(p) != wanted.get(p))
    return [(path, found.get(path), wanted.get(path)) for path in paths]


def _shapes(tree: Any) -> dict[str, Shape]:
    """{path: shape} of `tree`'s arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    keystr = functools.partial(jax.tree_util.keystr, simple=True, separator="/")
    return {keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else f"shaped {shape}"


def error_line(error: BaseException) -> str:
    """One line for a failed restore: the root cause (tensorstore's names the array and file),
    its lines joined, without tensorstore's spec, at most 400 characters."""
    text = " ".join(str(_root(error)).split()) or type(_root(error)).__name__
    text = text.split(" [tensorstore_spec")[0]
    return text if len(text) <= 400 else text[:397] + "..."


def _root(error: BaseException) -> BaseException:
    """The first error of `error`'s chain: what went wrong, below orbax's wrapping."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays with their shardings: the target of a restore, so
    a checkpoint comes back laid out as this run wants it, whatever wrote it."""

    def abstract(x):
        if isinstance(x, np.ndarray | np.generic):  # host values come back as host values
            return np.zeros_like(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(abstract, tree)
