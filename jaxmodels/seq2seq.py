"""Pre-LayerNorm encoder-decoder Transformer for sequence to sequence tasks (translation-style).

The encoder is a stack of `TransformerBlock`s over the source tokens (bidirectional; token id 0 is
padding and is masked out of attention). Each decoder block is pre-LayerNorm like them, with
cross-attention between its causal self-attention and its MLP:

    x = x + SelfAttention(LN(x))              causal; cached when decoding
    x = x + CrossAttention(LN(x), encoded)    every target position sees every real source token
    x = x + MLP(LN(x))

Source and target share one vocabulary and one token embedding; each side has its own learned
position embedding. Mixed precision as in `jaxmodels.transformer`: float32 parameters, `dtype`
for the computation, float32 logits.

Training calls the model on whole sequences (teacher forcing):

    logits = model.apply({"params": params}, inputs, decoder_inputs, train=True, rngs=...)

Decoding encodes once and then feeds the decoder one token at a time, its keys and values kept in
the `"cache"` collection (`train.decode.translate` does this):

    encoded = model.apply(variables, inputs, train=False, method="encode")
    logits, variables = model.apply({"params": params, "cache": cache}, encoded, inputs, token,
                                    train=False, decode=True, mutable=["cache"], method="decode")
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.transformer import (
    SelfAttention,
    TransformerBlock,
    attention_kernel,
    cache_position,
)


class CrossAttention(nn.Module):
    """Multi-head attention of the decoder's positions over the encoder's outputs.

    Attributes:
      num_heads: number of heads; must divide `width`.
      width: model width (input and output size).
      dtype: computation dtype; parameters stay float32.
      implementation: the attention kernel, "standard", "cpu" or "auto" (`attention_kernel`).
    """

    num_heads: int
    width: int
    dtype: str = "float32"
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, encoded: jax.Array, mask: jax.Array) -> jax.Array:
        """Attends every target position to the source positions `mask` allows.

        Args:
          x: `[batch, target_len, width]`.
          encoded: `[batch, source_len, width]`, the encoder's output.
          mask: bool, True where a query may attend to a key, broadcastable to
            `[batch, num_heads, target_len, source_len]`.

        Returns:
          `[batch, target_len, width]`.
        """
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        batch, target_len, _ = x.shape
        source_len = encoded.shape[1]
        head_dim = self.width // self.num_heads
        dtype = jnp.dtype(self.dtype)
        q = nn.Dense(self.width, dtype=dtype, name="query")(x)  # [batch, target_len, width]
        q = q.reshape(batch, target_len, self.num_heads, head_dim)
        kv = nn.Dense(2 * self.width, dtype=dtype, name="key_value")(encoded)
        kv = kv.reshape(batch, source_len, 2, self.num_heads, head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]  # each [batch, source_len, heads, head_dim]
        out = attention_kernel(self.implementation)(q, k, v, mask)  # [batch, target_len, heads, hd]
        out = out.reshape(batch, target_len, self.width)
        return nn.Dense(self.width, dtype=dtype, name="out")(out)  # [batch, target_len, width]


class DecoderBlock(nn.Module):
    """Pre-LayerNorm decoder block: causal self-attention, cross-attention, MLP, each residual.

    Attributes:
      num_heads: attention heads.
      width: model width.
      mlp_dim: hidden size of the MLP.
      dropout_rate: dropout on the three residual branches (only when `train=True`).
      dtype: computation dtype; parameters stay float32.
      implementation: the attention kernel of both attentions (see `attention_kernel`).
    """

    num_heads: int
    width: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: str = "float32"
    implementation: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        source_mask: jax.Array,
        *,
        train: bool,
        decode: bool = False,
    ) -> jax.Array:
        """Applies the block.

        Args:
          x: `[batch, target_len, width]`.
          encoded: `[batch, source_len, width]`.
          source_mask: bool `[batch, 1, 1, source_len]`, False at source padding.
          train: enables dropout (rng stream `"dropout"`).
          decode: self-attention over cached keys and values too (`SelfAttention`).

        Returns:
          `[batch, target_len, width]` in `dtype`.
        """
        dtype = jnp.dtype(self.dtype)
        x = x.astype(dtype)

        def residual(x, y):
            return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)

        y = nn.LayerNorm(dtype=dtype, name="self_attn_norm")(x)
        y = SelfAttention(
            self.num_heads, self.width, self.dtype, self.implementation, name="self_attn"
        )(y, None, decode=decode)
        x = residual(x, y)
        y = nn.LayerNorm(dtype=dtype, name="cross_attn_norm")(x)
        y = CrossAttention(
            self.num_heads, self.width, self.dtype, self.implementation, name="cross_attn"
        )(y, encoded, source_mask)
        x = residual(x, y)
        y = nn.LayerNorm(dtype=dtype, name="mlp_norm")(x)
        y = nn.Dense(self.mlp_dim, dtype=dtype, name="mlp_in")(y)  # [batch, target_len, mlp_dim]
        y = nn.Dense(self.width, dtype=dtype, name="mlp_out")(nn.gelu(y))
        return residual(x, y)  # [batch, target_len, width]


class PositionEmbedding(nn.Module):
    """Adds a learned position embedding (`embedding`, `[max_len, width]`); with `decode=True`,
    that of the positions after those already cached.

    Attributes:
      max_len: longest sequence.
      width: model width.
    """

    max_len: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, *, decode: bool = False) -> jax.Array:
        """`x` `[batch, seq_len, width]` plus the embeddings of its positions."""
        seq_len = x.shape[1]
        if seq_len > self.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_len={self.max_len}")
        table = self.param(
            "embedding", nn.initializers.normal(stddev=0.02), (self.max_len, self.width)
        )
        if decode:
            table = jax.lax.dynamic_slice_in_dim(table, cache_position(self, seq_len), seq_len)
        return x + table[None, :seq_len].astype(x.dtype)


def _source_mask(inputs: jax.Array) -> jax.Array:
    """bool `[batch, 1, 1, source_len]`: no query attends to source padding (id 0)."""
    return (inputs != 0)[:, None, None, :]


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer: source tokens in, next-target-token logits out.

    Parameters: `token_embed` (shared by both sides), `encoder_positions`, `encoder_blocks_{i}`
    (`TransformerBlock`s), `encoder_norm`, `decoder_positions`, `decoder_blocks_{i}`
    (`DecoderBlock`s), `decoder_norm` and `lm_head`.

    Attributes:
      vocab_size: number of token ids, source and target alike; id 0 is padding.
      num_layers: blocks in the encoder, and again in the decoder.
      num_heads: attention heads; must divide `width`.
      width: model (embedding) width.
      mlp_dim: hidden size of each block's MLP.
      max_len: longest source and longest target sequence (size of the position embeddings).
      dropout_rate: dropout on residual branches (only when `train=True`).
      dtype: computation dtype; parameters stay float32 and the logits are returned as float32.
      implementation: the attention kernel of every block, "standard", "cpu" or "auto" (see
        `jaxmodels.transformer.attention_kernel`); the parameters are the same for all three.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    width: int
    mlp_dim: int
    max_len: int
    dropout_rate: float = 0.0
    dtype: str = "float32"
    implementation: str = "auto"

    def setup(self):
        dtype = jnp.dtype(self.dtype)
        self.token_embed = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=dtype,
            embedding_init=nn.initializers.normal(stddev=0.02),
        )
        self.encoder_positions = PositionEmbedding(self.max_len, self.width)
        self.encoder_blocks = [
            TransformerBlock(
                self.num_heads,
                self.width,
                self.mlp_dim,
                self.dropout_rate,
                self.dtype,
                self.implementation,
            )
            for i in range(self.num_layers)
        ]
        self.encoder_norm = nn.LayerNorm(dtype=dtype)
        self.decoder_positions = PositionEmbedding(self.max_len, self.width)
        self.decoder_blocks = [
            DecoderBlock(
                self.num_heads,
                self.width,
                self.mlp_dim,
                self.dropout_rate,
                self.dtype,
                self.implementation,
            )
            for i in range(self.num_layers)
        ]
        self.decoder_norm = nn.LayerNorm(dtype=dtype)
        self.lm_head = nn.Dense(self.vocab_size, dtype=dtype)

    def __call__(self, inputs: jax.Array, decoder_inputs: jax.Array, *, train: bool) -> jax.Array:
        """Teacher-forced logits of every target position.

        Args:
          inputs: int source token ids `[batch, source_len]`, 0 after the source.
          decoder_inputs: int target token ids shifted right, `[batch, target_len]` (a start
            token, then the target but its last token).
          train: enables dropout (rng stream `"dropout"`).

        Returns:
          float32 logits `[batch, target_len, vocab_size]`: position t predicts target token t.
        """
        encoded = self.encode(inputs, train=train)
        return self.decode(encoded, inputs, decoder_inputs, train=train)

    def encode(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """The encoder's output, `[batch, source_len, width]`, of ids `[batch, source_len]`."""
        x = self.encoder_positions(self.token_embed(inputs))  # [batch, source_len, width]
        mask = _source_mask(inputs)
        for block in self.encoder_blocks:
            x = block(x, mask, train=train)
        return self.encoder_norm(x)

    def decode(
        self,
        encoded: jax.Array,
        inputs: jax.Array,
        decoder_inputs: jax.Array,
        *,
        train: bool,
        decode: bool = False,
    ) -> jax.Array:
        """The decoder's logits.

        Args:
          encoded: `encode(inputs)`, `[batch, source_len, width]`.
          inputs: the source ids `[batch, source_len]` (for the padding mask).
          decoder_inputs: target ids `[batch, target_len]`; with `decode=True`, the positions
            after those in the `"cache"` collection (see the module docstring).
          train: enables dropout.
          decode: keep and extend the decoder's self-attention keys and values in the cache.

        Returns:
          float32 logits `[batch, target_len, vocab_size]`.
        """
        x = self.decoder_positions(self.token_embed(decoder_inputs), decode=decode)
        mask = _source_mask(inputs)
        for block in self.decoder_blocks:
            x = block(x, encoded, mask, train=train, decode=decode)
        x = self.decoder_norm(x)
        return self.lm_head(x).astype(jnp.float32)  # [batch, target_len, vocab_size]
