"""Table 1 augmentations: identity when switched off, hue as a YIQ chroma rotation."""

import jax
import jax.numpy as jnp
import numpy as np

from mu2net.evolver.augment import AUGMENT_HPARAMS, _RGB2YIQ, _YIQ2RGB, augment


def _hp(**values):
    hp = {k: jnp.float32(0.0) for k in AUGMENT_HPARAMS}
    hp.update(crop_area_min=jnp.float32(1.0), crop_aspect_min=jnp.float32(1.0))
    hp.update({k: jnp.float32(v) for k, v in values.items()})
    return hp


def _images(seed=0, shape=(8, 12, 12, 3)):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-1.0, maxval=1.0)


def test_everything_off_returns_the_images():
    x = _images()
    out = jax.jit(augment)(x, _hp(), jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-6)


def test_hue_matches_a_rotation_of_the_yiq_chroma_plane():
    x = _images(seed=2)
    rng = jax.random.PRNGKey(5)
    out = np.asarray(jax.jit(augment)(x, _hp(hue=0.25), rng))
    # reference: the angle augment draws (same key split), applied as matmuls in YIQ space
    angle = np.asarray(jax.random.uniform(jax.random.split(rng, 7)[5], (x.shape[0],), minval=-1.0, maxval=1.0))
    angle = angle * 0.25 * 2 * np.pi
    yiq = ((np.asarray(x) + 1) / 2) @ _RGB2YIQ.T
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    i = yiq[..., 1] * c - yiq[..., 2] * s
    q = yiq[..., 1] * s + yiq[..., 2] * c
    ref = np.clip(np.stack([yiq[..., 0], i, q], -1) @ _YIQ2RGB.T, 0, 1) * 2 - 1
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.abs(out - np.asarray(x)).max() > 0.05  # the rotation did change colours


def test_crop_changes_images_only_when_switched_on():
    x = _images(seed=3)
    f = jax.jit(augment)
    off = f(x, _hp(crop=0.0, crop_area_min=0.3, crop_aspect_min=0.5), jax.random.PRNGKey(0))
    on = f(x, _hp(crop=1.0, crop_area_min=0.3, crop_aspect_min=0.5), jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(off), np.asarray(x), atol=1e-6)
    assert np.abs(np.asarray(on) - np.asarray(x)).max() > 0.1
    assert on.shape == x.shape


def test_a_crop_box_that_does_not_fit_is_rejected_not_clipped():
    # area 1.0 with an aspect ratio != 1 never fits inside the image: every box is rejected
    # and the whole image is kept (clipping it would stretch the image along one axis)
    x = _images(seed=4)
    out = jax.jit(augment)(x, _hp(crop=1.0, crop_area_min=1.0, crop_aspect_min=0.5), jax.random.PRNGKey(3))
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-5)
    # the crop boxes that do fit keep their aspect ratio: a 0.5-area crop still zooms in
    zoom = jax.jit(augment)(x, _hp(crop=1.0, crop_area_min=0.5, crop_aspect_min=1.0), jax.random.PRNGKey(3))
    assert np.abs(np.asarray(zoom) - np.asarray(x)).max() > 0.1
