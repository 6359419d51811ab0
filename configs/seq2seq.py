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

from train.config import base_config


def get_config(variant: str = "default") -> ml_collections.ConfigDict:
    """Returns the config; `variant` is 'default', 'tiny' (seconds on a laptop CPU) or 'ted'
    (Portuguese to English, UTF-8 bytes; needs ted_hrlr_translate/pt_to_en prepared)."""
    config = base_config()  # the shared settings, commented there

    config.model.name = "seq2seq"
    config.model.vocab_size = 14  # <pad>, <bos>, <eos>, 0-9 and +; >= the data's vocabulary
    config.model.num_layers = 2  # encoder blocks, and as many decoder blocks
    config.model.num_heads = 4
    config.model.width = 64
    config.model.mlp_dim = 256
    config.model.max_len = 8  # longest source and target; >= data.seq_len
    config.model.dropout_rate = 0.0  # 100,000 problems, seen twice or three times: no overfitting
    config.model.dtype = "float32"  # computation dtype; "bfloat16" keeps float32 params
    config.model.implementation = "auto"  # auto | standard | cpu (jaxmodels/tuned.py)

    config.data.dataset = "addition"  # generated: 100,000 training problems, held-out ones apart
    config.data.batch_size = 128  # global: split over all devices and hosts
    config.data.seq_len = 8  # tokens per source and per target: "999+999" is 7, "1998" + EOS 5

    config.optimizer.name = "adamw"  # any optax optimizer: sgd, adam, adamw, lion, adafactor, ...
    config.optimizer.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98))  # its own arguments
    config.optimizer.learning_rate = 2e-3  # peak value of the schedule
    config.optimizer.weight_decay = 0.01  # on weight matrices and embeddings, not biases or norms
    config.optimizer.warmup_steps = 200
    config.optimizer.end_learning_rate = 1e-5  # cosine only: value at the last step
    config.optimizer.grad_clip_norm = 1.0  # clip the global gradient norm; 0 disables

    config.train.num_steps = 2000  # about 2.6 epochs of the 100,000 training problems
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.sample_lines = 8  # held-out sources translated into the log and samples.txt
    config.train.sample_temperature = 0.0  # 0: greedy, as the evaluation decodes

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
