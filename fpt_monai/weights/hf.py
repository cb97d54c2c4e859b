"""Hugging Face ``transformers`` ViT checkpoints -> the timm ``VisionTransformer`` layout."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch

from fpt_monai.weights.files import PretrainedWeightsError, _format_keys

__all__ = ["is_hf_vit_layout", "hf_vit_to_timm"]

logger = logging.getLogger(__name__)

_HF_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_HF_QKV_RE = re.compile(r"^attention\.attention\.(query|key|value)$")
_HF_LAYER_MAP = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP_LEVEL_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Parts of Hugging Face checkpoints that a timm ViT backbone has no use for.
_HF_DROPPED_PREFIXES = ("pooler.", "embeddings.mask_token")
_HF_MARKER_RE = re.compile(
    r"^(vit\.)?(embeddings\.patch_embeddings\.projection\.weight|encoder\.layer\.\d+\.attention\.attention\.query\."
    r"weight)$"
)


def is_hf_vit_layout(state_dict: Mapping[str, Any]) -> bool:
    """Tells whether a state dict uses the Hugging Face ``transformers`` ViT layout.

    Both ``ViTForImageClassification`` (keys prefixed with ``vit.``) and a bare ``ViTModel`` (no prefix) are
    recognised, by their patch-embedding projection or per-layer ``attention.attention.query`` keys.

    Args:
        state_dict: a state dict.

    Returns:
        True if the state dict looks like a Hugging Face ViT checkpoint.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping, got {type(state_dict).__name__}.")
    return any(isinstance(k, str) and _HF_MARKER_RE.match(k) for k in state_dict)


def hf_vit_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converts a Hugging Face ``transformers`` ViT state dict to the timm ``VisionTransformer`` layout.

    The per-layer ``query``/``key``/``value`` projections are concatenated (in that order, along dim 0) into timm's
    fused ``attn.qkv``; ``classifier.*`` becomes ``head.*``; pooler weights (and a masked-image-modelling
    ``mask_token``) are dropped, timm ViTs have no use for them.

    Args:
        state_dict: a ``ViTModel`` or ``ViTForImageClassification`` state dict (``vit.`` prefix optional).

    Returns:
        A new state dict in timm layout, sharing the input tensors where no concatenation is needed.

    Raises:
        PretrainedWeightsError: if the state dict holds keys that are not part of a Hugging Face ViT, or a layer
            lacks one of its query/key/value tensors.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping, got {type(state_dict).__name__}.")
    has_prefix = any(isinstance(k, str) and k.startswith("vit.") for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    dropped: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(key, str):
            unknown.append(repr(key))
            continue
        if key.startswith("classifier."):
            out["head." + key[len("classifier.") :]] = value
            continue
        if has_prefix:
            if not key.startswith("vit."):
                unknown.append(key)
                continue
            name = key[len("vit.") :]
        else:
            name = key
        if name.startswith(_HF_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        if name in _HF_TOP_LEVEL_MAP:
            out[_HF_TOP_LEVEL_MAP[name]] = value
            continue
        match = _HF_LAYER_RE.match(name)
        if match is None:
            unknown.append(key)
            continue
        layer, module, param = int(match.group(1)), match.group(2), match.group(3)
        qkv_match = _HF_QKV_RE.match(module)
        if qkv_match is not None:
            qkv.setdefault((layer, param), {})[qkv_match.group(1)] = value
        elif module in _HF_LAYER_MAP:
            out[f"blocks.{layer}.{_HF_LAYER_MAP[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise PretrainedWeightsError(
            f"Cannot convert a Hugging Face ViT state dict to timm layout: {len(unknown)} key(s) are not part of a "
            f"Hugging Face ViT(Model/ForImageClassification): {_format_keys(unknown)}."
        )
    for (layer, param), parts in sorted(qkv.items()):
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            prefix = "vit." if has_prefix else ""
            names = [f"{prefix}encoder.layer.{layer}.attention.attention.{p}.{param}" for p in missing]
            raise PretrainedWeightsError(
                f"Cannot convert a Hugging Face ViT state dict to timm layout: missing {_format_keys(names)}."
            )
        out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if dropped:
        logger.debug("Dropped %d Hugging Face ViT key(s) unused by timm: %s", len(dropped), _format_keys(dropped))
    return out
