"""fpt_monai/_compat.py against the installed libraries: each private name it relies on still does its job."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fpt_monai._compat import _private, checkpoint_saver_checkpoints, ddp_ignore, timm_vit_tokens


def test_ddp_leaves_the_ignored_parameters_and_buffers_alone(tmp_path):
    """DDP takes the names ddp_ignore gives as the parameters and buffers it leaves alone (the frozen backbone)."""
    from torch.nn.parallel import DistributedDataParallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        network[0].requires_grad_(False)
        ignored = ["0.weight", "0.bias", "1.running_mean"]
        ddp_ignore(network, ignored)
        ddp = DistributedDataParallel(network)
        assert ddp.parameters_to_ignore == set(ignored)
    finally:
        dist.destroy_process_group()


def test_timm_vit_tokens_are_what_the_first_block_gets():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(images)
        tokens = timm_vit_tokens(model, images)
    assert torch.equal(tokens, seen["x"]) and tokens.shape == (2, 1 + 4, model.embed_dim)


def test_checkpoint_saver_checkpoints_are_ignite_checkpoints(tmp_path):
    from ignite.handlers import Checkpoint
    from monai.handlers import CheckpointSaver

    saver = CheckpointSaver(str(tmp_path), {"net": torch.nn.Linear(1, 1)}, save_final=True, save_key_metric=True)
    parts = checkpoint_saver_checkpoints(saver)
    assert isinstance(parts["final"], Checkpoint) and isinstance(parts["key_metric"], Checkpoint)
    assert parts["interval"] is None
    assert parts["key_metric"].state_dict() == {"_saved": []}  # the best-checkpoint bookkeeping resume relies on


def test_a_missing_private_name_fails_loudly():
    with pytest.raises(RuntimeError, match=r"somelib 9\.9 has no `Linear._gone`.*_compat\.py"):
        _private(torch.nn.Linear, "_gone", "somelib", "9.9")
