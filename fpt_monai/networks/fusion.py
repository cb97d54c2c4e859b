"""Fine-grained prompts and the fusion module of FPT (MICCAI 2024) and FPT+ (IEEE TNNLS 2025).

Learnable prompts query the frozen backbone's own (selected) keys and values by cross-attention; there are no
learnable key/value projections. One fusion module is shared by all blocks; only the prompts are per block.

- FPT:  q = Linear(side -> backbone)(prompts); ctx = softmax(q K^T / sqrt(d)) V;
        out = Dropout(Linear(backbone -> side)(ctx) + prompts), prompts of the side width.
- FPT+: q = LayerNorm(prompts); same attention; out = Dropout(Linear(backbone -> side)(ctx + prompts)),
        prompts of the backbone width.

The prompts never see the side network's hidden states, so the fused prompts of all blocks are computed in
one batched attention, up front.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpt_monai.networks.cpu_kernels import KernelSwitch, PromptCrossAttention, builds_graph, use_cpu_kernels

__all__ = ["FUSION_VARIANTS", "FineGrainedPrompts", "FineGrainedFusion"]

FUSION_VARIANTS = ("fpt", "fpt_plus")


class FineGrainedPrompts(nn.Module):
    """``num_prompts`` learnable prompts of width ``dim`` for each of ``num_blocks`` side blocks.

    Initialised from a normal distribution with std 1e-6, as in the papers.

    Args:
        num_blocks: side blocks that receive prompts.
        num_prompts: prompts per block (16 in the papers).
        dim: prompt width (side width for FPT, backbone width for FPT+).
    """

    def __init__(self, num_blocks: int, num_prompts: int, dim: int) -> None:
        super().__init__()
        if num_blocks < 1 or num_prompts < 1 or dim < 1:
            raise ValueError(
                f"num_blocks, num_prompts and dim must be positive, got {num_blocks}, {num_prompts}, {dim}."
            )
        self.prompts = nn.Parameter(torch.empty(num_blocks, num_prompts, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.prompts, std=1e-6)

    def forward(self) -> torch.Tensor:
        """The prompts, shape (num_blocks, num_prompts, dim)."""
        return self.prompts


class FineGrainedFusion(KernelSwitch, nn.Module):
    """Cross-attention of fine-grained prompts over the frozen backbone's selected keys/values.

    Args:
        variant: ``"fpt"`` or ``"fpt_plus"`` (see the module docstring).
        side_dim: width of the side network, which the fused prompts are projected to.
        backbone_dim: width of the backbone's attention (heads x head_dim).
        num_heads: backbone heads; the keys/values arrive split into them.
        dropout: dropout on the fused prompts (0.5 in the papers).
        kernels: ``"auto"``, ``"reference"`` or ``"cpu"``: where the attention runs as the CPU kernel
            :class:`~fpt_monai.networks.cpu_kernels.PromptCrossAttention` (see :mod:`~fpt_monai.networks.cpu_kernels`);
            also an attribute.
    """

    def __init__(
        self,
        variant: str,
        side_dim: int,
        backbone_dim: int,
        num_heads: int,
        dropout: float = 0.5,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        if variant not in FUSION_VARIANTS:
            raise ValueError(f"variant must be one of {FUSION_VARIANTS}, got {variant!r}.")
        if backbone_dim % num_heads:
            raise ValueError(f"backbone_dim {backbone_dim} must be divisible by num_heads {num_heads}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.variant = variant
        self.side_dim = side_dim
        self.backbone_dim = backbone_dim
        self.num_heads = num_heads
        self.head_dim = backbone_dim // num_heads
        self.prompt_dim = side_dim if variant == "fpt" else backbone_dim
        # FPT projects side-width prompts up to queries; FPT+ has backbone-width prompts and only normalises.
        self.query = nn.Linear(side_dim, backbone_dim) if variant == "fpt" else nn.LayerNorm(backbone_dim)
        self.out_proj = nn.Linear(backbone_dim, side_dim)
        self.dropout = nn.Dropout(dropout)
        self.kernels = kernels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) linear weights, zero biases, LayerNorm 1/0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, prompts: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Fuse the prompts of every block with that block's selected keys/values.

        Args:
            prompts: (L, P, prompt_dim), the per-block prompts.
            kv: (B, L, 2, H, k, head_dim), selected keys (index 0) and values (index 1) of the L blocks.

        Returns:
            Fused prompts (B, L, P, side_dim), ready to be appended to the side blocks' tokens.
        """
        num_blocks, num_prompts, prompt_dim = prompts.shape
        if prompt_dim != self.prompt_dim:
            raise ValueError(f"prompts must have width {self.prompt_dim} for {self.variant}, got {prompt_dim}.")
        if kv.ndim != 6 or kv.shape[1] != num_blocks or kv.shape[2] != 2 or kv.shape[3] != self.num_heads:
            raise ValueError(
                f"kv must have shape (B, {num_blocks}, 2, {self.num_heads}, k, {self.head_dim}), got {tuple(kv.shape)}."
            )
        if kv.shape[-1] != self.head_dim:
            raise ValueError(f"kv head dim must be {self.head_dim}, got {kv.shape[-1]}.")
        batch = kv.shape[0]
        if kv.requires_grad:
            raise ValueError("kv comes from the frozen backbone and must not require a gradient.")
        query = self.query(prompts)
        query = query.reshape(num_blocks, num_prompts, self.num_heads, self.head_dim).transpose(1, 2)
        # computed in the prompts' precision whatever the storage dtype of the (preloaded) keys/values
        if use_cpu_kernels(self.kernels, kv, builds_graph(self)):
            context = PromptCrossAttention.apply(query, kv, self.head_dim**-0.5)
        else:
            # the L blocks as a batch dimension: (B * L, H, P, D) queries over (B * L, H, k, D) keys/values
            keys, values = (kv[:, :, i].to(query.dtype).flatten(0, 1) for i in (0, 1))
            queries = query.expand(batch, -1, -1, -1, -1).flatten(0, 1)
            context = F.scaled_dot_product_attention(queries, keys, values).unflatten(0, (-1, num_blocks))
        context = context.transpose(2, 3).reshape(batch, num_blocks, num_prompts, self.backbone_dim)
        if self.variant == "fpt":
            fused = self.out_proj(context) + prompts
        else:
            fused = self.out_proj(context + prompts)
        return self.dropout(fused)
