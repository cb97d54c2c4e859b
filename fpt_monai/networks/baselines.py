"""The transfer-learning methods FPT is compared with, on the same timm ViT backbone.

Every baseline is a plain ``nn.Module`` with ``forward(images) -> logits`` on the high-resolution image, plus
``trainable_parameters()`` and ``parameter_counts()`` like :class:`~fpt_monai.networks.FPTNet`, so the bundle
trains it by swapping ``network_def`` (see ``configs/baseline.json``).

- ``full``: full fine-tuning, every weight learns.
- ``linear``: linear probing, a new head on the frozen backbone's class token (no gradient enters the backbone).
- ``vpt``: VPT-deep prompt tuning (Jia et al., ECCV 2022): learnable tokens inserted at every block's input.
- ``lora``: LoRA (Hu et al., ICLR 2022) on every attention's fused q/k/v projection.
- ``adapter``: AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck in parallel with every MLP.

Except for ``full``, the backbone's own weights are frozen; the new classifier head always learns. The default
sizes give learnable shares close to those the FPT+ paper reports for these methods on ViT-B/16 (prompt tuning
0.17%, LoRA 0.68%); the adapter uses AdaptFormer's bottleneck of 64 (1.4%; the paper's adapter row is 2.03%).

LoRA is written here (two small matrices per projection) rather than taken from ``peft``: ``peft`` would bring
``transformers`` and ``accelerate`` as dependencies for what is a dozen lines on timm's ``Attention.qkv``.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "BASELINE_METHODS",
    "LoRALinear",
    "ParallelAdapter",
    "PromptedBlock",
    "ViTBaseline",
    "create_baseline",
]

BASELINE_METHODS = ("full", "linear", "vpt", "lora", "adapter")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a learnable low-rank update: ``W x + b + (alpha / r) B A x``.

    ``A`` starts Kaiming-uniform and ``B`` at zero, so the wrapped layer starts as the pre-trained one.

    Args:
        linear: the pre-trained projection (frozen here).
        rank: ``r``, the rank of the update.
        alpha: scaling numerator (the update is scaled by ``alpha / rank``).
    """

    def __init__(self, linear: nn.Linear, rank: int = 16, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        self.linear = linear.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank))
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling


class ParallelAdapter(nn.Module):
    """AdaptFormer's AdaptMLP: ``mlp(x) + s * up(relu(down(x)))``, the bottleneck in parallel with the MLP.

    The up-projection starts at zero, so the adapted block starts as the pre-trained one.

    Args:
        mlp: the block's pre-trained MLP (frozen here).
        dim: the block width.
        bottleneck: the adapter's hidden width (64 in AdaptFormer).
        scale: ``s`` (0.1 in AdaptFormer).
    """

    def __init__(self, mlp: nn.Module, dim: int, bottleneck: int = 64, scale: float = 0.1) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}.")
        self.mlp = mlp.requires_grad_(False)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.up(torch.relu(self.down(x))) * self.scale


class PromptedBlock(nn.Module):
    """A frozen transformer block whose input gets ``num_prompts`` learnable tokens (VPT-deep).

    The prompts go right after the class/register tokens and are dropped again after the block, so every block
    sees its own prompts, as in VPT-deep.

    Args:
        block: the pre-trained block (frozen here).
        num_prefix_tokens: class/register tokens before the patch tokens.
        num_prompts: prompts of this block.
        dim: the block width.
    """

    def __init__(self, block: nn.Module, num_prefix_tokens: int, num_prompts: int, dim: int) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}.")
        self.block = block.requires_grad_(False)
        self.num_prefix_tokens = num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim))
        # VPT initialises uniformly in +-sqrt(6 / (fan_in + fan_out)) of the patch projection; with 16x16x3
        # patches and width 768 this is about 0.06
        nn.init.uniform_(self.prompts, -0.06, 0.06)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_prefix_tokens
        prompts = self.prompts.expand(x.shape[0], -1, -1)
        x = self.block(torch.cat([x[:, :n], prompts, x[:, n:]], dim=1))
        return torch.cat([x[:, :n], x[:, n + prompts.shape[1] :]], dim=1)


class ViTBaseline(nn.Module):
    """A timm ``VisionTransformer`` trained with one of :data:`BASELINE_METHODS`.

    Args:
        model: a timm ``VisionTransformer`` with pre-trained weights (its head is replaced).
        method: ``full``, ``linear``, ``vpt``, ``lora`` or ``adapter``.
        num_classes: number of output logits.
        num_prompts: VPT prompts per block.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA scaling numerator.
        adapter_bottleneck: AdaptFormer hidden width.
        adapter_scale: AdaptFormer scale ``s``.
    """

    def __init__(
        self,
        model: VisionTransformer,
        method: str,
        num_classes: int,
        num_prompts: int = 16,
        lora_rank: int = 16,
        lora_alpha: float = 16.0,
        adapter_bottleneck: int = 64,
        adapter_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if method not in BASELINE_METHODS:
            raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}.")
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}.")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.method = method
        model.reset_classifier(num_classes)
        if method != "full":
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith("head."))
        dim = model.embed_dim
        if method == "vpt":
            model.blocks = nn.Sequential(
                *(PromptedBlock(b, model.num_prefix_tokens, num_prompts, dim) for b in model.blocks)
            )
        elif method == "lora":
            for block in model.blocks:
                block.attn.qkv = LoRALinear(block.attn.qkv, lora_rank, lora_alpha)
        elif method == "adapter":
            for block in model.blocks:
                block.mlp = ParallelAdapter(block.mlp, dim, adapter_bottleneck, adapter_scale)
        self.model = model
        self.img_size = tuple(model.patch_embed.img_size)
        # the input normalisation of the weights, where the bundle's transforms look for it (as on the backbones)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.5, 0.5, 0.5)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: the parameters with ``requires_grad``."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Learnable and frozen parameter counts."""
        learnable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"learnable": learnable, "frozen": frozen}

    def train(self, mode: bool = True) -> ViTBaseline:
        super().train(mode)
        if self.method == "linear":  # a frozen feature extractor keeps its inference behaviour
            self.model.eval()
            self.model.head.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) at the backbone's resolution -> logits (B, num_classes)."""
        if self.method == "linear":
            with torch.no_grad():  # the frozen features need no graph
                features = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
            return self.model.head(features)
        return self.model(images)


def create_baseline(
    method: str,
    num_classes: int,
    preset: str = "fpt",
    pretrained: bool | str | os.PathLike = True,
    img_size: int | None = None,
    **kwargs,
) -> ViTBaseline:
    """A baseline on the same timm backbone and resolution as an FPT preset.

    Args:
        method: one of :data:`BASELINE_METHODS`.
        num_classes: number of output logits.
        preset: the FPT preset whose backbone weights name and input size are used (``fpt``: ViT-B/16 at 512).
        pretrained: as for :func:`~fpt_monai.networks.create_fpt` (hub name, local file, or ``False`` with a loud
            warning).
        img_size: input size; default: the preset's (512 for ``fpt``).
        **kwargs: method settings of :class:`ViTBaseline` (``num_prompts``, ``lora_rank``, ``lora_alpha``,
            ``adapter_bottleneck``, ``adapter_scale``).
    """
    from fpt_monai.networks.fpt import PRESETS
    from fpt_monai.weights import create_timm_vit

    if method not in BASELINE_METHODS:
        raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}.")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    config = PRESETS[preset]
    model = create_timm_vit(config.model_name, img_size=img_size or config.img_size, pretrained=pretrained)
    return ViTBaseline(model, method, num_classes, **kwargs)
