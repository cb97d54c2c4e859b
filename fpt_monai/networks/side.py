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
import torch.nn.functional as F
from monai.networks.layers import Conv
from monai.utils import ensure_tuple_rep
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block

from fpt_monai.networks.cpu_kernels import (
    KernelSwitch,
    builds_graph,
    gelu_linear,
    narrow_head_attention,
    use_cpu_kernels,
)

__all__ = ["ActivationRecomputingMlp", "SideAttention", "SideBlock", "SideViT"]


class ActivationRecomputingMlp(KernelSwitch, Mlp):
    """timm's ``Mlp`` (same parameters and state dict) that can keep only its hidden pre-activation for backward.

    A plain MLP keeps both ``fc1``'s output (for the GELU's backward) and the GELU's output (for ``fc2``'s weight
    gradient). Where the ``kernels`` switch selects the CPU kernels (:mod:`~fpt_monai.networks.cpu_kernels`) and
    ``recompute`` is set, the GELU and ``fc2`` run as :class:`~fpt_monai.networks.cpu_kernels.GeluLinear`, which
    recomputes the GELU during backward: one elementwise op buys back a quarter of the side ViT's saved activations
    other than attention. Otherwise (the reference path) it is timm's ``Mlp``.
    """

    recompute: bool = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.act, nn.GELU) or not isinstance(self.norm, nn.Identity) or self.drop1.p:
            raise ValueError("the side ViT's MLP is fc1, GELU, fc2 (no hidden norm or dropout).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.recompute and use_cpu_kernels(self.kernels, hidden, builds_graph(self)):
            return self.drop2(gelu_linear(hidden, self.fc2, self.act.approximate))
        return self.drop2(self.fc2(self.act(hidden)))


class SideAttention(KernelSwitch, Attention):
    """timm's ``Attention`` (same parameters and state dict) whose queries can be the first tokens only.

    Prompt tokens are appended to a side block only to be attended to: their own outputs are dropped after the block.
    ``forward(x, num_queries)`` computes keys and values of all tokens but queries, outputs and the projection of
    the first ``num_queries`` only, which is exactly what the kept tokens receive.

    The reference path is timm's: ``F.scaled_dot_product_attention`` (PyTorch's fused attention: flash or
    memory-efficient on a GPU; flash on a CPU, which keeps no probability matrix either) with ``fused_attn`` set
    (timm's default), the explicit softmax without; under ``kernels="auto"`` it is also the path of training on a
    CPU. With ``kernels="cpu"``, training runs :class:`~fpt_monai.networks.cpu_kernels.NarrowHeadAttention`, which
    keeps no (B, heads, queries, keys) probability matrix with ``recompute`` set and keeps them (a quicker
    backward) without.
    """

    recompute: bool = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.attn_drop.p or self.gate is not None or not isinstance(self.q_norm, nn.Identity):
            raise ValueError("the side ViT's attention has no attention dropout, no gate and no query/key norm.")

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        batch, num_tokens, _ = x.shape
        num_queries = num_tokens if num_queries is None else num_queries
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
        if use_cpu_kernels(self.kernels, x, builds_graph(self), auto=False):
            x = narrow_head_attention(qkv, num_queries, self.scale, keep_probabilities=not self.recompute)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q = q[:, :, :num_queries]
            if self.fused_attn:
                x = F.scaled_dot_product_attention(q, k, v)
            else:
                x = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1) @ v
            x = x.transpose(1, 2)
        x = self.norm(x.reshape(batch, num_queries, self.attn_dim))
        return self.proj_drop(self.proj(x))


class SideBlock(Block):
    """timm's pre-norm ViT ``Block`` (same parameters and state dict) that takes prompt tokens beside its tokens.

    ``forward(x, prompts)`` is ``Block.forward(cat(x, prompts))`` with the prompts' outputs dropped, computed
    without them: the prompts are normalised and attended to, but get no query, projection or MLP. With
    ``cls_only`` only the first token's output is computed (the last block of a classifier that reads CLS).
    """

    def forward(self, x: torch.Tensor, prompts: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        tokens = x if prompts is None else torch.cat((x, prompts), dim=1)
        if cls_only:
            x = x[:, :1]
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(tokens), num_queries=x.shape[1])))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class SideViT(KernelSwitch, nn.Module):
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
        recompute: on the CPU kernels' path, recompute the MLP's activation (:class:`ActivationRecomputingMlp`)
            and, under ``kernels="cpu"``, the attention probabilities (:class:`SideAttention`) in backward instead of
            keeping them: less memory, more time. The reference path is plain autograd and ignores it. Also an attribute that can be
            switched at any time.
        kernels: which path the blocks take, ``"auto"``, ``"reference"`` or ``"cpu"``
            (see :mod:`~fpt_monai.networks.cpu_kernels`). Also an attribute that can be switched at any time.
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
        recompute: bool = True,
        kernels: str = "auto",
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
            SideBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=rate,
                norm_layer=norm_layer,
                attn_layer=SideAttention,
                mlp_layer=ActivationRecomputingMlp,
            )
            for rate in rates
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.recompute = recompute
        self.kernels = kernels
        self.reset_parameters()

    @property
    def recompute(self) -> bool:
        """Whether training recomputes attention probabilities and MLP activations in backward (see the class)."""
        return self._recompute

    @recompute.setter
    def recompute(self, value: bool) -> None:
        self._recompute = bool(value)
        for module in self.modules():
            if isinstance(module, (SideAttention, ActivationRecomputingMlp)):
                module.recompute = self._recompute

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

    def _check_inputs(self, x: torch.Tensor, block_prompts: torch.Tensor | None) -> None:
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

    def _tokens(self, x: torch.Tensor, block_prompts: torch.Tensor | None, cls_only: bool) -> torch.Tensor:
        self._check_inputs(x, block_prompts)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        last = self.depth - 1
        for index, block in enumerate(self.blocks):
            prompts = None if block_prompts is None else block_prompts[:, index]
            x = block(x, prompts, cls_only=cls_only and index == last)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor, block_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> final-normed tokens ``[CLS, patches]`` of shape (B, 1 + num_patches, embed_dim).

        Args:
            x: (B, in_channels, *img_size) low-resolution images.
            block_prompts: optional (B, depth, P, embed_dim) prompts; block i attends to ``block_prompts[:, i]``
                beside its tokens, and their outputs are dropped.
        """
        return self._tokens(x, block_prompts, cls_only=False)

    def forward(self, x: torch.Tensor, block_prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Images (and optional per-block prompts) -> logits (B, num_classes) from the CLS token.

        The last block computes only the CLS token's output: the head reads nothing else.
        """
        return self.head(self._tokens(x, block_prompts, cls_only=True)[:, 0])
