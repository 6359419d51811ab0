"""Pre-LayerNorm Transformer: a causal language model or a bidirectional encoder classifier.

Mixed precision: parameters are always float32; `dtype` is the computation dtype of the matmuls,
LayerNorms and activations (the attention softmax runs in float32), and the logits are cast back
to float32. `implementation` picks the attention kernel: `jax.nn.dot_product_attention` or its
XLA:CPU form in `jaxmodels.tuned` (the same parameters, the same function).

Decoding (`decode=True`) keeps the keys and values of earlier positions in Flax's `"cache"`
collection, so that each new token costs one position instead of a re-run of the whole sequence:

    cache = model.apply({"params": params}, jnp.zeros((batch, length), jnp.int32), train=False,
                        decode=True, mutable=["cache"])[1]["cache"]  # the first call creates it
    logits, variables = model.apply({"params": params, "cache": cache}, tokens, train=False,
                                    decode=True, mutable=["cache"])  # tokens: the next positions

The creating call fixes the cache's batch size and `length` (its output is that of an ordinary
causal pass); `train.decode.init_cache` makes it with `jax.eval_shape`, at no cost. Later calls take
one or more new positions each (a prompt in one call, then one token at a time) and must not run
past `length`.
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxmodels import tuned
from jaxmodels.dense import DenseParams, dense
from jaxmodels.tokens import pool, word_dropout


def cache_position(module: nn.Module, length: int) -> jax.Array | int:
    """Where `length` new positions start in decoding: `module`'s `"position"` counter in the
    `"cache"` collection, which this advances by `length`. 0 in the call that creates the cache.

    Call it from a module's compact method, with `decode=True`.
    """
    is_initialized = module.has_variable("cache", "position")
    position = module.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
    if not is_initialized:
        return 0
    start = position.value
    position.value = start + length
    return start


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The standard attention kernel: `[batch, seq_len, heads, head_dim]` q, k, v; mask None
    (causal) or bool, True where a query may attend to a key."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None)


def attention_kernel(implementation: str) -> Callable:
    """The kernel `implementation` picks, `kernel(q, k, v, mask)` on projected heads
    `[batch, len, heads, head_dim]`: `jax.nn.dot_product_attention` ("standard") or
    `jaxmodels.tuned.attention` ("cpu"), the same function; "auto" is "cpu" on a CPU backend."""
    return tuned.attention if tuned.use_tuned(implementation) else _attention


class SelfAttention(nn.Module):
    """Multi-head self-attention: one q/k/v projection, an attention kernel, one output projection;
    with `decode=True`, over the keys and values cached from earlier calls too.

    The layer owns the parameters and the projections (where position encodings of q and k such
    as rotary embeddings would go); `implementation` only picks the kernel that attends the
    projected heads: `jax.nn.dot_product_attention` ("standard") or `jaxmodels.tuned.attention`
    ("cpu"), the same function.

    Attributes:
      num_heads: number of heads; must divide `width`.
      width: model width (input and output size).
      dtype: computation dtype; parameters stay float32.
      implementation: "standard", "cpu" or "auto" (see `jaxmodels.tuned`).
    """

    num_heads: int
    width: int
    dtype: str = "float32"
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, *, decode: bool = False) -> jax.Array:
        """Attends every position to the positions `mask` allows.

        Args:
          x: `[batch, seq_len, width]`.
          mask: None for causal attention (each position sees itself and earlier ones), else
            bool, True where a query may attend to a key, broadcastable to
            `[batch, num_heads, seq_len, seq_len]` (query axis before key axis).
          decode: causal attention over the cache as well: `x` holds the `seq_len` positions
            after those cached (see the module docstring). `mask` must be None.

        Returns:
          `[batch, seq_len, width]`.
        """
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        batch, seq_len, _ = x.shape
        head_dim = self.width // self.num_heads
        dtype = jnp.dtype(self.dtype)
        # The parameters of `nn.Dense(3 * width)`, named `qkv`. Logical names: `heads` is the axis
        # tensor parallelism splits (Megatron: each device computes whole heads), `embed` the
        # model width; the constraints do nothing outside a trainer's mesh. The columns are
        # q | k | v, each heads x head_dim, so a split of all 3 * width columns into equal
        # runs is no split by heads: the kernel is viewed as [in, 3, heads, head_dim] and laid
        # out by heads before the matmul, which moves the weight once a step rather than every
        # token's q, k and v.
        kernel, bias = DenseParams(x.shape[-1], 3 * self.width, ("embed", "heads"), name="qkv")()
        kernel = nn.with_logical_constraint(
            kernel.reshape(-1, 3, self.num_heads, head_dim), ("embed", None, "heads", "head_dim")
        )
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
        # [batch, seq_len, in] x [in, 3, heads, head_dim] -> [batch, seq_len, 3, heads, head_dim]
        qkv = jax.lax.dot_general(x, kernel, (((2,), (0,)), ((), ())))
        qkv = qkv + bias.reshape(3, self.num_heads, head_dim)
        q, k, v = (  # each [batch, seq_len, heads, head_dim]
            nn.with_logical_constraint(qkv[:, :, i], ("batch", "length", "heads", "head_dim"))
            for i in range(3)
        )
        if decode:
            if mask is not None:
                raise ValueError("decode=True is causal attention; it takes no mask")
            k, v, mask = self._with_cache(k, v)
        # Scores are scaled by head_dim ** -0.5 and the softmax runs in float32.
        attention = attention_kernel(self.implementation)
        out = attention(q, k, v, mask).reshape(batch, seq_len, self.width)  # heads concatenated
        return dense(self.width, ("heads", None), dtype, "out")(out)  # [batch, seq_len, width]

    def _with_cache(self, k: jax.Array, v: jax.Array):
        """Writes the new positions' keys and values `[batch, seq_len, heads, head_dim]` into the
        cache and returns the whole cache, `[batch, cache_len, heads, head_dim]` each, with the
        mask `[1, 1, seq_len, cache_len]` that lets each new position see itself and what came
        before it. The call that creates the cache returns `k`, `v` and None (causal) unchanged.
        """
        is_initialized = self.has_variable("cache", "key")
        cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
        start = cache_position(self, k.shape[1])
        if not is_initialized:
            return k, v, None
        cached_k.value = jax.lax.dynamic_update_slice_in_dim(cached_k.value, k, start, axis=1)
        cached_v.value = jax.lax.dynamic_update_slice_in_dim(cached_v.value, v, start, axis=1)
        query_positions = start + jnp.arange(k.shape[1])  # [seq_len]
        key_positions = jnp.arange(cached_k.value.shape[1])  # [cache_len]
        # Keys after a query are masked: later new positions, and the cache's unwritten zeros.
        mask = key_positions[None, :] <= query_positions[:, None]  # [seq_len, cache_len]
        return cached_k.value, cached_v.value, mask[None, None]


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: `x + Attn(LN(x))`, then `x + MLP(LN(x))`.

    Attributes:
      num_heads: attention heads.
      width: model width.
      mlp_dim: hidden size of the MLP.
      dropout_rate: dropout on both residual branches (only when `train=True`).
      dtype: computation dtype; parameters stay float32.
      implementation: "standard", "cpu" or "auto" (see `jaxmodels.tuned`).
    """

    num_heads: int
    width: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: str = "float32"
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array | None, *, train: bool, decode: bool = False
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: `[batch, seq_len, width]`.
          mask: None for causal attention, else a bool attention mask broadcastable to
            `[batch, num_heads, seq_len, seq_len]`.
          train: enables dropout (rng stream `"dropout"`).
          decode: causal attention over cached keys and values (`SelfAttention`).

        Returns:
          `[batch, seq_len, width]` in `dtype`.
        """
        dtype = jnp.dtype(self.dtype)
        # Casting the residual stream keeps its dtype fixed, which a scan over blocks requires.
        x = x.astype(dtype)
        y = nn.LayerNorm(dtype=dtype, name="attn_norm")(x)
        attention = SelfAttention(
            self.num_heads, self.width, self.dtype, self.implementation, name="attn"
        )
        y = attention(y, mask, decode=decode)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(dtype=dtype, name="mlp_norm")(x)
        y = dense(self.mlp_dim, ("embed", "mlp"), dtype, "mlp_in")(y)  # [b, seq_len, mlp_dim]
        y = nn.with_logical_constraint(y, ("batch", "length", "mlp"))
        y = dense(self.width, ("mlp", None), dtype, "mlp_out")(nn.gelu(y))  # [b, seq_len, width]
        return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class Transformer(nn.Module):
    """Token Transformer in one of two modes.

    - Decoder LM (`causal=True`, `num_classes=0`): causal attention, final LayerNorm, and an LM
      head, giving next-token logits `[batch, seq_len, vocab_size]`.
    - Encoder classifier (`causal=False`, `num_classes > 0`): token id 0 is padding and is
      masked out of attention and of the pool over positions; returns `[batch, num_classes]`.

    The blocks are `block_0`, `block_1`, ... or, with `scan_layers=True`, one `nn.scan` over a
    single block whose parameters are stacked along a leading `num_layers` axis under
    `params["blocks"]` (e.g. `blocks/attn/qkv/kernel` is `[num_layers, width, 3 * width]`): XLA
    then compiles one block whatever the depth, at some run-time cost on CPU. Both layouts compute
    the same function, but the scan draws each layer's init and dropout rngs differently, so
    checkpoints of one layout do not load into the other.

    Attributes:
      vocab_size: number of token ids.
      num_layers: number of `TransformerBlock`s.
      num_heads: attention heads per block; must divide `width`.
      width: model (embedding) width.
      mlp_dim: hidden size of each block's MLP.
      max_len: longest supported sequence (size of the learned position embedding).
      causal: decoder (True) or encoder (False).
      num_classes: classifier outputs for the encoder; 0 for the decoder.
      pooling: encoder classifier: "mean" or "max" of the final outputs over non-padding positions.
      dropout_rate: dropout on residual branches (only when `train=True`).
      word_dropout_rate: encoder classifier, training only: each non-padding token is replaced
        by `unk_id` with this probability (`jaxmodels.tokens.word_dropout`).
      unk_id: the id of the unknown-word token (the data layer's `<unk>`).
      dtype: computation dtype; parameters stay float32 and the logits are returned as float32.
      scan_layers: run the blocks as one `nn.scan` with stacked parameters (see above).
      remat: recompute each block's activations in the backward pass instead of storing them
        (`nn.remat`), trading about one extra forward pass for activation memory.
      implementation: "standard" (`jax.nn.dot_product_attention`), "cpu" (`jaxmodels.tuned`'s
        attention kernel) or "auto" (cpu on a CPU backend): the same parameters and function.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    width: int
    mlp_dim: int
    max_len: int
    causal: bool = True
    num_classes: int = 0
    pooling: str = "mean"
    dropout_rate: float = 0.0
    word_dropout_rate: float = 0.0
    unk_id: int = 1
    dtype: str = "float32"
    scan_layers: bool = False
    remat: bool = False
    implementation: str = "auto"

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool, decode: bool = False) -> jax.Array:
        """Runs the model.

        Args:
          tokens: int token ids, `[batch, seq_len]` with `seq_len <= max_len`.
          train: enables dropout (rng stream `"dropout"`).
          decode: decoder only: `tokens` are the positions after those in the `"cache"`
            collection, which this call extends (see the module docstring).

        Returns:
          float32 logits: `[batch, seq_len, vocab_size]` for the decoder,
          `[batch, num_classes]` for the encoder classifier.
        """
        if decode and not self.causal:
            raise ValueError("decode=True needs the causal Transformer (a decoder LM)")
        if self.causal and self.num_classes:
            raise ValueError(f"causal Transformer is an LM; got num_classes={self.num_classes}")
        if not self.causal and not self.num_classes:
            raise ValueError("non-causal Transformer is a classifier; it needs num_classes > 0")
        seq_len = tokens.shape[1]
        if seq_len > self.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_len={self.max_len}")
        if self.causal and self.word_dropout_rate:
            raise ValueError("word_dropout_rate is for the encoder classifier (causal=False)")
        if self.pooling not in ("mean", "max"):
            raise ValueError(f"Unknown Transformer pooling {self.pooling!r}; use mean or max.")
        dtype = jnp.dtype(self.dtype)

        not_pad = tokens != 0  # [batch, seq_len]; padding as the data had it
        if train and self.word_dropout_rate > 0:
            rng = self.make_rng("dropout")
            tokens = word_dropout(rng, tokens, self.word_dropout_rate, self.unk_id)
        embed_init = nn.initializers.normal(stddev=0.02)  # GPT-2 style small embeddings
        x = nn.Embed(
            self.vocab_size, self.width, dtype=dtype, embedding_init=embed_init, name="token_embed"
        )(tokens)  # [batch, seq_len, width]
        positions = self.param("pos_embed", embed_init, (self.max_len, self.width))
        if decode:  # `tokens` follow the positions already cached
            start = cache_position(self, seq_len)
            positions = jax.lax.dynamic_slice_in_dim(positions, start, seq_len)
        x = x + positions[None, :seq_len].astype(dtype)  # [batch, seq_len, width]

        if self.causal:
            mask = None  # attention applies its own causal mask
        else:
            mask = not_pad[:, None, None, :]  # [batch, 1, 1, k]: no query attends to padding

        x = self._blocks(x, mask, train, decode)  # [batch, seq_len, width]
        x = nn.LayerNorm(dtype=dtype, name="final_norm")(x)  # [batch, seq_len, width]

        if self.causal:
            logits = nn.Dense(self.vocab_size, dtype=dtype, name="lm_head")(x)
            return logits.astype(jnp.float32)  # [batch, seq_len, vocab_size]
        pooled = pool(x, not_pad[..., None], self.pooling)  # [batch, width]
        logits = nn.Dense(self.num_classes, dtype=dtype, name="classifier")(pooled)
        return logits.astype(jnp.float32)  # [batch, num_classes]

    def _blocks(self, x: jax.Array, mask: jax.Array | None, train: bool, decode: bool) -> jax.Array:
        """Applies the `num_layers` blocks, unrolled or scanned, optionally rematerialised."""

        # nn.scan's body has the form (module, carry, *xs) -> (carry, ys): the residual stream is
        # the carry and the mask is broadcast to every layer. The unrolled loop uses it too.
        def apply_block(block: TransformerBlock, x: jax.Array, mask: jax.Array | None):
            return block(x, mask, train=train, decode=decode), None

        if self.remat:
            # Only each block's input is kept for the backward pass. `prevent_cse` stops XLA
            # merging the recomputation with the forward pass again, which a scan's loop boundary
            # already prevents, so inside the scan it is off (as the JAX docs advise).
            apply_block = nn.remat(apply_block, prevent_cse=not self.scan_layers)

        def make_block(name: str) -> TransformerBlock:
            return TransformerBlock(
                self.num_heads,
                self.width,
                self.mlp_dim,
                self.dropout_rate,
                self.dtype,
                self.implementation,
                name=name,
            )

        if self.scan_layers:
            scan_blocks = nn.scan(
                apply_block,
                # Every parameter (and, decoding, every cache entry) gains a leading
                # [num_layers] axis.
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},  # independent init and dropout
                metadata_params={nn.PARTITION_NAME: "layers"},  # the new axis's logical name
                in_axes=(nn.broadcast,),  # the same mask for every layer
                length=self.num_layers,
            )
            x, _ = scan_blocks(make_block("blocks"), x, mask)
            return x
        for i in range(self.num_layers):
            x, _ = apply_block(make_block(f"block_{i}"), x, mask)
        return x
