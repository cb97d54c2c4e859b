"""Absolute position embeddings resampled to another patch grid (1D, 2D, 3D), and MONAI ViT checkpoints."""

from __future__ import annotations

import logging
import math
import operator
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from fpt_monai.weights.files import PretrainedWeightsError, _as_path, _format_keys, _load_checked, load_state_dict_file

__all__ = ["RESAMPLING_METHODS", "resample_position_embedding", "load_monai_vit_weights"]

logger = logging.getLogger(__name__)

_MONAI_POS_EMBED_KEY = "patch_embedding.position_embeddings"


def _check_grid(grid: Any, name: str) -> tuple[int, ...]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not 1 <= len(grid) <= 3:
        raise ValueError(f"`{name}` must be a sequence of 1 to 3 positive ints, got {grid!r}.")
    try:
        checked = tuple(operator.index(g) for g in grid if not isinstance(g, bool))
    except TypeError:
        checked = ()
    if len(checked) != len(grid) or any(g <= 0 for g in checked):
        raise ValueError(f"`{name}` must be a sequence of 1 to 3 positive ints, got {grid!r}.")
    return checked


def _infer_cube_grid(num_tokens: int, ndim: int) -> tuple[int, ...]:
    """Returns ``(s,) * ndim`` with ``s ** ndim == num_tokens``, or raises ValueError."""
    side = round(num_tokens ** (1.0 / ndim))
    for s in (side - 1, side, side + 1):
        if s > 0 and s**ndim == num_tokens:
            return (s,) * ndim
    shape = {1: "line", 2: "square", 3: "cube"}[ndim]
    raise ValueError(
        f"Cannot infer the {ndim}D grid of a position embedding with {num_tokens} patch tokens: {num_tokens} is not "
        f"a perfect {shape}; pass the grid explicitly."
    )


#: How 2D grids are resampled: ``"timm"`` (antialiased bicubic to exactly the new grid, timm's) or ``"authors"``
#: (plain bicubic with the scale factor ``(new + 0.1) / old``, the FPT authors' code after the older Hugging Face
#: ``interpolate_pos_encoding``).
RESAMPLING_METHODS = ("timm", "authors")


