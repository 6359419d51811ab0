"""Loading config files outside the command line (tests, notebooks, your own scripts)."""

import importlib.util
import pathlib

import ml_collections


def load_config(spec: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:variant]` the way `--config=` does, and locks it.

    Args:
      spec: a config file path, optionally followed by `:variant` (passed to `get_config`).

    Returns:
      The locked ConfigDict: fields can be changed, new keys cannot be added.
    """
    path, _, variant = str(spec).partition(":")
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"Config file {path!r} does not exist; pass e.g. configs/cnn.py.")
    module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    config.lock()
    return config
