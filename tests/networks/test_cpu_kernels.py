"""The CPU kernels against the reference path: same outputs and gradients, and the one switch that chooses them."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_tiny_timm_vit
from fpt_monai.networks import FPTNet, TimmViTBackbone
from fpt_monai.presets import create_backbone, create_fpt
from fpt_monai.networks.cpu_kernels import KERNEL_MODES, one_image_at_a_time, use_cpu_kernels


class CountCalls(TorchFunctionMode):
    """Counts the calls of one torch function inside the mode (by default ``F.scaled_dot_product_attention``)."""

    def __init__(self, function=F.scaled_dot_product_attention):
        super().__init__()
        self.function, self.calls = function, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is self.function
        return func(*args, **(kwargs or {}))


class RecordOps(TorchDispatchMode):
    """The aten operators dispatched inside the mode, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def tiny_fpt(variant, kernels, blocks=None):
    backbone = TimmViTBackbone(make_tiny_timm_vit(), blocks=blocks, token_ratio=0.2)
    net = FPTNet(backbone, 3, side_img_size=32, variant=variant, num_prompts=4, reduction=4, kernels=kernels)
    return net.double().train()


def training_step(net, images, kv=None):
    """Logits and every gradient (parameters and input images) of one training forward/backward."""
    images = images.clone().requires_grad_()
    torch.manual_seed(1)  # the fusion's dropout draws the same mask on both paths
    with CountCalls() as attention:
        logits = net(images, kv=kv)
        (logits.square().sum() + logits.logsumexp(dim=1).sum()).backward()
    if kv is not None:  # the path taken (the backbone's blocks that extract nothing are timm's own)
        assert attention.calls == (0 if net.kernels == "cpu" else net.side.depth + 1)
    grads = {name: p.grad for name, p in net.named_parameters() if p.requires_grad}
    return logits, grads, images.grad


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("preloaded", [True, False])
@pytest.mark.parametrize("variant,blocks", [("fpt", None), ("fpt_plus", (2, 3))])
def test_cpu_kernels_and_reference_agree_in_outputs_and_all_gradients(variant, blocks, preloaded, recompute):
    torch.manual_seed(0)
    kernels = tiny_fpt(variant, "cpu", blocks)
    kernels.side.recompute = recompute
    reference = copy.deepcopy(kernels)
    reference.kernels = "reference"
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    kv = None
    if preloaded:
        kv = kernels.backbone(images)
        images = kernels.side_view(images)
    logits, grads, image_grad = training_step(kernels, images, kv)
    logits_ref, grads_ref, image_grad_ref = training_step(reference, images, kv)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(kernels.trainable_parameters())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(image_grad, image_grad_ref, rtol=1e-10, atol=1e-12)


def test_cpu_kernels_and_reference_agree_in_float32_on_a_float16_cache():
    torch.manual_seed(0)
    kernels = tiny_fpt("fpt_plus", "cpu", (2, 3)).float()
    reference = copy.deepcopy(kernels)
    reference.kernels = "reference"
    images = torch.randn(4, 3, 64, 64)
    kv = kernels.backbone(images).half()
    logits, grads, _ = training_step(kernels, kernels.side_view(images), kv)
    logits_ref, grads_ref, _ = training_step(reference, reference.side_view(images), kv)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("blocks", [None, (1, 3)])
