"""Config files: the settings they share (`base_config`), and loading one outside the command
line (tests, notebooks, your own scripts)."""

import importlib.util
import pathlib

import ml_collections
from ml_collections import config_dict


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


def base_config() -> ml_collections.ConfigDict:
    """The settings every config file shares, at the values most of them keep.

    A file in configs/ starts from this, adds its `model` section and the fields every task sets
    (data set, batch, optimizer, steps), and changes only what differs, saying why.
    """
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()  # the config file's: `name` picks the module

    config.data = ml_collections.ConfigDict()
    # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets (and the package's own tiny_shakespeare).
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.seq_len = 0  # tokens per example; unused by image data
    config.data.vocab_size = 0  # word vocabulary (SST-2); 0: none, or read off the data
    config.data.num_workers = 0  # read-ahead threads (worker processes if streamed); 0: none
    # True: decode the training split whole into memory; False: stream it from the files;
    # "auto": stream MNIST and SST-2 splits over 1 GiB on disk (README: Data).
    config.data.in_memory = config_dict.FieldReference("auto", field_type=object)
    config.data.on_device = True  # split in device memory, batches gathered there (jit only)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.weight_decay = 0.0  # on weight matrices and embeddings, not biases or norms
    config.optimizer.schedule = "cosine"  # constant | cosine (both after a linear warmup)
    config.optimizer.warmup_steps = 100
    config.optimizer.end_learning_rate = 0.0  # cosine only: value at the last step
    config.optimizer.grad_clip_norm = 0.0  # clip the global gradient norm; 0 disables

    config.train = ml_collections.ConfigDict()
    config.train.log_every = 100
    config.train.checkpoint_keep = 3  # newest checkpoints kept on disk
    config.train.keep_best = ""  # an eval metric, e.g. eval/accuracy: keep its best params
    config.train.parallelism = "jit"  # jit (sharded over a device mesh) | pmap
    config.train.mesh = ml_collections.ConfigDict()  # device mesh axes; -1 takes the rest
    config.train.mesh.data = -1  # data parallel: the batch is split over data x fsdp devices
    config.train.mesh.fsdp = 1  # >1 shards params and optimizer state (FSDP)
    config.train.mesh.tensor = 1  # >1 splits the Transformer's heads and MLP units (Megatron)
    # >1: TPU slices joined by the data-center network (Multislice): `data` is split across them,
    # fsdp and tensor stay within each slice, on the chips' own links
    config.train.mesh.slices = 1
    config.train.grad_accum_steps = 1  # micro-batches per step; the same update, less memory
    config.train.steps_per_call = 1  # steps run in one compiled call; >1 for sub-ms steps
    config.train.compile_cache_dir = "~/.cache/jaxmodels/xla"  # "" off (command line only)
    config.train.reuse_host_memory = True  # command line, CPU: see train/process.py
    config.train.cpu_devices = 0  # command line, CPU: see train/process.py
    config.train.profile_steps = 0  # >0: a JAX profiler trace of that many steps, WORKDIR/profile
    config.train.profile_first_step = 10  # the first step traced (after the compile of step 1)
    config.train.sample_lines = 0  # language models and seq2seq: samples written at the end
    config.train.sample_length = 0  # tokens per language-model sample
    config.train.sample_temperature = 1.0  # 0: greedy

    config.seed = 0
    return config
