"""ViT components (paper Section 3.5, "Architecture") as Flax modules.

A component is one layer of a ViT: patch embedding, class token, position embedding,
transformer block, or head. Every component of a path shares one :class:`ViTConfig`
(width, patch size, input resolution...). Components are pure: ``init_component`` makes
their parameters, ``apply_component`` runs them; nothing here holds state.

Activations flow as ``[batch, tokens, width] float32`` between components; the patch
embedding takes ``[batch, image_size, image_size, 3] float32`` images and the head returns
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
CLASS_TOKEN = "class_token"
POSITION_EMBEDDING = "position_embedding"
TRANSFORMER_BLOCK = "transformer_block"
HEAD = "head"
KINDS = (PATCH_EMBEDDING, CLASS_TOKEN, POSITION_EMBEDDING, TRANSFORMER_BLOCK, HEAD)


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
    if kind == PATCH_EMBEDDING:
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


def apply_component(kind: str, config: ViTConfig, params: Params, x: jax.Array,
                    num_classes: int = 0) -> jax.Array:
    """Runs one component on a batch (see the module docstring for shapes)."""
    return module(kind, config, num_classes).apply({"params": params}, x)


def num_params(params: Params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
