import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.networks.nets import ViT

from conftest import make_tiny_timm_vit
from fpt_monai.networks.fpt import BACKBONE_REFERENCE_KEY
from fpt_monai.networks import FPTNet, MonaiViTBackbone, TimmViTBackbone, make_side_view
from fpt_monai.presets import create_fpt


def tiny_fpt(variant="fpt", blocks=None, num_classes=3):
    backbone = TimmViTBackbone(make_tiny_timm_vit(), blocks=blocks, token_ratio=0.2)
    return FPTNet(backbone, num_classes=num_classes, side_img_size=32, variant=variant, num_prompts=4, reduction=4)


def tiny_fpt_3d(variant="fpt"):
    torch.manual_seed(0)
    model = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
                classification=True, spatial_dims=3)
    backbone = MonaiViTBackbone(model, 32, 8, token_ratio=0.25)
    return FPTNet(backbone, num_classes=2, side_img_size=16, variant=variant, num_prompts=3, reduction=4)


@pytest.mark.parametrize("variant", ["fpt", "fpt_plus"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_logits_shape(variant, spatial_dims):
    if spatial_dims == 2:
        net, images, classes = tiny_fpt(variant), torch.randn(2, 3, 64, 64), 3
    else:
        net, images, classes = tiny_fpt_3d(variant), torch.randn(2, 1, 32, 32, 32), 2
    assert net(images).shape == (2, classes)


@pytest.mark.parametrize("variant,blocks", [("fpt", None), ("fpt_plus", (2, 3))])
def test_image_path_equals_preloaded_path(variant, blocks):
    net = tiny_fpt(variant, blocks).eval()
    images = torch.randn(3, 3, 64, 64)
    kv = net.backbone(images)
    torch.testing.assert_close(net(images), net.forward_side(net.side_view(images), kv))
    # a network built from the shape alone (no backbone weights resident) gives the same logits
    light = FPTNet(net.shape, num_classes=3, side_img_size=32, variant=variant, num_prompts=4, reduction=4).eval()
    light.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("backbone.")})
    torch.testing.assert_close(light.forward_side(net.side_view(images), kv), net(images))
    assert sum(p.numel() for p in light.parameters()) == net.parameter_counts()["learnable"]
    with pytest.raises(RuntimeError, match="forward_side"):
        light(images)


@pytest.mark.parametrize("variant", ["fpt", "fpt_plus"])
def test_gradients_reach_every_trainable_parameter_and_no_backbone_parameter(variant):
    net = tiny_fpt(variant).train()
    net(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).sum().backward()
    for name, param in net.named_parameters():
        if name.startswith("backbone."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_train_mode_keeps_backbone_in_eval():
    net = tiny_fpt().train()
    assert net.side.training and net.fusion.training
    assert not net.backbone.training and not any(m.training for m in net.backbone.modules())


def test_half_precision_kv_gives_nearly_the_same_logits():
    net = tiny_fpt().eval()
    images = torch.randn(2, 3, 64, 64)
    kv, side = net.backbone(images), net.side_view(images)
    torch.testing.assert_close(net.forward_side(side, kv.half()), net.forward_side(side, kv), atol=1e-3, rtol=1e-3)


def test_wrong_kv_shape_is_explained():
    net = tiny_fpt()
    with pytest.raises(ValueError, match="kv must have shape"):
        net.forward_side(torch.randn(1, 3, 32, 32), torch.randn(1, 4, 2, 4, 12, 16))
    with pytest.raises(ValueError, match="batch sizes"):
        net.forward_side(torch.randn(2, 3, 32, 32), torch.randn(1, 4, 2, 4, 13, 16))


def test_bad_configuration_raises():
    backbone = TimmViTBackbone(make_tiny_timm_vit())
    with pytest.raises(ValueError, match="reduction"):
        FPTNet(backbone, 2, 32, reduction=3)
    with pytest.raises(ValueError, match="divisible"):
        FPTNet(backbone, 2, 32, reduction=32)  # side width 2 cannot hold 4 heads
    with pytest.raises(ValueError, match="variant"):
        FPTNet(backbone, 2, 32, variant="lora")
    with pytest.raises(ValueError, match="num_classes"):
        FPTNet(backbone, 0, 32)
    with pytest.raises(TypeError, match="BackboneShape"):
        FPTNet(torch.nn.Linear(2, 2), 2, 32)


@pytest.mark.parametrize(
    "preset,learnable,side,fusion",
    [("fpt", 1_602_341, 1_435_589, 166_752), ("fpt_plus", 900_965, 751_877, 149_088)],
)
def test_vit_b_parameter_parity_with_the_papers(preset, learnable, side, fusion):
    with pytest.warns(UserWarning, match="random"), torch.device("meta"):
        net = create_fpt(preset, num_classes=5, pretrained=False)
    counts = net.parameter_counts()
    assert (counts["learnable"], counts["side"], counts["fusion"]) == (learnable, side, fusion)
    assert counts["frozen"] == 86_434_560  # ViT-B/16 at 512 without classifier head
    assert net.shape.kv_shape == ((12 if preset == "fpt" else 6), 2, 12, 205, 64)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == learnable


def test_make_side_view():
    images = torch.rand(2, 3, 64, 64)
    assert make_side_view(images, (32, 32)).shape == (2, 3, 32, 32)
    assert make_side_view(images, (64, 64)) is images
    assert make_side_view(torch.rand(1, 1, 16, 16, 16), (8, 8, 8)).shape == (1, 1, 8, 8, 8)
    constant = torch.full((1, 1, 64, 64), 0.7)
    torch.testing.assert_close(make_side_view(constant, (28, 28)), torch.full((1, 1, 28, 28), 0.7))


def test_trains_in_a_monai_supervised_trainer():
    torch.manual_seed(0)
    net = tiny_fpt(num_classes=2)
    backbone_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    side_before = net.side.head.weight.clone()
    data = [{"image": torch.randn(3, 64, 64), "label": torch.tensor(i % 2)} for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=net,
        optimizer=torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2),
        loss_function=torch.nn.CrossEntropyLoss(),
    )
    trainer.run()
    assert trainer.state.iteration == 2 and torch.isfinite(torch.as_tensor(trainer.state.output[0]["loss"]))
    assert not torch.equal(net.side.head.weight, side_before)
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key


