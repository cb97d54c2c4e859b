"""The lightweight, trainable side ViT of FPT/FPT+ (Huang et al., MICCAI 2024; IEEE TNNLS 2025).

It sees the image at low resolution (224 for FPT, 128 for FPT+) and receives, at each block, fine-grained
prompts that carry what the frozen high-resolution backbone saw. Its shape is derived from the backbone:
width = backbone width / reduction (768 / 8 = 96), the backbone's head count, one block per extracted
backbone block, the backbone's patch size, MLP ratio 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from monai.networks.layers import Conv
from monai.utils import ensure_tuple_rep
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

__all__ = ["ActivationRecomputingAttention", "ActivationRecomputingMlp", "SideViT"]


def _recomputes(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.jit.is_scripting()


class ActivationRecomputingMlp(Mlp):
    """timm's ``Mlp`` (same parameters and state dict) that keeps only its hidden pre-activation for backward.

    A plain MLP keeps both ``fc1``'s output (for the GELU's backward) and the GELU's output (for ``fc2``'s weight
    gradient). In training the GELU and ``fc2`` run under non-reentrant ``torch.utils.checkpoint``, so the GELU is
    recomputed during backward: one elementwise op buys back a quarter of the side ViT's saved activations other
    than attention (63 MB at batch 16 for the ``fpt`` preset). Inference and tracing run the plain path.
    """

    def _activate_and_project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.drop1(self.act(hidden))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if _recomputes(self):
            return self.drop2(checkpoint(self._activate_and_project, hidden, use_reentrant=False))
        return self.drop2(self._activate_and_project(hidden))


class ActivationRecomputingAttention(Attention):
    """timm's ``Attention`` (same parameters and state dict) that, with eager attention, keeps only its input.

    Eager attention keeps every (B, heads, N, N) softmax matrix for backward: with the side ViT's 12 heads of
    width 8 they are most of its saved activations (35 MB per block at batch 16 and 213 tokens, far more than
    the 1.3 MB of tokens). In training with ``fused_attn=False`` the whole attention runs under non-reentrant
    ``torch.utils.checkpoint`` and is recomputed in backward; fused attention (PyTorch's SDPA, the default)
    stores no such matrix and runs the plain path, as do inference and tracing.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.fused_attn or not _recomputes(self):
            return super().forward(x, attn_mask, is_causal)
        return checkpoint(super().forward, x, attn_mask, is_causal, use_reentrant=False)


class SideViT(nn.Module):
    """A plain pre-norm ViT classifier (2D or 3D) whose blocks can take extra prompt tokens.

    Tokens are ``[CLS, patches]`` with a learned position embedding over all of them. When ``block_prompts``
    are given, block i sees ``[CLS, patches, prompts_i]`` (prompts carry no position embedding) and the
    prompt outputs are dropped after the block, as FPT's prompt injection prescribes. The head is a linear
    layer on the final-LayerNorm'd CLS token.

    Parameters are initialised with truncated normal (std 0.02) weights, zero biases and LayerNorm 1/0.

    Args:
        img_size: low-resolution input size, an int or one per spatial dim.
        patch_size: patch size, an int or one per spatial dim.
        in_channels: image channels.
        embed_dim: token width (must be divisible by ``num_heads``).
        depth: number of blocks.
        num_heads: attention heads per block.
        num_classes: output logits; 0 returns the CLS features.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        spatial_dims: 2 for images, 3 for volumes.
        drop_path_rate: stochastic depth rate, linearly increasing over blocks.
    """

    def __init__(
        self,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        in_channels: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        mlp_ratio: float = 4.0,
        spatial_dims: int = 2,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.img_size = ensure_tuple_rep(img_size, spatial_dims)
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        for size, patch in zip(self.img_size, self.patch_size):
            if size % patch:
                raise ValueError(f"side img_size {self.img_size} is not divisible by patch_size {self.patch_size}.")
        if embed_dim < 1 or depth < 1 or num_heads < 1:
            raise ValueError(f"embed_dim, depth and num_heads must be positive, got {embed_dim}, {depth}, {num_heads}.")
        if embed_dim % num_heads:
            raise ValueError(f"side embed_dim {embed_dim} must be divisible by num_heads {num_heads}.")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        num_patches = math.prod(s // p for s, p in zip(self.img_size, self.patch_size))

        self.patch_embed = Conv[Conv.CONV, spatial_dims](
            in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # the ViT convention (timm, original JAX ViT)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=rate,
                norm_layer=norm_layer,
                attn_layer=ActivationRecomputingAttention,
                mlp_layer=ActivationRecomputingMlp,
            )
            for rate in rates
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) weights and tokens, zero biases, LayerNorm weight 1 and bias 0."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor, block_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> final-normed tokens ``[CLS, patches]`` of shape (B, 1 + num_patches, embed_dim).

        Args:
            x: (B, in_channels, *img_size) low-resolution images.
            block_prompts: optional (B, depth, P, embed_dim) prompts; block i gets ``block_prompts[:, i]``.
        """
        expected = (self.in_channels, *self.img_size)
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"the side network expects (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}.")
        if block_prompts is not None and (
            block_prompts.ndim != 4
            or block_prompts.shape[0] != x.shape[0]
            or block_prompts.shape[1] != self.depth
            or block_prompts.shape[2] < 1
            or block_prompts.shape[3] != self.embed_dim
        ):
            raise ValueError(
                f"block_prompts must have shape ({x.shape[0]}, {self.depth}, P, {self.embed_dim}), "
                f"got {tuple(block_prompts.shape)}."
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for index, block in enumerate(self.blocks):
            if block_prompts is None:
                x = block(x)
            else:
                num_prompts = block_prompts.shape[2]
                x = block(torch.cat((x, block_prompts[:, index]), dim=1))[:, :-num_prompts]
        return self.norm(x)

    def forward(self, x: torch.Tensor, block_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Images (and optional per-block prompts) -> logits (B, num_classes) from the CLS token."""
        return self.head(self.forward_features(x, block_prompts)[:, 0])
