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
