import math

import pytest
import torch
from monai.networks.nets import ViT
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from conftest import make_tiny_timm_vit
from fpt_monai.networks import MonaiViTBackbone, TimmViTBackbone


def reference_kv(model, images, blocks, ratio, qkv_of):
    """Keys/values captured from the model's own plain forward, selected from the full attention matrix."""
    captured = {}
    hooks = [qkv_of(model, i).register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)) for i in blocks]
    with torch.no_grad():
        output = model(images)
    for hook in hooks:
        hook.remove()
    selected = []
    for i in blocks:
        b, n, three_c = captured[i].shape
        heads = 4
        q, k, v = captured[i].reshape(b, n, 3, heads, three_c // 3 // heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        keep = int(n * ratio)
        index = attention.mean(dim=2).argsort(dim=-1, descending=True)[..., :keep].sort(dim=-1).values
        index = index[..., None].expand(-1, -1, -1, k.shape[-1])
        selected.append(torch.stack((k.gather(2, index), v.gather(2, index)), dim=1))
    return torch.stack(selected, dim=1), output


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("blocks", [None, (1, 3), (0,)])
def test_timm_adapter_matches_plain_timm_forward(tiny_timm_vit, blocks, fused):
    for block in tiny_timm_vit.blocks:
        block.attn.fused_attn = fused
    backbone = TimmViTBackbone(tiny_timm_vit, blocks=blocks, token_ratio=0.2)
    images = torch.randn(2, 3, 64, 64)
    kv, features = backbone.forward_with_features(images)
    used = blocks or range(4)
    kv_ref, _ = reference_kv(tiny_timm_vit, images, used, 0.2, lambda m, i: m.blocks[i].attn.qkv)
    torch.testing.assert_close(features, tiny_timm_vit.forward_features(images), atol=1e-5, rtol=1e-5)
    assert kv.shape == (2, len(used), 2, 4, 13, 16) == (2, *backbone.shape.kv_shape)
    torch.testing.assert_close(kv, kv_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone(images), kv)


def test_timm_adapter_reads_shape_from_model():
    model = VisionTransformer(img_size=(48, 32), patch_size=16, embed_dim=96, depth=3, num_heads=6, num_classes=0)
    shape = TimmViTBackbone(model, token_ratio=0.5).shape
    assert (shape.img_size, shape.patch_size, shape.embed_dim, shape.num_heads, shape.head_dim) == (
        (48, 32), (16, 16), 96, 6, 16)
    assert shape.num_tokens == 3 * 2 + 1 and shape.blocks == (0, 1, 2)
    assert shape.kv_shape == (3, 2, 6, 3, 16)


def test_backbone_is_frozen_and_keeps_no_activations(tiny_timm_vit):
    backbone = TimmViTBackbone(tiny_timm_vit, blocks=(2,))
    backbone.train()
    assert not backbone.training and not backbone.model.training
    assert all(not p.requires_grad for p in backbone.parameters())
    images = torch.randn(1, 3, 64, 64, requires_grad=True)
    kv = backbone(images)
    assert not kv.requires_grad and kv.grad_fn is None


def test_blocks_after_the_last_extracted_one_are_not_run(tiny_timm_vit):
    calls = []
    tiny_timm_vit.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    TimmViTBackbone(tiny_timm_vit, blocks=(0, 2))(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_last_extracted_block_stops_after_its_keys_and_values(tiny_timm_vit):
    # forward() needs only the last block's keys/values and importance: its projection and MLP are skipped,
    # forward_with_features() runs them (the backbone's own output needs them); the keys/values agree.
    calls = []
    for module in (tiny_timm_vit.blocks[2].attn.proj, tiny_timm_vit.blocks[2].mlp, tiny_timm_vit.blocks[1].mlp):
        module.register_forward_hook(lambda m, *a: calls.append(m))
    backbone = TimmViTBackbone(tiny_timm_vit, blocks=(0, 2))
    images = torch.randn(2, 3, 64, 64)
    kv = backbone(images)
    assert calls == [tiny_timm_vit.blocks[1].mlp] * 2  # the CPU path runs one image at a time
    calls.clear()
    kv_all, _ = backbone.forward_with_features(images)
    assert tiny_timm_vit.blocks[2].mlp in calls and tiny_timm_vit.blocks[2].attn.proj in calls
    torch.testing.assert_close(kv, kv_all, rtol=0, atol=0)
    # the whole batch at once (the accelerator path) selects the same keys/values
    with torch.no_grad():
        torch.testing.assert_close(backbone._run_images(images, all_blocks=False)[0], kv)


def test_wrong_input_size_names_expected_shape(tiny_timm_vit):
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        TimmViTBackbone(tiny_timm_vit)(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("blocks,match", [((4,), "out of range"), ((), "at least one"), ((2, 1), "increasing")])
def test_bad_blocks_raise(tiny_timm_vit, blocks, match):
    with pytest.raises(ValueError, match=match):
        TimmViTBackbone(tiny_timm_vit, blocks=blocks)


def test_ratio_keeping_nothing_raises(tiny_timm_vit):
    with pytest.raises(ValueError, match="keeps no token"):
        TimmViTBackbone(tiny_timm_vit, token_ratio=0.01)


def test_unsupported_timm_blocks_raise():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="ResPostBlock"):
        TimmViTBackbone(model)
    with pytest.raises(TypeError, match="VisionTransformer"):
        TimmViTBackbone(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "spatial_dims,img_size,classification",
    [(2, (64, 48), True), (2, (32, 32), False), (3, (32, 32, 32), False), (3, (32, 16, 32), True)],
)
def test_monai_adapter_matches_plain_monai_forward(spatial_dims, img_size, classification):
    torch.manual_seed(0)
    model = ViT(
        in_channels=1, img_size=img_size, patch_size=8, hidden_size=64, mlp_dim=128, num_layers=3, num_heads=4,
        classification=classification, spatial_dims=spatial_dims, qkv_bias=True,
    ).eval()
    backbone = MonaiViTBackbone(model, img_size, 8, blocks=(0, 2), token_ratio=0.25)
    images = torch.randn(2, 1, *img_size)
    kv, features = backbone.forward_with_features(images)
    with torch.no_grad():
        _, hidden = model(images)
    torch.testing.assert_close(features, model.norm(hidden[-1]), atol=1e-5, rtol=1e-5)
    num_tokens = backbone.shape.num_tokens
    assert num_tokens == math.prod(s // 8 for s in img_size) + int(classification)
    kv_ref, _ = reference_kv(model, images, (0, 2), 0.25, lambda m, i: m.blocks[i].attn.qkv)
    torch.testing.assert_close(kv, kv_ref, atol=1e-5, rtol=1e-5)
    assert kv.shape == (2, 2, 2, 4, int(num_tokens * 0.25), 16)


def test_monai_adapter_checks_sizes():
    model = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2,
                spatial_dims=3)
    with pytest.raises(ValueError, match="patch_size"):
        MonaiViTBackbone(model, 32, 16)
    with pytest.raises(ValueError, match="patches"):
        MonaiViTBackbone(model, 64, 8)


def test_metatensor_images_give_the_same_keys_and_values(tiny_timm_vit):
    from monai.data import MetaTensor

    backbone = TimmViTBackbone(tiny_timm_vit, blocks=(1, 3))
    images = torch.randn(2, 3, 64, 64)
    kv = backbone(MetaTensor(images.clone(), meta={"filename_or_obj": "a.png"}))
    assert type(kv) is torch.Tensor
    torch.testing.assert_close(kv, backbone(images), rtol=0, atol=0)
