"""MLP classifier on MNIST.

Usage:
  python -m train --config=configs/mlp.py --workdir=runs/mlp
  python -m train --config=configs/mlp.py:tiny --config.optimizer.learning_rate=0.05
"""

import ml_collections

from train.config import base_config


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default' or 'tiny' (seconds on a laptop CPU)."""
    config = base_config()  # the shared settings, commented there

    config.model.name = "mlp"
    config.model.hidden_sizes = (512, 512)
    config.model.num_classes = 10
    config.model.dropout_rate = 0.2  # after each hidden layer: without it the MLP overfits MNIST
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params

    config.data.dataset = "mnist"
    config.data.eval_split = "test"
    config.data.batch_size = 128  # global: split over all devices and hosts

    config.optimizer.name = "sgd"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(momentum=0.9))  # its own arguments
    config.optimizer.learning_rate = 0.1  # peak value of the schedule

    config.train.num_steps = 8000  # about 17 epochs of 60000 images at batch 128
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    # Steps run in one compiled call (a lax.scan): a step here is so short that the host's work
    # per call (dispatch, batch, metrics) would be a large share. Best a divisor of log_every and
    # checkpoint_every: the loop reports and saves only between calls.
    config.train.steps_per_call = 25
    # Off here: one malloc heap makes threads wait for each other, which costs a step this short
    # more than it gains (see train/process.py and benchmarks/RESULTS.md).
    config.train.reuse_host_memory = False

    if variant == "tiny":
        config.model.hidden_sizes = (128,)
        config.model.dropout_rate = 0.0
        config.data.train_split = "train[:8192]"
        config.data.eval_split = "test[:1000]"
        config.data.batch_size = 64
        config.train.num_steps = 200
        config.train.log_every = 50
        config.train.eval_every = 100
        config.train.checkpoint_every = 100
        config.optimizer.warmup_steps = 10
    elif variant != "default":
        raise ValueError(f"Unknown variant {variant!r} of configs/mlp.py. Known: default, tiny")
    return config
