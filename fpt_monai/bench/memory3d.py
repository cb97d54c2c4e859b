"""Training memory of FPT on volumes against full fine-tuning of the same 3D ViT (``fpt-monai memory3d``).

FPT (Huang et al., MICCAI 2024) and FPT+ (IEEE TNNLS 2025) report training memory for 2D images only; volumes
are where it matters most: a 3D ViT-B/16 on a 128^3 CT volume has 513 tokens per sample and keeps every
block's activations (and, with plain attention, every 513 x 513 attention matrix per head) for backward.

Protocol (the defaults):

- Backbone: MONAI ``ViT(spatial_dims=3)``, ViT-B-like (width 768, 12 blocks, 12 heads, MLP 3072, no qkv bias as
  MONAI's default, class token), patch 16, one input channel, float32 compute, 2 classes, cross-entropy, AdamW.
- Full fine-tuning: that ViT with a linear head on its class token, every parameter trainable, input a batch
  of high-resolution volumes.
- FPT, preloaded (the bundle's way): side ViT (width 96, 12 blocks, 12 heads, at ``side_img_size``), 16 prompts
  per block, the FPT fusion module; the inputs are the side view and the cached keys/values of the 20% most
  attended tokens per block and head (``kv_dtype``, float16 as in the bundle); the backbone's weights are not
  resident (the network is built from the backbone's shape).
- FPT, online: no cache; the frozen backbone is resident and runs in every step under no-grad on the
  high-resolution volume.

Per method the figure is the sum of the parts of one training step, in bytes:

- ``parameters``: every resident parameter and buffer (the frozen backbone's too, where it is resident);
- ``gradients``: one per trainable parameter (allocated during backward);
- ``optimizer_state``: AdamW's two moments per trainable parameter plus its step counters;
- ``activations``: what autograd keeps for backward at the end of the forward pass, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once; parameters and inputs excluded);
- ``inputs``: the batch (volumes or side views, keys/values, labels).

The sum is an upper bound of the step's peak of live tensors that leaves out backward's short-lived
temporaries (gradients of activations; they are freed block by block). Tensors are fake by default
(``FakeTensorMode``: shapes, dtypes and storages, no data, no compute), so the full fine-tuning of a 3D ViT-B is
accounted for in seconds; ``fake=False`` runs real tensors and gives the same bytes (tested on small sizes).
Attention: ``"eager"`` (MONAI's own attention, which materialises the score matrix, and timm's plain path in the
side ViT) or ``"fused"`` (``scaled_dot_product_attention`` in both; MONAI's ``use_flash_attention``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fpt_monai.weights import random_weights_expected

__all__ = ["MEMORY_PARTS", "measure_3d_memory", "markdown_table"]

#: The parts each method's training memory is split into (bytes).
MEMORY_PARTS = ("parameters", "gradients", "optimizer_state", "activations", "inputs")
_ATTENTION = ("eager", "fused")
_METHODS = ("full_finetuning", "fpt_preloaded", "fpt_online")


def _set_attention(module: nn.Module, attention: str) -> None:
    fused = attention == "fused"
    for m in module.modules():
        if hasattr(m, "use_flash_attention") and not getattr(m, "save_attn", False):  # MONAI SABlock
            m.use_flash_attention = fused
        if hasattr(m, "fused_attn"):  # timm Attention (the side ViT)
            m.fused_attn = fused


def _storage_key(tensor: torch.Tensor) -> int:
    # the StorageImpl's address: views share it; fake tensors have storages too (but no data pointer)
    return tensor.untyped_storage()._cdata


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adamw_state_bytes(params: list[nn.Parameter]) -> int:
    """AdamW's state (``torch.optim.AdamW`` defaults): exp_avg and exp_avg_sq, plus a float32 step per tensor."""
    return 2 * _nbytes(params) + 4 * len(params)


