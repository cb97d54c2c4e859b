"""Exporting FPTNet: TorchScript (MONAI's ckpt_export default) and torch.export give the eager outputs."""

from __future__ import annotations

import pytest
import torch

from fpt_monai.networks import class_names_of
from fpt_monai.presets import create_fpt

CASES = [("fpt_tiny", 64, 32), ("fpt_plus_tiny", 64, 32), ("fpt_3d_tiny", 32, 16)]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def network(request, random_weights_quiet):
    preset, img_size, side_img_size = request.param
    torch.manual_seed(0)
    net = create_fpt(preset, num_classes=3, pretrained=False, img_size=img_size, side_img_size=side_img_size)
    return net.eval()


def images(net, batch):
    return torch.rand(batch, net.shape.in_channels, *net.shape.img_size)


def test_scripting_saves_a_module_with_the_eager_outputs_at_any_batch_size(network, tmp_path):
    scripted = torch.jit.script(network)
    torch.jit.save(scripted, str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    assert network.training is False and network.backbone is not None  # the eager network is left as it was
    with torch.no_grad():
        for batch in (1, 3):
            x = images(network, batch)
            torch.testing.assert_close(loaded(x), network(x), rtol=1e-5, atol=1e-6)


def test_torch_export_with_a_dynamic_batch_gives_the_eager_outputs(network):
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(network, (images(network, 2),), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        for size in (1, 3):
            x = images(network, size)
            torch.testing.assert_close(program.module()(x), network(x), rtol=1e-5, atol=1e-6)


def test_scripting_keeps_the_training_mode(network):
    network.train()
    torch.jit.script(network)
    assert network.training and network.side.training



NAMES = ["normal", "benign", "malignant"]
GUARD_CASES = [("fpt_tiny", 64, 32), ("fpt_demo", 64, 32)]  # a ViT and the demo CNN (which runs on any size)


def named(preset, img_size, side_img_size):
    torch.manual_seed(0)
    net = create_fpt(
        preset, num_classes=3, pretrained=False, img_size=img_size, side_img_size=side_img_size, class_names=NAMES
    )
    return net.eval()


@pytest.mark.parametrize("case", GUARD_CASES, ids=[c[0] for c in GUARD_CASES])
def test_torchscript_carries_the_class_names_and_refuses_another_image_size(case, random_weights_quiet, tmp_path):
    network = named(*case)
    torch.jit.save(torch.jit.script(network), str(tmp_path / "model.ts"))
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    assert loaded.class_names == NAMES and class_names_of(loaded) == NAMES
    assert loaded(images(network, 2)).shape == (2, 3)
    for size in (48, 80):
        with pytest.raises(torch.jit.Error, match=r"expects images of shape \(B, 3, 64, 64\)"):
            loaded(torch.rand(2, 3, size, size))


def test_torch_export_carries_the_class_names_and_refuses_another_image_size(random_weights_quiet, tmp_path):
    network = named("fpt_demo", 64, 32)  # the CNN, which would run on any size; exporting a ViT too adds 15 s
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(network, (images(network, 2),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    loaded = torch.export.load(str(tmp_path / "model.pt2"))
    assert class_names_of(loaded) == NAMES
    for size in (48, 80):
        with pytest.raises(Exception, match="64"):
            loaded.module()(torch.rand(2, 3, size, size))
