"""LSTM sentiment classifier on GLUE SST-2 (word tokens).

The default is the best final validation accuracy of four TPE sweeps (studies and tables in
benchmarks/RESULTS.md and benchmarks/sweeps): one bidirectional layer of 256 over 128-wide word
embeddings, max pooling, light weight decay, 2500 steps.

Usage:
  python -m train --config=configs/lstm.py --workdir=runs/lstm
  python -m train --config=configs/lstm.py:tiny --config.model.hidden_size=64
"""

import ml_collections

from train.config import base_config


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default' or 'tiny' (seconds on a laptop CPU)."""
    config = base_config()  # the shared settings, commented there

    config.model.name = "lstm"
    config.model.num_layers = 1  # one layer did as well as two in the sweeps, at a third the time
    config.model.bidirectional = True  # each sentence also read backwards (twice the time)
    config.model.hidden_size = 256
    config.model.num_outputs = 2  # negative / positive
    config.model.vocab_size = 16384  # must be >= data.vocab_size
    config.model.embed_dim = 128  # the fourth sweep's winner (256 before)
    config.model.head_sizes = (256,)  # Dense+relu layers between the last LSTM state and the logits
    config.model.per_step = False  # False: one prediction per sentence, from `pooling`
    # last | max | mean of the last layer's outputs over the words: each feature's maximum lets the
    # classifier read a strong word anywhere in the sentence (84.9% against 83.7% for "last",
    # measured with two one-way layers).
    config.model.pooling = "max"
    config.model.dropout_rate = 0.2947339569045316  # on the LSTM's outputs (the sweep's value)
    config.model.embedding_dropout_rate = 0.25010183010157033  # on the word embeddings
    config.model.word_dropout_rate = 0.0137253953762997  # share of words replaced by <unk>
    config.model.unk_id = 1  # the data layer's <unk>
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params
    config.model.implementation = "auto"  # auto | standard | cpu (jaxmodels/tuned.py)

    config.data.dataset = "glue/sst2"
    config.data.batch_size = 64  # global: split over all devices and hosts
    config.data.seq_len = 64  # tokens per sentence after padding/truncation (99% of SST-2 fits)
    config.data.vocab_size = 16384  # most frequent training words, <pad> and <unk> included

    config.optimizer.name = "adam"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))  # its own arguments
    config.optimizer.learning_rate = 0.002080719595210012  # peak of the schedule (the sweep's)
    config.optimizer.grad_clip_norm = 1.0  # recurrent nets: keeps early steps stable; 0 disables
    config.optimizer.weight_decay = 1e-4  # L2 on weight matrices and embeddings (the sweep's)

    config.train.num_steps = 2500  # about 2.4 epochs of 67349 sentences at batch 64
    config.train.log_every = 50
    config.train.eval_every = 250  # often: train.keep_best keeps the best evaluation
    config.train.checkpoint_every = 1000
    config.train.keep_best = "eval/accuracy"  # the best step's params go to WORKDIR/best

    if variant == "tiny":
        config.model.bidirectional = False
        config.model.hidden_size = 32
        config.model.vocab_size = 2048
        config.model.embed_dim = 32
        config.model.head_sizes = ()
        config.model.dropout_rate = 0.0
        config.model.embedding_dropout_rate = 0.0
        config.model.word_dropout_rate = 0.0
        config.optimizer.weight_decay = 0.0
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
        raise ValueError(f"Unknown variant {variant!r} of configs/lstm.py. Known: default, tiny")
    return config
