"""FPT on volumes: 3D presets and weights, the 3D sample dataset, 3D transforms and preloading, the 3D bundle
overlays end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import ViT
from monai.transforms import Compose
from safetensors.torch import save_file

from conftest import TEST_WORKFLOW
from fpt_monai.bundle import config_files, run_workflow
from fpt_monai.cli import Commands
from fpt_monai.data import (
    SAMPLE_3D_CLASSES,
    SampleVolumeSpec,
    SideViewd,
    dataset_classes,
    fpt_transforms_3d,
    inference_transforms_3d,
    is_dicom_series,
    make_sample_dataset_3d,
    make_volume_datalist,
    volume_image_datalist,
)
from fpt_monai.data.sample3d import render_sample_volume
from fpt_monai.networks import FPTNet
from fpt_monai.presets import PRESETS, create_backbone, create_fpt, MonaiViTPreset
from fpt_monai.networks.fpt import BACKBONE_REFERENCE_KEY, make_side_view
from fpt_monai.preload import KVCacheDataset, item_digest
from fpt_monai.weights import PretrainedWeightsError

# the tiny 3D preset shrunk further: 32^3 volumes, patch 8 -> 64 patches + class token, side view 16^3
TINY_3D = {"img_size": 32, "side_img_size": 16}
SMALL_SAMPLE = dict(num_train=6, num_val=3, num_test=3, volume_size=32)


def tiny_vit(img_size=32, classification=True, num_classes=2, seed=0) -> ViT:
    torch.manual_seed(seed)
    config = PRESETS["fpt_3d_tiny"]
    return ViT(in_channels=1, img_size=img_size, patch_size=8, hidden_size=config.hidden_size,
               mlp_dim=config.mlp_dim, num_layers=config.num_layers, num_heads=config.num_heads,
               classification=classification, num_classes=num_classes, spatial_dims=3)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A MONAI-layout checkpoint of the tiny preset's architecture, made at 48^3 (a 6^3 grid) with a head."""
    path = tmp_path_factory.mktemp("weights") / "vit3d.safetensors"
    save_file(tiny_vit(img_size=48, num_classes=5).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def sample3d(tmp_path_factory) -> Path:
    return make_sample_dataset_3d(tmp_path_factory.mktemp("sample3d") / "data", progress=False, **SMALL_SAMPLE)


def tiny_net(weights_file, **overrides) -> FPTNet:
    return create_fpt("fpt_3d_tiny", num_classes=3, pretrained=str(weights_file), **{**TINY_3D, **overrides})


# -- networks ---------------------------------------------------------------------------------------------------


def test_3d_presets_are_monai_vit_presets_with_one_channel():
    for name in ("fpt_3d", "fpt_plus_3d", "fpt_3d_tiny"):
        preset = PRESETS[name]
        assert isinstance(preset, MonaiViTPreset) and preset.spatial_dims == 3 and preset.in_channels == 1
        assert preset.img_size % preset.patch_size == 0 and preset.side_img_size % preset.patch_size == 0
    assert PRESETS["fpt_plus_3d"].blocks == tuple(range(6, 12)) and PRESETS["fpt_plus_3d"].variant == "fpt_plus"


def test_local_weights_load_with_resampled_position_embedding(weights_file):
    net = tiny_net(weights_file)
    source = tiny_vit(img_size=48, num_classes=5)
    model = net.backbone.model
    # blocks are copied, the 6^3 position grid is resampled to 4^3, the head is dropped, the class token kept
    torch.testing.assert_close(model.blocks[3].mlp.linear1.weight, source.blocks[3].mlp.linear1.weight)
    torch.testing.assert_close(model.cls_token, source.cls_token)
    assert model.patch_embedding.position_embeddings.shape == (1, 64, 96)
    assert not [k for k in model.state_dict() if k.startswith("classification_head")]
    assert net.shape.num_tokens == 65 and net.shape.kv_shape == (6, 2, 4, 13, 24)
    assert net.backbone.mean == (0.5,) and net.backbone.std == (0.5,)


def test_checkpoint_without_class_token_gives_a_backbone_without_one(tmp_path):
    path = tmp_path / "unetr_vit.pt"
    torch.save({"state_dict": tiny_vit(classification=False).state_dict()}, path)
    backbone = create_backbone("fpt_3d_tiny", pretrained=str(path), **TINY_3D)
    assert not hasattr(backbone.model, "cls_token") and backbone.shape.num_tokens == 64


def test_pretrained_true_is_an_error_and_false_warns_loudly(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no downloadable weights"):
        create_backbone("fpt_3d_tiny", pretrained=True, **TINY_3D)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        create_backbone("fpt_3d_tiny", pretrained=False, **TINY_3D)
    wrong = tmp_path / "wrong.safetensors"
    save_file(ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=6, num_heads=4,
                  spatial_dims=3).state_dict(), str(wrong))
    with pytest.raises(PretrainedWeightsError, match="hidden_size=96"):
        create_backbone("fpt_3d_tiny", pretrained=str(wrong), **TINY_3D)


def test_3d_network_shapes_frozen_backbone_and_gradient_flow(weights_file):
    net = tiny_net(weights_file).train()
    volumes = torch.randn(2, 1, 32, 32, 32)
    logits = net(volumes)
    assert logits.shape == (2, 3)
    assert not net.backbone.training and all(not p.requires_grad for p in net.backbone.parameters())
    logits.logsumexp(dim=1).sum().backward()
    for name, param in net.named_parameters():
        if name.startswith("backbone."):
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    net.eval()
    kv = net.backbone(volumes)
    assert kv.shape == (2, *net.shape.kv_shape) and kv.grad_fn is None
    torch.testing.assert_close(net(volumes), net.forward_side(net.side_view(volumes), kv.half()), atol=2e-3, rtol=1e-3)
    # a checkpoint holds what learns and the backbone's digest, and refuses other backbone weights
    state = net.state_dict()
    assert BACKBONE_REFERENCE_KEY in state and not [k for k in state if k.startswith("backbone.")]


def test_3d_side_view_averages_areas():
    volume = torch.zeros(1, 1, 32, 32, 32)
    volume[0, 0, 5, 9, 30] = 64.0
    side = make_side_view(volume, (8, 8, 8))
    assert side.shape == (1, 1, 8, 8, 8)
    # a one-voxel spot is averaged into its 4^3 block, wherever it sits (no sampling that skips it)
    assert side[0, 0, 1, 2, 7] == 1.0 and side.sum() == 1.0
    assert make_side_view(volume, (40, 40, 40)).shape == (1, 1, 40, 40, 40)


# -- sample dataset ------------------------------------------------------------------------------------------------


def test_3d_sample_layout_determinism_and_reuse(sample3d, tmp_path):
    assert dataset_classes(sample3d) == list(SAMPLE_3D_CLASSES)
    train = make_volume_datalist(sample3d, "train")
    assert len(train) == 6 and sorted(item["label"] for item in train) == [0, 0, 1, 1, 2, 2]

    image = nib.load(train[0]["image"])
    assert image.shape == (32, 32, 32) and image.get_data_dtype() == np.int16
    assert np.allclose(image.header.get_zooms(), 1.5)
    again = make_sample_dataset_3d(tmp_path / "again", progress=False, **SMALL_SAMPLE)
    first = sorted(p.read_bytes() for p in sample3d.rglob("*.nii.gz"))
    assert first == sorted(p.read_bytes() for p in again.rglob("*.nii.gz"))
    stamp = (again / "sample_dataset.json").stat().st_mtime_ns
    make_sample_dataset_3d(again, progress=False, **SMALL_SAMPLE)  # same settings: reused, not rewritten
    assert (again / "sample_dataset.json").stat().st_mtime_ns == stamp
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sample dataset"):
        make_sample_dataset_3d(tmp_path / "mine", progress=False, **SMALL_SAMPLE)


def test_3d_sample_grade_is_visible_at_high_resolution_only():
    spec = SampleVolumeSpec()
    assert all(high <= spec.spots_per_volume[0] for _, high in spec.spots_per_grade)
    with pytest.raises(ValueError, match="spots_per_volume"):
        SampleVolumeSpec(spots_per_grade=((0, 0), (2, 4), (7, 20)))
    volumes = {
        grade: torch.from_numpy(np.stack(
            [render_sample_volume(spec, grade, np.random.default_rng([9, i, grade])) for i in range(3)]
        ).astype(np.float32))[:, None]
        for grade in (0, 2)
    }
    high = {g: float(v.amax(dim=(1, 2, 3, 4)).mean()) for g, v in volumes.items()}
    side = {g: float(make_side_view(v, (16, 16, 16)).amax(dim=(1, 2, 3, 4)).mean()) for g, v in volumes.items()}
    assert high[2] - high[0] > 250  # sharp spots of a few hundred HU at 64^3 ...
    assert side[2] - side[0] < 40  # ... are faint sub-voxel smudges like the blobs at the side's 16^3


# -- transforms and preloading -------------------------------------------------------------------------------------


def test_3d_items_cache_hits_and_equal_paths(sample3d, weights_file, tmp_path):
    net = tiny_net(weights_file).eval()
    backbone = net.backbone
    calls = []
    backbone.model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    read = {"intensity_range": (-200, 600)}
    data = make_volume_datalist(sample3d, "val")
    chain = fpt_transforms_3d(32, 16, backbone.mean, backbone.std, train=False, backbone=backbone, **read)
    dataset = KVCacheDataset(data, chain, tmp_path / "cache", progress=False)
    assert dataset.preload(batch_size=2)["computed"] == 3
    assert dataset.preload(batch_size=2)["computed"] == 0
    # reading items never runs the backbone again: the keys/values come from the cache
    calls.clear()
    items = [dataset[i] for i in range(3)]
    assert calls == [] and len(list(dataset.cache_dir.glob("*.safetensors"))) == 3
    assert items[0]["kv"].shape == net.shape.kv_shape and items[0]["kv"].dtype == torch.float16
    assert items[0]["image"].shape == (1, 16, 16, 16) and "high_res" not in items[0]
    # the evaluation path through the cache gives the logits of the single-volume network
    volume = Compose(inference_transforms_3d(32, backbone.mean, backbone.std, **read))(dict(data[0]))["image"]
    with torch.no_grad():
        online = net(volume[None])
        cached = net(items[0]["image"][None], kv=items[0]["kv"][None])
    torch.testing.assert_close(cached, online, atol=2e-3, rtol=1e-3)
    # training items: augmented side view of the same shape, the same cache entries
    train_chain = fpt_transforms_3d(32, 16, backbone.mean, backbone.std, train=True, backbone=backbone, **read)
    train_set = KVCacheDataset(data, train_chain, tmp_path / "cache", progress=False)
    assert train_set.cache_dir == dataset.cache_dir and train_set.preload()["computed"] == 0
    assert train_set[1]["image"].shape == (1, 16, 16, 16)
    # the intensity window is part of the cache identity
    other = fpt_transforms_3d(32, 16, backbone.mean, backbone.std, train=False, backbone=backbone,
                              intensity_range=(-1000, 1000))
    assert KVCacheDataset(data, other, tmp_path / "cache", progress=False).fingerprint != dataset.fingerprint
    percentile = fpt_transforms_3d(32, 16, backbone.mean, backbone.std, train=False, backbone=backbone)
    assert KVCacheDataset(data, percentile, tmp_path / "cache", progress=False).fingerprint != dataset.fingerprint


def test_side_view_transform_matches_the_network_in_3d(weights_file):
    net = tiny_net(weights_file)
    volume = torch.randn(1, 32, 32, 32)
    torch.testing.assert_close(SideViewd("image", 16)({"image": volume})["image"], net.side_view(volume[None])[0])


def test_volume_options_are_checked(sample3d):
    with pytest.raises(ValueError, match="intensity_range"):
        fpt_transforms_3d(32, 16, [0.5], [0.5], train=False, intensity_range=(100, -100))
    with pytest.raises(ValueError, match="percentiles"):
        fpt_transforms_3d(32, 16, [0.5], [0.5], train=False, percentiles=None)
    item = make_volume_datalist(sample3d, "test")[0]
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps the transform's error
        Compose(inference_transforms_3d(32, [0.5] * 3, [0.5] * 3))(dict(item))
    assert "expected a volume of 3 channel(s)" in str(info.value.__cause__) and item["image"] in str(info.value.__cause__)


def test_dicom_series_folders_are_volumes_with_a_file_level_identity(tmp_path):
    itk = pytest.importorskip("itk")
    volume = np.random.default_rng(0).normal(0, 100, (12, 16, 20)).astype(np.int16)  # (z, y, x) for ITK
    image = itk.image_from_array(volume)
    series = tmp_path / "train" / "a" / "patient1"
    series.mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    names = [str(series / f"slice_{i:03d}.dcm") for i in range(volume.shape[0])]
    writer = itk.ImageSeriesWriter[type(image), itk.Image[itk.SS, 2]].New(Input=image, ImageIO=itk.GDCMImageIO.New())
    writer.SetFileNames(names)
    writer.Update()
    assert is_dicom_series(series) and not is_dicom_series(series.parent)
    assert make_volume_datalist(tmp_path, "train") == [{"image": str(series), "label": 0}]
    assert volume_image_datalist(tmp_path) == [{"image": str(series)}]
    read = Compose(inference_transforms_3d((20, 16, 12), [0.0], [1.0], intensity_range=(-500, 500)))
    out = read({"image": str(series)})["image"]
    expected = np.clip((volume.transpose(2, 1, 0) + 500) / 1000, 0, 1)  # ITK reads (x, y, z), like nibabel
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)
    before = item_digest({"image": str(series), "label": 0})
    Path(names[3]).write_bytes(Path(names[3]).read_bytes() + b"\0")  # one edited slice: a new cache entry
    assert item_digest({"image": str(series), "label": 0}) != before


