"""ViT components (paper Section 3.5, "Architecture") as Flax modules.

A component is one layer of a ViT: patch embedding (or its convolutional alternative, the
conv stem), class token, position embedding, transformer block, or head. Every component of a path shares one :class:`ViTConfig`
(width, patch size, input resolution...). Components are pure: ``init_component`` makes
their parameters, ``apply_component`` runs them; nothing here holds state.

Activations flow as ``[batch, tokens, width] float32`` between components; the patch
embedding (or conv stem) takes ``[batch, image_size, image_size, 3] float32`` images and the head returns
``[batch, num_classes] float32`` logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any  # a pytree of jax arrays

PATCH_EMBEDDING = "patch_embedding"
CONV_STEM = "conv_stem"
CLASS_TOKEN = "class_token"
POSITION_EMBEDDING = "position_embedding"
TRANSFORMER_BLOCK = "transformer_block"
HEAD = "head"
KINDS = (PATCH_EMBEDDING, CONV_STEM, CLASS_TOKEN, POSITION_EMBEDDING, TRANSFORMER_BLOCK, HEAD)
#: Kinds that turn images into tokens: the first component of every path.
STEMS = (PATCH_EMBEDDING, CONV_STEM)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Static shape of every component of a layer pool.

    Attributes:
      image_size: input resolution in pixels (square); images are resized to it.
      patch_size: patch side in pixels; ``image_size`` must be a multiple of it.
      width: token dimension (ViT "hidden_size").
      mlp_dim: hidden size of the transformer block's MLP.
      num_heads: attention heads; must divide ``width``.
    """

    image_size: int = 28
    patch_size: int = 4
    width: int = 96
    mlp_dim: int = 192
    num_heads: int = 4

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class PatchEmbedding(nn.Module):
    """[B, H, W, 3] -> [B, (H/p)*(W/p), width] via a strided convolution (ViT "embedding")."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                    padding="VALID", name="embedding")(x)
        return x.reshape(x.shape[0], -1, c.width)


class ConvStem(nn.Module):
    """[B, H, W, 3] -> [B, (H/p)*(W/p), width] via stride-2 3x3 convolutions, then a 1x1 one.

    The convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers see
    better", Section 3): ``log2(patch_size)`` 3x3 convolutions of stride 2, each followed
    by a ReLU, with channels doubling up to ``width`` (for patch 4 and width 64: 32, 64),
    then a 1x1 convolution to ``width``. It makes as many tokens as a patch embedding of
    the same ``patch_size``, so the rest of the ViT (and the layer pool) is unchanged. No
    batch norm (a component holds parameters only), as in the probe of DATA.md.

    Raises:
      ValueError: if ``patch_size`` is not a power of two >= 2.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        depth = conv_stem_depth(c.patch_size)
        for i in range(depth):
            channels = max(1, c.width // 2 ** (depth - 1 - i))
            x = nn.relu(nn.Conv(channels, (3, 3), strides=(2, 2), padding="SAME", name=f"conv_{i}")(x))
        x = nn.Conv(c.width, (1, 1), name="projection")(x)
        return x.reshape(x.shape[0], -1, c.width)


def conv_stem_depth(patch_size: int) -> int:
    """Number of stride-2 convolutions of a conv stem standing in for ``patch_size`` patches.

    Raises:
      ValueError: if ``patch_size`` is not a power of two >= 2.
    """
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"a conv stem needs a patch_size that is a power of two >= 2 "
                         f"(2, 4, 8, 16...), got {patch_size}")
    return patch_size.bit_length() - 1


class ClassToken(nn.Module):
    """Prepends the learned class token: [B, N, D] -> [B, N+1, D] (ViT "cls")."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.config.width))
        return jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)


class PositionEmbedding(nn.Module):
    """Adds learned position embeddings to [B, N+1, D] (ViT "posembed_input")."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                        (1, self.config.num_patches + 1, self.config.width))
        return x + pe


