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


def test_prompts_are_given_to_one_block_each_and_dropped():
    side = SideViT(32, 8, in_channels=1, embed_dim=16, depth=3, num_heads=2, num_classes=2).eval()
    calls = []
    for block in side.blocks:
        block.register_forward_hook(
            lambda m, args, kwargs, out: calls.append((args[0].shape[1], args[1].shape[1], out.shape[1])),
            with_kwargs=True,
        )
    prompts = torch.randn(2, 3, 5, 16)
    assert side.forward_features(torch.randn(2, 1, 32, 32), prompts).shape == (2, 17, 16)
    assert calls == [(1 + 16, 5, 1 + 16)] * 3  # [CLS, 16 patches] beside 5 prompts, prompts never accumulated


def reference_logits(side, x, prompts):
    """The papers' injection with timm's own blocks: block(cat(tokens, prompts)), then the prompts dropped."""
    import copy

    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    plain = copy.deepcopy(side)
    for block in plain.blocks:
        block.__class__, block.attn.__class__, block.mlp.__class__ = Block, Attention, Mlp
        block.attn.fused_attn = False
    tokens = plain.patch_embed(x).flatten(2).transpose(1, 2)
    tokens = torch.cat((plain.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1) + plain.pos_embed
    for index, block in enumerate(plain.blocks):
        tokens = block(torch.cat((tokens, prompts[:, index]), dim=1))[:, : -prompts.shape[2]]
    return plain.head(plain.norm(tokens)[:, 0]), plain


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_side_vit_matches_timm_blocks_on_concatenated_prompts(recompute, fused):
    """Queries, MLP and projection only for the kept tokens (CLS only in the last block) change no result."""
    torch.manual_seed(0)
    side = SideViT(32, 8, in_channels=3, embed_dim=16, depth=3, num_heads=4, num_classes=3, recompute=recompute)
    for block in side.blocks:
        block.attn.fused_attn = fused
    x, prompts = torch.randn(5, 3, 32, 32), torch.randn(5, 3, 4, 16, requires_grad=True)
    logits = side.train()(x, prompts)
    (grad_prompts,) = torch.autograd.grad(logits.square().sum(), prompts, retain_graph=True)
    logits.square().sum().backward()
    reference, plain = reference_logits(side, x, prompts)
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=1e-5)
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), prompts, retain_graph=True)
    reference.square().sum().backward()
    torch.testing.assert_close(grad_prompts, grad_reference, atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(side.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(side.eval()(x, prompts), reference, atol=1e-6, rtol=1e-5)


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


def test_recompute_keeps_no_attention_matrix_and_stored_keeps_them():
    torch.manual_seed(0)
    side = SideViT(32, 8, in_channels=3, embed_dim=16, depth=3, num_heads=4, num_classes=3, kernels="cpu").train()
    x, prompts = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 3, 16)
    side.recompute = True
    recomputing = _saved_bytes(lambda: side(x, prompts))
    side.recompute = False
    storing = _saved_bytes(lambda: side(x, prompts))
    # two full blocks (17 queries over 17 tokens + 3 prompts) and the CLS-only last block, batch 2, 4 heads, float32
    attention_matrices = 2 * 4 * (2 * 17 + 1) * 20 * 4
    assert storing - recomputing >= attention_matrices
    # "auto" trains the attention with PyTorch's fused attention, which keeps no attention matrix either
    side.kernels, side.recompute = "auto", True
    assert _saved_bytes(lambda: side(x, prompts)) <= recomputing


def test_recompute_is_one_switch_over_every_block():
    side = SideViT(32, 8, in_channels=3, embed_dim=16, depth=2, num_heads=4, num_classes=3, recompute=False)
    assert not side.recompute
    assert not any(block.attn.recompute or block.mlp.recompute for block in side.blocks)
    side.recompute = True
    assert all(block.attn.recompute and block.mlp.recompute for block in side.blocks)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_linear_gradients(approximate):
    from fpt_monai.networks.cpu_kernels import GeluLinear

    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b: GeluLinear.apply(h, w, b, approximate), (hidden, weight, bias))
    expected = torch.nn.functional.linear(torch.nn.functional.gelu(hidden, approximate=approximate), weight, bias)
    torch.testing.assert_close(GeluLinear.apply(hidden, weight, bias, approximate), expected)


@pytest.mark.parametrize("keep_probabilities", [False, True])
def test_narrow_head_attention_gradients(keep_probabilities):
    from fpt_monai.networks.cpu_kernels import NarrowHeadAttention

    torch.manual_seed(0)
    qt, kt, vt = (torch.randn(3, 2, 4, n, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    fn = lambda q, k, v: NarrowHeadAttention.apply(q, k, v, 0.5, keep_probabilities)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qt, kt, vt))
    expected = ((qt.transpose(-2, -1) @ kt) * 0.5).softmax(dim=-1) @ vt.transpose(-2, -1)
    torch.testing.assert_close(fn(qt, kt, vt), expected.transpose(-2, -1))


def test_narrow_head_attention_is_stable_for_large_scores():
    """Scores in the thousands (far beyond exp's float32 range) give the softmax, not inf or NaN."""
    from fpt_monai.networks.cpu_kernels import NarrowHeadAttention

    torch.manual_seed(0)
    qt, kt, vt = (torch.randn(2, 2, 8, n) * 30 for n in (5, 6, 6))
    for t in (qt, kt, vt):
        t.requires_grad_()
    out = NarrowHeadAttention.apply(qt, kt, vt, 8**-0.5, False)
    expected = ((qt.transpose(-2, -1) @ kt) * 8**-0.5).softmax(dim=-1) @ vt.transpose(-2, -1)
    torch.testing.assert_close(out, expected.transpose(-2, -1))
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (qt, kt, vt))
