"""The hand-written CPU kernels of FPT/FPT+, and the one switch that chooses them.

The networks (:mod:`~fpt_monai.networks.side`, :mod:`~fpt_monai.networks.fusion`,
:mod:`~fpt_monai.networks.backbones.vit`) are written in stock PyTorch and timm operations
(``F.scaled_dot_product_attention``, plain autograd): the reference path, which reads against the papers and runs on
every device and in every export. This module holds what makes a training step fast and small on a CPU, where
the memory traffic of large intermediates dominates:

- :class:`NarrowHeadAttention`: the side ViT's attention (heads 8 wide) on transposed operands, chunked over the
  batch, its probabilities recomputed in backward (under ``"cpu"`` only: see below);
- :class:`GeluLinear`: the side ViT's GELU + ``fc2``, the GELU recomputed in backward;
- :class:`PromptCrossAttention`: the fusion's attention over the frozen (often float16) keys/values, upcast a few
  images at a time into one reused buffer (:data:`FUSION_CHUNK_BYTES`), nothing but the inputs kept for backward;
- :func:`attend_and_rank` and :func:`one_image_at_a_time`: the frozen backbone's attention one (image, head) at a
  time and its forward one image at a time, so that no intermediate outgrows the CPU's caches or the allocator's
  reusable blocks.

Each kernel computes exactly what the reference path computes (tests/networks/test_cpu_kernels.py proves outputs and
gradients equal). The switch, ``kernels`` (:data:`KERNEL_MODES`; ``FPTNet(..., kernels=)``, ``create_fpt``, the
bundle's ``kernels`` key), is read by :func:`use_cpu_kernels`:

- ``"auto"`` (default): the kernels for training work on a CPU. The side ViT's MLP and the fusion take them in
  forwards that build a graph for backward (training) on CPU tensors; the side ViT's attention keeps PyTorch's
  fused attention, which on the CPU it was measured on trains faster and keeps less than
  :class:`NarrowHeadAttention` (``benchmarks/results/step.md``). The frozen backbone never builds a graph and takes
  its kernels whenever it runs on a CPU (filling the cache, training without one, inference): its batched reference
  path would hold every head's N x N attention matrix at once. Everything else (inference of the side ViT and the
  fusion, every other device) takes the reference path.
- ``"reference"``: the reference path everywhere.
- ``"cpu"``: every kernel, :class:`NarrowHeadAttention` included, for the same work on any device (the tensors'
  device is not consulted).

Whatever the switch says, a forward that is traced, scripted, compiled or exported takes the reference path: a graph
can hold neither a Python autograd function nor a Python loop over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpt_monai.utils import exporting

__all__ = [
    "ATTENTION_CHUNK_BYTES",
    "FUSION_CHUNK_BYTES",
    "KERNEL_MODES",
    "GeluLinear",
    "KernelSwitch",
    "NarrowHeadAttention",
    "PromptCrossAttention",
    "attend_and_rank",
    "builds_graph",
    "check_kernels",
    "gelu_linear",
    "narrow_head_attention",
    "one_image_at_a_time",
    "use_cpu_kernels",
]

#: The values of the ``kernels`` switch (see the module docstring).
KERNEL_MODES = ("auto", "reference", "cpu")


def check_kernels(kernels: str) -> str:
    """``kernels`` if it is one of :data:`KERNEL_MODES`; a ``ValueError`` naming the choices otherwise."""
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}.")
    return kernels


class KernelSwitch:
    """Mixin of the modules with a ``kernels`` switch: setting it on a module sets every submodule that has one, so
    one assignment on the outermost network chooses the path of the backbone, the fusion and the side network."""

    _kernels = "auto"

    @property
    def kernels(self) -> str:
        """Which path runs: ``"auto"``, ``"reference"`` or ``"cpu"`` (see :data:`KERNEL_MODES`)."""
        return self._kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        value = check_kernels(value)
        for module in self.modules():
            if isinstance(module, KernelSwitch):
                module._kernels = value


def builds_graph(module: nn.Module) -> bool:
    """Whether ``module``'s forward is training work: in training mode, with autograd recording."""
    return module.training and torch.is_grad_enabled()


def use_cpu_kernels(kernels: str, tensor: torch.Tensor, training: bool = True, auto: bool = True) -> bool:
    """Whether a forward on ``tensor`` takes the CPU kernels under the switch ``kernels``.

    Args:
        kernels: one of :data:`KERNEL_MODES`.
        tensor: an input of the forward; its device decides under ``"auto"``.
        training: whether the forward is the work the kernels are for (:func:`builds_graph` for the side ViT and
            the fusion; always for the frozen backbone).
        auto: whether ``"auto"`` takes this kernel on a CPU at all (``False``: only ``"cpu"`` does).
    """
    if check_kernels(kernels) == "reference" or not training or exporting():
        return False
    return kernels == "cpu" or (auto and tensor.device.type == "cpu")


# -- the side ViT's attention -------------------------------------------------------------------------------------

