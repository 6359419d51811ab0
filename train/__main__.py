"""Command line: python -m train --config=configs/transformer.py[:variant] [--workdir=DIR].

Any config field can be overridden, e.g. --config.optimizer.learning_rate=3e-4.
"""

import importlib.util
import logging as std_logging
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/cnn.py:tiny", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>[-<variant>]).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def default_workdir(config_arg: str) -> str:
    """runs/cnn for configs/cnn.py, runs/cnn-tiny for configs/cnn.py:tiny."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    return str(pathlib.Path("runs") / (f"{name}-{variant}" if variant else name))


class _QuietLibraries(std_logging.Filter):
    """Drops INFO lines of orbax (dozens per checkpoint) and tfds; their warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        return not any(name in record.pathname for name in ("orbax", "tensorflow_datasets"))


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # TensorFlow is not needed, but if it is installed it must not take GPU memory from JAX.
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    from train import loop  # imported after flag parsing: importing jax is slow

    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    logging.info("Workdir: %s", workdir)
    _, scalars = loop.train_and_evaluate(FLAGS.config, workdir)
    print(" ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))


if __name__ == "__main__":
    app.run(main)