# -- the bundle -----------------------------------------------------------------------------------------------------


def test_3d_overlays_parse():
    parser = ConfigParser()
    parser.read_config(config_files("train", "evaluate", "inference", "train_3d", "evaluate_3d", "inference_3d"))
    assert "make_sample_dataset_3d" in parser["dataset_dir"] and parser["preset"] == "fpt_3d_tiny"
    for key in ("train#preprocessing", "validate#preprocessing", "test#preprocessing"):
        assert "fpt_transforms_3d" in parser[key], key
    assert "inference_transforms_3d" in parser["preprocessing#transforms"]
    assert parser["volume_reader"]["intensity_range"] == [-200, 600]
    assert parser["train#dataset#_target_"] == "fpt_monai.preload.KVCacheDataset"  # the rest of train.json stays


def test_3d_bundle_trains_and_evaluates_end_to_end(sample3d, weights_file, tmp_path):
    override = {
        "bundle_root": str(tmp_path), "dataset_dir": str(sample3d), "pretrained": str(weights_file),
        "network_def#img_size": 32, "network_def#side_img_size": 16, "num_epochs": 1, "batch_size": 3,
        "num_workers": 0,
    }
    run_workflow(["train", "train_3d"], "training", **TEST_WORKFLOW, **override)
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "model_final.pt").is_file()
    entries = list((tmp_path / "cache").glob("*/*.safetensors"))
    assert len(entries) == 9  # 6 train + 3 val volumes preloaded once
    results = run_workflow(["train", "evaluate", "train_3d", "evaluate_3d"], "evaluating", **TEST_WORKFLOW, **override)[0]
    assert set(results) == {"best", "final"}
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 12  # + 3 test volumes, train/val reused
    metrics = json.loads((tmp_path / "eval" / "best" / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and "test_auc" in metrics["metrics"]


def test_params_command_counts_the_3d_preset(capsys):
    level = logging.getLogger("fpt_monai").level
    try:
        Commands().params(preset="fpt_3d", num_classes=2)
    finally:
        logging.getLogger("fpt_monai").setLevel(level)
    captured = capsys.readouterr()
    counts = json.loads(captured.out)
    assert counts["kv_shape_per_image"] == [12, 2, 12, 102, 64] and counts["frozen"] == 88_587_264
    assert "RANDOM" not in captured.err
