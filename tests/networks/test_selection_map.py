"""The frozen backbones' selection maps show the tokens their forward actually keeps."""

from __future__ import annotations

import pytest
import timm
import torch
from monai.networks.nets import ViT

from conftest import make_tiny_timm_vit
from fpt_monai.networks import MonaiViTBackbone, TimmViTBackbone
from fpt_monai.networks.backbones.cnn import FrozenCNNBackbone


def kept_fraction(selected: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Per image and token, the fraction of (block, head) pairs whose selected keys contain the token's key.

    ``selected``: the forward's keys/values (B, L, 2, H, k, D); ``full``: the same backbone's at token ratio 1
    (B, L, 2, H, N, D), every token in sequence order. A selected key is found by exact match.
    """
    b, blocks, _, heads, n, _ = full.shape
    counts = torch.zeros(b, n)
    for i in range(b):
        for block in range(blocks):
            for head in range(heads):
                keys, chosen = full[i, block, 0, head], selected[i, block, 0, head]
                match = (chosen[:, None, :] == keys[None, :, :]).all(dim=-1)  # (k, N)
                assert (match.sum(dim=1) == 1).all(), "every selected key is exactly one token's key"
                counts[i] += match.any(dim=0).float()
    return counts / (blocks * heads)


def timm_backbones(ratio):
    model = make_tiny_timm_vit(img_size=64, depth=4)
    return TimmViTBackbone(model, blocks=(1, 3), token_ratio=ratio), TimmViTBackbone(model, blocks=(1, 3), token_ratio=1)


def monai_backbones(ratio):
    torch.manual_seed(0)
    model = ViT(in_channels=3, img_size=64, patch_size=16, hidden_size=32, mlp_dim=64, num_layers=3, num_heads=4,
                spatial_dims=2, classification=True)
    make = lambda r: MonaiViTBackbone(model, 64, 16, blocks=(0, 2), token_ratio=r)  # noqa: E731
    return make(ratio), make(1)


def cnn_backbones(ratio):
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    make = lambda r: FrozenCNNBackbone(model, img_size=64, blocks=(3, 5), token_ratio=r, num_heads=2,  # noqa: E731
                                       head_dim=16)
    return make(ratio), make(1)


@pytest.mark.parametrize("backbones", [timm_backbones, monai_backbones, cnn_backbones], ids=["timm", "monai", "cnn"])
def test_selection_map_is_the_fraction_of_blocks_and_heads_whose_forward_kept_each_patch(backbones):
    backbone, every_token = backbones(0.25)
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    expected = kept_fraction(backbone(images), every_token(images))
    selection = backbone.selection_map(images)
    grid = backbone.shape.grid
    assert grid == tuple(i // p for i, p in zip(backbone.shape.img_size, backbone.shape.patch_size))
    assert selection.shape == (2, *grid) and not selection.requires_grad
    prefix = backbone.shape.num_tokens - grid[0] * grid[1]
    torch.testing.assert_close(selection.reshape(2, -1), expected[:, prefix:], rtol=0, atol=1e-6)
    assert 0 < selection.sum() and selection.max() <= 1
    # the same indices one image at a time and as a batch (the CPU path runs ViTs image by image)
    torch.testing.assert_close(backbone.selection_map(images[1:]), selection[1:])
