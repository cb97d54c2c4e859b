"""Multi-process runs with torchrun (Gloo on CPU): the bundle's multi-GPU configs, DDP over what learns, and
distributed preloading of the K/V cache."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_BUNDLE as TINY
from conftest import TEST_WORKFLOW, make_tiny_timm_vit, tiny_bundle_task
from fpt_monai.bundle import config_files, run_workflow
from fpt_monai.cli import Commands
from fpt_monai.engine import distributed
from fpt_monai.networks import FPTNet, TimmViTBackbone
from fpt_monai.preload import read_entry
from fpt_monai.preload.handler import _preload_sharded
from preload_setup import make_dataset, write_images

TESTS = Path(__file__).resolve().parents[1]  # tests/: conftest.py, preload_setup.py
# Shuffling, augmentation and dropout draw different random numbers in one process than in two, so the runs
# compared here switch them off: then both see the same global batches and only float rounding differs.
DETERMINISTIC = {
    "network_def#fusion_dropout": 0.0,
    "train#preprocessing#transforms": "$@train#deterministic_transforms + @validate#side_transforms",  # no augmentation
}
# What two processes may differ from one by: float rounding (the all-reduce, 1 thread per rank against the
# test's threads), which AdamW's normalised steps (lr 1e-3, 4 steps) enlarge for tiny gradients. Measured on a
# 2-core CPU: weights 3e-6, probabilities 1e-6, metrics identical.
WEIGHT_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-4


def torchrun(arguments: list[str], cwd: Path, nproc: int = 2, **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


def bundle_command(run_id: str, names: list[str], overrides: dict) -> list[str]:
    arguments = ["-m", "monai.bundle", "run", run_id, "--config_file", str(config_files(*names)),
                 "--meta_file", config_files("metadata")[0]]
    for key, value in overrides.items():
        arguments += [f"--{key}", str(value)]
    return arguments


def validation_scalars(root: Path) -> dict[str, list[float]]:
    scalars = {}
    for events in sorted((root / "eval" / "tensorboard").glob("events.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith("val_"):
                scalars[tag] = [event.value for event in accumulator.Scalars(tag)]
    return scalars


def predictions(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    # 8 training images: 2 global batches of 4 per epoch; 5 validation / test images: ranks get 3 and 2
    return root, {**TINY, **tiny_bundle_task(root, num_train=8, num_val=5, num_test=5)}


def test_two_processes_train_and_evaluate_like_one_process(sample):
    root, common = sample
    one, two = root / "one", root / "two"
    # one process, train.json as it is (but shuffling, augmentation and dropout off)
    run_workflow(["train"], "training", **TEST_WORKFLOW, bundle_root=str(one), **common, **DETERMINISTIC,
                 **{"train#dataloader#shuffle": False})
    single = run_workflow(["train", "evaluate"], "evaluating", **TEST_WORKFLOW, bundle_root=str(one), **common)[0]
    # two processes (Gloo), the same global batch of 4 as 2 x 2
    overrides = {"bundle_root": str(two), **common, **DETERMINISTIC, "train#sampler#shuffle": False}
    # as under `srun torchrun` in a SLURM job, where SLURM_LOCALID is the torchrun task's index on its node
    trained = torchrun(bundle_command("training", ["train", "multi_gpu_train"], overrides), cwd=root,
                       SLURM_JOB_ID="4242", SLURM_LOCALID="0")
    torchrun(bundle_command("evaluating", ["train", "evaluate", "multi_gpu_evaluate"],
                            {"bundle_root": str(two), **common}), cwd=root)

    # ranks other than 0 log warnings only, and only rank 0 writes TensorBoard files and checkpoints
    log = trained.stdout + trained.stderr
    assert "process 1 of 2 (local rank 1 on" in log  # ignite did not put SLURM_LOCALID over torchrun's LOCAL_RANK
    assert log.count("Epoch[2] Metrics") == 1 and log.count("Train completed, saved final checkpoint") == 1
    # rank 0 reports its shards of the training and the validation cache; rank 1 is quiet
    assert log.count("as shard 1 of 2") == 2 and "as shard 2 of 2" not in log
    event_files = [len(list((run / "eval" / "tensorboard").glob("events.*"))) for run in (one, two)]
    assert event_files[1] == event_files[0]
    # the shards filled one cache: every training/validation/test image once, no temporary file left
    caches = list((two / "cache").iterdir())
    assert len(caches) == 1 and len(list(caches[0].glob("*.safetensors"))) == 18
    assert not list(caches[0].glob(".*.tmp"))

    # validation metrics, gathered over both ranks every epoch, equal the one-process run's
    val_one, val_two = validation_scalars(one), validation_scalars(two)
    assert set(val_one) == {"val_auc", "val_accuracy", "val_f1", "val_kappa"} and set(val_two) == set(val_one)
    for tag in val_one:
        assert len(val_two[tag]) == 2
        assert val_two[tag] == pytest.approx(val_one[tag], abs=1e-6), tag
    # the checkpoints: plain FPTNet state dicts (no "module." prefix), weights within float rounding
    for name in ("model.pt", "model_final.pt"):
        a = torch.load(one / "models" / name, weights_only=True)
        b = torch.load(two / "models" / name, weights_only=True)
        assert set(a) == set(b) and not [key for key in b if key.startswith("module.")]
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=WEIGHT_TOLERANCE, rtol=0, msg=key)
    # evaluation: test metrics gathered over ranks, the per-image report of both ranks in datalist order
    for checkpoint in ("best", "final"):
        report_one = json.loads((one / "eval" / checkpoint / "metrics.json").read_text())
        report_two = json.loads((two / "eval" / checkpoint / "metrics.json").read_text())
        assert report_two["num_images"] == report_one["num_images"] == 5
        assert report_two["confusion_matrix"] == report_one["confusion_matrix"]
        assert report_two["metrics"] == pytest.approx(report_one["metrics"], abs=1e-6)
        assert report_two["metrics"] == pytest.approx(single[checkpoint], abs=1e-6)
        rows_one = predictions(one / "eval" / checkpoint / "predictions.csv")
        rows_two = predictions(two / "eval" / checkpoint / "predictions.csv")
        assert [r["filename"] for r in rows_two] == [r["filename"] for r in rows_one]
        for r1, r2 in zip(rows_one, rows_two):
            assert r2["prediction"] == r1["prediction"]
            for key in (k for k in r1 if k.startswith("probability_")):
                assert float(r2[key]) == pytest.approx(float(r1[key]), abs=PROBABILITY_TOLERANCE)


# -- distributed preloading ----------------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / "images", names=[f"{c}/{i:04d}.png" for c in "ab" for i in range(3)])


def test_preload_shards_are_disjoint_and_together_fill_the_cache(images, tmp_path):
    shards = [make_dataset(images, tmp_path / "cache").preload(batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    assert [(s["total"], s["computed"], s["rank"], s["world_size"]) for s in shards] == [(3, 3, 0, 2), (3, 3, 1, 2)]
    dataset = make_dataset(images, tmp_path / "cache")
    assert all(dataset.is_cached(item) for item in images)
    assert dataset.preload()["computed"] == 0
    with pytest.raises(ValueError, match="rank"):
        dataset.preload(rank=2, world_size=2)


def test_ranks_on_nodes_without_a_shared_cache_folder_compute_what_they_cannot_see(images, tmp_path):
    # two "nodes", one process each, each with its own cache folder (node-local disks)
    reports = [
        _preload_sharded(make_dataset(images, tmp_path / f"node{r}"), 2, 0, rank=r, world_size=2, local_rank=0,
                         local_world_size=1, wait=lambda: None)
        for r in (0, 1)
    ]
    assert [(r["not_visible"], r["computed"]) for r in reports] == [(3, 6), (3, 6)]
    for node in (0, 1):
        assert all(make_dataset(images, tmp_path / f"node{node}").is_cached(item) for item in images)


def test_a_process_killed_while_writing_leaves_no_corrupt_entry(images, tmp_path):
    # The process dies by SIGKILL inside the write of its third entry, after the bytes, before the rename. A
    # fresh interpreter, not a fork: a fork of this process (threads from earlier tests) can deadlock.
    worker = textwrap.dedent(
        f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        import fpt_monai.preload.dataset as module
        from preload_setup import make_dataset
        published, replace = [], os.replace
        def dying_replace(src, dst):
            if str(dst).endswith(".safetensors"):
                published.append(dst)
                if len(published) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        module.os.replace = dying_replace
        make_dataset(json.loads(sys.argv[1]), {str(tmp_path / "cache")!r}).preload(batch_size=1)
        """
    )
    process = subprocess.run([sys.executable, "-c", worker, json.dumps(images)], capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    dataset = make_dataset(images, tmp_path / "cache")
    written = sorted(Path(dataset.cache_dir).glob("*.safetensors"))
    assert len(written) == 2 and len(list(Path(dataset.cache_dir).glob(".*.tmp"))) == 1  # the dead write's bytes
    for path in written:
        read_entry(path, dataset.fingerprint)  # complete and verified
    report = dataset.preload()
    assert (report["already_cached"], report["computed"]) == (2, 4)


def test_preload_command_under_torchrun_fills_one_shard_per_process(sample, tmp_path, monkeypatch, capsys):
    _, common = sample
    reports = []
    for rank in (0, 1):  # what `torchrun --nproc_per_node=2 -m fpt_monai preload ...` sets for each process
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        Commands().preload(common["dataset_dir"], str(tmp_path / "cache"), preset="fpt_plus_tiny",
                           pretrained=common["pretrained"], splits="val", batch_size=2)
        reports.append(json.loads(capsys.readouterr().out))
    assert [(r["rank"], r["splits"]["val"]["computed"]) for r in reports] == [(0, 3), (1, 2)]
    folders = {r["splits"]["val"]["cache_dir"] for r in reports}
    assert len(folders) == 1 and len(list(Path(folders.pop()).glob("*.safetensors"))) == 5  # one whole cache


# -- helpers -------------------------------------------------------------------------------------------------
def test_backend_device_and_rank_come_from_the_machine_and_torchrun(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.rank_and_world_size() == (0, 1) and not distributed.is_distributed()
    if not torch.cuda.is_available():
        assert distributed.distributed_backend() == "gloo" and distributed.distributed_device() == torch.device("cpu")
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_distributed()
    assert distributed.rank_zero_first(max, 2, 3) == 3  # one process: just the call
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.rank_and_world_size() == (1, 2)


def test_global_batch_and_samplers_are_shared_among_processes(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.per_rank_batch_size(16) == 8
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        distributed.per_rank_batch_size(5)
    items = list(range(5))
    assert list(distributed.distributed_sampler(items, shuffle=False, even_divisible=False)) == [1, 3]
    assert list(distributed.distributed_sampler(items, shuffle=False, even_divisible=True)) == [1, 3, 0]  # padded
    with pytest.raises(ValueError, match="cannot be shared among 2 processes"):
        distributed.distributed_sampler([0], shuffle=False, even_divisible=False)


@pytest.fixture
def process_group(tmp_path):
    """A one-process Gloo group in this process, removed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def test_ddp_leaves_the_frozen_backbone_out(process_group, monkeypatch):
    net = FPTNet(TimmViTBackbone(make_tiny_timm_vit()), num_classes=3, side_img_size=32, num_prompts=4, reduction=4)
    ddp = distributed.wrap_ddp(net, torch.device("cpu"))
    backbone = {f"backbone.{n}" for n, _ in net.backbone.named_parameters()} | {
        f"backbone.{n}" for n, _ in net.backbone.named_buffers()}
    assert backbone and set(ddp.parameters_to_ignore) == backbone  # neither broadcast nor synchronised
    synchronised = {id(p) for p in ddp.parameters() if not getattr(p, "_ddp_ignored", False) and p.requires_grad}
    assert synchronised == {id(p) for p in net.trainable_parameters()}
    assert not [k for k in ddp.module.state_dict() if k.startswith("module.")]  # what checkpoints save

    # weights that differ between ranks are refused, naming the submodule
    def other_rank_differs(output, digests):
        output[:] = [digests, {name: "0" * 64 for name in digests}]

    monkeypatch.setattr(distributed.dist, "all_gather_object", other_rank_differs)
    with pytest.raises(ValueError, match=r"frozen \['backbone'\] weights differ between ranks"):
        distributed.wrap_ddp(FPTNet(TimmViTBackbone(make_tiny_timm_vit()), 3, 32, num_prompts=4, reduction=4))
    monkeypatch.undo()
    unfrozen = FPTNet(TimmViTBackbone(make_tiny_timm_vit()), 3, 32, num_prompts=4, reduction=4)
    unfrozen.backbone.requires_grad_(True)
    with pytest.raises(ValueError, match="'backbone' is not frozen"):
        distributed.wrap_ddp(unfrozen)


def test_wrap_ddp_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_distributed"):
        distributed.wrap_ddp(torch.nn.Linear(2, 2))