class TransformerBlock(nn.Module):
    """Pre-LN transformer encoder block, [B, T, D] -> [B, T, D] (ViT "encoderblock")."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        y = nn.LayerNorm(name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads, kernel_init=nn.initializers.xavier_uniform(),
            name="MultiHeadDotProductAttention_1")(y, y)
        x = x + y
        y = nn.LayerNorm(name="LayerNorm_2")(x)
        y = nn.Dense(c.mlp_dim, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(stddev=1e-6), name="Dense_0")(y)
        y = nn.gelu(y)
        y = nn.Dense(c.width, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(stddev=1e-6), name="Dense_1")(y)
        return x + y


class Head(nn.Module):
    """Final LayerNorm on the class token then a dense layer: [B, T, D] -> [B, classes].

    The ViT "encoder_norm" belongs to the head, so a path's head is its only task-specific
    output layer (the paper's "model head").
    """

    config: ViTConfig
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.LayerNorm(name="encoder_norm")(x[:, 0])
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)


def module(kind: str, config: ViTConfig, num_classes: int = 0) -> nn.Module:
    """The Flax module of a component kind. ``num_classes`` is used by heads only."""
    if kind == PATCH_EMBEDDING:
        return PatchEmbedding(config)
    if kind == CONV_STEM:
        conv_stem_depth(config.patch_size)
        return ConvStem(config)
    if kind == CLASS_TOKEN:
        return ClassToken(config)
    if kind == POSITION_EMBEDDING:
        return PositionEmbedding(config)
    if kind == TRANSFORMER_BLOCK:
        return TransformerBlock(config)
    if kind == HEAD:
        if num_classes < 1:
            raise ValueError(f"a head needs num_classes >= 1, got {num_classes}")
        return Head(config, num_classes)
    raise ValueError(f"unknown component kind {kind!r}; allowed: {list(KINDS)}")


def input_shape(kind: str, config: ViTConfig) -> tuple[int, ...]:
    """Shape of one example entering a component of ``kind`` (batch of 1)."""
    if kind in STEMS:
        return (1, config.image_size, config.image_size, 3)
    if kind == CLASS_TOKEN:
        return (1, config.num_patches, config.width)
    return (1, config.num_patches + 1, config.width)


def init_component(kind: str, config: ViTConfig, rng: jax.Array, num_classes: int = 0) -> Params:
    """Randomly initialised parameters of a new component.

    Args:
      kind: one of :data:`KINDS`.
      config: the layer pool's ViT shape.
      rng: a ``jax.random`` key.
      num_classes: number of output classes (heads only).

    Returns:
      The parameter pytree (``{"params": ...}`` stripped), float32.
    """
    x = jnp.zeros(input_shape(kind, config), jnp.float32)
    return module(kind, config, num_classes).init(rng, x)["params"]


def identity_block(params: Params) -> Params:
    """A transformer block's parameters with both residual branches' output projections
    zeroed (attention ``out`` and MLP ``Dense_1``, kernels and biases), so the block
    computes the identity until it trains: inserting it preserves the path's function
    (zero-initialised residual outputs, as in function-preserving ViT growth, arXiv
    2308.06103). The other parameters are kept, so gradients reach them after the first
    update of the output projections.
    """
    zero = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # noqa: E731
    out = dict(params)
    attention = dict(out["MultiHeadDotProductAttention_1"])
    attention["out"] = zero(attention["out"])
    out["MultiHeadDotProductAttention_1"] = attention
    out["Dense_1"] = zero(out["Dense_1"])
    return out


def apply_component(kind: str, config: ViTConfig, params: Params, x: jax.Array,
                    num_classes: int = 0) -> jax.Array:
    """Runs one component on a batch (see the module docstring for shapes)."""
    return module(kind, config, num_classes).apply({"params": params}, x)


def num_params(params: Params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
