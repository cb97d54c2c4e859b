"""The baselines on the demo network (EfficientNet-Lite0) and their bundle overlay."""

import pytest
import torch

from fpt_monai.networks.baselines import CNN_BASELINE_METHODS, CNNBaseline, LoRALinear, ParallelConvAdapter
from fpt_monai.pretrained import DEMO_SETTINGS
from fpt_monai.presets import create_demo_baseline


pytestmark = pytest.mark.usefixtures("random_weights_quiet")  # the networks here have random weights


def demo(method, seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_demo_baseline(method, 3, img_size=64, **kwargs)


# EfficientNet-Lite0 without classifier: 3,371,008 weights; the new head on its 1280 pooled features: 3,843.
# LoRA r=8 on its 32 pointwise convolutions: 8 x sum(in + out) = 182,272. Adapter, bottleneck 16, beside its
# 16 blocks: sum(16 in + 16 + 16 out + out) = 55,312.
@pytest.mark.parametrize(
    "method, learnable, frozen",
    [("full", 3_374_851, 0), ("linear", 3_843, 3_371_008), ("lora", 186_115, 3_371_008), ("adapter", 59_155, 3_371_008)],
)
def test_parameter_counts_and_interface(method, learnable, frozen):
    net = create_demo_baseline(method, 3, pretrained=False)
    counts = net.parameter_counts()
    assert (counts["learnable"], counts["frozen"]) == (learnable, frozen)
    assert sum(p.numel() for p in net.trainable_parameters()) == learnable
    assert net.img_size == (512, 512)
    assert net.mean == tuple(DEMO_SETTINGS["mean"]) and net.std == tuple(DEMO_SETTINGS["std"])
    assert net.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_what_each_method_wraps():
    lora = demo("lora")
    wrapped = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 32 and all(m.lora_a.shape[0] == 8 for m in wrapped)
    assert all(tuple(m.linear.kernel_size) == (1, 1) for m in wrapped)
    assert not isinstance(lora.model.conv_stem, LoRALinear)  # the 3x3 stem is not pointwise
    adapters = [m for m in demo("adapter").modules() if isinstance(m, ParallelConvAdapter)]
    assert len(adapters) == 16
    assert [a.down.stride[0] for a in adapters].count(2) == 4  # the four stride-2 blocks


@pytest.mark.parametrize("method", CNN_BASELINE_METHODS)
def test_channels_last_layout_gives_the_plain_networks_output(method):
    net = demo(method).eval()
    assert net.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    plain = demo(method).eval()
    plain.model.to(memory_format=torch.contiguous_format)
    plain.load_state_dict(net.state_dict())
    images = torch.randn(2, 3, 64, 64)  # default layout
    with torch.no_grad():  # the timm model's own forward, default layout throughout
        assert torch.allclose(net(images), plain.model(images), atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lora_and_adapter_start_as_the_pretrained_network(method):
    images = torch.randn(2, 3, 64, 64)
    plain, adapted = demo("full").eval(), demo(method).eval()
    adapted.model.classifier.load_state_dict(plain.model.classifier.state_dict())
    assert torch.allclose(adapted(images), plain(images), atol=1e-5)


@pytest.mark.parametrize("method", CNN_BASELINE_METHODS)
def test_one_step_updates_only_what_learns(method):
    net = demo(method).train()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2)
    logits = net(torch.randn(4, 3, 64, 64))
    assert logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    learnable = {name for name, p in net.named_parameters() if p.requires_grad}
    for name, p in net.named_parameters():
        if p.requires_grad:
            # B of LoRA and the adapter's up-projection start at zero: their first gradient is nonzero, A's not
            if not name.endswith(("lora_a", "down.weight", "down.bias")):
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and torch.equal(before[name], p.detach()), name
    if method == "full":
        assert len(learnable) == len(before)
        # batch norm statistics follow the data in full fine-tuning
        assert not torch.equal(buffers["model.bn1.running_mean"], net.model.bn1.running_mean)
        return
    expected = {"linear": ("classifier.",), "lora": ("classifier.", "lora_a", "lora_b"),
                "adapter": ("classifier.", "down.", "up.")}[method]
    assert learnable and all(any(key in name for key in expected) for name in learnable)
    # the frozen network stays in eval mode: its batch norm statistics do not move
    assert all(torch.equal(buffers[name], b) for name, b in net.named_buffers()), method
    assert not net.model.bn1.training and net.model.classifier.training
    changed = {name for name, p in net.named_parameters() if not torch.equal(before[name], p.detach())}
    assert "model.classifier.weight" in changed


def test_linear_probe_sends_no_gradient_into_the_network():
    net = demo("linear").train()
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    net(images).sum().backward()
    assert images.grad is None  # the features were computed without a graph


def test_vpt_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="VPT-deep needs transformer tokens"):
        create_demo_baseline("vpt", 3, pretrained=False)
    with pytest.raises(ValueError, match="method must be one of"):
        create_demo_baseline("bitfit", 3, pretrained=False)
    with pytest.raises(ValueError, match="num_classes"):
        create_demo_baseline("full", 0, pretrained=False)
    with pytest.raises(TypeError, match="EfficientNet-family"):
        CNNBaseline(torch.nn.Linear(2, 2), "full", 2, img_size=64)
    with pytest.raises(TypeError, match="pointwise"):
        LoRALinear(torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="bottleneck"):
        create_demo_baseline("adapter", 3, pretrained=False, adapter_bottleneck=0)


def test_overlay_order_merges_into_a_demo_baseline():
    from monai.bundle import ConfigParser

    from fpt_monai.bundle import config_files, demo_config_names
    from fpt_monai.config_check import ConfigOverrideError, check_overrides

    assert demo_config_names("adapter") == ["train", "demo", "baseline", "demo_baseline"]
    assert demo_config_names("fpt", evaluate=True) == ["train", "evaluate", "demo"]
    with pytest.raises(ValueError, match="transformer tokens"):
        demo_config_names("vpt")
    parser = ConfigParser()
    parser.read_config(config_files(*demo_config_names("lora", evaluate=True)))
    assert parser["network_def"]["_target_"] == "fpt_monai.presets.create_demo_baseline"
    assert "preset" not in parser["network_def"]
    # the schedule is the demo's, the input the image itself, the test set not preloaded
    assert (parser["num_epochs"], parser["batch_size"], parser["learning_rate"]) == (20, 16, 0.001)
    assert parser["prepare_batch"] == "$monai.engines.PrepareBatchDefault()"
    assert parser["test#dataset"]["_target_"] == "Dataset" and parser["test#handlers"][0]["_disabled_"] is True
    names = config_files(*demo_config_names("lora", evaluate=True))
    check_overrides(names, {"method": "full", "network_def#lora_rank": 4, "num_epochs": 2})
    with pytest.raises(ConfigOverrideError, match="num_epoch"):
        check_overrides(names, {"num_epoch": 2})