def _saved_for_backward(run: Callable[[], torch.Tensor], excluded: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``run()`` recording the bytes autograd saves for backward (unique storages, ``excluded`` left out)."""
    skip = {_storage_key(t) for t in excluded}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in skip:
            saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    return output, sum(saved.values())


def _step_memory(
    net: nn.Module, forward: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor], inputs: list[torch.Tensor],
    labels: torch.Tensor,
) -> dict[str, Any]:
    trainable = [p for p in net.parameters() if p.requires_grad]
    resident = [*net.parameters(), *net.buffers()]
    net.train()
    loss, activations = _saved_for_backward(
        lambda: F.cross_entropy(forward(net, inputs), labels), [*resident, *inputs, labels]
    )
    loss.backward()
    # gradients (and AdamW state) exist for the parameters the step reaches; MONAI's TransformerBlock carries
    # a cross-attention LayerNorm that a plain ViT never uses, which full fine-tuning leaves without either
    updated = [p for p in trainable if p.grad is not None]
    if not updated:
        raise RuntimeError("no gradient reached any trainable parameter: the measured step is not a training step.")
    parts = {
        "parameters": _nbytes(resident),
        "gradients": _nbytes(updated),
        "optimizer_state": _adamw_state_bytes(updated),
        "activations": activations,
        "inputs": _nbytes([*inputs, labels]),
    }
    learnable = sum(p.numel() for p in trainable)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    return {
        **parts,
        "total": sum(parts.values()),
        "learnable_parameters": learnable,
        "frozen_parameters": frozen,
    }


def _monai_vit(img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, in_channels, **kwargs) -> nn.Module:
    from monai.networks.nets import ViT

    return ViT(
        in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
        num_layers=num_layers, num_heads=num_heads, spatial_dims=3, **kwargs,
    )


def measure_3d_memory(
    img_size: int = 128,
    side_img_size: int = 64,
    patch_size: int = 16,
    batch_size: int = 4,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_layers: int = 12,
    num_heads: int = 12,
    in_channels: int = 1,
    num_classes: int = 2,
    variant: str = "fpt",
    blocks: list[int] | None = None,
    token_ratio: float = 0.2,
    num_prompts: int = 16,
    reduction: int = 8,
    kv_dtype: str = "float16",
    attention: str = "fused",
    fake: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Training-step memory of full fine-tuning and of FPT (preloaded, online) on one 3D ViT (see module doc).

    Args:
        img_size: high-resolution volume size (cubic), the backbone's input.
        side_img_size: the side network's input size (cubic).
        patch_size: patch size of the backbone and of the side ViT.
        batch_size: volumes per step.
        hidden_size, mlp_dim, num_layers, num_heads, in_channels: the MONAI ViT (ViT-B by default).
        num_classes: classes of the task.
        variant: ``"fpt"`` or ``"fpt_plus"`` (fusion variant).
        blocks: extracted backbone blocks (default all; FPT+ uses the second half).
        token_ratio: kept tokens per block and head.
        num_prompts, reduction: prompts per side block; backbone width / side width.
        kv_dtype: storage dtype of the preloaded keys/values (``float16``, ``bfloat16``, ``float32``).
        attention: ``"fused"`` (scaled_dot_product_attention) or ``"eager"`` (score matrix materialised).
        fake: fake tensors (no data, no compute); ``False`` runs real tensors on the CPU.
        seed: seed of the (random) weights and inputs; the byte counts do not depend on it.

    Returns:
        ``{"protocol": {...}, "methods": {name: {part: bytes, ..., "total", "learnable_parameters",
        "frozen_parameters"}}, "fpt_vs_full": {...}}``.
    """
    from fpt_monai.networks import FPTNet, MonaiViTBackbone
    from fpt_monai.preload import storage_dtype

    if attention not in _ATTENTION:
        raise ValueError(f"attention must be one of {_ATTENTION}, got {attention!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if img_size % patch_size or side_img_size % patch_size:
        raise ValueError(f"img_size {img_size} and side_img_size {side_img_size} must be multiples of {patch_size}.")
    dtype = storage_dtype(kv_dtype)
    vit = dict(img_size=img_size, patch_size=patch_size, hidden_size=hidden_size, mlp_dim=mlp_dim,
               num_layers=num_layers, num_heads=num_heads, in_channels=in_channels)
    torch.manual_seed(seed)
    fpt_args = dict(num_classes=num_classes, side_img_size=side_img_size, variant=variant, num_prompts=num_prompts,
                    reduction=reduction)

    def full_vit() -> nn.Module:
        return _monai_vit(**vit, classification=True, num_classes=num_classes, post_activation=None)

    def online_fpt() -> nn.Module:
        model = _monai_vit(**vit, classification=True)
        model.classification_head = nn.Identity()  # FPT never uses it (as in the 3D presets)
        backbone = MonaiViTBackbone(model, img_size, patch_size, blocks=blocks, token_ratio=token_ratio)
        return FPTNet(backbone, **fpt_args)

    # fake tensors: the modules are built on the meta device (no init compute) and get fake storages in the mode
    with torch.device("meta") if fake else nullcontext():
        builders = {"full_finetuning": full_vit, "fpt_online": online_fpt}
        nets = {name: make() for name, make in builders.items()}
        shape = nets["fpt_online"].shape
        nets["fpt_preloaded"] = FPTNet(shape, **fpt_args)  # the backbone's weights not resident
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)  # the meta modules become fake in it
    else:
        mode = nullcontext()
    methods: dict[str, dict] = {}
    with mode:
        if fake:
            nets = {name: net.to_empty(device="cpu") for name, net in nets.items()}
        for net in nets.values():
            _set_attention(net, attention)
        volumes = torch.randn(batch_size, in_channels, *(img_size,) * 3)
        labels = torch.arange(batch_size) % num_classes
        side_view = torch.randn(batch_size, in_channels, *(side_img_size,) * 3)
        kv = torch.randn(batch_size, *shape.kv_shape).to(dtype)
        # full fine-tuning: the same ViT with a linear head on its class token, everything trainable
        methods["full_finetuning"] = _step_memory(
            nets.pop("full_finetuning"), lambda n, x: n(x[0])[0], [volumes], labels
        )
        # FPT online: the frozen backbone resident, run under no-grad in every step on the volumes
        methods["fpt_online"] = _step_memory(nets.pop("fpt_online"), lambda n, x: n(x[0]), [volumes], labels)
        # FPT preloaded: side view + cached keys/values in
        methods["fpt_preloaded"] = _step_memory(
            nets.pop("fpt_preloaded"), lambda n, x: n.forward_side(x[0], x[1]), [side_view, kv], labels
        )
    methods = {name: methods[name] for name in _METHODS}
    for result in methods.values():
        total_parameters = result["learnable_parameters"] + result["frozen_parameters"]
        result["learnable_percent"] = round(100 * result["learnable_parameters"] / total_parameters, 3)
    # FPT's learnable share is of learnable + the frozen backbone, whether or not the backbone is resident
    backbone_parameters = methods["fpt_online"]["frozen_parameters"]
    methods["fpt_preloaded"]["learnable_percent"] = round(
        100 * methods["fpt_preloaded"]["learnable_parameters"]
        / (methods["fpt_preloaded"]["learnable_parameters"] + backbone_parameters), 3
    )
    full_total = methods["full_finetuning"]["total"]
    return {
        "protocol": {
            "backbone": f"MONAI ViT 3D: width {hidden_size}, {num_layers} blocks, {num_heads} heads, MLP {mlp_dim}, "
                        f"patch {patch_size}, class token, qkv without bias",
            "img_size": [img_size] * 3,
            "side_img_size": [side_img_size] * 3,
            "batch_size": batch_size,
            "num_classes": num_classes,
            "tokens": shape.num_tokens,
            "side_tokens": (side_img_size // patch_size) ** 3 + 1,
            "kept_tokens_per_block_and_head": shape.num_selected_tokens,
            "variant": variant,
            "extracted_blocks": list(shape.blocks),
            "kv_dtype": str(dtype).removeprefix("torch."),
            "kv_bytes_per_volume": math.prod(shape.kv_shape) * torch.empty(0, dtype=dtype).element_size(),
            "attention": attention,
            "compute_dtype": "float32",
            "optimizer": "AdamW",
            "tensors": "fake (FakeTensorMode)" if fake else "real (CPU)",
        },
        "methods": methods,
        "fpt_vs_full": {
            name: round(methods[name]["total"] / full_total, 4) for name in ("fpt_preloaded", "fpt_online")
        },
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The methods of :func:`measure_3d_memory` as a Markdown table (MB = 10^6 bytes)."""
    header = "| method | learnable | learnable % | " + " | ".join(MEMORY_PARTS) + " | total | of full FT |"
    rows = [header, "|---" + "|---:" * (len(MEMORY_PARTS) + 4) + "|"]
    full_total = result["methods"]["full_finetuning"]["total"]
    for name, m in result["methods"].items():
        cells = [name, f"{m['learnable_parameters']:,}", f"{m['learnable_percent']:.2f}"]
        cells += [f"{m[part] / 1e6:,.1f} MB" for part in MEMORY_PARTS]
        cells += [f"{m['total'] / 1e6:,.1f} MB", f"{100 * m['total'] / full_total:.1f}%"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run(**kwargs) -> dict[str, Any]:
    """:func:`measure_3d_memory` without the random-weights warnings (the weights do not matter here)."""
    with random_weights_expected():
        return measure_3d_memory(**kwargs)
