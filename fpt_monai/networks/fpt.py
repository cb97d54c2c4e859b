"""FPTNet: Fine-grained Prompt Tuning (FPT, MICCAI 2024) and FPT+ (IEEE TNNLS 2025) as one network.

A frozen pre-trained ViT sees the image at high resolution; a small side ViT sees it at low resolution;
fine-grained prompts carry what the frozen ViT saw into every side block through the fusion module.

Two entry points share one implementation:

- ``forward(images)``: high-resolution images -> logits. The side view is made inside by resizing, so the
  network drops into any MONAI pipeline (``SupervisedTrainer``, ``SimpleInferer``, ...).
- ``forward_side(side_images, kv)`` (also ``forward(side_images, kv=kv)``): low-resolution (possibly
  augmented) images plus the frozen backbone's selected keys/values, computed earlier (preloading) -> logits.
  The backbone is not run.

References:
    Huang, Cheng, Tam, Tang. Fine-grained Prompt Tuning: A Parameter and Memory Efficient Transfer Learning
    Method for High-resolution Medical Image Classification. MICCAI 2024. arXiv:2403.07576.
    Huang, Cheng, Tam, Tang. Boosting Memory Efficiency in Transfer Learning for High-Resolution Medical Image
    Classification. IEEE TNNLS 2025. arXiv:2408.02426.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import ensure_tuple_rep

from fpt_monai.networks.backbones import BackboneShape, FrozenBackbone
from fpt_monai.networks.cpu_kernels import KernelSwitch, check_kernels
from fpt_monai.networks.fusion import FUSION_VARIANTS, FineGrainedFusion, FineGrainedPrompts
from fpt_monai.networks.labels import bind_class_names, class_names_of
from fpt_monai.networks.side import SideViT

__all__ = ["BACKBONE_REFERENCE_KEY", "FPTNet", "make_side_view"]


def make_side_view(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize high-resolution images (B, C, *spatial) to the side network's low resolution.

    2D uses antialiased bilinear interpolation (a plain bilinear 512 -> 224 would alias the fine detail the
    method is about). 3D shrinks by area averaging (PyTorch has no antialiased trilinear mode, and a plain
    trilinear 128 -> 32 would sample a few voxels and skip the rest), and enlarges trilinearly.
    """
    size = tuple(int(s) for s in size)
    if tuple(images.shape[2:]) == size:
        return images
    if images.ndim == 4:
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    if images.ndim == 5:
        if all(s <= i for s, i in zip(size, images.shape[2:])):
            return F.interpolate(images, size=size, mode="area")
        return F.interpolate(images, size=size, mode="trilinear", align_corners=False)
    raise ValueError(f"images must be (B, C, H, W) or (B, C, D, H, W), got {tuple(images.shape)}.")


