"""Dense layers whose parameters carry logical axis names, for a trainer to lay out over devices.

`nn.with_logical_partitioning` boxes a parameter's initial value with one name per axis (e.g.
`("embed", "mlp")`); `model.init` returns the boxes (`nn.Partitioned`), `model.apply` takes plain
arrays or boxes alike, and a trainer maps the names to mesh axes (train/parallel.py's
`LOGICAL_RULES`). The initial values are those of a plain `nn.Dense`.
"""

import flax.linen as nn
import jax


def dense(features: int, axes: tuple[str | None, str | None], dtype, name: str) -> nn.Dense:
    """`nn.Dense(features)` whose kernel (and bias, where its output axis has a name) carry the
    logical axis names `axes` `(input, output)`."""
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
    bias_init = nn.initializers.zeros_init()
    if axes[1] is not None:
        bias_init = nn.with_logical_partitioning(bias_init, axes[1:])
    return nn.Dense(features, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init, name=name)


class DenseParams(nn.Module):
    """Declares the parameters of `dense(features, axes)` on `inputs` inputs and returns them, for
    a layer that computes with them in another layout.

    Attributes:
      inputs: input size.
      features: output size.
      axes: logical axis names `(input, output)`.
    """

    inputs: int
    features: int
    axes: tuple[str | None, str | None]

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        """`(kernel [inputs, features], bias [features])`, float32."""
        kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), self.axes)
        bias_init = nn.initializers.zeros_init()
        if self.axes[1] is not None:
            bias_init = nn.with_logical_partitioning(bias_init, self.axes[1:])
        kernel = self.param("kernel", kernel_init, (self.inputs, self.features))
        return kernel, self.param("bias", bias_init, (self.features,))
