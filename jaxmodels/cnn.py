"""Small convolutional classifier (LeNet-like) for images such as MNIST."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels import tuned


class Conv(nn.Module):
    """`nn.Conv(features, kernel_size, padding="SAME")`: the same parameters (`kernel`
    `[kh, kw, in, features]`, lecun-normal; `bias` `[features]`, zeros) and function, computed by
    XLA's convolution or, with `implementation` "cpu", as `jaxmodels.tuned.patch_conv`.

    Attributes:
      features: output channels.
      kernel_size: `(kh, kw)`, odd.
      dtype: computation dtype; parameters stay float32.
      implementation: "standard", "cpu" or "auto" (see `jaxmodels.tuned`).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    dtype: str = "float32"
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Convolves `x` `[batch, height, width, in]` into `[batch, height, width, features]`."""
        dtype = jnp.dtype(self.dtype)
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape).astype(dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,)).astype(dtype)
        x = x.astype(dtype)
        if tuned.use_tuned(self.implementation):
            return tuned.patch_conv(x, kernel, bias)
        dimensions = ("NHWC", "HWIO", "NHWC")
        return (
            jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dimensions)
            + bias
        )


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
      implementation: "standard" (XLA's convolution, `nn.max_pool`), "cpu" (`jaxmodels.tuned`'s
        patch convolution and reshape pooling: the same parameters and function) or "auto" (cpu on
        a CPU backend).
    """

    conv_features: Sequence[int] = (32, 64)
    dense_features: int = 128
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: str = "float32"
    implementation: str = "auto"

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
        fast = tuned.use_tuned(self.implementation)
        for i, features in enumerate(self.conv_features):
            x = Conv(features, (3, 3), self.dtype, self.implementation, name=f"conv_{i}")(x)
            if fast:
                x = tuned.max_pool_2x2(nn.relu(x))
            else:
                x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))  # [batch, h / 2, w / 2, f]
        x = x.reshape(x.shape[0], -1)  # [batch, h * w * features]
        x = nn.Dense(self.dense_features, dtype=dtype, name="dense")(x)
        x = nn.relu(x)  # [batch, dense_features]
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(self.num_classes, dtype=dtype, name="logits")(x)
        return logits.astype(jnp.float32)  # [batch, num_classes]
