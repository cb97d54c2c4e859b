"""The transfer-learning methods FPT is compared with, on the same timm backbone (a ViT, or the demo CNN).

Every baseline is a plain ``nn.Module`` with ``forward(images) -> logits`` on the high-resolution image, plus
``trainable_parameters()`` and ``parameter_counts()`` like :class:`~fpt_monai.networks.FPTNet`, so the bundle
trains it by swapping ``network_def`` (see ``configs/baseline.json``). Whatever is frozen stays in eval mode
under ``train()``; only the modules that own learnable parameters follow it.

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

:class:`CNNBaseline` carries the methods over to a timm EfficientNet-family CNN (the demo backbone,
:func:`fpt_monai.presets.create_demo_baseline`; an extension, the papers compare on ViTs only):

- ``full`` and ``linear`` as above; the linear probe's features are what timm's ``forward_features`` /
  ``forward_head(pre_logits=True)`` give: the last 1x1 convolution (``conv_head``, 1280 channels for
  EfficientNet-Lite0) with its batch norm and ReLU6, globally average-pooled over the feature map.
- ``lora`` on every pointwise (1x1, ungrouped) convolution: such a convolution is a linear map applied at
  every pixel, the CNN counterpart of a ViT's token-wise projections (:class:`LoRAPointwiseConv`).
- ``adapter``: AdaptFormer's scaled bottleneck (1x1 convolution down, ReLU, 1x1 convolution up, zero-initialised)
  in parallel with every MBConv block, added to its output (:class:`ParallelConvAdapter`).
- ``vpt`` has no counterpart: VPT inserts tokens into a transformer's sequence and a CNN has none
  (``ValueError``).

The layout follows PEFT's tuners: one layer class per method that wraps a pre-trained module
(:class:`LoRALinear`/:class:`LoRAPointwiseConv`, :class:`ParallelAdapter`/:class:`ParallelConvAdapter`,
:class:`PromptedBlock`; ``linear`` and ``full`` add no layer, only the new classifier), tables that say which
modules each method wraps on each network (:data:`VIT_INJECTIONS`, :data:`CNN_INJECTIONS`: a module-name pattern
and the layer), and one injector, :func:`inject`, that wraps the matching modules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fpt_monai.networks.labels import bind_class_names
from fpt_monai.networks.methods import method_names

__all__ = [
    "BASELINE_METHODS",
    "CNN_BASELINE_METHODS",
    "CNN_INJECTIONS",
    "CNNBaseline",
    "Injection",
    "LoRALinear",
    "LoRAPointwiseConv",
    "ParallelAdapter",
    "ParallelConvAdapter",
    "PromptedBlock",
    "VIT_INJECTIONS",
    "ViTBaseline",
    "check_cnn_method",
    "inject",
]

#: The methods :class:`ViTBaseline` has.
BASELINE_METHODS = method_names(baseline=True)
#: The methods :class:`CNNBaseline` has (VPT needs transformer tokens).
CNN_BASELINE_METHODS = method_names(baseline=True, on_cnn=True)


def _is_pointwise(conv: nn.Module) -> bool:
    """A 1x1, ungrouped, unpadded ``nn.Conv2d``: one linear map applied at every pixel (of a strided grid)."""
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (1, 1)
        and conv.groups == 1
        and not isinstance(conv.padding, str)
        and tuple(conv.padding) == (0, 0)
    )


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a learnable low-rank update: ``W x + b + (alpha / r) B A x``.

    ``A`` starts Kaiming-uniform and ``B`` at zero, so the wrapped layer starts as the pre-trained one.

    Args:
        linear: the pre-trained projection (frozen here).
        rank: ``r``, the rank of the update.
        alpha: scaling numerator (the update is scaled by ``alpha / rank``).
    """

    def __init__(self, linear: nn.Module, rank: int = 16, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        in_features, out_features = self._features(linear)
        self.linear = linear.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)

    @staticmethod
    def _features(linear: nn.Module) -> tuple[int, int]:
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"LoRALinear wraps an nn.Linear, got {linear}; a pointwise (1x1, ungrouped, unpadded) nn.Conv2d "
                "takes LoRAPointwiseConv."
            )
        return linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling


class LoRAPointwiseConv(LoRALinear):
    """:class:`LoRALinear` on a pointwise ``nn.Conv2d`` (1x1, one group, no padding) of a (B, C, H, W) feature map.

    Such a convolution is a linear map applied at every pixel; the update is folded into its weight,
    ``W + (alpha / r) B A``, and one convolution runs. The frozen convolution is kept as ``linear`` (the same
    state-dict keys as :class:`LoRALinear`).
    """

    @staticmethod
    def _features(linear: nn.Module) -> tuple[int, int]:
        if not _is_pointwise(linear):
            raise TypeError(f"LoRAPointwiseConv wraps a pointwise (1x1, ungrouped, unpadded) nn.Conv2d, got {linear}.")
        return linear.in_channels, linear.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.linear
        weight = conv.weight + (self.lora_b @ self.lora_a * self.scaling)[:, :, None, None]
        return F.conv2d(x, weight, conv.bias, conv.stride, 0, conv.dilation, 1)


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
        _init_bottleneck(self.down, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.up(torch.relu(self.down(x))) * self.scale


def _init_bottleneck(down: nn.Module, up: nn.Module) -> None:
    """AdaptFormer's initialisation: down Kaiming-uniform, up (and both biases) zero: the adapter starts as 0."""
    nn.init.kaiming_uniform_(down.weight, a=5**0.5)
    nn.init.zeros_(down.bias)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)


