"""Table 1 data augmentations as one jittable function with traced hyperparameters.

Hyperparameters arrive as arrays so that a hyperparameter mutation never recompiles the
train step. Images are ``[batch, size, size, 3] float32`` in [-1, 1] (after
:func:`mu2net.paths.preprocess`).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

#: Hyperparameters read by :func:`augment` (names of :mod:`mu2net.hparams`).
AUGMENT_HPARAMS = ("crop", "crop_area_min", "crop_aspect_min", "flip", "brightness", "contrast",
                   "saturation", "hue")

# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
# numpy, not jax, constants: importing this module must not initialise the JAX backend
# (the server sizes XLA's thread pool before that, see mu2net.server.compute)
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).astype(np.float32)


#: Crop boxes drawn per image before falling back to the whole image (the
#: ``max_attempts`` of ``tf.image.sample_distorted_bounding_box``, whose default is 100).
CROP_ATTEMPTS = 10


def _random_resized_crop(x: jax.Array, rng: jax.Array, area_min: jax.Array,
                         aspect_min: jax.Array) -> jax.Array:
    """Inception-style crop of one ``[S, S, 3]`` image resized back to ``[S, S, 3]``.

    Area fraction ~ U(area_min, 1); aspect ratio log-uniform in [aspect_min, 1/aspect_min]
    (the ``area_range``/``aspect_ratio_range`` of the official code's ``inception_crop``).
    A box that does not fit inside the image is rejected and another is drawn, as
    ``tf.image.sample_distorted_bounding_box`` does; if none of :data:`CROP_ATTEMPTS`
    fits, the whole image is kept. (Clipping a box that does not fit would change its
    aspect ratio, so ``crop_area_min=1.0`` with ``crop_aspect_min<1`` would stretch every
    image.)
    """
    size = x.shape[0]
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    area = jax.random.uniform(k1, (CROP_ATTEMPTS,), minval=area_min, maxval=1.0)
    log_r = jax.random.uniform(k2, (CROP_ATTEMPTS,), minval=jnp.log(aspect_min), maxval=-jnp.log(aspect_min))
    ratio = jnp.exp(log_r)
    ws, hs = jnp.sqrt(area * ratio), jnp.sqrt(area / ratio)
    fits = (ws <= 1.0) & (hs <= 1.0) & (ws >= 1.0 / size) & (hs >= 1.0 / size)
    first = jnp.argmax(fits)
    found = fits[first]
    w = jnp.where(found, ws[first], 1.0)
    h = jnp.where(found, hs[first], 1.0)
    y0 = jax.random.uniform(k3) * (1.0 - h)
    x0 = jax.random.uniform(k4) * (1.0 - w)
    scale = jnp.stack([1.0 / h, 1.0 / w])
    translation = -jnp.stack([y0, x0]) * size * scale
    return jax.image.scale_and_translate(x, x.shape, (0, 1), scale, translation, "linear",
                                         antialias=True)


def _hue_rotation(angle: jax.Array) -> jax.Array:
    """``[B, 3, 3]`` RGB->RGB matrices rotating the YIQ chroma plane (I, Q) by ``angle`` [B] radians."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    one, zero = jnp.ones_like(cos), jnp.zeros_like(cos)
    rot = jnp.stack([jnp.stack([one, zero, zero], -1),
                     jnp.stack([zero, cos, -sin], -1),
                     jnp.stack([zero, sin, cos], -1)], -2)
    return _YIQ2RGB @ rot @ _RGB2YIQ


def _apply_color_matrix(x: jax.Array, m: jax.Array) -> jax.Array:
    """``x [B, H, W, 3]`` times per-image ``m [B, 3, 3]`` along channels.

    Written as three broadcast multiply-adds, which XLA fuses with the surrounding
    elementwise ops; a channel matmul with a contraction of 3 is about 5x slower on CPU.
    """
    m = m[:, None, None]  # [B, 1, 1, 3, 3]
    return x[..., 0:1] * m[..., :, 0] + x[..., 1:2] * m[..., :, 1] + x[..., 2:3] * m[..., :, 2]


def augment(images: jax.Array, hp: Mapping[str, jax.Array], rng: jax.Array) -> jax.Array:
    """Applies crop, flip, brightness, contrast, saturation and hue jitter (Table 1).

    Args:
      images: ``[B, S, S, 3] float32`` in [-1, 1].
      hp: traced scalars for :data:`AUGMENT_HPARAMS` (booleans as 0/1 floats); deltas are
        in units of the [0, 1] pixel range, as in ``tf.image.random_brightness`` & co.
      rng: a ``jax.random`` key.

    Returns:
      ``[B, S, S, 3] float32`` in [-1, 1].
    """
    b = images.shape[0]
    keys = jax.random.split(rng, 7)
    crop_keys = jax.random.split(keys[0], b)

    def crop_all(x: jax.Array) -> jax.Array:
        return jax.vmap(_random_resized_crop, in_axes=(0, 0, None, None))(
            x, crop_keys, hp["crop_area_min"], hp["crop_aspect_min"])

    # lax.cond, not jnp.where: with crop off (Table 1's other value) the resampling is
    # skipped at run time instead of computed and discarded (about 1.2 ms per batch of 64
    # 28x28 images on this CPU)
    x = jax.lax.cond(hp["crop"] > 0.5, crop_all, lambda x: x, images)
    do_flip = (jax.random.uniform(keys[1], (b, 1, 1, 1)) < 0.5) & (hp["flip"] > 0.5)
    x = jnp.where(do_flip, x[:, :, ::-1, :], x)
    x = (x + 1.0) / 2.0  # to [0, 1] where the deltas are defined
    x = x + jax.random.uniform(keys[2], (b, 1, 1, 1), minval=-1.0, maxval=1.0) * hp["brightness"]
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    f = 1.0 + jax.random.uniform(keys[3], (b, 1, 1, 1), minval=-1.0, maxval=1.0) * hp["contrast"]
    x = (x - mean) * f + mean
    gray = jnp.mean(x, axis=-1, keepdims=True)
    s = 1.0 + jax.random.uniform(keys[4], (b, 1, 1, 1), minval=-1.0, maxval=1.0) * hp["saturation"]
    x = gray + (x - gray) * s
    angle = jax.random.uniform(keys[5], (b,), minval=-1.0, maxval=1.0) * hp["hue"] * 2 * jnp.pi
    x = _apply_color_matrix(x, _hue_rotation(angle))
    return jnp.clip(x, 0.0, 1.0) * 2.0 - 1.0
