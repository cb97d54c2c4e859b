"""The FPT authors' numerical conventions, on request: what each of the three changes, and that defaults stay."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from fpt_monai.presets import create_fpt
from fpt_monai.conventions import AUTHORS_LAYER_NORM_EPS, apply_conventions
from fpt_monai.weights.position import resample_position_embedding

TINY = {"img_size": 64, "side_img_size": 32}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A ViT-Ti/16 weights file on its 14x14 pre-training grid, with a smooth position embedding."""
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict()
    rows, cols = torch.meshgrid(torch.linspace(0, 3, 14), torch.linspace(0, 3, 14), indexing="ij")
    waves = torch.stack([torch.sin(rows * (k + 1) / 3 + cols * k / 5) for k in range(state["pos_embed"].shape[-1])])
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], waves.reshape(1, -1, 196).transpose(1, 2)], dim=1)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_file(state, str(path))
    return path, state["pos_embed"]


def test_the_authors_resampling_is_plain_bicubic_with_the_old_scale_factor():
    rows, cols = torch.meshgrid(torch.linspace(0, 3, 24), torch.linspace(0, 3, 24), indexing="ij")
    grid = torch.stack([torch.sin(rows + 2 * cols), torch.cos(rows * cols / 3)], dim=-1).double()
    pos_embed = torch.cat([torch.zeros(1, 1, 2, dtype=torch.float64), grid.reshape(1, 576, 2)], dim=1)
    timm_way = resample_position_embedding(pos_embed, (32, 32), num_prefix_tokens=1)
    authors = resample_position_embedding(pos_embed, (32, 32), num_prefix_tokens=1, method="authors")
    expected = F.interpolate(
        grid.permute(2, 0, 1)[None], scale_factor=(32.1 / 24, 32.1 / 24), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(authors[0, 1:], expected[0].permute(1, 2, 0).reshape(1024, 2))
    torch.testing.assert_close(authors[:, :1], pos_embed[:, :1])  # the class token is kept
    difference = (authors - timm_way).abs().max().item()
    assert 1e-3 < difference < 0.2, difference  # what the convention changes: small, not round-off
    with pytest.raises(ValueError, match="method"):
        resample_position_embedding(pos_embed, (32, 32), num_prefix_tokens=1, method="nearest")


def test_each_convention_changes_only_what_it_names(weights):
    path, original = weights
    torch.manual_seed(1)
    default = create_fpt("fpt_tiny", 3, pretrained=str(path), **TINY)
    torch.manual_seed(1)
    authors = create_fpt("fpt_tiny", 3, pretrained=str(path), conventions="authors", **TINY)
    # LayerNorm eps: 1e-6 by default, 1e-12 in every LayerNorm (backbone, side network, fusion) with "authors"
    assert {m.eps for m in default.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert {m.eps for m in authors.modules() if isinstance(m, nn.LayerNorm)} == {AUTHORS_LAYER_NORM_EPS}
    # the fusion's Linear layers: truncated normal 0.02 and zero biases, or PyTorch's default (uniform, biases too)
    for net, zero_bias in ((default, True), (authors, False)):
        for linear in (m for m in net.fusion.modules() if isinstance(m, nn.Linear)):
            assert (linear.bias.abs().max().item() == 0) is zero_bias
            if not zero_bias:
                assert linear.weight.abs().max().item() <= 1 / math.sqrt(linear.in_features)
    # position embedding: timm's antialiased resampling of the file's 14x14 grid, or the authors' to 4x4
    grid = (4, 4)
    torch.testing.assert_close(
        default.backbone.model.pos_embed.detach(), resample_position_embedding(original, grid, (14, 14), 1)
    )
    torch.testing.assert_close(
        authors.backbone.model.pos_embed.detach(),
        resample_position_embedding(original, grid, (14, 14), 1, method="authors"),
    )
    # everything else is the same: the side network's weights, the backbone's other weights
    torch.testing.assert_close(default.side.state_dict(), authors.side.state_dict())
    other = {k: v for k, v in default.backbone.model.state_dict().items() if k != "pos_embed"}
    torch.testing.assert_close(other, {k: authors.backbone.model.state_dict()[k] for k in other})
    # so the frozen backbone is another one (its digest, hence the cache and checkpoints, tell them apart)
    assert default.backbone.weights_digest() != authors.backbone.weights_digest()


def test_default_conventions_change_nothing_and_unknown_ones_are_refused():
    network = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    assert apply_conventions(network, "default") is network
    torch.testing.assert_close(network.state_dict(), before)
    assert network[1].eps == 1e-5
    with pytest.raises(ValueError, match="conventions must be one of"):
        create_fpt("fpt_tiny", 3, pretrained=False, conventions="paper", **TINY)