class ParallelConvAdapter(nn.Module):
    """AdaptFormer's bottleneck beside a CNN block: ``block(x) + s * up(relu(down(x)))``.

    ``down`` and ``up`` are 1x1 convolutions (the token-wise linear layers of :class:`ParallelAdapter` applied at
    every pixel); ``down`` has the block's stride and ``up`` its output channels, so the two branches have the
    same shape and are added (for a block with a skip connection, the block's output already contains it). The
    up-projection starts at zero, so the adapted block starts as the pre-trained one.

    Args:
        block: the pre-trained block (frozen here).
        in_channels: the block's input channels.
        out_channels: the block's output channels.
        stride: the block's spatial stride.
        bottleneck: the adapter's hidden width.
        scale: ``s`` (0.1 in AdaptFormer).
    """

    def __init__(
        self,
        block: nn.Module,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        bottleneck: int = 16,
        scale: float = 0.1,
    ) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}.")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}.")
        self.block = block.requires_grad_(False)
        self.down = nn.Conv2d(in_channels, bottleneck, 1, stride=stride)
        self.up = nn.Conv2d(bottleneck, out_channels, 1)
        self.scale = scale
        _init_bottleneck(self.down, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.up(torch.relu(self.down(x))) * self.scale


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


@dataclass(frozen=True)
class Injection:
    """Where a method puts its layer in a network, and how it builds it.

    Attributes:
        pattern: regular expression that the full name of a target module must match
            (``model.named_modules()`` names, e.g. ``blocks\\.\\d+\\.attn\\.qkv``).
        layer: ``(target module, model, settings) -> layer`` wrapping it; ``settings`` are the baseline's
            method settings (``lora_rank``, ``adapter_bottleneck``, ...).
        where: a further test a target module must pass (e.g. being a pointwise convolution), or ``None``.
    """

    pattern: str
    layer: Callable[[nn.Module, nn.Module, dict], nn.Module]
    where: Callable[[nn.Module], bool] | None = None


def inject(model: nn.Module, injection: Injection, settings: dict) -> list[str]:
    """Replace every submodule of ``model`` that ``injection`` targets by its layer; return the names, in order.

    Modules are visited in ``named_modules()`` order, so layers draw their random initialisation in a fixed order.

    Raises:
        ValueError: no module of ``model`` matches (the pattern names modules of another architecture).
    """
    pattern = re.compile(injection.pattern)
    names = [
        name
        for name, module in model.named_modules()
        if name and pattern.fullmatch(name) and (injection.where is None or injection.where(module))
    ]
    if not names:
        raise ValueError(f"no module of the {type(model).__name__} matches {injection.pattern!r}.")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, injection.layer(model.get_submodule(name), model, settings))
    return names


