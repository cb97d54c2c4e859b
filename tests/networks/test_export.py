"""Exporting FPTNet: TorchScript (MONAI's ckpt_export default) and torch.export give the eager outputs."""

from __future__ import annotations

import pytest
import torch

from fpt_monai.networks import create_fpt

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
