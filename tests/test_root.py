"""Root model: random init and vision_transformer npz checkpoints (written by the test)."""

import jax
import numpy as np
import pytest

from conftest import TINY
from mu2net import paths as P
from mu2net import root as R


def test_random_root_with_zero_blocks():
    arch, params = R.random_root(TINY, num_blocks=0)
    assert arch.kinds == ("patch_embedding", "class_token", "position_embedding", "head")
    assert len(params) == 4


def test_checkpoint_in_vision_transformer_naming_round_trips(tmp_path):
    arch, params = R.random_root(TINY, num_blocks=2, seed=7, num_classes=5)
    # make the head non-zero so the logits are informative
    params[-1]["head"]["kernel"] = np.random.default_rng(0).normal(size=params[-1]["head"]["kernel"].shape).astype(np.float32)
    ckpt = tmp_path / "vit.npz"
    R.save_vit_checkpoint(ckpt, arch, params)
    names = set(np.load(ckpt).files)
    assert {"embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding",
            "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel",
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
            "Transformer/encoder_norm/scale", "head/kernel"} <= names
    arch2, params2 = R.load_vit_checkpoint(ckpt)
    assert arch2 == arch
    images = np.random.default_rng(1).integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(P.predict(arch, params, images), P.predict(arch2, params2, images), rtol=1e-6)


def test_checkpoint_missing_arrays_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "bad.npz", cls=np.zeros((1, 1, 16), np.float32))
    with pytest.raises(ValueError, match="lacks arrays"):
        R.load_vit_checkpoint(tmp_path / "bad.npz")


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 13, 5, 3), (2, 32, 32, 4), (2, 8, 8, 2)])
def test_preprocess_brings_any_image_to_path_input(shape):
    x = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    out = jax.device_get(P.preprocess(x, 8))
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 - 1e-5 and out.max() <= 1.0 + 1e-5


def test_preprocess_rejects_bad_channels():
    with pytest.raises(ValueError, match="5 channels"):
        P.preprocess(np.zeros((1, 8, 8, 5), np.uint8), 8)


def test_conv_stem_root_makes_as_many_tokens_as_patches_and_trains():
    from mu2net import components as C

    arch, params = R.random_root(TINY, num_blocks=1, seed=3, stem=C.CONV_STEM, num_classes=3)
    assert arch.kinds[0] == "conv_stem"
    # log2(patch 4) = 2 stride-2 3x3 convolutions (channels 8, 16 for width 16), then a 1x1 projection
    assert set(params[0]) == {"conv_0", "conv_1", "projection"}
    assert params[0]["conv_0"]["kernel"].shape == (3, 3, 3, TINY.width // 2)
    assert params[0]["conv_1"]["kernel"].shape == (3, 3, TINY.width // 2, TINY.width)
    assert params[0]["projection"]["kernel"].shape == (1, 1, TINY.width, TINY.width)
    x = np.random.default_rng(0).normal(size=(2, TINY.image_size, TINY.image_size, 3)).astype(np.float32)
    tokens = C.apply_component(C.CONV_STEM, TINY, params[0], x)
    assert tokens.shape == (2, TINY.num_patches, TINY.width)
    images = np.random.default_rng(1).integers(0, 255, (5, 8, 8, 1), dtype=np.uint8)
    assert P.predict(arch, params, images).shape == (5, 3)


def test_conv_stem_needs_a_power_of_two_patch_size_and_is_not_saved_as_a_vit_checkpoint(tmp_path):
    from mu2net import components as C

    with pytest.raises(ValueError, match="power of two"):
        R.random_root(C.ViTConfig(image_size=28, patch_size=7, width=16, mlp_dim=32, num_heads=2), 0,
                      stem=C.CONV_STEM)
    with pytest.raises(ValueError, match="stem must be one of"):
        R.random_root(TINY, 0, stem="resnet")
    arch, params = R.random_root(TINY, 0, stem=C.CONV_STEM)
    with pytest.raises(ValueError, match="no conv_stem"):
        R.save_vit_checkpoint(tmp_path / "x.npz", arch, params)
