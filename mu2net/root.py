"""The root model: the path the system starts from (paper Section 3.5, "Parameters").

Either a randomly initialised ViT with zero or more transformer blocks, or a ViT loaded
from a checkpoint in the ``vision_transformer`` npz naming (``embedding/kernel``, ``cls``,
``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_{i}/...``,
``Transformer/encoder_norm/...``, ``head/...``).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mu2net import components as C
from mu2net import hparams as H
from mu2net.paths import Architecture, Path
from mu2net.store import ROOT_PATH_ID, ComponentRecord, Store

DEFAULT_ROOT_NUM_CLASSES = 1  # the root head is replaced on every task (new head per task)


def random_root(config: C.ViTConfig, num_blocks: int, seed: int = 0,
                num_classes: int = DEFAULT_ROOT_NUM_CLASSES,
                stem: str = C.PATCH_EMBEDDING) -> tuple[Architecture, list[Any]]:
    """A randomly initialised ViT.

    Args:
      config: the layer pool's ViT shape.
      num_blocks: transformer blocks (>= 0).
      seed: initialisation seed.
      num_classes: classes of the root's head (replaced by every task).
      stem: first component kind, ``patch_embedding`` (ViT) or ``conv_stem`` (ViT with a
        convolutional stem, Xiao et al. 2021; needs a power-of-two ``patch_size``).

    Returns:
      (architecture, list of numpy parameter pytrees per component).

    Raises:
      ValueError: for a negative ``num_blocks``, an unknown ``stem`` or a conv stem with a
        patch size that is not a power of two.
    """
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if stem not in C.STEMS:
        raise ValueError(f"stem must be one of {list(C.STEMS)}, got {stem!r}")
    kinds = (stem, C.CLASS_TOKEN, C.POSITION_EMBEDDING) + (C.TRANSFORMER_BLOCK,) * num_blocks + (C.HEAD,)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(kinds))
    params = [jax.device_get(C.init_component(k, config, key, num_classes)) for k, key in zip(kinds, keys)]
    return Architecture(config, kinds, num_classes), params


def _take(flat: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if k.startswith(prefix + "/"):
            node = out
            parts = k[len(prefix) + 1:].split("/")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = np.asarray(v, np.float32)
    return out


def load_vit_checkpoint(path: str | os.PathLike[str], image_size: int | None = None,
                        mlp_dim: int | None = None, num_heads: int | None = None) -> tuple[Architecture, list[Any]]:
    """Loads a ``vision_transformer`` npz checkpoint as a root model.

    Width, patch size, number of blocks and classes are read from the arrays; ``num_heads``
    (not recoverable from a checkpoint's shapes in general) is read from the attention
    kernels' ``[width, heads, head_dim]`` shape.

    Raises:
      ValueError: if an expected array is missing or shapes disagree.
    """
    with np.load(path, allow_pickle=False) as npz:
        flat = {k: npz[k] for k in npz.files}
    required = ["embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding",
                "Transformer/encoder_norm/scale", "head/kernel"]
    missing = [k for k in required if k not in flat]
    if missing:
        raise ValueError(f"checkpoint {os.fspath(path)!r} lacks arrays {missing}; expected vision_transformer naming")
    kernel = flat["embedding/kernel"]
    patch, width = kernel.shape[0], kernel.shape[-1]
    n_tokens = flat["Transformer/posembed_input/pos_embedding"].shape[1] - 1
    side = int(round(np.sqrt(n_tokens)))
    num_blocks = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
    if num_blocks:
        q = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
        heads = q.shape[1]
        mlp = flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape[1]
    else:
        heads, mlp = num_heads or 1, mlp_dim or width
    config = C.ViTConfig(image_size=image_size or side * patch, patch_size=patch, width=width,
                         mlp_dim=mlp_dim or mlp, num_heads=num_heads or heads)
    if config.num_patches != n_tokens:
        raise ValueError(f"image_size {config.image_size} gives {config.num_patches} patches; "
                         f"the checkpoint's position embedding has {n_tokens}")
    num_classes = flat["head/kernel"].shape[-1]
    params: list[Any] = [
        {"embedding": _take(flat, "embedding")},
        {"cls": np.asarray(flat["cls"], np.float32)},
        {"pos_embedding": np.asarray(flat["Transformer/posembed_input/pos_embedding"], np.float32)},
    ]
    for i in range(num_blocks):
        b = _take(flat, f"Transformer/encoderblock_{i}")
        params.append({
            "LayerNorm_0": b["LayerNorm_0"], "LayerNorm_2": b["LayerNorm_2"],
            "MultiHeadDotProductAttention_1": b["MultiHeadDotProductAttention_1"],
            "Dense_0": b["MlpBlock_3"]["Dense_0"], "Dense_1": b["MlpBlock_3"]["Dense_1"],
        })
    params.append({"encoder_norm": _take(flat, "Transformer/encoder_norm"), "head": _take(flat, "head")})
    kinds = (C.PATCH_EMBEDDING, C.CLASS_TOKEN, C.POSITION_EMBEDDING) + (C.TRANSFORMER_BLOCK,) * num_blocks + (C.HEAD,)
    arch = Architecture(config, kinds, num_classes)
    # shape check against freshly initialised components
    for kind, p in zip(kinds, params):
        ref = C.init_component(kind, config, jax.random.PRNGKey(0), num_classes)
        ref_shapes = jax.tree_util.tree_map(np.shape, ref)
        got_shapes = jax.tree_util.tree_map(np.shape, p)
        if ref_shapes != got_shapes:
            raise ValueError(f"checkpoint {kind} shapes {got_shapes} do not match the ViT's {ref_shapes}")
    return arch, params


def save_vit_checkpoint(path: str | os.PathLike[str], arch: Architecture, params: list[Any]) -> None:
    """Writes a path's parameters in the ``vision_transformer`` npz naming (inverse of loading).

    Raises:
      ValueError: for a path with a conv stem (the npz naming has patch embeddings only).
    """
    from flax import traverse_util

    if arch.kinds[0] != C.PATCH_EMBEDDING:
        raise ValueError(f"the vision_transformer npz naming has no {arch.kinds[0]}; "
                         f"only paths starting with {C.PATCH_EMBEDDING} can be saved")
    flat: dict[str, np.ndarray] = {}
    def put(prefix: str, tree: Mapping[str, Any]) -> None:
        for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items():
            flat[f"{prefix}/{k}" if prefix else k] = np.asarray(v)
    put("", params[0])
    flat["cls"] = np.asarray(params[1]["cls"])
    flat["Transformer/posembed_input/pos_embedding"] = np.asarray(params[2]["pos_embedding"])
    for i, b in enumerate(params[3:-1]):
        put(f"Transformer/encoderblock_{i}", {
            "LayerNorm_0": b["LayerNorm_0"], "LayerNorm_2": b["LayerNorm_2"],
            "MultiHeadDotProductAttention_1": b["MultiHeadDotProductAttention_1"],
            "MlpBlock_3": {"Dense_0": b["Dense_0"], "Dense_1": b["Dense_1"]}})
    put("Transformer/encoder_norm", params[-1]["encoder_norm"])
    put("head", params[-1]["head"])
    np.savez(path, **flat)


def root_hparams(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Table 1 defaults with optional overrides, for the root path."""
    return H.with_defaults(overrides)


def init_root(store: Store, arch: Architecture, params: Sequence[Any],
              hparams: Mapping[str, Any] | None = None, *, pretrained: bool = False) -> Path:
    """Publishes the root model if the store has none; returns the store's root path.

    ``pretrained`` records whether the parameters came from a checkpoint (True) or a
    random initialisation (False): a random root holds no knowledge, so a new task's
    first-answer child clones and trains it instead of reusing it frozen.
    """
    existing = store.root_path()
    if existing is not None:
        return existing
    records, ids = [], []
    for kind, p in zip(arch.kinds, params):
        pd, _ = store.write_component_files(p, None)
        records.append(ComponentRecord(id=pd, kind=kind, params_digest=pd, opt_digest=None, parent_id=None,
                                       task=None, acl_group=None, steps={}, num_params=C.num_params(p),
                                       num_classes=arch.num_classes if kind == C.HEAD else 0))
        ids.append(pd)
    total = sum(r.num_params for r in records)
    root = Path(id=ROOT_PATH_ID, task=None, component_ids=tuple(ids), architecture=arch,
                hparams=H.with_defaults(hparams), score=None, parent_id=None,
                metrics={"activated_params": total, "pretrained": bool(pretrained)})
    store.publish(root, records)
    return root
