"""Pre-LayerNorm decoder Transformer: a character language model of tiny_shakespeare.

Usage:
  python -m train --config=configs/transformer.py --workdir=runs/transformer
  python -m train --config=configs/transformer.py:tiny --config.train.num_steps=500
  python -m train --config=configs/transformer.py:small   # a common small CPU setting

The default is sized for a laptop CPU (about 3.2M parameters, 4096 tokens a step); on a GPU or
TPU raise `model.width`, `model.num_layers`, `data.seq_len` and `data.batch_size`.
"""

import ml_collections

from train.config import base_config


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default', 'tiny' (seconds on a laptop CPU) or 'small'."""
    config = base_config()  # the shared settings, commented there

    config.model.name = "transformer"
    config.model.vocab_size = 65  # characters of the training text; >= the data's vocabulary
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.width = 256
    config.model.mlp_dim = 1024  # 4 x width, as in GPT-2
    config.model.max_len = 128  # longest sequence the position table covers; >= data.seq_len
    config.model.causal = True  # decoder LM; False with num_classes > 0 is an encoder classifier
    config.model.num_classes = 0  # 0: language-model head over the vocabulary
    # No dropout: 1500 steps are 6 passes over the text, too few to overfit this model (with 2000
    # steps, validation loss rose from 1.467 at step 1500 to 1.488).
    config.model.dropout_rate = 0.0
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params
    config.model.implementation = "auto"  # auto | standard | cpu (jaxmodels/tuned.py)
    config.model.scan_layers = False  # True: one scanned layer, compile time flat in depth
    config.model.remat = False  # recompute activations in backward: less memory

    config.data.dataset = "tiny_shakespeare"
    config.data.batch_size = 32  # global: split over all devices and hosts
    config.data.seq_len = 128  # characters per training window

    config.optimizer.name = "adamw"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    # optax.adamw\'s own arguments; b2 0.99: on a small data set a shorter second-moment memory
    # helps.
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.99))
    config.optimizer.learning_rate = 2e-3  # peak value of the schedule (1e-3 learnt more slowly)
    config.optimizer.weight_decay = 0.1  # on weight matrices and embeddings, not biases or norms
    config.optimizer.end_learning_rate = 1e-4  # cosine only: value at the last step
    config.optimizer.grad_clip_norm = 1.0  # clip the global gradient norm; 0 disables

    config.train.num_steps = 1500  # about 6 epochs of the 1M training characters
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.cpu_devices = 2  # command line, CPU: see train/process.py
    config.train.sample_lines = 4  # text samples written to the log and workdir at the end
    config.train.sample_length = 200  # characters per sample
    config.train.sample_temperature = 0.8

    if variant == "tiny":
        config.model.num_layers = 2
        config.model.num_heads = 2
        config.model.width = 64
        config.model.mlp_dim = 256
        config.model.max_len = 64
        config.model.dropout_rate = 0.0
        config.data.seq_len = 64
        config.data.batch_size = 16
        config.data.eval_split = "validation"
        config.train.num_steps = 200
        config.train.log_every = 50
        config.train.eval_every = 100
        config.train.checkpoint_every = 100
        config.train.sample_lines = 2
        config.train.sample_length = 80
        config.train.cpu_devices = 0  # too small a step to gain from the split
        config.optimizer.warmup_steps = 10
        config.optimizer.learning_rate = 3e-3
    elif variant == "small":
        # A common small CPU recipe for this data (2000 steps of 12 x 64 characters, no dropout),
        # for comparing step times with other implementations of the same setting.
        config.model.num_layers = 4
        config.model.num_heads = 4
        config.model.width = 128
        config.model.mlp_dim = 512
        config.model.max_len = 64
        config.model.dropout_rate = 0.0
        config.data.seq_len = 64
        config.data.batch_size = 12
        config.optimizer.learning_rate = 1e-3
        config.train.num_steps = 2000
        config.train.log_every = 100
        config.train.eval_every = 500
        config.train.checkpoint_every = 1000
        config.train.sample_lines = 2
        config.train.cpu_devices = 0  # one device: a step this small gains nothing from the split
    elif variant in ("124m", "1b", "7b"):
        # For TPU slices: check one on this machine first, then run it with the same flags, e.g.
        #   python -m train.compile --config=configs/transformer.py:1b --topology=v5p-64
        # The shapes of well-known open models (GPT-2 small, Pythia-1B, Pythia-6.9B) over UTF-8
        # bytes: a vocabulary of 256 (>= tiny_shakespeare's 65 characters) keeps the embeddings
        # small, so the parameters number 85M, 0.81B and 6.4B.
        num_layers, width, num_heads, context, learning_rate = {
            "124m": (12, 768, 12, 1024, 6e-4),
            "1b": (16, 2048, 8, 2048, 3e-4),
            "7b": (32, 4096, 32, 2048, 1.2e-4),
        }[variant]
        config.model.vocab_size = 256
        config.model.num_layers = num_layers
        config.model.width = width
        config.model.num_heads = num_heads
        config.model.mlp_dim = 4 * width
        config.model.max_len = context
        config.model.dtype = "bfloat16"  # matmuls in bf16, parameters and Adam moments float32
        config.model.remat = True  # keep only each layer's input for the backward pass
        config.model.scan_layers = True  # compile one layer, whatever the depth
        config.data.seq_len = context
        config.data.batch_size = 256  # sequences: 0.26M (124m) or 0.52M tokens a step
        config.optimizer.learning_rate = learning_rate
        config.train.mesh.data = 1  # FSDP over every device; Multislice: data = the slices
        config.train.mesh.fsdp = -1
    elif variant != "default":
        raise ValueError(
            f"Unknown variant {variant!r} of configs/transformer.py. Known: default, tiny, small, "
            "124m, 1b, 7b"
        )
    return config
