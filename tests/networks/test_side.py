import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fpt_monai.networks import SideViT


@pytest.mark.parametrize("img_size,depth,expected", [(224, 12, 1_435_589), (128, 6, 751_877)])
def test_reference_side_vit_parameter_counts(img_size, depth, expected):
    side = SideViT(img_size, 16, in_channels=3, embed_dim=96, depth=depth, num_heads=12, num_classes=5)
    assert sum(p.numel() for p in side.parameters()) == expected


def test_side_vit_is_a_standard_vit_without_prompts():
    torch.manual_seed(0)
    side = SideViT(32, 8, in_channels=3, embed_dim=16, depth=2, num_heads=2, num_classes=3).eval()
    timm_vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                                 qkv_bias=True).eval()
    state = {k.replace("patch_embed.", "patch_embed.proj."): v for k, v in side.state_dict().items()}
    timm_vit.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(side(x), timm_vit(x), atol=1e-6, rtol=1e-5)


def test_prompts_are_appended_for_one_block_then_dropped():
    side = SideViT(32, 8, in_channels=1, embed_dim=16, depth=3, num_heads=2, num_classes=2).eval()
    lengths = []
    for block in side.blocks:
        block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    prompts = torch.randn(2, 3, 5, 16)
    out = side(torch.randn(2, 1, 32, 32), prompts)
    assert out.shape == (2, 2)
    assert lengths == [1 + 16 + 5] * 3  # [CLS, 16 patches, 5 prompts] at every block, never accumulated


def test_each_blocks_prompts_change_the_output():
    torch.manual_seed(0)
    side = SideViT(32, 8, in_channels=1, embed_dim=16, depth=3, num_heads=2, num_classes=2).eval()
    x, prompts = torch.randn(1, 1, 32, 32), torch.randn(1, 3, 4, 16)
    base = side(x, prompts)
    for block in range(3):
        changed = prompts.clone()
        changed[:, block] = torch.randn(1, 4, 16)
        assert (side(x, changed) - base).abs().max() > 1e-5


def test_3d_side_vit_shapes():
    side = SideViT((16, 32, 32), 8, in_channels=1, embed_dim=16, depth=2, num_heads=4, num_classes=3, spatial_dims=3)
    assert side.pos_embed.shape == (1, 1 + 2 * 4 * 4, 16)
    assert side(torch.randn(2, 1, 16, 32, 32), torch.randn(2, 2, 3, 16)).shape == (2, 3)


def test_initialisation():
    side = SideViT(32, 8, in_channels=3, embed_dim=64, depth=2, num_heads=2, num_classes=2)
    assert torch.equal(side.norm.weight, torch.ones(64)) and torch.equal(side.norm.bias, torch.zeros(64))
    weight = side.blocks[0].mlp.fc1.weight
    assert abs(weight.std().item() - 0.02) < 0.002  # trunc_normal_(std=0.02) with the MONAI/timm bounds
    assert torch.equal(side.head.bias, torch.zeros(2))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        SideViT(30, 8, 1, 16, 2, 2, 2)
    with pytest.raises(ValueError, match="num_heads"):
        SideViT(32, 8, 1, 15, 2, 2, 2)
    side = SideViT(32, 8, 1, 16, 2, 2, 2)
    with pytest.raises(ValueError, match=r"\(B, 1, 32, 32\)"):
        side(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="block_prompts"):
        side(torch.randn(1, 1, 32, 32), torch.randn(1, 3, 4, 16))


def _saved_bytes(fn) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        fn()
    return sum(saved)


@pytest.mark.parametrize("fused", [False, True])
def test_recomputing_attention_gives_plain_gradients_and_keeps_no_attention_matrix(fused):
    import copy

    from timm.layers import Attention

    torch.manual_seed(0)
    side = SideViT(32, 8, in_channels=3, embed_dim=16, depth=2, num_heads=4, num_classes=3).train()
    plain = copy.deepcopy(side)
    for block in plain.blocks:  # timm's own attention: same parameters, nothing recomputed
        block.attn.__class__ = Attention
    for net in (side, plain):
        for block in net.blocks:
            block.attn.fused_attn = fused
    x, prompts = torch.randn(2, 3, 32, 32), torch.randn(2, 2, 3, 16)
    side(x, prompts).sum().backward()
    plain(x, prompts).sum().backward()
    for (name, p), q in zip(side.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    recomputing, stock = _saved_bytes(lambda: side(x, prompts)), _saved_bytes(lambda: plain(x, prompts))
    attention_matrices = 2 * 2 * 4 * 20 * 20 * 4  # blocks x batch x heads x (17 tokens + 3 prompts)^2 x float32
    # eager: the softmax matrices are no longer kept; fused attention runs the plain path
    if fused:
        assert recomputing == stock
    else:
        assert stock - recomputing >= attention_matrices
