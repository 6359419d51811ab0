"""Small convolutional classifier (LeNet-like) for images such as MNIST."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2, written as a reshape and a max.

    Gives exactly the result of `nn.max_pool(x, (2, 2), strides=(2, 2))` for even height and width,
    but XLA on CPU compiles this form to a much faster kernel than the generic reduce_window.

    Args:
      x: `[batch, height, width, channels]` with even height and width.

    Returns:
      `[batch, height // 2, width // 2, channels]`.
    """
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"max_pool_2x2 needs even height and width, got input shape {x.shape}")
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    return x.max(axis=(2, 4))  # [batch, height / 2, width / 2, channels]


class PatchConv(nn.Module):
    """A stride-1 "SAME" convolution computed as one matmul over image patches (im2col).

    Declares the same parameters as `nn.Conv(features, kernel_size, padding="SAME")` (`kernel`
    `[kh, kw, in, out]` with lecun-normal init, `bias` `[out]` zeros) and gives the same result to
    float32 round-off. The kh * kw shifted copies of the padded input are stacked along the channel
    axis, `[batch, h, w, kh * kw * in]`, and multiplied by the kernel reshaped to
    `[kh * kw * in, out]`: one large matmul forward and two backward, which XLA:CPU runs much
    faster than its convolution kernels (the benchmark CNN's train step: 117 ms -> 88 ms). The
    patches take kh * kw times the input's memory, which is small for MNIST-sized maps.

    Attributes:
      features: output channels.
      kernel_size: odd `(kh, kw)`.
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters stay float32.
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves `x` `[batch, height, width, in]` into `[batch, height, width, features]`."""
        kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"PatchConv needs an odd kernel_size for SAME padding, got {(kh, kw)}")
        batch, height, width, in_features = x.shape
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (kh, kw, in_features, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = jnp.dtype(self.dtype)
        padded = jnp.pad(x.astype(dtype), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        # Channel order (i, j, c) matches the kernel's [kh, kw, in] order once reshaped.
        patches = jnp.concatenate(
            [padded[:, i : i + height, j : j + width] for i in range(kh) for j in range(kw)],
            axis=-1,
        )  # [batch, height, width, kh * kw * in]
        y = patches @ kernel.reshape(kh * kw * in_features, self.features).astype(dtype)
        return y + bias.astype(dtype)  # [batch, height, width, features]


class CNN(nn.Module):
    """Conv + relu + 2x2 max pool stages, then a dense hidden layer and a linear classifier.

    With the defaults on 28x28x1 MNIST the feature maps go 28 -> 14 -> 7 and the model has
    421,642 parameters.

    Attributes:
      conv_features: output channels of each 3x3 "SAME" conv stage; each stage halves height
        and width, so the input's spatial size must stay even through every stage.
      dense_features: width of the hidden dense layer.
      num_classes: number of output logits.
      dropout_rate: dropout before the last layer (only when `train=True`).
      dtype: computation dtype, 'float32' or 'bfloat16'; parameters stay float32.
    """

    conv_features: Sequence[int] = (32, 64)
    dense_features: int = 128
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Classifies a batch of images.

        Args:
          x: float images, `[batch, height, width, channels]`.
          train: enables dropout (rng stream `"dropout"`).

        Returns:
          float32 logits, `[batch, num_classes]`.
        """
        dtype = jnp.dtype(self.dtype)
        for i, features in enumerate(self.conv_features):
            conv = PatchConv(features, (3, 3), dtype=self.dtype, name=f"conv_{i}")
            x = max_pool_2x2(nn.relu(conv(x)))  # [batch, h / 2, w / 2, features]
        x = x.reshape(x.shape[0], -1)  # [batch, h * w * features]
        x = nn.Dense(self.dense_features, dtype=dtype, name="dense")(x)
        x = nn.relu(x)  # [batch, dense_features]
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=dtype, name="logits")(x)
        return logits.astype(jnp.float32)  # [batch, num_classes]
