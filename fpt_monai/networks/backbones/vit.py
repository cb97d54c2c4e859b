"""Frozen ViT backbones: a pre-trained ViT -> selected keys/values of chosen blocks.

FPT (Huang et al., MICCAI 2024) and FPT+ (Huang et al., IEEE TNNLS 2025) never train the large pre-trained
model (LPM). For every "extracted" block l they take the attention keys K_l and values V_l the block computes
from its pre-attention LayerNorm output, keep the most attended tokens of each head
(:func:`~fpt_monai.networks.selection.select_important_tokens`), and hand them to the fusion module.

:class:`FrozenViTBackbone` implements that walk through the blocks once, for any ViT; the subclasses only say
how their blocks compute q/k/v and how they finish the block (:class:`TimmViTBackbone` for timm's
``VisionTransformer``, :class:`MonaiViTBackbone` for MONAI's 2D/3D ``ViT``). The attention of an extracted
block is computed exactly once: its softmax gives both the block output and the token importance, so the
backbone's own output is unchanged by the extraction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT
from monai.utils import ensure_tuple_rep
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from fpt_monai._compat import timm_vit_tokens
from fpt_monai.networks.backbones.base import FrozenBackbone
from fpt_monai.networks.cpu_kernels import KernelSwitch, attend_and_rank, one_image_at_a_time, use_cpu_kernels
from fpt_monai.networks.selection import mean_received_attention, select_important_tokens
from fpt_monai.utils import exporting

__all__ = ["FrozenViTBackbone", "TimmViTBackbone", "MonaiViTBackbone"]


class FrozenViTBackbone(KernelSwitch, FrozenBackbone):
    """A frozen ViT as a :class:`~fpt_monai.networks.backbones.base.FrozenBackbone`: keys/values from attention.

    Every forward runs under ``torch.no_grad()``, so no activation is ever kept for backward. Subclasses
    implement :meth:`embed`, :meth:`attention_inputs`, :meth:`finish_block` and :meth:`final_norm` for their
    block layout, and fill ``shape``, ``mean`` and ``std``. The constructor is the base class's, with the
    ViT's transformer blocks as ``blocks_in_order``.

    ``kernels`` (``"auto"``, ``"reference"``, ``"cpu"``; see :mod:`~fpt_monai.networks.cpu_kernels`) chooses between
    the batched reference path and the CPU kernels, which run one image and one head at a time; under ``"auto"`` on
    CPU inputs.
    """

    # -- hooks for a concrete block layout ---------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, *img_size) -> tokens (B, N, embed_dim), prefix tokens and position embedding added."""
        raise NotImplementedError

    def attention_inputs(
        self, block: nn.Module, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Tokens entering ``block`` -> (q, k, v, scale), q/k/v of shape (B, H, N, D) after any q/k norm."""
        raise NotImplementedError

    def finish_block(self, block: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attention context (B, H, N, D) of ``block`` -> the block's output tokens (B, N, embed_dim)."""
        raise NotImplementedError

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's final normalisation of the tokens."""
        raise NotImplementedError

    # -- the walk through the blocks, shared by every layout ------------------------------------------
    def _attend_and_rank(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Attention context (B, H, N, D) and token importance (B, H, N) from one softmax per (image, head).

        With ``v=None`` only the importance is computed (the context is ``None``).
        """
        if use_cpu_kernels(self.kernels, q):
            return attend_and_rank(q, k, v, scale)
        attention = (q * scale @ k.transpose(-2, -1)).softmax(dim=-1)
        return (None if v is None else attention @ v), mean_received_attention(attention)

    def _extracting_block(
        self, block: nn.Module, x: torch.Tensor, finish: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Output tokens of ``block`` (``None`` unless ``finish``), its selected keys/values (B, 2, H, k, D) and
        the indices (B, H, k) of the selected tokens."""
        q, k, v, scale = self.attention_inputs(block, x)
        context, importance = self._attend_and_rank(q, k, v if finish else None, scale)
        x = self.finish_block(block, x, context) if finish else None
        k_sel, v_sel, indices = select_important_tokens(k, v, importance, self.token_ratio, return_indices=True)
        return x, torch.stack((k_sel, v_sel), dim=1), indices

    def _run(self, images: torch.Tensor, all_blocks: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Keys/values (B, L, 2, H, k, D), final tokens (``None`` unless ``all_blocks``) and selected indices
        (B, L, H, k)."""
        self.check_input(images)
        if type(images) is not torch.Tensor and not exporting():
            # a MONAI MetaTensor (or other subclass): its per-op metadata handling would be paid by every op of the
            # per-head loops below, and the keys/values carry no image metadata
            images = images.as_subclass(torch.Tensor)
        if images.shape[0] > 1 and use_cpu_kernels(self.kernels, images):
            return one_image_at_a_time(lambda image: self._run_images(image, all_blocks), images)
        return self._run_images(images, all_blocks)

    def _run_images(
        self, images: torch.Tensor, all_blocks: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        x = self.embed(images)
        selected, indices = [], []
        last = self.depth - 1 if all_blocks else self.extracted_blocks[-1]
        for index, block in enumerate(self._blocks[: last + 1]):
            if index in self.extracted_blocks:
                # Of the last block only its keys, values and importance are needed unless the backbone's own
                # output is asked for: its attention output, projection and MLP (1/12 of ViT-B/16) are skipped.
                x, kv, kept = self._extracting_block(block, x, finish=all_blocks or index != last)
                selected.append(kv)
                indices.append(kept)
            else:
                x = block(x)
        return torch.stack(selected, dim=1), x, torch.stack(indices, dim=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Selected keys/values of the extracted blocks.

        Blocks after the last extracted one are not run.

        Args:
            images: (B, in_channels, *img_size) high-resolution images, normalised like the pre-training data.

        Returns:
            Tensor of shape (B, L, 2, H, k, D): for each of the L extracted blocks, the keys (index 0) and
            values (index 1) of the k most attended tokens of each of the H heads.
        """
        return self._run(images, all_blocks=False)[0]

    @torch.no_grad()
    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected keys/values as :meth:`forward`, plus the backbone's own final (normed) tokens."""
        kv, x, _ = self._run(images, all_blocks=True)
        return kv, self.final_norm(x)

    @torch.no_grad()
    def selected_token_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Indices (B, L, H, k) of the tokens :meth:`forward` keeps (its own walk and selection)."""
        return self._run(images, all_blocks=False)[2]


class TimmViTBackbone(FrozenViTBackbone):
    """Frozen timm ``VisionTransformer`` of any size (patch, width, depth and heads are read from the model).

    Build the model at the high input resolution (``timm.create_model(name, img_size=512, ...)`` or
    :func:`fpt_monai.weights.create_timm_vit`), so its position embeddings are interpolated to that grid.

    Args:
        model: a timm ``VisionTransformer`` whose blocks are standard pre-norm ``Block``s with ``Attention``.
        blocks: indices of the extracted blocks; ``None`` extracts all.
        token_ratio: fraction of tokens kept per block and head.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int] | None = None, token_ratio: float = 0.2) -> None:
        if not isinstance(model, VisionTransformer):
            raise TypeError(f"TimmViTBackbone needs a timm VisionTransformer, got {type(model).__name__}.")
        for index, block in enumerate(model.blocks):
            if type(block) is not Block or type(block.attn) is not Attention or block.attn.gate is not None:
                raise TypeError(
                    f"block {index} of the timm model is {type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__}; only standard pre-norm Block/Attention "
                    "(no gating) is supported."
                )
        if getattr(model, "dynamic_img_size", False):
            raise ValueError("build the timm model at a fixed img_size (dynamic_img_size=False).")
        super().__init__(model, list(model.blocks), blocks, token_ratio)
        # the normalisation the weights were trained with (timm's pretrained config of the model's tag)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.5, 0.5, 0.5)))
        attn = model.blocks[0].attn
        patch_embed = model.patch_embed
        self._set_shape(
            spatial_dims=2,
            in_channels=patch_embed.proj.in_channels,
            img_size=tuple(patch_embed.img_size),
            patch_size=tuple(patch_embed.patch_size),
            embed_dim=model.embed_dim,
            num_heads=attn.num_heads,
            head_dim=attn.head_dim,
            num_tokens=patch_embed.num_patches + model.num_prefix_tokens,
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return timm_vit_tokens(self.model, images)

    def attention_inputs(self, block, x):
        attn = block.attn
        b, n, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v, attn.scale

    def finish_block(self, block, x, context):
        attn = block.attn
        b, _, n, _ = context.shape
        context = attn.norm(context.transpose(1, 2).reshape(b, n, attn.attn_dim))
        x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(context))))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def final_norm(self, x):
        return self.model.norm(x)


