"""Transformer encoder sentiment classifier on GLUE SST-2 (word tokens).

The `Transformer` with `causal=False`: bidirectional attention that masks padding (id 0), the
outputs mean-pooled over the real tokens, and a 2-way classifier on top.

Usage:
  python -m train --config=configs/transformer_classifier.py --workdir=runs/transformer_classifier
  python -m train --config=configs/transformer_classifier.py:tiny
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default' or 'tiny' (seconds on a laptop CPU)."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "transformer"
    config.model.vocab_size = 16384  # must be >= data.vocab_size
    config.model.num_layers = 2
    config.model.num_heads = 4
    config.model.width = 64  # 128 (mlp 512) reached the same accuracy at 4x the time
    config.model.mlp_dim = 256  # 4 x width
    config.model.max_len = 48  # longest sequence the position table covers; >= data.seq_len
    config.model.causal = False  # encoder: every token sees the whole sentence
    config.model.num_classes = 2  # negative / positive
    config.model.pooling = "mean"  # mean | max over the words, of the last layer's outputs
    # SST-2's 67k training phrases are learnt by heart within two epochs (94% train accuracy):
    # heavy dropout and weight decay keep validation accuracy from falling as that happens.
    config.model.dropout_rate = 0.5
    config.model.word_dropout_rate = 0.0  # share of words replaced by <unk> in training
    config.model.unk_id = 1  # the data layer's <unk>
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params
    config.model.implementation = "auto"  # auto | standard | cpu (jaxmodels/tuned.py)
    config.model.scan_layers = False  # True: one scanned layer, compile time flat in depth
    config.model.remat = False  # recompute activations in backward: less memory

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "glue/sst2"
    # None: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "validation"  # the test split has no labels
    # Global: split over all devices and hosts. 128 at twice the learning rate, over the same
    # epochs, ends 1.3 points above 64 at 1e-3 (two seeds each): the larger batch averages out
    # more of the noise of SST-2's short, overlapping phrases.
    config.data.batch_size = 128
    config.data.seq_len = 48  # words per sentence after padding/truncation: all of validation
    config.data.vocab_size = 16384  # most frequent training words, <pad> and <unk> included
    config.data.num_workers = 0  # read-ahead threads (worker processes if streamed); 0: none
    # True: decode the training split whole into memory; False: stream it from the files;
    # "auto": stream MNIST and SST-2 splits over 1 GiB on disk (README: Data).
    config.data.in_memory = config_dict.FieldReference("auto", field_type=object)
    config.data.on_device = True  # split in device memory, batches gathered there (jit only)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98))  # its own arguments
    config.optimizer.learning_rate = 2e-3  # peak value of the schedule
    config.optimizer.weight_decay = 0.1  # on weight matrices and embeddings, not biases or norms
    config.optimizer.schedule = "cosine"  # constant | cosine (both after a linear warmup)
    config.optimizer.warmup_steps = 200
    config.optimizer.end_learning_rate = 0.0  # cosine only: value at the last step
    config.optimizer.grad_clip_norm = 1.0  # clip the global gradient norm; 0 disables

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 1000  # about 1.9 epochs of 67349 phrases at batch 128
    config.train.log_every = 50
    config.train.eval_every = 50  # often: train.keep_best keeps the best evaluation
    config.train.checkpoint_every = 1000
    config.train.checkpoint_keep = 3  # newest checkpoints kept on disk
    config.train.keep_best = "eval/accuracy"  # the best step's params go to WORKDIR/best
    config.train.parallelism = "jit"  # jit (sharded over a device mesh) | pmap
    config.train.mesh = ml_collections.ConfigDict()  # device mesh axes; -1 takes the rest
    config.train.mesh.data = -1  # data parallel: the batch is split over data x fsdp devices
    config.train.mesh.fsdp = 1  # >1 shards params and optimizer state (FSDP)
    config.train.grad_accum_steps = 1  # micro-batches per step; the same update, less memory
    config.train.steps_per_call = 1  # steps run in one compiled call; >1 for sub-ms steps
    config.train.compile_cache_dir = "~/.cache/jaxmodels/xla"  # "" off (command line only)
    config.train.reuse_host_memory = True  # command line, CPU: see train/process.py
    config.train.cpu_devices = 0  # command line, CPU: see train/process.py
    config.train.profile_steps = 0  # >0: a JAX profiler trace of that many steps, WORKDIR/profile
    config.train.profile_first_step = 10  # the first step traced (after the compile of step 1)
    config.train.sample_lines = 0  # language models only: text lines sampled at the end
    config.train.sample_length = 0
    config.train.sample_temperature = 1.0

    config.seed = 0

    if variant == "tiny":
        config.model.num_layers = 1
        config.model.num_heads = 2
        config.model.width = 32
        config.model.mlp_dim = 64
        config.model.vocab_size = 2048
        config.model.max_len = 32
        config.model.dropout_rate = 0.0
        config.data.vocab_size = 2048
        config.data.seq_len = 32
        config.data.batch_size = 32
        config.train.num_steps = 200
        config.train.log_every = 50
        config.train.eval_every = 100
        config.train.checkpoint_every = 100
        config.optimizer.warmup_steps = 10
        config.optimizer.learning_rate = 3e-3
    elif variant != "default":
        raise ValueError(
            f"Unknown variant {variant!r} of configs/transformer_classifier.py. "
            "Known: default, tiny"
        )
    return config
