"""Paths (the paper's "models") and the one forward function every caller uses.

A path is the ordered list of component ids one task runs, plus its hyperparameters,
score and parent path. Training, evaluation and serving all run :func:`forward`, so they
cannot disagree. Compiled functions are cached by :class:`Architecture` (the static
structure of a path), so a path with the same structure as an earlier one does not
recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mu2net import components as C


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Static structure of a path: what a compiled function depends on.

    Attributes:
      config: the ViT shape shared by the layer pool.
      kinds: component kind of each position, e.g. (patch_embedding, class_token,
        position_embedding, transformer_block, ..., head); the first may be a conv_stem.
      num_classes: output classes of the head.
    """

    config: C.ViTConfig
    kinds: tuple[str, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if (len(self.kinds) < 4 or self.kinds[0] not in C.STEMS
                or self.kinds[1:3] != (C.CLASS_TOKEN, C.POSITION_EMBEDDING) or self.kinds[-1] != C.HEAD
                or any(k != C.TRANSFORMER_BLOCK for k in self.kinds[3:-1])):
            raise ValueError(
                f"path kinds {self.kinds} must be (one of {C.STEMS}, {C.CLASS_TOKEN!r}, "
                f"{C.POSITION_EMBEDDING!r}) + transformer_block* + (head,)")

    @property
    def num_blocks(self) -> int:
        return len(self.kinds) - 4


@dataclasses.dataclass(frozen=True)
class Path:
    """A retained or candidate model of the multitask system.

    Attributes:
      id: unique id (uuid4 hex).
      task: the task it was trained on; None for the root model.
      component_ids: ids of its components in the layer pool, in forward order.
      architecture: static structure (kinds line up with ``component_ids``).
      hparams: Table 1 hyperparameters (see :mod:`mu2net.hparams`).
      score: score on ``task``'s validation split (Section 3.3); None for the root model.
      parent_id: id of the parent path; None for the root model.
      metrics: extra measurements (validation/test accuracy, parameter counts...).
    """

    id: str
    task: str | None
    component_ids: tuple[str, ...]
    architecture: Architecture
    hparams: Mapping[str, Any]
    score: float | None = None
    parent_id: str | None = None
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
    """Brings images of any size and channel count to the path's input.

    Args:
      images: ``[batch, height, width, channels] uint8`` with channels 1 (gray), 2 (gray +
        alpha), 3 (RGB) or 4 (RGBA).
      image_size: target resolution.

    Returns:
      ``[batch, image_size, image_size, 3] float32`` in [-1, 1] (ViT normalisation).

    Raises:
      ValueError: for a rank other than 4 or an unsupported channel count.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got shape {images.shape}")
    channels = images.shape[-1]
    if channels in (1, 2):
        images = jnp.repeat(images[..., :1], 3, axis=-1)
    elif channels == 4:
        images = images[..., :3]
    elif channels != 3:
        raise ValueError(f"images have {channels} channels; allowed: 1, 2, 3 or 4")
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), "bilinear", antialias=True)
    return x


def forward(arch: Architecture, params: Sequence[C.Params], x: jax.Array,
            start: int = 0) -> jax.Array:
    """Runs components ``start..`` of a path.

    Args:
      arch: the path's architecture.
      params: parameters of components ``start..`` in order.
      x: input of component ``start``: preprocessed images ``[B, S, S, 3] float32`` when
        ``start == 0``, else activations ``[B, T, width] float32``.
      start: index of the first component to run.

    Returns:
      ``[B, num_classes] float32`` logits.
    """
    for kind, p in zip(arch.kinds[start:], params):
        x = C.apply_component(kind, arch.config, p, x, arch.num_classes)
    return x


def forward_prefix(arch: Architecture, params: Sequence[C.Params], x: jax.Array,
                   stop: int) -> jax.Array:
    """Runs components ``0..stop-1`` on preprocessed images and returns the activations."""
    for kind, p in zip(arch.kinds[:stop], params):
        x = C.apply_component(kind, arch.config, p, x, arch.num_classes)
    return x


class TraceCounter:
    """Counts how many times each cached function was traced (i.e. compiled).

    Shared by training and inference caches so tests and benchmarks can prove that a
    same-structure path does not recompile (STYLE.md: chex ``assert_max_traces``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def hit(self, name: str) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1

    def total(self, prefix: str = "") -> int:
        with self._lock:
            return sum(v for k, v in self.counts.items() if k.startswith(prefix))


TRACES = TraceCounter()


@functools.lru_cache(maxsize=256)
def predict_fn(arch: Architecture) -> Callable[[Sequence[C.Params], jax.Array], jax.Array]:
    """Jitted ``(params, images uint8 [B,H,W,C]) -> logits [B, classes] float32`` for ``arch``.

    Cached by architecture: every path of the same structure shares one compiled function
    (jax additionally specialises on input shapes, i.e. batch size and image size).
    """

    def predict(params: Sequence[C.Params], images: jax.Array) -> jax.Array:
        TRACES.hit("predict")
        return forward(arch, params, preprocess(images, arch.config.image_size))

    return jax.jit(predict)


@functools.lru_cache(maxsize=256)
def probabilities_fn(arch: Architecture) -> Callable[[Sequence[C.Params], jax.Array], jax.Array]:
    """Jitted ``(params, images uint8 [B,H,W,C]) -> softmax probabilities [B, classes] float32``.

    The serving entry point: the same :func:`forward` as training, softmax inside the jit.
    """

    def probabilities(params: Sequence[C.Params], images: jax.Array) -> jax.Array:
        TRACES.hit("probabilities")
        return jax.nn.softmax(forward(arch, params, preprocess(images, arch.config.image_size)), axis=-1)

    return jax.jit(probabilities)


def predict(arch: Architecture, params: Sequence[C.Params], images: np.ndarray,
            batch_size: int = 256) -> np.ndarray:
    """Logits for a whole array of images, in fixed-size batches (the last one padded).

    Args:
      arch: path architecture.
      params: parameters of every component of the path, in order.
      images: ``[N, H, W, C] uint8``.
      batch_size: evaluation batch size; padding keeps it to one compiled shape.

    Returns:
      ``[N, num_classes] float32`` numpy logits.
    """
    fn = predict_fn(arch)
    n = len(images)
    out = np.zeros((n, arch.num_classes), np.float32)
    for i in range(0, n, batch_size):
        batch = images[i:i + batch_size]
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        out[i:i + batch_size] = np.asarray(fn(params, batch))[:batch_size - pad]
    return out


def accuracy(arch: Architecture, params: Sequence[C.Params], images: np.ndarray,
             labels: np.ndarray, batch_size: int = 256) -> float:
    """Top-1 accuracy in [0, 1] of a path on ``images`` ``[N,H,W,C] uint8`` / ``labels [N] int``."""
    if len(images) == 0:
        raise ValueError("cannot compute accuracy on an empty split")
    logits = predict(arch, params, images, batch_size)
    return float(np.mean(np.argmax(logits, -1) == labels))
