"""Mixed precision on the reference path: what training on a GPU runs under MONAI's ``amp`` (float16 autocast).

The CPU's autocast runs the same reference operators (SDPA, linear layers) in float16 and bfloat16, so the
agreement with float32 is checked here. Stated tolerance: the logits within 1e-3 (float16) and 2e-3 (bfloat16) of
float32's, and the learnable parameters' gradient, as one vector, within 2% of float32's norm (float16) and 4%
(bfloat16). Measured on the tiny networks: logits 6e-05-9e-05 (float16) and 3e-04-4e-04 (bfloat16) apart, gradients
0.1% (float16) and 0.9-1.2% (bfloat16).
"""

import pytest
import torch

from conftest import make_tiny_timm_vit
from fpt_monai.networks import FPTNet, TimmViTBackbone

TOLERANCE = {torch.float16: (1e-3, 0.02), torch.bfloat16: (2e-3, 0.04)}  # logits (absolute), gradients (relative)


def logits_and_grads(net, side, kv, dtype=None):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the fusion's dropout draws the same mask with and without autocast
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = net(side, kv=kv)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    return logits.float().detach(), {n: p.grad.float() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["fpt", "fpt_plus"])
def test_the_reference_path_under_autocast_agrees_with_float32(variant, dtype):
    torch.manual_seed(0)
    backbone = TimmViTBackbone(make_tiny_timm_vit(), token_ratio=0.2)
    net = FPTNet(backbone, 3, side_img_size=32, variant=variant, num_prompts=4, reduction=4, kernels="reference")
    net.train()
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        kv = net.backbone(images).half()  # a float16 cache, as the bundle stores it
    side = net.side_view(images)
    reference, reference_grads = logits_and_grads(net, side, kv)
    logits, grads = logits_and_grads(net, side, kv, dtype)
    logits_tolerance, grads_tolerance = TOLERANCE[dtype]
    assert (logits - reference).abs().max() <= logits_tolerance
    assert grads.keys() == reference_grads.keys() and grads
    # every learnable gradient as one vector (what the optimizer and the clipping see)
    difference = torch.cat([(grads[n] - reference_grads[n]).flatten() for n in grads])
    scale = torch.cat([reference_grads[n].flatten() for n in grads])
    assert difference.norm() <= grads_tolerance * scale.norm()
