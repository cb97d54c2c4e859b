"""What every frozen FPT backbone provides: :class:`FrozenBackbone` and its :class:`BackboneShape`.

FPT (Huang et al., MICCAI 2024) and FPT+ (Huang et al., IEEE TNNLS 2025) never train the large pre-trained
model. The trainable parts (side ViT, prompts, fusion) need from it only, per image, the keys and values of the
most important tokens of chosen blocks, and its shape. :class:`FrozenBackbone` names that contract; the ViTs
(:mod:`~fpt_monai.networks.backbones.vit`) and the CNN extension (:mod:`~fpt_monai.networks.backbones.cnn`)
implement it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from fpt_monai.networks.selection import num_selected_tokens, selection_frequency
from fpt_monai.utils import state_dict_sha256

__all__ = ["BackboneShape", "FrozenBackbone", "state_dict_sha256"]


@dataclass(frozen=True)
class BackboneShape:
    """Everything the trainable FPT parts need to know about a frozen backbone (no weights).

    A network built from a shape alone can train on preloaded keys/values without the backbone resident.

    Attributes:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: image channels the backbone takes.
        img_size: high-resolution input size, one entry per spatial dim.
        patch_size: patch size, one entry per spatial dim.
        embed_dim: backbone width (768 for ViT-B).
        num_heads: attention heads per block (12 for ViT-B).
        head_dim: width of one head (64 for ViT-B).
        num_tokens: sequence length N, prefix (class) tokens included (1025 for ViT-B/16 at 512).
        blocks: indices of the extracted backbone blocks, in order.
        token_ratio: fraction of the N tokens kept per block and head.
    """

    spatial_dims: int
    in_channels: int
    img_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    embed_dim: int
    num_heads: int
    head_dim: int
    num_tokens: int
    blocks: tuple[int, ...]
    token_ratio: float

    @property
    def grid(self) -> tuple[int, ...]:
        """Patch tokens per spatial dim: ``img_size // patch_size``."""
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))

    @property
    def num_selected_tokens(self) -> int:
        """Tokens kept per block and head: ``int(num_tokens * token_ratio)``."""
        return num_selected_tokens(self.num_tokens, self.token_ratio)

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of the selected keys/values of one image: (blocks, 2, heads, selected tokens, head dim)."""
        return (len(self.blocks), 2, self.num_heads, self.num_selected_tokens, self.head_dim)


class FrozenBackbone(nn.Module):
    """A frozen pre-trained network that returns the selected keys/values of its extracted blocks.

    The contract FPT relies on, whatever the architecture:

    - :attr:`shape`: a :class:`BackboneShape` (input size, width, heads, tokens, extracted blocks);
    - ``forward(images)``: (B, in_channels, *img_size) -> keys/values (B, L, 2, H, k, D), under no-grad;
    - ``forward_with_features(images)``: the same keys/values plus the backbone's own final features;
    - :meth:`selection_map`: which patches the selection kept, per image (for display; not used in training);
    - :meth:`weights_digest`: SHA-256 of the frozen weights, naming them in checkpoints and caches;
    - ``mean`` / ``std``: the per-channel input normalisation the weights were trained with (images scaled to
      [0, 1], then ``(x - mean) / std``), tuples of floats set by each implementation.

    The wrapped model is put in eval mode and its parameters get ``requires_grad=False``; ``train()`` cannot
    switch it back to training mode.

    Args:
        model: the pre-trained network (already at the high input resolution).
        blocks_in_order: the model's blocks, in order; ``blocks`` indexes them.
        blocks: indices of the blocks whose keys/values are extracted; ``None`` extracts all of them.
        token_ratio: fraction of tokens kept per block and head (0.2 in the papers).
    """

    shape: BackboneShape

    def __init__(
        self, model: nn.Module, blocks_in_order: Sequence[nn.Module], blocks: Sequence[int] | None, token_ratio
    ) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        depth = len(blocks_in_order)
        blocks = tuple(range(depth)) if blocks is None else tuple(int(b) for b in blocks)
        if not blocks:
            raise ValueError("blocks must name at least one backbone block to extract.")
        if any(b < 0 or b >= depth for b in blocks):
            raise ValueError(f"blocks {blocks} out of range for a backbone with {depth} blocks (0..{depth - 1}).")
        if list(blocks) != sorted(set(blocks)):
            raise ValueError(f"blocks must be strictly increasing without repeats, got {blocks}.")
        if not 0.0 < token_ratio <= 1.0:
            raise ValueError(f"token_ratio must be in (0, 1], got {token_ratio}.")
        self._blocks = list(blocks_in_order)
        self.extracted_blocks = blocks
        self.token_ratio = float(token_ratio)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        """The backbone stays in eval mode whatever ``mode`` is (it is frozen: no dropout, no drop-path)."""
        return super().train(False)

    def _set_shape(self, **fields) -> None:
        self.shape = BackboneShape(blocks=self.extracted_blocks, token_ratio=self.token_ratio, **fields)
        self.shape.num_selected_tokens  # raises when the ratio keeps no token of this sequence

    @property
    def depth(self) -> int:
        """Number of blocks in the backbone."""
        return len(self._blocks)

    def weights_digest(self) -> str:
        """SHA-256 of the backbone's state dict (names, dtypes, shapes and bytes of every tensor, in order).

        It identifies the frozen weights in cache fingerprints and checkpoints. Hashing ViT-B's 86 M values takes a noticeable
        fraction of a second, so the value is kept until a tensor is replaced or modified in place (tracked by storage and version).
        """
        state = self.state_dict(keep_vars=True)
        key = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in state.items())
        cached = getattr(self, "_weights_digest_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._weights_digest_cache = (key, state_dict_sha256(state))
        return self._weights_digest_cache[1]

    def check_input(self, images: torch.Tensor) -> None:
        """Raise a clear error when ``images`` is not (B, in_channels, *img_size)."""
        expected = (self.shape.in_channels, *self.shape.img_size)
        if images.ndim != self.shape.spatial_dims + 2 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"the frozen backbone expects images of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(images.shape)}; resize the high-resolution view to {self.shape.img_size}."
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Selected keys/values (B, L, 2, H, k, D) of the L extracted blocks: the keys (index 0) and values
        (index 1) of the k most important tokens of each of the H heads. Blocks after the last extracted one
        are not run."""
        raise NotImplementedError

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected keys/values as :meth:`forward`, plus the backbone's own final features."""
        raise NotImplementedError

    def selected_token_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Indices (B, L, H, k) of the tokens :meth:`forward` keeps, per extracted block and head.

        Implementations return what their forward's own selection picked (the same walk through the blocks and
        the same :func:`~fpt_monai.networks.selection.select_important_tokens` call), under no-grad.
        """
        raise NotImplementedError

    @torch.no_grad()
    def selection_map(self, images: torch.Tensor) -> torch.Tensor:
        """Which high-resolution patches the token selection kept: one map per image, on the patch grid.

        The value of a patch is the fraction of the (extracted block, head) pairs whose selection kept its token
        (1: kept by every block and head, 0: by none). Prefix tokens (class token, the CNN adapter's mean token)
        have no patch and are left out. It costs one pass of the backbone up to its last extracted block.

        Args:
            images: (B, in_channels, *img_size), normalised as for :meth:`forward`.

        Returns:
            Float tensor (B, *grid) in [0, 1], ``grid = img_size // patch_size`` per spatial dim.
        """
        indices = self.selected_token_indices(images)
        grid = self.shape.grid
        frequency = selection_frequency(indices, self.shape.num_tokens)
        patches = math.prod(grid)
        # prefix tokens come first in every implementation's sequence, patch tokens follow in row-major order
        return frequency[:, self.shape.num_tokens - patches :].reshape(frequency.shape[0], *grid)
