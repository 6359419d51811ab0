"""Flax linen models and the one table that maps a config's `model.name` to a model class.

The models are plain Flax; `jaxmodels.tuned` holds faster forms of some layers for XLA:CPU, which
the CNN, LSTM, Transformer and encoder-decoder use when their `implementation` field asks for
them.

Usage:
  model = build_model("cnn", num_classes=10)
  variables = model.init(rng, images, train=False)
"""

import dataclasses

import flax.linen as nn

from jaxmodels.cnn import CNN
from jaxmodels.lstm import LSTM, LSTMCell, LSTMLayer
from jaxmodels.mlp import MLP
from jaxmodels.seq2seq import Seq2Seq
from jaxmodels.transformer import SelfAttention, Transformer, TransformerBlock

MODELS = {"mlp": MLP, "cnn": CNN, "lstm": LSTM, "transformer": Transformer, "seq2seq": Seq2Seq}


def build_model(name: str, **fields) -> nn.Module:
    """Builds the model registered as `name` from its constructor fields.

    Args:
      name: a key of `MODELS`.
      **fields: the model's dataclass fields, e.g. `num_layers=2`.

    Returns:
      An unbound Flax module.

    Raises:
      KeyError: for an unknown name.
      TypeError: for fields the model does not have (the message lists the valid ones).
    """
    if name not in MODELS:
        raise KeyError(f"Unknown model {name!r}. Known: {sorted(MODELS)}")
    cls = MODELS[name]
    # `parent` and `name` are fields every Flax module gets; they are not model settings.
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.name not in {"parent", "name"})
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise TypeError(f"Model {name!r} has no fields {unknown}. Valid fields: {valid}")
    return cls(**fields)


__all__ = [
    "CNN",
    "LSTM",
    "MLP",
    "MODELS",
    "LSTMCell",
    "LSTMLayer",
    "SelfAttention",
    "Seq2Seq",
    "Transformer",
    "TransformerBlock",
    "build_model",
]
