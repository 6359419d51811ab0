"""Multi-layer perceptron classifier."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense + relu layers over the flattened input, then a linear classifier.

    Attributes:
      hidden_sizes: width of each hidden layer, in order.
      num_classes: number of output logits.
      dropout_rate: dropout after each hidden layer (only when `train=True`).
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters stay float32.
    """

    hidden_sizes: Sequence[int]
    num_classes: int
    dropout_rate: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Classifies a batch.

        Args:
          x: float inputs, `[batch, ...]`; every axis but the first is flattened.
          train: enables dropout (rng stream `"dropout"`).

        Returns:
          float32 logits, `[batch, num_classes]`.
        """
        dtype = jnp.dtype(self.dtype)
        x = x.reshape(x.shape[0], -1)  # [batch, features]
        for i, size in enumerate(self.hidden_sizes):
            x = nn.relu(nn.Dense(size, dtype=dtype, name=f"hidden_{i}")(x))  # [batch, size]
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=dtype, name="logits")(x)
        return logits.astype(jnp.float32)  # [batch, num_classes]