#: Upper bound on the attention probabilities one chunk of :class:`NarrowHeadAttention` computes at a time: small
#: enough to stay in a CPU core's cache while the chunk is softmax'ed and multiplied, large enough to amortise the
#: per-chunk calls.
ATTENTION_CHUNK_BYTES = 2 * 2**20

LOG2_E = math.log2(math.e)


class NarrowHeadAttention(torch.autograd.Function):
    """``softmax(q k^T * scale) v`` for narrow heads, on transposed operands, over chunks of the batch.

    The side ViT's heads are 8 wide. A matrix product whose output is 8 wide runs several times slower on a CPU than
    the same product computed transposed (8-row output), so this function takes and returns every operand transposed:
    ``qt`` (B, H, D, Nq), ``kt`` and ``vt`` (B, H, D, Nk), contiguous; it returns ``ot`` (B, H, D, Nq), and its
    gradients have the inputs' layouts. The attention probabilities are laid out keys-major, (B, H, Nk, Nq): the
    softmax then reduces down the columns (over the keys), which vectorises across the queries, and every product
    keeps a wide output.

    The softmax is taken in base 2: the scores are computed in log2 units (``scale * log2(e)`` folded into the
    queries) and exponentiated with ``exp2``, which is cheaper than ``exp`` on a CPU and gives the same
    probabilities. Its log-sum-exp per query, a (B, H, 1, Nq) tensor, is kept for backward.

    The (B, H, Nk, Nq) attention probabilities are most of the side ViT's saved activations. With
    ``keep_probabilities`` off they are not kept: backward recomputes them, chunk by chunk, from ``qt``, ``kt`` and
    the log-sum-exp (one product and one ``exp2``, no second softmax); on, they are kept and backward is quicker.
    PyTorch's CPU flash attention keeps no matrix either, but is built for wide heads.
    """

    @staticmethod
    def forward(ctx, qt, kt, vt, scale: float, keep_probabilities: bool):
        batch, heads, _, num_queries = qt.shape
        ot = torch.empty_like(qt)
        log_sum = qt.new_empty((batch, heads, 1, num_queries))
        kept = qt.new_empty((batch, heads, kt.shape[-1], num_queries)) if keep_probabilities else None
        for rows in NarrowHeadAttention._chunks(qt, kt):
            scores = NarrowHeadAttention._log2_scores(qt[rows], kt[rows], scale)
            maximum = scores.amax(dim=-2, keepdim=True)
            probabilities = scores.sub_(maximum).exp2_()
            total = probabilities.sum(dim=-2, keepdim=True)
            probabilities.div_(total)
            torch.add(maximum, total.log2_(), out=log_sum[rows])
            torch.matmul(vt[rows], probabilities, out=ot[rows])
            if kept is not None:
                kept[rows] = probabilities
        ctx.save_for_backward(qt, kt, vt, ot, log_sum, kept)
        ctx.scale = scale
        return ot

    @staticmethod
    def _chunks(qt: torch.Tensor, kt: torch.Tensor):
        per_item = qt.shape[1] * qt.shape[3] * kt.shape[3] * qt.element_size()
        size = max(1, ATTENTION_CHUNK_BYTES // per_item)
        return [slice(start, start + size) for start in range(0, qt.shape[0], size)]

    @staticmethod
    def _log2_scores(qt: torch.Tensor, kt: torch.Tensor, scale: float) -> torch.Tensor:
        """Keys-major scores in log2 units, ``k q^T * scale * log2(e)``: (c, H, Nk, Nq)."""
        return torch.matmul(kt.transpose(-2, -1), qt * (scale * LOG2_E))

    @staticmethod
    def backward(ctx, grad_ot: torch.Tensor):
        qt, kt, vt, ot, log_sum, kept = ctx.saved_tensors
        grad_ot = grad_ot.contiguous()
        grad_qt, grad_kt, grad_vt = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        for rows in NarrowHeadAttention._chunks(qt, kt):
            g = grad_ot[rows]
            if kept is None:
                scores = NarrowHeadAttention._log2_scores(qt[rows], kt[rows], ctx.scale)
                probabilities = scores.sub_(log_sum[rows]).exp2_()
            else:
                probabilities = kept[rows]
            torch.matmul(g, probabilities.transpose(-2, -1), out=grad_vt[rows])
            # softmax backward: p * (dp - colsum(dp * p)), where colsum(dp * p) = colsum(g * o)
            grad_scores = torch.matmul(vt[rows].transpose(-2, -1), g)
            grad_scores.sub_((g * ot[rows]).sum(dim=-2, keepdim=True)).mul_(probabilities)
            torch.matmul(kt[rows], grad_scores, out=grad_qt[rows]).mul_(ctx.scale)
            torch.matmul(qt[rows] * ctx.scale, grad_scores.transpose(-2, -1), out=grad_kt[rows])
        return grad_qt, grad_kt, grad_vt, None, None


def narrow_head_attention(
    qkv: torch.Tensor, num_queries: int, scale: float, keep_probabilities: bool = False
) -> torch.Tensor:
    """The side ViT's attention context through :class:`NarrowHeadAttention`.

    Args:
        qkv: (B, N, 3, H, D), the queries, keys and values of all N tokens.
        num_queries: the first tokens whose outputs are computed.
        scale: the softmax scale.
        keep_probabilities: keep the attention probabilities for backward instead of recomputing them.

    Returns:
        The context (B, num_queries, H, D), as ``scaled_dot_product_attention(q[:, :, :num_queries], k, v)``
        transposed to tokens-major.
    """
    qt = qkv[:, :num_queries, 0].permute(0, 2, 3, 1).contiguous()  # (B, H, D, Nq)
    kt, vt = qkv[:, :, 1:].permute(2, 0, 3, 4, 1).contiguous().unbind(0)  # each (B, H, D, N)
    return NarrowHeadAttention.apply(qt, kt, vt, scale, keep_probabilities).permute(0, 3, 1, 2)


# -- the side ViT's MLP -------------------------------------------------------------------------------------------


class GeluLinear(torch.autograd.Function):
    """``linear(gelu(hidden), weight, bias)`` that keeps only ``hidden`` for backward and recomputes the GELU there.

    ``torch.utils.checkpoint`` around the same two ops would recompute the linear layer's output too, which backward
    does not need: a whole matrix product per block.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str):
        ctx.save_for_backward(hidden, weight)
        ctx.approximate = approximate
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(hidden, approximate=approximate), weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_()
            activation = F.gelu(leaf, approximate=ctx.approximate)
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_out.t() @ activation.detach().reshape(-1, activation.shape[-1])
        grad_bias = grad_out.sum(dim=0) if ctx.has_bias else None
        (grad_hidden,) = torch.autograd.grad(activation, leaf, (grad_out @ weight).view_as(hidden))
        return grad_hidden, grad_weight, grad_bias, None


def gelu_linear(hidden: torch.Tensor, linear: nn.Linear, approximate: str) -> torch.Tensor:
    """``linear(gelu(hidden))`` through :class:`GeluLinear` (the GELU recomputed in backward)."""
    return GeluLinear.apply(hidden, linear.weight, linear.bias, approximate)


# -- the fusion's attention ---------------------------------------------------------------------------------------

#: Bytes of float32 keys+values :class:`PromptCrossAttention` upcasts and works on at a time (a few images of
#: ViT-B/16 at 512): what stays in a CPU's cache.
FUSION_CHUNK_BYTES = 6 * 2**20


class PromptCrossAttention(torch.autograd.Function):
    """softmax(q K^T * scale) V for prompt queries shared by the batch, over frozen keys/values of any dtype.

    The keys/values come from the frozen backbone (often a float16 cache) and never need a gradient. Computing
    in float32 through ``kv.float()`` would keep a float32 copy of them alive for backward, so a float16 cache
    would cost more memory than a float32 one. This function saves the keys/values as they came (no copy) and
    upcasts a few images of one block at a time into one reused buffer, in forward and again in backward. The
    attention weights are not kept either: with a handful of prompt queries they are cheaper to recompute per block
    in backward than to store for all blocks.

    The queries are shared by the batch, so the buffer holds a block's keys as (heads, images x tokens, head_dim):
    the transposed scores of the chunk's images are one (images*tokens x head_dim) @ (head_dim x prompts) product per
    head, and the queries' gradient, summed over the images, one (prompts x images*tokens) @ (images*tokens x head_dim)
    product. Scores are kept transposed, (heads, batch, tokens, prompts): with a few prompts as the short side the
    products run faster on a CPU than in the (prompts x tokens) orientation.

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
        streamed through memory by every product.
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


# -- the frozen backbone ------------------------------------------------------------------------------------------


def attend_and_rank(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention context (B, H, N, D) and mean received attention (B, H, N), one (image, head) at a time.

    The batched reference holds all B x H matrices of N x N at once; here one N x N matrix (4 MB at N=1025) stays in
    the CPU's cache, in one buffer reused for the scores and, in place, their softmax (a fresh matrix per head would
    cost a page-faulting allocation each, and the in-place softmax halves the memory traffic). With ``v=None`` only
    the importance is computed (the context is ``None``). Run without gradient (the backbone is frozen).
    """
    q = q * scale
    n = q.shape[2]
    attention = q.new_empty((n, n))
    context = None if v is None else q.new_empty(v.shape)
    importance = q.new_empty(q.shape[:3])
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            torch.mm(q[b, h], k[b, h].transpose(-2, -1), out=attention)
            torch.softmax(attention, -1, out=attention)  # row-wise, so in place is exact
            if context is not None:
                torch.mm(attention, v[b, h], out=context[b, h])
            torch.sum(attention, dim=0, out=importance[b, h])
    return context, importance.div_(n)


def one_image_at_a_time(
    run: Callable[[torch.Tensor], tuple[torch.Tensor | None, ...]], images: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """``run(images)`` computed one image at a time: each tensor ``run`` returns, concatenated over the images
    (an output that is ``None`` stays ``None``).

    A ViT-B/16 block's largest intermediates at 512 (the MLP's 4100 x 3072 activations at batch 4) are then a
    batch's fraction, small enough for the allocator to reuse instead of mapping fresh, page-faulting memory on
    every call.
    """
    runs = [run(image[None]) for image in images]
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*runs))
