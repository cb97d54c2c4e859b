"""MONAI ViTs (3D volumes, or 2D) as frozen FPT backbones, with weights from a local MONAI-layout file.

FPT (Huang et al., MICCAI 2024) and FPT+ (IEEE TNNLS 2025) are 2D methods; nothing in them is specific to two
dimensions. On volumes the frozen large model is MONAI's :class:`monai.networks.nets.ViT` with
``spatial_dims=3`` fed the scan at high resolution (a 128^3 volume with 16^3 patches is 512 tokens);
:func:`create_monai_vit` builds it, its weights read from a local checkpoint in MONAI's state-dict layout (a MONAI
Model Zoo or self-supervised pre-training checkpoint, ``.pt``/``.pth``/``.safetensors``), position embeddings
resampled to the input grid. There is no hub for 3D ViT weights: ``pretrained=True`` is an error that says so,
``pretrained=False`` gives random weights with a loud warning (FPT then has nothing to transfer). The 3D presets
(:class:`~fpt_monai.presets.MonaiViTPreset`) put it behind :class:`~fpt_monai.networks.MonaiViTBackbone`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch.nn as nn
from monai.networks.nets import ViT
from monai.utils import ensure_tuple_rep

from fpt_monai.weights.files import PretrainedWeightsError, load_state_dict_file, warn_random_weights
from fpt_monai.weights.position import load_monai_vit_weights

__all__ = ["create_monai_vit"]

logger = logging.getLogger(__name__)

_HEAD_PREFIX = "classification_head."


def create_monai_vit(
    img_size: Sequence[int] | int,
    patch_size: Sequence[int] | int,
    pretrained: bool | str | os.PathLike = False,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_layers: int = 12,
    num_heads: int = 12,
    in_channels: int = 1,
    spatial_dims: int = 3,
    qkv_bias: bool = False,
    classification: bool = True,
    checkpoint_grid: Sequence[int] | None = None,
) -> nn.Module:
    """A MONAI ``ViT`` for use as a frozen FPT backbone, with weights from a local file.

    The model has no classification head (FPT never uses it; a checkpoint's head is dropped). Whether it has a
    class token follows the checkpoint when weights are loaded (``classification`` is then only a default):
    MONAI's segmentation ViTs (UNETR) have none, its classification ViTs have one.

    Args:
        img_size: high-resolution input size, an int or one per spatial dim.
        patch_size: patch size, an int or one per spatial dim.
        pretrained: path of a checkpoint in MONAI ViT layout (``patch_embedding.*``, ``blocks.N.*``, ``norm.*``;
            wrappers like ``{"state_dict": ...}`` and a ``module.`` prefix are removed); ``False`` for random
            weights (warned about); ``True`` is an error: no 3D ViT weights can be downloaded by name.
        hidden_size, mlp_dim, num_layers, num_heads, in_channels, spatial_dims, qkv_bias: the MONAI ViT's
            architecture (ViT-B: 768, 3072, 12, 12; ``qkv_bias=False`` is MONAI's default).
        classification: give the model a class token (random weights only; see above).
        checkpoint_grid: the checkpoint's patch grid when it is not a cube (see
            :func:`~fpt_monai.weights.load_monai_vit_weights`).

    Raises:
        PretrainedWeightsError: ``pretrained=True``, or the checkpoint cannot be read or does not fit the
            architecture (the message names the file and the mismatching keys).
        TypeError: ``pretrained`` is neither a bool nor a path.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    img_size = ensure_tuple_rep(img_size, spatial_dims)
    patch_size = ensure_tuple_rep(patch_size, spatial_dims)
    if any(i % p for i, p in zip(img_size, patch_size)):
        raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}.")
    if pretrained is True:
        raise PretrainedWeightsError(
            "There are no downloadable weights for a MONAI ViT backbone: pass pretrained='/path/to/monai_vit.pt' "
            "(a local .pt/.pth/.safetensors state dict in MONAI ViT layout, e.g. a MONAI Model Zoo or "
            "self-supervised pre-training checkpoint; position embeddings are resampled to the input grid), or "
            "pretrained=False for random weights (tests only: a random frozen backbone has nothing to transfer)."
        )
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(
            f"`pretrained` must be False or a checkpoint path, got {type(pretrained).__name__}: {pretrained!r}."
        )
    state: dict[str, Any] | None = None
    if pretrained is not False:
        state = load_state_dict_file(pretrained)
        head = [k for k in state if k.startswith(_HEAD_PREFIX)]
        for key in head:
            del state[key]
        if head:
            logger.info("Dropped the checkpoint's classification head (%d tensors): FPT never uses it.", len(head))
        has_class_token = "cls_token" in state
        if has_class_token != classification:
            logger.info(
                "Building the MONAI ViT %s a class token, as the checkpoint %s.",
                "with" if has_class_token else "without",
                pretrained,
            )
        classification = has_class_token
    model = ViT(
        in_channels=in_channels,
        img_size=img_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        classification=classification,
        spatial_dims=spatial_dims,
        qkv_bias=qkv_bias,
    )
    if classification:
        # the class token stays (it is a token of the sequence), the head goes: no frozen weights that never run
        model.classification_head = nn.Identity()
    if state is None:
        warn_random_weights(
            f"MONAI ViT ({spatial_dims}D, {hidden_size} wide, {num_layers} blocks): the frozen backbone has RANDOM "
            "weights (pretrained=False). Its features are random, so Fine-grained Prompt Tuning (which keeps the "
            "backbone frozen) has little or nothing to transfer. Use this only for tests and pipeline checks; for "
            "real training pass pretrained='/path/to/monai_vit.pt' (a MONAI ViT state dict, e.g. from the MONAI "
            "Model Zoo or self-supervised pre-training)."
        )
        return model
    grid = tuple(i // p for i, p in zip(img_size, patch_size))
    try:
        load_monai_vit_weights(model, pretrained, grid=grid, checkpoint_grid=checkpoint_grid, state_dict=state)
    except PretrainedWeightsError as err:
        raise PretrainedWeightsError(
            f"{err} The MONAI ViT was built with hidden_size={hidden_size}, mlp_dim={mlp_dim}, "
            f"num_layers={num_layers}, num_heads={num_heads}, in_channels={in_channels}, patch_size={patch_size}, "
            f"qkv_bias={qkv_bias}: set the preset's fields to the checkpoint's architecture."
        ) from err
    return model
