"""Every use of another library's private API in fpt_monai, each checked against the library when it is used.

The package uses no other private names. Each entry says why there is no public way, and raises a
``RuntimeError`` naming the library and its version when the private name is gone, instead of failing somewhere
deeper or silently doing something else. ``tests/engine/test_compat.py`` runs every entry against the installed
libraries, so an upgrade that changes one fails there first.
"""

from __future__ import annotations

from typing import Any

import monai
import timm
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["checkpoint_saver_checkpoints", "ddp_ignore", "timm_vit_tokens"]


def _private(owner: Any, name: str, library: str, version: str) -> Any:
    """``getattr(owner, name)``, or a ``RuntimeError`` saying which library version no longer has it."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise RuntimeError(
            f"{library} {version} has no `{getattr(owner, '__name__', type(owner).__name__)}.{name}`, which "
            "fpt_monai relies on (see fpt_monai/_compat.py): this version of the library is not supported."
        ) from None


def ddp_ignore(module: nn.Module, names: list[str]) -> None:
    """Have ``DistributedDataParallel(module)`` leave the parameters and buffers ``names`` alone.

    Neither broadcast at construction nor kept in step: the frozen backbone (88 M values for ViT-B) is built
    identically on every rank, and its digests are compared instead. PyTorch has no public API for this yet
    (pytorch/pytorch#43690); this is the static method DDP documents as the workaround.
    """
    _private(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", "torch", torch.__version__)(
        module, names
    )


def timm_vit_tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The tokens a timm ``VisionTransformer`` feeds its first block: patch embedding, prefix tokens and position
    embedding added (``_pos_embed``, which has no public counterpart short of running every block), ``norm_pre``.
    """
    pos_embed = _private(model, "_pos_embed", "timm", timm.__version__)
    return model.norm_pre(model.patch_drop(pos_embed(model.patch_embed(images))))


def checkpoint_saver_checkpoints(saver: Any) -> dict[str, Any]:
    """The ignite ``Checkpoint`` objects inside a MONAI ``CheckpointSaver``: ``final``, ``key_metric``, ``interval``
    (``None`` where that kind of checkpoint is off). MONAI keeps them private; their save handler is replaced to
    write atomically, and the key-metric one holds the best-checkpoint bookkeeping a resumed run needs.
    """
    return {
        kind: _private(saver, f"_{kind}_checkpoint", "MONAI", monai.__version__)
        for kind in ("final", "key_metric", "interval")
    }
