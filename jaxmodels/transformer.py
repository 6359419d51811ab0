"""Pre-LayerNorm Transformer: a causal language model or a bidirectional encoder classifier."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection.

    Attributes:
      num_heads: number of heads; must divide `width`.
      width: model width (input and output size).
    """

    num_heads: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Attends every position to the positions `mask` allows.

        Args:
          x: `[batch, seq_len, width]`.
          mask: bool, True where a query may attend to a key, broadcastable to
            `[batch, num_heads, seq_len, seq_len]` (query axis before key axis).

        Returns:
          `[batch, seq_len, width]`.
        """
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        batch, seq_len, _ = x.shape
        head_dim = self.width // self.num_heads
        qkv = nn.Dense(3 * self.width, name="qkv")(x)  # [batch, seq_len, 3 * width]
        qkv = qkv.reshape(batch, seq_len, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [batch, seq_len, heads, head_dim]
        q = q * head_dim**-0.5  # scaling q is cheaper than scaling the [seq_len, seq_len] scores
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)  # [batch, heads, seq_len, seq_len]
        # Softmax in float32 even for low-precision activations. Masked scores become the most
        # negative float rather than -inf, so a fully masked row gives a uniform average, not NaN.
        scores = scores.astype(jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [batch, seq_len, heads, head_dim]
        out = out.reshape(batch, seq_len, self.width)  # [batch, seq_len, width]
        return nn.Dense(self.width, name="out")(out)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: `x + Attn(LN(x))`, then `x + MLP(LN(x))`.

    Attributes:
      num_heads: attention heads.
      width: model width.
      mlp_dim: hidden size of the MLP.
      dropout_rate: dropout on both residual branches (only when `train=True`).
    """

    num_heads: int
    width: int
    mlp_dim: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
        """Applies the block.

        Args:
          x: `[batch, seq_len, width]`.
          mask: bool attention mask broadcastable to `[batch, num_heads, seq_len, seq_len]`.
          train: enables dropout (rng stream `"dropout"`).

        Returns:
          `[batch, seq_len, width]`.
        """
        y = nn.LayerNorm(name="attn_norm")(x)
        y = SelfAttention(self.num_heads, self.width, name="attn")(y, mask)
        x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.LayerNorm(name="mlp_norm")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(y))  # [batch, seq_len, mlp_dim]
        y = nn.Dense(self.width, name="mlp_out")(y)  # [batch, seq_len, width]
        return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class Transformer(nn.Module):
    """Token Transformer in one of two modes.

    - Decoder LM (`causal=True`, `num_classes=0`): causal attention, final LayerNorm, and an LM
      head, giving next-token logits `[batch, seq_len, vocab_size]`.
    - Encoder classifier (`causal=False`, `num_classes > 0`): token id 0 is padding and is
      masked out of attention and of the mean pool; returns `[batch, num_classes]`.

    The other two combinations raise a ValueError: an encoder needs a classifier head, and a causal
    classifier is not something we train.

    Attributes:
      vocab_size: number of token ids.
      num_layers: number of `TransformerBlock`s.
      num_heads: attention heads per block; must divide `width`.
      width: model (embedding) width.
      mlp_dim: hidden size of each block's MLP.
      max_len: longest supported sequence (size of the learned position embedding).
      causal: decoder (True) or encoder (False).
      num_classes: classifier outputs for the encoder; 0 for the decoder.
      dropout_rate: dropout on residual branches (only when `train=True`).
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    width: int
    mlp_dim: int
    max_len: int
    causal: bool = True
    num_classes: int = 0
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
        """Runs the model.

        Args:
          tokens: int token ids, `[batch, seq_len]` with `seq_len <= max_len`.
          train: enables dropout (rng stream `"dropout"`).

        Returns:
          float32 logits: `[batch, seq_len, vocab_size]` for the decoder,
          `[batch, num_classes]` for the encoder classifier.
        """
        if self.causal and self.num_classes:
            raise ValueError(f"causal Transformer is an LM; got num_classes={self.num_classes}")
        if not self.causal and not self.num_classes:
            raise ValueError("non-causal Transformer is a classifier; it needs num_classes > 0")
        seq_len = tokens.shape[1]
        if seq_len > self.max_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_len={self.max_len}")

        embed_init = nn.initializers.normal(stddev=0.02)  # GPT-2 style small embeddings
        x = nn.Embed(self.vocab_size, self.width, embedding_init=embed_init, name="token_embed")(
            tokens
        )  # [batch, seq_len, width]
        positions = self.param("pos_embed", embed_init, (self.max_len, self.width))
        x = x + positions[None, :seq_len]  # [batch, seq_len, width]

        if self.causal:
            mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None, None]  # [1, 1, q, k]
        else:
            not_pad = tokens != 0  # [batch, seq_len]
            mask = not_pad[:, None, None, :]  # [batch, 1, 1, k]: no query attends to padding

        for i in range(self.num_layers):
            x = TransformerBlock(
                self.num_heads, self.width, self.mlp_dim, self.dropout_rate, name=f"block_{i}"
            )(x, mask, train=train)
        x = nn.LayerNorm(name="final_norm")(x)  # [batch, seq_len, width]

        if self.causal:
            return nn.Dense(self.vocab_size, name="lm_head")(x)  # [batch, seq_len, vocab_size]
        # Mean over non-padding positions; padded positions still hold values, so zero them first.
        weights = not_pad[..., None].astype(x.dtype)  # [batch, seq_len, 1]
        pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)  # [batch, width]
        return nn.Dense(self.num_classes, name="classifier")(pooled)  # [batch, num_classes]
