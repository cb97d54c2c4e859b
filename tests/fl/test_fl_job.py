"""The FLARE job's starting point and the MONAI FL client's exchange helpers (no federation run: see
tests/integration/test_fl.py)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from fpt_monai.fl import learnable_names, learnable_state_dict, numeric_entries
from fpt_monai.fl.job import initial_weights
from fpt_monai.presets import create_fpt

TINY = {"preset": "fpt_tiny", "network_def#img_size": 64, "network_def#side_img_size": 32}


@pytest.fixture
def vit_tiny_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(path))
    return path


def test_fpt_starts_from_the_bundles_learnable_init_without_the_backbone(vit_tiny_file, random_weights_quiet):
    """Round 1's global model: the learnable parameters the bundle builds (seeded), which do not depend on the
    backbone's weights, so the job builds them with a random backbone."""
    without = initial_weights({**TINY, "pretrained": str(vit_tiny_file)})
    again = initial_weights({**TINY, "pretrained": False})
    net = create_fpt("fpt_tiny", 3, pretrained=False, img_size=64, side_img_size=32)
    assert list(without) == learnable_names(net) and not any(n.startswith("backbone.") for n in without)
    assert all(torch.equal(without[n], again[n]) for n in without)  # seeded: every job starts the same


def test_a_full_fine_tuning_baseline_starts_from_the_pretrained_weights(vit_tiny_file):
    """What full fine-tuning learns is the pretrained backbone itself: its round 1 must hold those weights."""
    from safetensors.torch import load_file

    start = initial_weights(
        {"preset": "fpt_tiny", "method": "full", "pretrained": str(vit_tiny_file)}, configs=("train", "baseline")
    )
    pretrained = load_file(str(vit_tiny_file))
    name = next(n for n in start if n.endswith("blocks.0.attn.qkv.weight"))
    torch.testing.assert_close(start[name], pretrained["blocks.0.attn.qkv.weight"])


def test_exchange_helpers_keep_learnable_tensors_and_finite_numbers(random_weights_quiet):
    net = create_fpt("fpt_tiny", 3, pretrained=False, img_size=64, side_img_size=32)
    state = learnable_state_dict(net)
    assert sum(t.numel() for t in state.values()) == net.parameter_counts()["learnable"]
    assert all(not t.requires_grad and t.device.type == "cpu" for t in state.values())
    state[next(iter(state))].add_(1.0)  # a copy: the network is untouched
    assert not torch.equal(state[next(iter(state))], dict(net.named_parameters())[next(iter(state))])
    kept = numeric_entries({"auc": 0.5, "n": 3, "path": "/data/a.png", "nan": float("nan"), "flag": True}, "x")
    assert kept == {"auc": 0.5, "n": 3}
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no learnable parameter"):
        learnable_names(net)
