"""A finished (or interrupted) run, loaded back from its workdir for use after training.

    trained = load("runs/cnn")
    logits = trained.model.apply({"params": trained.params}, images, train=False)

The workdir's config.json rebuilds the model and its vocabulary; only the parameters come back
from the checkpoint (orbax's partial restore), not the optimizer state, the base key or the data
iterator, so loading needs neither the optimizer's code nor the data pipeline's position.
`python -m train.export` and `python -m train.plot` use this module, and so can a notebook.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from train import checkpoint, data
from train.state import as_tuple, build_model, example_inputs


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained model and what it needs to take real inputs.

    Attributes:
      config: the run's config, locked, as config.json holds it.
      model: the unbound Flax module `config.model` names.
      params: the parameters of checkpoint `step`, on the default device.
      info: the data set's vocabulary and classes (`train.data.DatasetInfo`).
      step: the checkpoint's step.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    params: Any
    info: data.DatasetInfo
    step: int


def load(workdir: str | pathlib.Path, step: int | str | None = None) -> Trained:
    """Loads the run in `workdir` at checkpoint `step` (None: the newest; "best": the step of
    the best evaluation, which a run with `train.keep_best` keeps in WORKDIR/best).

    Raises:
      FileNotFoundError: no config.json, no checkpoint, or no checkpoint `step` in `workdir`.
      ValueError: the checkpoint's parameters do not fit the model of config.json.
    """
    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    model = build_model(config)
    info = data.load_info(config.data)
    step, params = restore_params(workdir, config, model, step)
    return Trained(config, model, params, info, step)


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The locked config of the run in `workdir`, read from its config.json.

    JSON has no tuples, so its lists come back as tuples, as the config files write sequences
    (`model.hidden_sizes`, `model.head_sizes`): Flax module fields are hashed, and lists are not.
    """
    path = pathlib.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass the --workdir of a run of `python -m train`."
        )
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    config = ml_collections.ConfigDict(_lists_to_tuples(fields))
    config.lock()
    return config


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _lists_to_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(item) for item in value)
    return value


def restore_params(
    workdir: pathlib.Path,
    config: ml_collections.ConfigDict,
    model: nn.Module,
    step: int | str | None,
) -> tuple[int, Any]:
    """(step, params) of checkpoint `step` (None: the newest) in `workdir`/checkpoints, or of
    the kept best step in `workdir`/best for `step="best"`.

    The target is the model's parameter shapes (from `jax.eval_shape`, nothing computed), placed
    on the default device whatever devices wrote them; the rest of the state stays on disk.
    """
    best = step == "best"
    directory = (workdir / ("best" if best else "checkpoints")).absolute()
    step = None if best else step
    steps = _checkpoint_steps(directory)
    if not steps and best:
        raise FileNotFoundError(
            f"No best checkpoint in {directory}; train with --config.train.keep_best="
            f"eval/accuracy (or another eval metric) to keep one."
        )
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint in {directory}; train first (python -m train ... --workdir={workdir})."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"No checkpoint step {step} in {directory}; it holds {steps}.")
    inputs = as_tuple(example_inputs(config))  # two for an encoder-decoder
    init = lambda rng: nn.unbox(model.init(rng, *inputs, train=False)["params"])  # noqa: E731
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(init, jax.random.key(0)),
    )
    # The "state" item of a CheckpointManager step is a plain PyTree checkpoint: read it directly.
    path = directory / str(step) / "state"
    handler = ocp.PyTreeCheckpointHandler()
    checkpointer = ocp.Checkpointer(handler)
    try:
        _check_shapes(handler.metadata(path)["params"], target, path, workdir)
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
                partial_restore=True,  # params only: no optimizer state, key or data position
            ),
        )
    finally:
        checkpointer.close()
    return step, restored["params"]


def _checkpoint_steps(directory: pathlib.Path) -> list[int]:
    """The finished checkpoint steps in `directory`, oldest first (orbax names each a number and
    renames it so only when complete; `<step>.corrupt` folders are set aside by the loop)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _check_shapes(saved: Any, target: Any, path: pathlib.Path, workdir: pathlib.Path) -> None:
    """Raises ValueError if the saved parameters differ in names or shapes from the model's."""
    differ = checkpoint.shape_differences(saved, target)
    if differ:
        name, *shapes = differ[0]
        there, here = ("absent" if shape is None else shape for shape in shapes)
        raise ValueError(
            f"{path} does not hold the parameters of the model in {workdir / 'config.json'}: "
            f"{name} is {there} there and {here} in the model ({len(differ)} differ)."
        )
