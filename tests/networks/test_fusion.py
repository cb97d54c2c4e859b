import pytest
import torch

from fpt_monai.networks import FineGrainedFusion, FineGrainedPrompts
from fpt_monai.networks.cpu_kernels import PromptCrossAttention


def reference_fusion(fusion, prompts, kv):
    """The spec's formulas, head by head, with explicit softmax(q K^T / sqrt(d)) V."""
    b, num_blocks, _, heads, _, d = kv.shape
    q = fusion.query(prompts)  # Linear (FPT) or LayerNorm (FPT+)
    out = torch.empty(b, num_blocks, prompts.shape[1], fusion.side_dim)
    for bi in range(b):
        for block in range(num_blocks):
            ctx = []
            for h in range(heads):
                qh = q[block, :, h * d:(h + 1) * d]
                k, v = kv[bi, block, 0, h], kv[bi, block, 1, h]
                ctx.append(torch.softmax(qh @ k.T / d**0.5, dim=-1) @ v)
            ctx = torch.cat(ctx, dim=-1)
            if fusion.variant == "fpt":
                out[bi, block] = fusion.out_proj(ctx) + prompts[block]
            else:
                out[bi, block] = fusion.out_proj(ctx + prompts[block])
    return out


@pytest.mark.parametrize("variant", ["fpt", "fpt_plus"])
def test_fusion_follows_the_spec_formulas(variant):
    torch.manual_seed(0)
    fusion = FineGrainedFusion(variant, side_dim=8, backbone_dim=32, num_heads=4).eval()
    prompts = torch.randn(3, 5, fusion.prompt_dim)  # random, not 1e-6, so every term matters
    kv = torch.randn(2, 3, 2, 4, 7, 8)
    out = fusion(prompts, kv)
    assert out.shape == (2, 3, 5, 8)
    torch.testing.assert_close(out, reference_fusion(fusion, prompts, kv), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,expected", [("fpt", 166_752), ("fpt_plus", 149_088)])
def test_vit_b_fusion_parameter_counts(variant, expected):
    # ViT-B/16 backbone (768 wide, 12 heads), side width 96, 16 prompts; FPT uses 12 blocks, FPT+ 6.
    fusion = FineGrainedFusion(variant, side_dim=96, backbone_dim=768, num_heads=12)
    prompts = FineGrainedPrompts(12 if variant == "fpt" else 6, 16, fusion.prompt_dim)
    assert fusion.prompt_dim == (96 if variant == "fpt" else 768)
    assert sum(p.numel() for p in fusion.parameters()) + prompts.prompts.numel() == expected


def test_prompts_are_initialised_tiny():
    prompts = FineGrainedPrompts(12, 16, 96)()
    assert prompts.shape == (12, 16, 96)
    assert 0 < prompts.std().item() < 1e-5


def test_dropout_acts_in_training_only():
    fusion = FineGrainedFusion("fpt", side_dim=8, backbone_dim=32, num_heads=4, dropout=0.5)
    prompts, kv = torch.randn(2, 4, 8), torch.randn(1, 2, 2, 4, 5, 8)
    fusion.train()
    assert (fusion(prompts, kv) == 0).float().mean() > 0.3
    fusion.eval()
    torch.testing.assert_close(fusion(prompts, kv), fusion(prompts, kv))
    assert (fusion(prompts, kv) == 0).sum() == 0


def test_half_precision_kv_is_computed_in_float32():
    fusion = FineGrainedFusion("fpt_plus", side_dim=8, backbone_dim=32, num_heads=4).eval()
    prompts, kv = torch.randn(2, 4, 32), torch.randn(1, 2, 2, 4, 5, 8)
    out = fusion(prompts, kv.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fusion(prompts, kv.half().float()))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="variant"):
        FineGrainedFusion("vpt", 8, 32, 4)
    with pytest.raises(ValueError, match="divisible"):
        FineGrainedFusion("fpt", 8, 30, 4)
    fusion = FineGrainedFusion("fpt", side_dim=8, backbone_dim=32, num_heads=4)
    with pytest.raises(ValueError, match="kv must have shape"):
        fusion(torch.randn(2, 4, 8), torch.randn(1, 3, 2, 4, 5, 8))
    with pytest.raises(ValueError, match="width 8"):
        fusion(torch.randn(2, 4, 32), torch.randn(1, 2, 2, 4, 5, 8))
    with pytest.raises(ValueError, match="head dim"):
        fusion(torch.randn(2, 4, 8), torch.randn(1, 2, 2, 4, 5, 6))
    with pytest.raises(ValueError, match="positive"):
        FineGrainedPrompts(0, 16, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prompt_cross_attention_gradient_matches_autograd(dtype):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 3, 2, 4, 7, 8).to(dtype)
    keys, values = kv[:, :, 0], kv[:, :, 1]
    out = PromptCrossAttention.apply(q, kv, 8**-0.5)
    reference = torch.softmax(q * 8**-0.5 @ keys.double().transpose(-2, -1), dim=-1) @ values.double()
    torch.testing.assert_close(out, reference)
    weights = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * weights).sum(), q)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), q)
    torch.testing.assert_close(grad, grad_reference)
    assert torch.autograd.gradcheck(lambda q: PromptCrossAttention.apply(q, kv, 0.3), (q,))


def saved_bytes(fusion, prompts, kv):
    """Bytes autograd keeps for backward (each tensor once), beyond the kv input itself."""
    seen = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr():
            seen[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fusion(prompts, kv)
    return sum(seen.values())


@pytest.mark.parametrize("variant", ["fpt", "fpt_plus"])
def test_half_precision_kv_keeps_no_float32_copy_for_backward(variant):
    fusion = FineGrainedFusion(variant, side_dim=16, backbone_dim=64, num_heads=4)
    prompts = FineGrainedPrompts(3, 4, fusion.prompt_dim)()
    kv = torch.randn(8, 3, 2, 4, 50, 16)
    kv_bytes = kv.numel() * kv.element_size()
    half, full = saved_bytes(fusion, prompts, kv.half()), saved_bytes(fusion, prompts, kv)
    assert half == full  # the same small tensors (prompts, attention probabilities), whatever the storage
    assert half < kv_bytes / 4  # and no upcast copy of the keys/values among them
