"""The baselines of the benchmark: parameter counts, what is frozen, identity at initialisation, gradient flow."""

import pytest
import torch

from fpt_monai.networks.baselines import BASELINE_METHODS, ViTBaseline
from fpt_monai.presets import create_baseline


pytestmark = pytest.mark.usefixtures("random_weights_quiet")  # the networks here have random weights


def tiny(method, seed=0, **kwargs):
    torch.manual_seed(seed)
    return create_baseline(method, 3, preset="fpt_tiny", pretrained=False, img_size=64, **kwargs)


@pytest.mark.parametrize(
    "method, learnable",
    [("full", 86_438_405), ("linear", 3_845), ("vpt", 151_301), ("lora", 593_669), ("adapter", 1_193_477)],
)
def test_vit_b_parameter_counts(method, learnable):
    with torch.device("meta"):
        net = create_baseline(method, 5, pretrained=False)
    counts = net.parameter_counts()
    assert counts["learnable"] == learnable
    # the frozen part is the whole ViT-B/16 backbone without a head, as for FPT
    assert counts["frozen"] == (0 if method == "full" else 86_434_560)
    assert sum(p.numel() for p in net.trainable_parameters()) == learnable


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lora_and_adapter_start_as_the_pretrained_network(method):
    images = torch.randn(2, 3, 64, 64)
    adapted, plain = tiny(method), tiny("full")
    assert torch.allclose(adapted(images), plain(images), atol=1e-5)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_one_step_updates_only_what_learns(method):
    net = tiny(method).train()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2)
    logits = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    optimizer.step()
    for name, p in net.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if p.requires_grad and name.endswith(("head.weight", "lora_a", "prompts", "down.weight")):
            assert changed, name
        if not p.requires_grad:
            assert not changed and p.grad is None, name
    if method == "full":
        assert all(p.requires_grad for p in net.parameters())
    else:
        frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
        assert any(".qkv." in n for n in frozen) and any("patch_embed" in n for n in frozen)


def test_linear_probe_keeps_the_backbone_in_eval_mode():
    net = tiny("linear").train()
    assert not net.model.blocks[0].training and net.model.head.training


def test_vpt_prompts_change_the_output_and_receive_gradients():
    net = tiny("vpt")
    images = torch.randn(2, 3, 64, 64)
    net(images).sum().backward()
    assert all(block.prompts.grad is not None and block.prompts.grad.abs().sum() > 0 for block in net.model.blocks)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="method must be one of"):
        tiny("bitfit")
    with pytest.raises(ValueError, match="LoRA rank"):
        tiny("lora", lora_rank=0)
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        ViTBaseline(torch.nn.Linear(2, 2), "full", 2)
    with pytest.raises(ValueError, match="unknown preset"):
        create_baseline("full", 2, preset="vit_huge", pretrained=False)


def test_the_bundle_trains_a_baseline_by_swapping_the_network(tmp_path):
    """configs/baseline.json: same bundle, same data and schedule, the image itself instead of preloaded K/V."""
    import timm
    from safetensors.torch import save_file

    from monai.bundle import ConfigWorkflow

    from fpt_monai.bundle import config_files
    from fpt_monai.data import make_sample_dataset

    data = make_sample_dataset(tmp_path / "data", num_train=6, num_val=3, num_test=3, image_size=64, progress=False)
    weights = tmp_path / "vit_tiny.safetensors"
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict()
    save_file(state, str(weights))
    override = {
        "preset": "fpt_tiny", "network_def#img_size": 64, "num_epochs": 1, "batch_size": 4, "num_workers": 0,
        "bundle_root": str(tmp_path), "dataset_dir": str(data), "pretrained": str(weights), "method": "lora",
    }
    workflow = ConfigWorkflow(
        config_file=config_files("train", "baseline"), meta_file=config_files("metadata"), logging_file=False,
        run_id="training", workflow_type=None, **override,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    checkpoint = torch.load(tmp_path / "models" / "model_final.pt", weights_only=True)
    assert any(k.endswith("lora_a") for k in checkpoint)
    # the frozen projection is the pre-trained one after training; the cache folder was never created
    assert torch.equal(checkpoint["model.blocks.0.attn.qkv.linear.weight"], state["blocks.0.attn.qkv.weight"])
    assert not (tmp_path / "cache").exists()


def test_injector_wraps_the_modules_a_pattern_names_in_order():
    from fpt_monai.networks.baselines import VIT_INJECTIONS, Injection, LoRALinear, inject

    torch.manual_seed(0)
    net = tiny("full")
    settings = {"lora_rank": 2, "lora_alpha": 2.0}
    names = inject(net.model, VIT_INJECTIONS["lora"], settings)
    assert names == [f"blocks.{i}.attn.qkv" for i in range(len(net.model.blocks))]
    assert all(isinstance(block.attn.qkv, LoRALinear) for block in net.model.blocks)
    assert not isinstance(net.model.blocks[0].attn.proj, LoRALinear)  # only what the pattern names
    with pytest.raises(ValueError, match="no module"):
        inject(net.model, Injection(r"conv_head", VIT_INJECTIONS["lora"].layer), settings)


def test_lora_layers_take_only_their_kind_of_module():
    from fpt_monai.networks.baselines import LoRALinear, LoRAPointwiseConv

    with pytest.raises(TypeError, match="LoRAPointwiseConv"):
        LoRALinear(torch.nn.Conv2d(4, 4, 1))
    with pytest.raises(TypeError, match="pointwise"):
        LoRAPointwiseConv(torch.nn.Linear(4, 4))
    conv = LoRAPointwiseConv(torch.nn.Conv2d(4, 6, 1), rank=2)
    torch.nn.init.normal_(conv.lora_b)
    x = torch.randn(2, 4, 3, 3)
    expected = conv.linear(x) + torch.einsum("oi,bihw->bohw", conv.lora_b @ conv.lora_a * conv.scaling, x)
    torch.testing.assert_close(conv(x), expected)


def test_method_lists_come_from_the_registry():
    from fpt_monai.networks import CNN_BASELINE_METHODS, METHODS, method_names

    assert BASELINE_METHODS == ("full", "linear", "vpt", "lora", "adapter")
    assert CNN_BASELINE_METHODS == tuple(m for m in BASELINE_METHODS if m != "vpt")
    assert method_names(baseline=False) == ("fpt", "fpt_plus") and set(method_names()) == set(METHODS)
