"""MLP classifier on MNIST.

Usage:
  python -m train --config=configs/mlp.py --workdir=runs/mlp
  python -m train --config=configs/mlp.py:tiny --config.optimizer.learning_rate=0.05
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default' or 'tiny' (seconds on a laptop CPU)."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"
    config.model.hidden_sizes = (512, 512)
    config.model.num_classes = 10
    config.model.dropout_rate = 0.2  # after each hidden layer: without it the MLP overfits MNIST
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "mnist"
    # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets (and the package's own tiny_shakespeare).
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.batch_size = 128  # global: split over all devices and hosts
    config.data.seq_len = 0  # unused by image data
    config.data.vocab_size = 0  # unused by image data
    config.data.num_workers = 0  # read-ahead threads (worker processes if streamed); 0: none
    # True: decode the training split whole into memory; False: stream it from the files;
    # "auto": stream MNIST and SST-2 splits over 1 GiB on disk (README: Data).
    config.data.in_memory = config_dict.FieldReference("auto", field_type=object)
    config.data.on_device = True  # split in device memory, batches gathered there (jit only)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(momentum=0.9))  # its own arguments
    config.optimizer.learning_rate = 0.1  # peak value of the schedule
    config.optimizer.weight_decay = 0.0  # on weight matrices and embeddings, not biases or norms
    config.optimizer.schedule = "cosine"  # constant | cosine (both after a linear warmup)
    config.optimizer.warmup_steps = 100
    config.optimizer.end_learning_rate = 0.0  # cosine only: value at the last step
    config.optimizer.grad_clip_norm = 0.0  # clip the global gradient norm; 0 disables

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 8000  # about 17 epochs of 60000 images at batch 128
    config.train.log_every = 100
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.checkpoint_keep = 3  # newest checkpoints kept on disk
    config.train.keep_best = ""  # an eval metric, e.g. eval/accuracy: keep its best params
    config.train.parallelism = "jit"  # jit (sharded over a device mesh) | pmap
    config.train.mesh = ml_collections.ConfigDict()  # device mesh axes; -1 takes the rest
    config.train.mesh.data = -1  # data parallel: the batch is split over data x fsdp devices
    config.train.mesh.fsdp = 1  # >1 shards params and optimizer state (FSDP)
    config.train.grad_accum_steps = 1  # micro-batches per step; the same update, less memory
    # Steps run in one compiled call (a lax.scan): a step here is so short that the host's work
    # per call (dispatch, batch, metrics) would be a large share. Best a divisor of log_every and
    # checkpoint_every: the loop reports and saves only between calls.
    config.train.steps_per_call = 25
    config.train.compile_cache_dir = "~/.cache/jaxmodels/xla"  # "" off (command line only)
    # Off here: one malloc heap makes threads wait for each other, which costs a step this short
    # more than it gains (see train/process.py and benchmarks/RESULTS.md).
    config.train.reuse_host_memory = False
    config.train.cpu_devices = 0  # command line, CPU: see train/process.py
    config.train.profile_steps = 0  # >0: a JAX profiler trace of that many steps, WORKDIR/profile
    config.train.profile_first_step = 10  # the first step traced (after the compile of step 1)
    config.train.sample_lines = 0  # language models only: text lines sampled at the end
    config.train.sample_length = 0
    config.train.sample_temperature = 1.0

    config.seed = 0

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
