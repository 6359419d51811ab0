"""Encoder-decoder Transformer on a translation-style task: addition, "123+45" -> "168".

The problems are generated (train/translation.py), so this runs offline with nothing prepared;
evaluation decodes the held-out validation problems greedily and reports the share of whole
answers right (`eval/sequence_accuracy`) and of answer tokens (`eval/greedy_token_accuracy`).

Usage:
  python -m train --config=configs/seq2seq.py --workdir=runs/seq2seq
  python -m train --config=configs/seq2seq.py:tiny
  python -m train.sample --workdir=runs/seq2seq --prompt="123+45"
  python -m train --config=configs/seq2seq.py:ted  # TFDS ted_hrlr_translate/pt_to_en, prepared
"""

import ml_collections
from ml_collections import config_dict


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default', 'tiny' (seconds on a laptop CPU) or 'ted'
    (Portuguese to English, UTF-8 bytes; needs ted_hrlr_translate/pt_to_en prepared)."""
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "seq2seq"
    config.model.vocab_size = 14  # <pad>, <bos>, <eos>, 0-9 and +; >= the data's vocabulary
    config.model.num_layers = 2  # encoder blocks, and as many decoder blocks
    config.model.num_heads = 4
    config.model.width = 64
    config.model.mlp_dim = 256
    config.model.max_len = 8  # longest source and target; >= data.seq_len
    config.model.dropout_rate = 0.0  # 100,000 problems, seen twice or three times: no overfitting
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "addition"  # generated: 100,000 training problems, held-out ones apart
    # TFDS data sets only; None: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "validation"  # 1,000 problems never trained on
    config.data.batch_size = 128  # global: split over all devices and hosts
    config.data.seq_len = 8  # tokens per source and per target: "999+999" is 7, "1998" + EOS 5
    config.data.vocab_size = 0  # unused: the vocabulary comes with the data set
    config.data.num_workers = 0  # read-ahead threads (worker processes if streamed); 0: none
    # True: decode the training split whole into memory; False: stream it from the files;
    # "auto": stream MNIST and SST-2 splits over 1 GiB on disk (README: Data).
    config.data.in_memory = config_dict.FieldReference("auto", field_type=object)
    config.data.on_device = True  # split in device memory, batches gathered there (jit only)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adamw"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98))  # its own arguments
    config.optimizer.learning_rate = 2e-3  # peak value of the schedule
    config.optimizer.weight_decay = 0.01  # on weight matrices and embeddings, not biases or norms
    config.optimizer.schedule = "cosine"  # constant | cosine (both after a linear warmup)
    config.optimizer.warmup_steps = 200
    config.optimizer.end_learning_rate = 1e-5  # cosine only: value at the last step
    config.optimizer.grad_clip_norm = 1.0  # clip the global gradient norm; 0 disables

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 2000  # about 2.6 epochs of the 100,000 training problems
    config.train.log_every = 100
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.checkpoint_keep = 3  # newest checkpoints kept on disk
    config.train.keep_best = ""  # an eval metric, e.g. eval/accuracy: keep its best params
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
    config.train.sample_lines = 8  # held-out sources translated into the log and samples.txt
    config.train.sample_length = 0  # unused: translations run to EOS or data.seq_len tokens
    config.train.sample_temperature = 0.0  # 0: greedy, as the evaluation decodes

    config.seed = 0

    if variant == "tiny":
        config.model.num_layers = 1
        config.model.num_heads = 2
        config.model.width = 32
        config.model.mlp_dim = 64
        config.data.batch_size = 32
        config.data.eval_split = "validation[:256]"
        config.train.num_steps = 200
        config.train.log_every = 50
        config.train.eval_every = 100
        config.train.checkpoint_every = 100
        config.train.sample_lines = 4
        config.optimizer.warmup_steps = 10
        config.optimizer.learning_rate = 3e-3
    elif variant == "ted":
        # Portuguese to English TED talk transcripts as UTF-8 bytes (no tokenizer to build).
        config.model.vocab_size = 259  # <pad>, <bos>, <eos> and 256 bytes
        config.model.num_layers = 4
        config.model.num_heads = 8
        config.model.width = 256
        config.model.mlp_dim = 1024
        config.model.max_len = 160
        config.model.dropout_rate = 0.1
        config.data.dataset = "ted_hrlr_translate/pt_to_en"
        config.data.batch_size = 64
        config.data.seq_len = 160  # bytes; longer training pairs are left out
        config.optimizer.learning_rate = 1e-3
        config.optimizer.warmup_steps = 1000
        config.train.num_steps = 30000
        config.train.eval_every = 2000
        config.train.checkpoint_every = 2000
        config.train.sample_lines = 4
    elif variant != "default":
        raise ValueError(
            f"Unknown variant {variant!r} of configs/seq2seq.py. Known: default, tiny, ted"
        )
    return config