def _tiny_fpt(seed: int = 0) -> FPTNet:
    backbone = TimmViTBackbone(make_tiny_timm_vit(seed=seed), token_ratio=0.25)
    torch.manual_seed(1)
    return FPTNet(backbone, num_classes=3, side_img_size=32)


def test_state_dict_holds_only_trainable_weights_and_a_backbone_reference():
    net = _tiny_fpt()
    state = net.state_dict()
    assert not [k for k in state if k.startswith("backbone.")]
    assert state[BACKBONE_REFERENCE_KEY].dtype == torch.uint8 and state[BACKBONE_REFERENCE_KEY].numel() == 32
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable <= set(state)
    assert sum(state[k].numel() for k in trainable) == net.parameter_counts()["learnable"]
    net.backbone_in_state_dict = True
    assert any(k.startswith("backbone.") for k in net.state_dict())


def test_checkpoint_round_trip_restores_logits_and_keeps_the_backbone(tmp_path):
    trained, fresh = _tiny_fpt(), _tiny_fpt()
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    fresh.load_state_dict(torch.load(path, weights_only=True))  # strict: backbone keys are not missing
    images = torch.rand(2, 3, 64, 64)
    trained.eval(), fresh.eval()
    torch.testing.assert_close(fresh(images), trained(images))


def test_checkpoint_of_another_backbone_is_refused():
    state = _tiny_fpt(seed=0).state_dict()
    other = _tiny_fpt(seed=5)
    with pytest.raises(RuntimeError, match="frozen backbone weights with SHA-256"):
        other.load_state_dict(state)


def test_trainable_parameters_are_those_that_learn():
    net = _tiny_fpt()
    assert sum(p.numel() for p in net.trainable_parameters()) == net.parameter_counts()["learnable"]
    assert all(p.requires_grad for p in net.trainable_parameters())


def test_traced_network_matches_eager_for_other_batch_sizes():
    net = _tiny_fpt().eval()
    traced = torch.jit.trace(net, torch.rand(1, 3, 64, 64))
    images = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(traced(images), net(images), rtol=1e-4, atol=1e-5)


def test_side_only_ablation_ignores_the_backbone_and_trains_only_the_side_network():
    ablation = FPTNet(_tiny_fpt().backbone, num_classes=3, side_img_size=32, side_only=True)
    trainable = {name.split(".")[0] for name, p in ablation.named_parameters() if p.requires_grad}
    assert trainable == {"side"}
    side = torch.rand(2, 3, 32, 32)
    kv = torch.randn(2, *ablation.shape.kv_shape)
    torch.testing.assert_close(ablation(side, kv=kv), ablation(side, kv=torch.zeros_like(kv)))
    torch.testing.assert_close(ablation(side, kv=kv), ablation.side(side))