class FPTNet(KernelSwitch, nn.Module):
    """Fine-grained Prompt Tuning network (FPT or FPT+) around a frozen ViT backbone.

    The side ViT's shape is derived from the backbone: width ``embed_dim // reduction``, the backbone's head
    count, one block per extracted backbone block, the backbone's patch size and channels. Prompts have the
    side width (FPT) or the backbone width (FPT+).

    Only the side network, the prompts and the fusion module learn; the backbone's parameters have
    ``requires_grad=False``, it stays in eval mode, and it runs under no-grad.

    Checkpoints hold only what learns: ``state_dict()`` leaves the frozen backbone's tensors out and records
    their SHA-256 under ``"backbone_sha256"`` instead (1.6 M instead of 88 M values for the ``fpt`` preset).
    ``load_state_dict`` keeps the backbone the network was built with, and refuses a checkpoint whose digest
    names other backbone weights, or that has no digest (unless ``allow_missing_backbone_digest`` is set). Set
    ``backbone_in_state_dict = True`` for a state dict with everything.

    Args:
        backbone: a :class:`FrozenBackbone`, or only its :class:`BackboneShape` to build a network that
            trains on preloaded keys/values without the backbone's weights resident (``forward`` then raises).
        num_classes: number of output logits.
        side_img_size: input size of the side network (224 for FPT, 128 for FPT+), int or one per dim.
        variant: ``"fpt"`` or ``"fpt_plus"``, the fusion module variant.
        num_prompts: prompts per side block (16).
        reduction: backbone width / side width (8).
        fusion_dropout: dropout on the fused prompts (0.5).
        side_drop_path_rate: stochastic depth of the side network (0).
        side_only: ablation: cut the high-resolution branch. The side network runs alone on the low-resolution
            view, without prompts; keys/values are accepted and ignored, and the prompts and fusion module are
            frozen. Trained with the same pipeline, it shows what the frozen backbone's features add.
        recompute: where training memory and speed pull apart. ``True`` (default): the side ViT recomputes its
            MLP activations (and, under ``kernels="cpu"``, its attention probabilities) in backward instead of
            keeping them. ``False``: it keeps them, which is faster and costs more memory (see the ``step``
            benchmark in ``benchmarks/README.md``). Applies where the CPU kernels run (the reference path is plain
            autograd). Also settable later through ``net.side.recompute``.
        kernels: which implementation runs, one switch for the backbone, fusion and side network (also an
            attribute, settable later): ``"auto"`` (default) the hand-written CPU kernels for training work on a
            CPU (:mod:`~fpt_monai.networks.cpu_kernels`: the side network's MLP and the fusion in training, the
            frozen backbone whenever it runs there), the reference path (stock PyTorch and timm operations,
            ``scaled_dot_product_attention``) otherwise: for the side network's attention, on any other device and
            in inference; ``"reference"`` the reference path everywhere; ``"cpu"`` every kernel for training work on
            any device. Exports always take the reference path. Both paths compute the same outputs and gradients.
        class_names: the names of the classes in output order, bound to the network
            (:func:`~fpt_monai.networks.labels.bind_class_names`): saved in its state dict and exports, and
            checked against a checkpoint's when one is loaded. ``None``: taken from the first checkpoint loaded.

    Example::

        backbone = TimmViTBackbone(create_timm_vit("vit_base_patch16_384.orig_in21k_ft_in1k", img_size=512))
        net = FPTNet(backbone, num_classes=5, side_img_size=224)
        logits = net(torch.rand(2, 3, 512, 512))
    """

    def __init__(
        self,
        backbone: FrozenBackbone | BackboneShape,
        num_classes: int,
        side_img_size: Sequence[int] | int,
        variant: str = "fpt",
        num_prompts: int = 16,
        reduction: int = 8,
        fusion_dropout: float = 0.5,
        side_drop_path_rate: float = 0.0,
        side_only: bool = False,
        recompute: bool = True,
        class_names: Sequence[str] | None = None,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(backbone, FrozenBackbone):
            self.backbone: FrozenBackbone | None = backbone
            shape = backbone.shape
        elif isinstance(backbone, BackboneShape):
            self.backbone = None
            shape = backbone
        else:
            raise TypeError(f"backbone must be a FrozenBackbone or a BackboneShape, got {type(backbone).__name__}.")
        if variant not in FUSION_VARIANTS:
            raise ValueError(f"variant must be one of {FUSION_VARIANTS}, got {variant!r}.")
        check_kernels(kernels)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names {list(class_names)} has {len(class_names)} names for {num_classes} classes.")
        if reduction < 1 or shape.embed_dim % reduction:
            raise ValueError(f"reduction {reduction} must divide the backbone width {shape.embed_dim}.")
        side_dim = shape.embed_dim // reduction
        if side_dim % shape.num_heads:
            raise ValueError(
                f"side width {side_dim} (= {shape.embed_dim} / {reduction}) must be divisible by the backbone's "
                f"{shape.num_heads} heads; choose another reduction."
            )
        self.shape = shape
        self.variant = variant
        self.side_img_size = ensure_tuple_rep(side_img_size, shape.spatial_dims)
        self.side = SideViT(
            img_size=self.side_img_size,
            patch_size=shape.patch_size,
            in_channels=shape.in_channels,
            embed_dim=side_dim,
            depth=len(shape.blocks),
            num_heads=shape.num_heads,
            num_classes=num_classes,
            spatial_dims=shape.spatial_dims,
            drop_path_rate=side_drop_path_rate,
            recompute=recompute,
        )
        self.fusion = FineGrainedFusion(
            variant,
            side_dim=side_dim,
            backbone_dim=shape.num_heads * shape.head_dim,
            num_heads=shape.num_heads,
            dropout=fusion_dropout,
        )
        self.prompts = FineGrainedPrompts(len(shape.blocks), num_prompts, self.fusion.prompt_dim)
        self.side_only = bool(side_only)
        if self.side_only:
            self.fusion.requires_grad_(False)
            self.prompts.requires_grad_(False)
        #: Whether ``state_dict`` includes the frozen backbone's weights (off: checkpoints hold only what learns).
        self.backbone_in_state_dict = False
        #: Whether a strict ``load_state_dict`` accepts a checkpoint without the backbone digest (off: refused).
        self.allow_missing_backbone_digest = False
        self.kernels = kernels
        self.register_state_dict_post_hook(_reference_frozen_backbone)
        self.register_load_state_dict_pre_hook(_check_and_keep_frozen_backbone)
        bind_class_names(self, class_names)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that learn (side network, fusion, prompts): what the optimizer should get."""
        return [p for p in self.parameters() if p.requires_grad]

    def side_view(self, images: torch.Tensor) -> torch.Tensor:
        """The low-resolution view of high-resolution images that ``forward`` feeds the side network."""
        return make_side_view(images, self.side_img_size)

    def forward_side(self, side_images: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Logits from the side view and the backbone's selected keys/values (preloading path).

        Args:
            side_images: (B, C, *side_img_size) low-resolution images.
            kv: (B, *shape.kv_shape) selected keys/values, any floating dtype (computed in float32).
        """
        expected = tuple(self.shape.kv_shape)
        if kv.ndim != 6 or tuple(kv.shape[1:]) != expected:
            raise ValueError(
                f"kv must have shape (B, {', '.join(map(str, expected))}) for this network "
                f"(blocks {self.shape.blocks}, token_ratio {self.shape.token_ratio}), got {tuple(kv.shape)}."
            )
        if kv.shape[0] != side_images.shape[0]:
            raise ValueError(f"batch sizes differ: side images {side_images.shape[0]}, kv {kv.shape[0]}.")
        if self.side_only:
            return self.side(side_images)
        block_prompts = self.fusion(self.prompts(), kv)
        return self.side(side_images, block_prompts)

    def forward(self, images: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_classes).

        Args:
            images: high-resolution images (B, C, *shape.img_size); or, when ``kv`` is given, the side view
                (B, C, *side_img_size).
            kv: preloaded keys/values (see :meth:`forward_side`). Given, the backbone is not run; this lets a
                MONAI ``SupervisedTrainer`` feed batches of a preloading cache through
                ``PrepareBatchExtraInput({"kv": "kv"})``.
        """
        if kv is not None:
            return self.forward_side(images, kv)
        if self.backbone is None:
            raise RuntimeError(
                "this FPTNet was built from a BackboneShape without the backbone's weights; "
                "use forward_side(side_images, kv) with preloaded keys/values."
            )
        if self.side_only:
            return self.side(self.side_view(images))
        return self.forward_side(self.side_view(images), self.backbone(images))

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: a trace of ``forward(images)`` at the backbone's input size.

        TorchScript is how MONAI's ``ckpt_export`` (and the Model Zoo's check) export a bundle's network. FPTNet's
        control flow depends only on its fixed shapes (the backbone's ``img_size``, the side view's size, the
        extracted blocks), never on values or the batch size, and what is Python-only (activation recomputation,
        the fusion's memory-saving autograd function) runs in training alone; so a trace in eval mode is the
        same graph scripting would compile, for any batch size. ``torch.export.export(network, (images,))`` needs
        none of this and is the forward-looking export (TorchScript is deprecated).

        A trace keeps no Python shape check, so :class:`TracedNetwork` holds the input-shape check the eager
        network makes (other image sizes are refused, not turned into plausible logits), and the class names as
        the attribute ``class_names`` (``torch.jit.load(path).class_names``).
        """
        if self.backbone is None:
            raise RuntimeError("an FPTNet built from a BackboneShape has no backbone to export; build it with one.")
        example = torch.zeros(2, self.shape.in_channels, *self.shape.img_size, device=self.prompts.prompts.device)
        training = self.training
        self.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # shape-to-Python conversions of the fixed shapes above; the batch size stays symbolic
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(self, example, check_trace=False)
        finally:
            self.train(training)
        return TracedNetwork(traced, (self.shape.in_channels, *self.shape.img_size), class_names_of(self) or [])

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts: side network, fusion (prompts included), learnable total, frozen backbone."""
        side = sum(p.numel() for p in self.side.parameters())
        fusion = sum(p.numel() for p in self.fusion.parameters()) + self.prompts.prompts.numel()
        frozen = 0 if self.backbone is None else sum(p.numel() for p in self.backbone.parameters())
        return {"side": side, "fusion": fusion, "learnable": side + fusion, "frozen": frozen}


class TracedNetwork(nn.Module):
    """A traced module behind a scriptable ``forward(images)``: what scripting an :class:`FPTNet` compiles.

    ``forward`` refuses images whose shape is not (B, *input_shape), as the eager network's backbone does: a trace
    drops Python shape checks, and the traced graph would otherwise return plausible logits for other image
    sizes (a CNN backbone runs on any size). ``class_names`` (in output order) and ``input_shape`` are kept as
    TorchScript attributes of the saved module.
    """

    # real types, not strings (this module's annotations are postponed): TorchScript reads them for the attributes
    __annotations__ = {"class_names": list[str], "input_shape": list[int]}

    def __init__(self, traced: torch.jit.ScriptModule, input_shape: Sequence[int], class_names: Sequence[str]) -> None:
        super().__init__()
        self.traced = traced
        self.input_shape = [int(s) for s in input_shape]
        self.class_names = [str(c) for c in class_names]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != len(self.input_shape) + 1 or list(images.shape[1:]) != self.input_shape:
            raise ValueError(
                "the network expects images of shape (B, "
                + ", ".join([str(s) for s in self.input_shape])
                + "), got "
                + str(images.shape)
                + "; resize the images to the size it was built for."
            )
        return self.traced(images)


#: State-dict key of the frozen backbone's weights digest (SHA-256 bytes as uint8) that a checkpoint refers to.
BACKBONE_REFERENCE_KEY = "backbone_sha256"


def _reference_frozen_backbone(module: FPTNet, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: replace the frozen backbone's tensors by a digest of them (see :class:`FPTNet`)."""
    if module.backbone is None or module.backbone_in_state_dict:
        return
    for key in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[key]
    digest = bytes.fromhex(module.backbone.weights_digest())
    state_dict[prefix + BACKBONE_REFERENCE_KEY] = torch.tensor(list(digest), dtype=torch.uint8)


def _check_and_keep_frozen_backbone(
    module: FPTNet, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """Load pre-hook: check a checkpoint's backbone digest, and keep the backbone's weights where it has none."""
    reference = state_dict.pop(prefix + BACKBONE_REFERENCE_KEY, None)
    if module.backbone is None:
        return
    if reference is not None:
        expected = bytes(reference.to(torch.uint8).cpu().tolist()).hex()
        actual = module.backbone.weights_digest()
        if expected != actual:
            error_msgs.append(
                f"the checkpoint was trained on frozen backbone weights with SHA-256 {expected[:16]}..., but this "
                f"network's backbone has {actual[:16]}...: build the network with the same backbone weights "
                "(the same preset and `pretrained` file) as in training."
            )
    elif (
        strict
        and not module.allow_missing_backbone_digest
        and not any(
            k.startswith(prefix + "backbone.") for k in state_dict  # a full state dict brings its backbone along
        )
    ):
        error_msgs.append(
            f"the checkpoint has no '{BACKBONE_REFERENCE_KEY}': nothing says which frozen backbone weights it was "
            "trained with, so it is refused. If you know it was trained with this network's backbone (the same "
            "preset and `pretrained` file), load it with allow_missing_backbone_digest=True (bundle: "
            "--allow_missing_backbone_digest True)."
        )
    for name, tensor in module.backbone.state_dict(prefix=prefix + "backbone.", keep_vars=True).items():
        state_dict.setdefault(name, tensor.detach())
