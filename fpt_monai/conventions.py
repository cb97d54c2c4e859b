"""The FPT authors' numerical conventions, on request (``create_fpt(..., conventions="authors")``).

Checked against the authors' code in float64 with the same weights, the network computes the same logits and
gradients to round-off. Three conventions differ, and a user who wants the papers' numbers can choose theirs:

- the frozen ViT's position embedding resampled from its pre-training grid (24x24 for ViT-B/16 at 384) to the
  input's (32x32 at 512): the authors use plain bicubic with the scale factor ``(new + 0.1) / old`` (the older
  Hugging Face ``interpolate_pos_encoding``); the default is timm's antialiased bicubic to exactly the new grid.
  Alone, this changes about 2.5% of the selected tokens and end-to-end logits by about 0.013;
- the fusion's Linear layers: PyTorch's default initialisation in the authors' code; the default here is a
  truncated normal (std 0.02) with zero biases, the ViT convention;
- LayerNorm eps: 1e-12 (the Hugging Face ViT config) in the authors' code, against 1e-6 (timm, the original JAX
  ViT) here, in the frozen backbone, the side network and the fusion.

With ``"authors"``, the bundle also normalises the input with the data set's statistics (as with ``mean``/``std``
``"dataset"``; see :class:`~fpt_monai.data.InputNormalization`). The defaults stay as they are: the timm
resampling is the antialiased one timm applies to every checkpoint, and the ViT conventions are those the backbone
was pre-trained with.
"""

from __future__ import annotations

import logging
import math
import os

import timm
import torch
import torch.nn as nn

from fpt_monai.weights import create_timm_vit, load_state_dict_file, resample_position_embedding

__all__ = ["AUTHORS_LAYER_NORM_EPS", "CONVENTIONS", "apply_conventions", "pretraining_position_embedding"]

logger = logging.getLogger(__name__)

#: The numerical conventions a network can be built with.
CONVENTIONS = ("default", "authors")
#: LayerNorm eps of the authors' code (the Hugging Face ViT config).
AUTHORS_LAYER_NORM_EPS = 1e-12


def pretraining_position_embedding(model_name: str, pretrained: bool | str | os.PathLike) -> torch.Tensor | None:
    """The position embedding of a timm ViT's weights on their pre-training grid (``None`` without weights).

    ``pretrained`` is a local weights file (timm or Hugging Face layout) or ``True`` (the timm hub).
    """
    if pretrained is False:
        return None
    if pretrained is True:
        size = timm.models.get_pretrained_cfg(model_name).input_size[-2:]
    else:
        found = [
            t for k, t in load_state_dict_file(pretrained).items() if k.endswith(("pos_embed", "position_embeddings"))
        ]
        if len(found) != 1:
            raise ValueError(f"{pretrained}: expected one position embedding, found {len(found)}.")
        patch = timm.create_model(model_name, pretrained=False, num_classes=0).patch_embed.patch_size[0]
        prefix = 1  # the class token of the supported ViTs
        side = math.isqrt(found[0].shape[-2] - prefix)
        size = (side * patch, side * patch)
    model = create_timm_vit(model_name, img_size=tuple(size), pretrained=pretrained)
    return model.pos_embed.detach()


def apply_conventions(
    network: nn.Module, conventions: str, model_name: str | None = None, pretrained: bool | str | os.PathLike = False
) -> nn.Module:
    """Give a built FPT network the ``conventions`` (one of :data:`CONVENTIONS`; see the module docstring).

    ``"default"`` changes nothing. ``"authors"`` sets every LayerNorm's eps to :data:`AUTHORS_LAYER_NORM_EPS`,
    re-initialises the fusion's Linear layers with PyTorch's default, and, for a timm ViT backbone with pretrained
    weights (``model_name``, ``pretrained``), resamples its position embedding from the pre-training grid the
    authors' way.
    """
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}.")
    if conventions == "default":
        return network
    for module in network.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = AUTHORS_LAYER_NORM_EPS
    fusion = getattr(network, "fusion", None)
    if fusion is not None:
        for module in fusion.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    model = getattr(getattr(network, "backbone", None), "model", None)
    pos_embed = getattr(model, "pos_embed", None)
    if model_name is not None and isinstance(pos_embed, nn.Parameter):
        original = pretraining_position_embedding(model_name, pretrained)
        if original is not None:
            prefix = pos_embed.shape[1] - math.prod(model.patch_embed.grid_size)
            old = math.isqrt(original.shape[1] - prefix)
            resampled = resample_position_embedding(
                original, tuple(model.patch_embed.grid_size), (old, old), prefix, method="authors"
            )
            with torch.no_grad():
                pos_embed.copy_(resampled.to(pos_embed.dtype))
    logger.info("the authors' numerical conventions: LayerNorm eps 1e-12, fusion init, position-embedding resampling.")
    return network
