"""Convolutional classifier on MNIST.

Usage:
  python -m train --config=configs/cnn.py --workdir=runs/cnn
  python -m train --config=configs/cnn.py:tiny --config.optimizer.learning_rate=0.05
"""

import ml_collections

from train.config import base_config


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default' or 'tiny' (seconds on a laptop CPU)."""
    config = base_config()  # the shared settings, commented there

    config.model.name = "cnn"
    config.model.conv_features = (32, 64)  # 3x3 SAME convolutions, each followed by a 2x2 max pool
    config.model.dense_features = 128
    config.model.num_classes = 10
    config.model.dropout_rate = 0.3  # before the last layer: regularises the dense head
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params
    config.model.implementation = "auto"  # auto | standard | cpu (jaxmodels/tuned.py)

    config.data.dataset = "mnist"
    config.data.eval_split = "test"
    config.data.batch_size = 128  # global: split over all devices and hosts

    config.optimizer.name = "adam"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))  # its own arguments
    config.optimizer.learning_rate = 1e-3  # peak value of the schedule

    config.train.num_steps = 5000  # about 10.7 epochs of 60000 images at batch 128
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000

    if variant == "tiny":
        config.model.dropout_rate = 0.0
        config.model.conv_features = (8, 16)
        config.model.dense_features = 32
        config.data.train_split = "train[:8192]"
        config.data.eval_split = "test[:1000]"
        config.data.batch_size = 64
        config.train.num_steps = 200
        config.train.log_every = 50
        config.train.eval_every = 100
        config.train.checkpoint_every = 100
        config.optimizer.warmup_steps = 10
        config.optimizer.learning_rate = 3e-3
    elif variant != "default":
        raise ValueError(f"Unknown variant {variant!r} of configs/cnn.py. Known: default, tiny")
    return config