def _block_geometry(block: nn.Module) -> tuple[int, int, int]:
    """(input channels, output channels, stride) of a CNN block, read from its convolutions."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TypeError(f"{type(block).__name__} has no convolution; cannot place an adapter beside it.")
    stride = math.prod(int(c.stride[0]) for c in convs)
    return convs[0].in_channels, convs[-1].out_channels, stride


#: What each method wraps in a timm ``VisionTransformer`` (``full`` and ``linear`` wrap nothing).
VIT_INJECTIONS: dict[str, Injection] = {
    "vpt": Injection(
        r"blocks\.\d+",
        lambda block, model, s: PromptedBlock(block, model.num_prefix_tokens, s["num_prompts"], model.embed_dim),
    ),
    "lora": Injection(
        r"blocks\.\d+\.attn\.qkv", lambda qkv, model, s: LoRALinear(qkv, s["lora_rank"], s["lora_alpha"])
    ),
    "adapter": Injection(
        r"blocks\.\d+\.mlp",
        lambda mlp, model, s: ParallelAdapter(mlp, model.embed_dim, s["adapter_bottleneck"], s["adapter_scale"]),
    ),
}

#: What each method wraps in a timm EfficientNet-family CNN (``full`` and ``linear`` wrap nothing).
CNN_INJECTIONS: dict[str, Injection] = {
    "lora": Injection(
        r"blocks\..+|conv_head",
        lambda conv, model, s: LoRAPointwiseConv(conv, s["lora_rank"], s["lora_alpha"]),
        where=_is_pointwise,
    ),
    "adapter": Injection(
        r"blocks\.\d+\.\d+",
        lambda block, model, s: ParallelConvAdapter(
            block, *_block_geometry(block), s["adapter_bottleneck"], s["adapter_scale"]
        ),
    ),
}


class _TimmBaseline(nn.Module):
    """What the baselines share: a timm model with a new classifier, the parameter views, train/eval, forward.

    ``self.model`` is the timm model; for every method but ``full`` only its new classifier and the modules a
    subclass adds learn.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        num_classes: int,
        injections: dict[str, Injection],
        settings: dict,
        img_size: tuple[int, ...],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        """Give ``model`` a new classifier of ``num_classes`` outputs, freeze the rest unless ``method`` is ``full``,
        and wrap the modules ``injections[method]`` names (with ``settings``); ``img_size``, ``mean`` and ``std``
        are the input the weights expect, where the bundle's transforms look for it (as on the backbones)."""
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.method = method
        self.model = model
        model.reset_classifier(num_classes)
        bind_class_names(self)  # class names travel with the classifier's weights (set by create_baseline)
        if method != "full":
            model.requires_grad_(False)
            model.get_classifier().requires_grad_(True)
        if method in injections:
            inject(model, injections[method], settings)
        self.img_size = tuple(int(s) for s in img_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: the parameters with ``requires_grad``."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        """Learnable and frozen parameter counts."""
        learnable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"learnable": learnable, "frozen": frozen}

    def train(self, mode: bool = True) -> _TimmBaseline:
        """``full``: everything follows ``mode``. Otherwise the frozen network stays in eval mode (batch norm
        statistics, dropout); the modules that own learnable parameters (classifier, adapters, LoRA, prompts)
        follow ``mode``."""
        super().train(mode)
        if self.method != "full":
            self.model.eval()
            for module in self.model.modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.training = mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) at the backbone's resolution -> logits (B, num_classes)."""
        if self.method == "linear":
            with torch.no_grad():  # the frozen features need no graph
                features = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
            return self.model.get_classifier()(features)
        return self.model(images)


class ViTBaseline(_TimmBaseline):
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
        if method not in BASELINE_METHODS:
            raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}.")
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}.")
        settings = dict(
            num_prompts=num_prompts,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            adapter_bottleneck=adapter_bottleneck,
            adapter_scale=adapter_scale,
        )
        cfg = getattr(model, "pretrained_cfg", None) or {}  # the normalisation of the weights' timm tag
        mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
        super().__init__(model, method, num_classes, VIT_INJECTIONS, settings, model.patch_embed.img_size, mean, std)


def check_cnn_method(method: str) -> None:
    """Raise ``ValueError`` unless ``method`` is one of :data:`CNN_BASELINE_METHODS` (saying why ``vpt`` is not)."""
    if method == "vpt":
        raise ValueError(
            "VPT-deep needs transformer tokens: it inserts learnable tokens into every block's token sequence, and "
            "a CNN (such as the demo backbone EfficientNet-Lite0) has no token sequence, so VPT has no counterpart "
            "on it. Use a ViT backbone (create_baseline) for VPT."
        )
    if method not in CNN_BASELINE_METHODS:
        raise ValueError(f"method must be one of {CNN_BASELINE_METHODS} on a CNN, got {method!r}.")


class CNNBaseline(_TimmBaseline):
    """A timm EfficientNet-family CNN trained with one of :data:`CNN_BASELINE_METHODS` (see the module docstring).

    Args:
        model: a timm CNN with ``conv_stem`` and ``blocks`` (stages of blocks) and pre-trained weights; its
            classifier is replaced.
        method: ``full``, ``linear``, ``lora`` or ``adapter`` (``vpt`` raises ``ValueError``: no tokens).
        num_classes: number of output logits.
        img_size: the input resolution (square) the network is used at.
        mean: per-channel input normalisation of the weights.
        std: per-channel input normalisation of the weights.
        lora_rank: LoRA rank ``r`` on every pointwise convolution.
        lora_alpha: LoRA scaling numerator (default: ``lora_rank``, a scaling of 1).
        adapter_bottleneck: hidden width of every block's adapter.
        adapter_scale: adapter scale ``s``.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str,
        num_classes: int,
        img_size: int,
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        lora_rank: int = 8,
        lora_alpha: float | None = None,
        adapter_bottleneck: int = 16,
        adapter_scale: float = 0.1,
    ) -> None:
        check_cnn_method(method)
        for attr in ("conv_stem", "blocks", "forward_features", "forward_head", "reset_classifier"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"CNNBaseline needs a timm EfficientNet-family model; {type(model).__name__} has no `{attr}`."
                )
        if int(img_size) < 1:
            raise ValueError(f"img_size must be positive, got {img_size}.")
        settings = dict(
            lora_rank=lora_rank,
            lora_alpha=float(lora_rank if lora_alpha is None else lora_alpha),
            adapter_bottleneck=adapter_bottleneck,
            adapter_scale=adapter_scale,
        )
        super().__init__(model, method, num_classes, CNN_INJECTIONS, settings, (img_size, img_size), mean, std)
        # Channels-last weights and inputs: oneDNN's depthwise and pointwise convolutions run much faster in that
        # layout (benchmarks/results/cpu_kernels.md), and cuDNN prefers it too. The state dict is unchanged.
        self.model.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) at the network's resolution, in any memory layout -> logits (B, num_classes)."""
        return super().forward(images.contiguous(memory_format=torch.channels_last))
