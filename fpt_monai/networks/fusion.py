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

from fpt_monai.utils import exporting

__all__ = ["FUSION_VARIANTS", "FineGrainedPrompts", "FineGrainedFusion", "PromptCrossAttention"]

FUSION_VARIANTS = ("fpt", "fpt_plus")

#: Bytes of float32 keys+values :class:`PromptCrossAttention` upcasts and works on at a time (about 4 images of
#: ViT-B/16 at 512): what stays in a CPU's cache.
FUSION_CHUNK_BYTES = 6 * 2**20


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


class PromptCrossAttention(torch.autograd.Function):
    """softmax(q K^T * scale) V for prompt queries shared by the batch, over frozen keys/values of any dtype.

    The keys/values come from the frozen backbone (often a float16 cache) and never need a gradient. Computing
    in float32 through ``kv.float()`` would keep a float32 copy of them alive for backward, so a float16 cache
    would cost more memory than a float32 one. This function saves the keys/values as they came (no copy) and
    upcasts a few images of one block at a time into one reused buffer, in forward and again in backward. The attention weights
    are not kept either: with a handful of prompt queries they are cheaper to recompute per block in backward than
    to store for all blocks (30 MB at batch 16 for the ``fpt`` preset).

    The queries are shared by the batch, so the buffer holds a block's keys as (heads, images x tokens, head_dim):
    the transposed scores of the chunk's images are one (images*tokens x head_dim) @ (head_dim x prompts) product per
    head, and the queries' gradient, summed over the images, one (prompts x images*tokens) @ (images*tokens x head_dim)
    product. Scores are kept transposed, (heads, batch, tokens, prompts): with a few prompts as the short side the
    products run about twice as fast on a CPU as in the (prompts x tokens) orientation.

    Shapes: q (L, H, P, D) float32; kv (B, L, 2, H, k, D); returns (B, L, H, P, D) in q's dtype.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
        batch, num_blocks, _, heads, _, head_dim = kv.shape
        out = q.new_empty(batch, num_blocks, heads, q.shape[2], head_dim)
        for block, images, keys, values in PromptCrossAttention._chunks(q, kv):
            attention = PromptCrossAttention._attention(q[block] * scale, keys)  # (H, b, k, P)
            out[images, block] = torch.matmul(attention.transpose(-2, -1), values).transpose(0, 1)
        ctx.save_for_backward(q, kv)
        ctx.scale = scale
        return out

    @staticmethod
    def _chunks(q: torch.Tensor, kv: torch.Tensor):
        """(block, image slice, keys, values): the keys/values of a few images of one block, upcast to q's dtype
        and laid out (H, b, k, D) in one reused buffer of at most ``FUSION_CHUNK_BYTES`` (or one image).

        A chunk that fits in the CPU's cache is read from memory once and then stays there while its scores are
        computed, softmax'ed and multiplied; a whole block (20 MB in float32 for ViT-B/16 at batch 16) would be
        streamed through memory by every product. Measured on a 2-core CPU: 30% less time than whole blocks.
        """
        batch, num_blocks, _, heads, tokens, head_dim = kv.shape
        per_image = 2 * heads * tokens * head_dim * q.element_size()
        size = max(1, min(batch, FUSION_CHUNK_BYTES // per_image))
        buffer = q.new_empty(2, heads, size, tokens, head_dim)
        for block in range(num_blocks):
            for first in range(0, batch, size):
                images = slice(first, min(first + size, batch))
                chunk = buffer[:, :, : images.stop - first]
                chunk.copy_(kv[images, block].permute(1, 2, 0, 3, 4))
                yield block, images, chunk[0], chunk[1]

    @staticmethod
    def _attention(scaled_q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Transposed attention weights (H, b, k, P): softmax over the tokens of each image."""
        heads, batch, tokens, head_dim = keys.shape
        scores = torch.matmul(keys.reshape(heads, batch * tokens, head_dim), scaled_q.transpose(-2, -1))
        return scores.view(heads, batch, tokens, scaled_q.shape[1]).softmax(dim=2)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        q, kv = ctx.saved_tensors
        num_prompts = q.shape[2]
        grad_q = torch.zeros_like(q)
        for block, images, keys, values in PromptCrossAttention._chunks(q, kv):
            heads, batch, tokens, head_dim = keys.shape
            attention = PromptCrossAttention._attention(q[block] * ctx.scale, keys)
            grad_attention = torch.matmul(values, grad_output[images, block].transpose(0, 1).transpose(-2, -1))
            # softmax backward over the tokens: a * (da - sum(da * a))
            grad_scores = grad_attention.sub_((grad_attention * attention).sum(dim=2, keepdim=True)).mul_(attention)
            # one batched product per chunk (an in-place baddbmm_ on this transposed view runs one product per head)
            grad_q_chunk = torch.bmm(
                grad_scores.view(heads, batch * tokens, num_prompts).transpose(-2, -1),
                keys.reshape(heads, batch * tokens, head_dim),
            )
            grad_q[block].add_(grad_q_chunk, alpha=ctx.scale)
        return grad_q, None, None


class FineGrainedFusion(nn.Module):
    """Cross-attention of fine-grained prompts over the frozen backbone's selected keys/values.

    Args:
        variant: ``"fpt"`` or ``"fpt_plus"`` (see the module docstring).
        side_dim: width of the side network, which the fused prompts are projected to.
        backbone_dim: width of the backbone's attention (heads x head_dim).
        num_heads: backbone heads; the keys/values arrive split into them.
        dropout: dropout on the fused prompts (0.5 in the papers).
    """

    def __init__(self, variant: str, side_dim: int, backbone_dim: int, num_heads: int, dropout: float = 0.5) -> None:
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
        if exporting():
            # a graph cannot hold a Python autograd function nor its loop over the batch; exports do not train
            keys, values = kv[:, :, 0].to(query.dtype), kv[:, :, 1].to(query.dtype)
            attention = (query * self.head_dim**-0.5 @ keys.transpose(-2, -1)).softmax(dim=-1)
            context = attention @ values
        else:
            context = PromptCrossAttention.apply(query, kv, self.head_dim**-0.5)
        context = context.transpose(2, 3).reshape(batch, num_blocks, num_prompts, self.backbone_dim)
        if self.variant == "fpt":
            fused = self.out_proj(context) + prompts
        else:
            fused = self.out_proj(context + prompts)
        return self.dropout(fused)