class MonaiViTBackbone(FrozenViTBackbone):
    """Frozen MONAI ``monai.networks.nets.ViT``, 2D or 3D (``spatial_dims`` of the model).

    MONAI's ViT does not record its input and patch size, so they are given here and checked against the
    model. With ``classification=True`` the model has a class token (prefix token, not position-embedded);
    its classification head is never used.

    Args:
        model: a MONAI ``ViT`` built at the high input resolution.
        img_size: input size, an int or one per spatial dim.
        patch_size: patch size, an int or one per spatial dim.
        blocks: indices of the extracted blocks; ``None`` extracts all.
        token_ratio: fraction of tokens kept per block and head.
        mean: the input normalisation the weights were pre-trained with, after intensity scaling to [0, 1], one
            value per input channel (MONAI ViTs carry no record of it); default 0.5 ([0, 1] -> [-1, 1]).
        std: as ``mean``.
    """

    def __init__(
        self,
        model: nn.Module,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        blocks: Sequence[int] | None = None,
        token_ratio: float = 0.2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(model, ViT):
            raise TypeError(f"MonaiViTBackbone needs a monai.networks.nets.ViT, got {type(model).__name__}.")
        for index, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if (
                not isinstance(block, TransformerBlock)
                or block.with_cross_attention
                or attn.causal
                or attn.rel_positional_embedding is not None
            ):
                raise TypeError(
                    f"block {index} of the MONAI ViT is not a plain self-attention TransformerBlock "
                    "(cross-attention, causal masks and relative position embeddings are not supported)."
                )
        patch_embedding = model.patch_embedding
        conv = patch_embedding.patch_embeddings
        spatial_dims = conv.weight.ndim - 2 if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else None
        if spatial_dims is None:
            raise TypeError("MonaiViTBackbone supports the ViT's conv patch embedding (proj_type='conv') only.")
        img_size = ensure_tuple_rep(img_size, spatial_dims)
        patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        if tuple(conv.kernel_size) != patch_size:
            raise ValueError(f"patch_size {patch_size} does not match the model's patch kernel {conv.kernel_size}.")
        num_patches = math.prod(i // p for i, p in zip(img_size, patch_size))
        if num_patches != patch_embedding.n_patches:
            raise ValueError(
                f"img_size {img_size} with patch {patch_size} gives {num_patches} patches, "
                f"but the model was built for {patch_embedding.n_patches}."
            )
        mean = (0.5,) * conv.in_channels if mean is None else tuple(float(m) for m in mean)
        std = (0.5,) * conv.in_channels if std is None else tuple(float(s) for s in std)
        if len(mean) != conv.in_channels or len(std) != conv.in_channels:
            raise ValueError(f"mean {mean} and std {std} need one value per input channel ({conv.in_channels}).")
        super().__init__(model, list(model.blocks), blocks, token_ratio)
        self.mean, self.std = mean, std
        attn = model.blocks[0].attn
        self._set_shape(
            spatial_dims=spatial_dims,
            in_channels=conv.in_channels,
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=conv.out_channels,
            num_heads=attn.num_heads,
            head_dim=attn.dim_head,
            num_tokens=num_patches + int(hasattr(model, "cls_token")),
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.patch_embedding(images)
        if hasattr(self.model, "cls_token"):
            x = torch.cat((self.model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def attention_inputs(self, block, x):
        attn = block.attn
        h = block.norm1(x)
        if attn.use_combined_linear:
            q, k, v = attn.input_rearrange(attn.qkv(h)).unbind(0)
        else:
            q, k, v = (attn.input_rearrange(proj(h)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        return q, k, v, attn.scale

    def finish_block(self, block, x, context):
        attn = block.attn
        out = attn.out_rearrange(context)
        if attn.include_fc:
            out = attn.out_proj(out)
        x = x + attn.drop_output(out)
        return x + block.mlp(block.norm2(x))

    def final_norm(self, x):
        return self.model.norm(x)