def resample_position_embedding(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Sequence[int] | None = None,
    num_prefix_tokens: int = 0,
    method: str = "timm",
) -> torch.Tensor:
    """Resamples an absolute position embedding to another patch grid, in 1, 2 or 3 spatial dimensions.

    timm's :func:`~timm.layers.resample_abs_pos_embed` only handles 2D grids, whereas MONAI ViTs are often 3D.
    2D grids are delegated to timm (bicubic); 3D grids use trilinear and 1D linear interpolation. Prefix tokens
    (class / register tokens) are kept as they are. Patch tokens are assumed in row-major grid order, as produced
    by flattening a convolutional patch embedding.

    Args:
        pos_embed: tensor of shape ``(1, num_prefix_tokens + prod(old_grid), C)``.
        new_grid: target patch grid, e.g. ``(4, 4, 4)``.
        old_grid: grid of ``pos_embed``; inferred as a square / cube with ``len(new_grid)`` dims when None.
        num_prefix_tokens: number of leading non-spatial tokens.
        method: for 2D grids, one of :data:`RESAMPLING_METHODS`. The two differ by up to a few percent of the
            embedding's scale (the authors' samples the old grid at positions stretched by ``0.1 / new``).

    Returns:
        A tensor of shape ``(1, num_prefix_tokens + prod(new_grid), C)`` with the dtype of ``pos_embed``
        (``pos_embed`` itself when the grids are equal).

    Raises:
        ValueError: for a badly shaped ``pos_embed``, inconsistent grids, or a grid that cannot be inferred.
    """
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        shape = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
        raise ValueError(f"`pos_embed` must be a tensor of shape (1, tokens, channels), got {shape}.")
    new_grid = _check_grid(new_grid, "new_grid")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"`num_prefix_tokens` must be a non-negative int, got {num_prefix_tokens!r}.")
    num_tokens = pos_embed.shape[1] - num_prefix_tokens
    if num_tokens <= 0:
        raise ValueError(
            f"`pos_embed` has {pos_embed.shape[1]} tokens, not more than num_prefix_tokens={num_prefix_tokens}."
        )
    if old_grid is None:
        old_grid = _infer_cube_grid(num_tokens, len(new_grid))
    else:
        old_grid = _check_grid(old_grid, "old_grid")
        if len(old_grid) != len(new_grid):
            raise ValueError(f"`old_grid` {old_grid} and `new_grid` {new_grid} have different numbers of dimensions.")
        if math.prod(old_grid) != num_tokens:
            raise ValueError(
                f"`old_grid` {old_grid} has {math.prod(old_grid)} cells but `pos_embed` has {num_tokens} patch tokens "
                f"(after {num_prefix_tokens} prefix token(s))."
            )
    if old_grid == new_grid:
        return pos_embed
    if method not in RESAMPLING_METHODS:
        raise ValueError(f"`method` must be one of {RESAMPLING_METHODS}, got {method!r}.")
    if len(new_grid) == 2 and method == "authors":
        prefix, tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
        grid = tokens.to(torch.float64).reshape(1, *old_grid, -1).movedim(-1, 1)
        scale = tuple((new + 0.1) / old for new, old in zip(new_grid, old_grid))
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        if tuple(grid.shape[-2:]) != new_grid:
            raise ValueError(f"the authors' resampling gives the grid {tuple(grid.shape[-2:])}, not {new_grid}.")
        tokens = grid.movedim(1, -1).reshape(1, -1, pos_embed.shape[-1]).to(pos_embed.dtype)
        return torch.cat([prefix, tokens], dim=1)
    if len(new_grid) == 2:
        return resample_abs_pos_embed(
            pos_embed,
            new_size=list(new_grid),
            old_size=list(old_grid),
            num_prefix_tokens=num_prefix_tokens,
            interpolation="bicubic",
            antialias=True,
        )
    prefix, tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    channels = tokens.shape[-1]
    grid = tokens.float().reshape(1, *old_grid, channels).movedim(-1, 1)
    mode = "trilinear" if len(new_grid) == 3 else "linear"
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    tokens = grid.movedim(1, -1).reshape(1, -1, channels).to(pos_embed.dtype)
    logger.info("Resampled position embedding from grid %s to %s.", old_grid, new_grid)
    return torch.cat([prefix, tokens], dim=1)


def _monai_patch_grid(block: nn.Module, grid: Sequence[int] | None, spatial_dims: int | None) -> tuple[int, ...]:
    """Returns the patch grid of a MONAI PatchEmbeddingBlock (given, or inferred as a square/cube)."""
    n_patches = int(block.position_embeddings.shape[1])
    if grid is not None:
        grid = _check_grid(grid, "grid")
        if math.prod(grid) != n_patches:
            raise ValueError(f"`grid` {grid} has {math.prod(grid)} cells but the model has {n_patches} patches.")
        return grid
    if spatial_dims is None:
        raise ValueError(
            "Cannot tell the number of spatial dimensions of the model's patch embedding (it is not a convolution); "
            "pass `grid` (img_size // patch_size per dimension)."
        )
    try:
        return _infer_cube_grid(n_patches, spatial_dims)
    except ValueError as err:
        raise ValueError(
            f"The model's patch grid is not a {spatial_dims}D cube ({n_patches} patches); pass "
            f"`grid=tuple(i // p for i, p in zip(img_size, patch_size))`."
        ) from err


