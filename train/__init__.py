"""Training for jaxmodels: a train state, pure step functions and the loop that runs them.

from train import create_train_state, train_step, train_steps, eval_step

Importing `train` does not import JAX: the names above load on first use, so that the command
line can read its config and restart itself with its process settings (`train.process`) without
starting JAX first.
"""

import importlib

_LAZY = {
    "TrainState": "train.state",
    "create_train_state": "train.state",
    "state_from_module": "train.state",
    "eval_step": "train.steps",
    "train_step": "train.steps",
    "train_steps": "train.steps",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # a submodule: `import train; train.loop...` works as it did before
        return importlib.import_module(f"train.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"train.{name}":  # the submodule exists but needs something missing
            raise
    raise AttributeError(f"module 'train' has no attribute {name!r}")