def test_backbone_kernels_and_reference_agree(blocks):
    backbone = TimmViTBackbone(make_tiny_timm_vit().double(), blocks=blocks, token_ratio=0.3)
    images = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    backbone.kernels = "cpu"
    with CountCalls(torch.mm) as kernel_path:  # the per-(image, head) loop of attend_and_rank
        kv, features = backbone.forward_with_features(images)
    backbone.kernels = "reference"
    with CountCalls(torch.mm) as reference_path:
        kv_ref, features_ref = backbone.forward_with_features(images)
    assert kernel_path.calls > 0 and reference_path.calls == 0
    torch.testing.assert_close(kv, kv_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(features, features_ref, rtol=1e-12, atol=1e-12)


def test_switch_reaches_every_module_and_refuses_unknown_values():
    net = tiny_fpt("fpt", "auto")
    for kernels in KERNEL_MODES:
        net.kernels = kernels
        assert net.side.kernels == net.fusion.kernels == net.backbone.kernels == kernels
        assert all(block.attn.kernels == block.mlp.kernels == kernels for block in net.side.blocks)
    with pytest.raises(ValueError, match="kernels must be one of"):
        net.kernels = "gpu"
    with pytest.raises(ValueError, match="kernels must be one of"):
        tiny_fpt("fpt", "fast")


def test_use_cpu_kernels_rule():
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert use_cpu_kernels("auto", cpu) and use_cpu_kernels("cpu", cpu) and use_cpu_kernels("cpu", meta)
    assert not use_cpu_kernels("auto", meta) and not use_cpu_kernels("reference", cpu)
    assert not use_cpu_kernels("auto", cpu, training=False) and not use_cpu_kernels("cpu", cpu, training=False)
    # a kernel "auto" leaves to PyTorch (the side ViT's attention) runs only when asked for
    assert not use_cpu_kernels("auto", cpu, auto=False) and use_cpu_kernels("cpu", cpu, auto=False)


@pytest.mark.parametrize("variant,preset", [("fpt", "fpt_tiny"), ("fpt_plus", "fpt_plus_tiny")])
def test_auto_trains_with_the_kernels_on_the_cpu_and_infers_with_fused_attention(variant, preset, random_weights_quiet):
    with torch.device("meta"):
        shape = create_backbone(preset, pretrained=False, img_size=64).shape
    net = FPTNet(shape, 3, side_img_size=32, variant=variant).train()
    side, kv = torch.randn(2, 3, 32, 32), torch.randn(2, *shape.kv_shape).half()
    with CountCalls() as training:
        net(side, kv=kv).sum().backward()
    with CountCalls() as inference, torch.no_grad():
        net.eval()(side, kv=kv)
    assert training.calls == net.side.depth  # every side block; the fusion is PromptCrossAttention
    assert inference.calls == net.side.depth + 1  # every side block and the fusion


@pytest.mark.parametrize("variant", ["fpt", "fpt_plus"])
def test_auto_training_on_the_cpu_dispatches_the_kernels_with_fused_side_attention(variant):
    """Under "auto" a CPU training step is the kernels' path with the side ViT's attention left to PyTorch."""
    ops = {}
    for kernels in ("auto", "cpu", "cpu with fused side attention", "reference"):
        torch.manual_seed(0)
        net = tiny_fpt(variant, kernels.split()[0]).float()
        if kernels.endswith("attention"):
            for block in net.side.blocks:
                block.attn.kernels = "reference"
        images = torch.randn(2, 3, 64, 64)
        with RecordOps() as record:
            net(images).sum().backward()
        ops[kernels] = record.ops
    assert ops["auto"] == ops["cpu with fused side attention"]
    assert not any("scaled_dot_product" in op for op in ops["cpu"])
    assert any("scaled_dot_product" in op for op in ops["auto"])
    assert ops["auto"] != ops["reference"]  # the MLP and the fusion keep their kernels


@pytest.mark.parametrize("variant,preset", [("fpt", "fpt_tiny"), ("fpt_plus", "fpt_plus_tiny")])
def test_training_off_the_cpu_dispatches_fused_attention(variant, preset, random_weights_quiet):
    """On the meta device (standing for any accelerator), training runs scaled_dot_product_attention everywhere."""
    counts = {}
    for kernels in ("auto", "cpu"):
        with torch.device("meta"):
            shape = create_backbone(preset, pretrained=False, img_size=64).shape
            net = FPTNet(shape, 3, side_img_size=32, variant=variant, kernels=kernels).train()
            side, kv = torch.randn(2, 3, 32, 32), torch.randn(2, *shape.kv_shape).half()
        with CountCalls() as mode:
            loss = net(side, kv=kv).sum()
            loss.backward()
        assert all(p.grad is not None and p.grad.is_meta for p in net.trainable_parameters())
        counts[kernels] = mode.calls
    assert counts == {"auto": net.side.depth + 1, "cpu": 0}


def test_create_fpt_passes_the_switch(random_weights_quiet):
    net = create_fpt("fpt_tiny", 3, pretrained=False, img_size=64, side_img_size=32, kernels="reference")
    assert net.kernels == net.side.kernels == net.backbone.kernels == "reference"


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_bundle_configs_pass_the_switch_to_the_network(config):
    parser = ConfigParser()
    parser.read_config(Path(__file__).parents[2] / "bundles" / "fpt_classification" / "configs" / config)
    assert parser["kernels"] == "auto"
    parser["kernels"] = "reference"  # what `--kernels reference` does
    assert parser.get_parsed_content("network_def#kernels") == "reference"


def test_one_image_at_a_time_concatenates_every_output():
    images = torch.randn(3, 2, 4)
    first, none, last = one_image_at_a_time(lambda x: (x * 2, None, x.sum(dim=(1, 2))), images)
    torch.testing.assert_close(first, images * 2)
    torch.testing.assert_close(last, images.sum(dim=(1, 2)))
    assert none is None