def load_monai_vit_weights(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    *,
    grid: Sequence[int] | None = None,
    checkpoint_grid: Sequence[int] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Loads a MONAI-layout ViT checkpoint into a :class:`monai.networks.nets.ViT`, resampling position embeddings.

    Suitable for MONAI Model Zoo and self-supervised pre-training checkpoints (wrappers such as
    ``{"state_dict": ...}`` are removed by :func:`load_state_dict_file`). ``classification_head.*`` and
    ``cls_token`` are dropped when the model has none. ``patch_embedding.position_embeddings`` (no prefix tokens)
    is resampled (trilinear in 3D, bicubic in 2D) from the checkpoint grid to the model grid; fixed ``sincos``
    embeddings are instead kept as the model computed them.

    Args:
        model: a MONAI ``ViT`` (any module with a MONAI ``PatchEmbeddingBlock`` as ``patch_embedding`` and the same
            key layout works).
        path: checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).
        strict: if True, missing or unexpected keys are errors; otherwise they are logged. Shape mismatches are
            always errors.
        grid: the model's patch grid (``img_size // patch_size`` per dim). Inferred as a square / cube (with the
            dimensionality of the patch-embedding convolution) when None, which is only needed when resampling.
        checkpoint_grid: the checkpoint's patch grid; inferred as a square / cube when None.
        state_dict: the content of ``path`` when the caller has already read it with :func:`load_state_dict_file`
            (e.g. to build the model to match it); ``path`` then only names the checkpoint in messages.

    Raises:
        TypeError: if ``model`` has no MONAI patch embedding.
        FileNotFoundError: if the checkpoint does not exist.
        ValueError: if the model grid cannot be inferred.
        PretrainedWeightsError: if the checkpoint cannot be read, its grid cannot be inferred, or it does not match
            the model (the message names the file and the keys).
    """
    block = getattr(model, "patch_embedding", None)
    model_pos = getattr(block, "position_embeddings", None)
    if not isinstance(model, nn.Module) or not isinstance(model_pos, torch.Tensor):
        raise TypeError(
            f"`model` must be a MONAI ViT with a PatchEmbeddingBlock as `patch_embedding`, got {type(model).__name__}."
        )
    path = _as_path(path)
    state_dict = load_state_dict_file(path) if state_dict is None else dict(state_dict)

    dropped = []
    if not hasattr(model, "classification_head"):
        dropped += [k for k in state_dict if k.startswith("classification_head.")]
    if not hasattr(model, "cls_token"):
        dropped += [k for k in state_dict if k == "cls_token"]
    for k in dropped:
        del state_dict[k]
    if dropped:
        logger.info("Dropped %s from %s (the model has no classification head).", _format_keys(dropped), path)

    ckpt_pos = state_dict.get(_MONAI_POS_EMBED_KEY)
    if ckpt_pos is not None and tuple(ckpt_pos.shape) != tuple(model_pos.shape):
        if getattr(block, "pos_embed_type", "learnable") == "sincos":
            logger.info("Using the model's own fixed sincos position embedding instead of the one in %s.", path)
            state_dict[_MONAI_POS_EMBED_KEY] = model_pos.detach().clone()
        else:
            if ckpt_pos.ndim != 3 or ckpt_pos.shape[0] != 1 or ckpt_pos.shape[-1] != model_pos.shape[-1]:
                raise PretrainedWeightsError(
                    f"Checkpoint '{path}' does not match the model: {_MONAI_POS_EMBED_KEY} has shape "
                    f"{tuple(ckpt_pos.shape)}, the model's is {tuple(model_pos.shape)} (different hidden size?)."
                )
            proj = getattr(block, "patch_embeddings", None)
            spatial_dims = len(proj.kernel_size) if isinstance(proj, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None
            if spatial_dims is None and grid is not None:
                spatial_dims = len(grid)
            if spatial_dims is None and checkpoint_grid is not None:
                spatial_dims = len(checkpoint_grid)
            new_grid = _monai_patch_grid(block, grid, spatial_dims)
            try:
                state_dict[_MONAI_POS_EMBED_KEY] = resample_position_embedding(
                    ckpt_pos, new_grid, old_grid=checkpoint_grid, num_prefix_tokens=0
                )
            except ValueError as err:
                raise PretrainedWeightsError(
                    f"Could not resample {_MONAI_POS_EMBED_KEY} of checkpoint '{path}' to the model grid {new_grid}: "
                    f"{err} (pass `checkpoint_grid`)."
                ) from err
    _load_checked(model, state_dict, path, strict=strict)
    logger.info("Loaded MONAI ViT weights from %s.", path)
