import json

import numpy as np
import pytest
import torch
from PIL import Image

from fpt_monai.data import (
    SideViewd,
    folder_datalist,
    json_datalist,
    make_datalist,
    make_fpt_dataset,
)
from fpt_monai.networks import FPTNet, make_side_view
from preload_setup import make_backbone


def make_folder(root, layout):
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((40, 40, 3), 10 * i, dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def test_folder_datalist_labels_follow_sorted_train_classes(tmp_path):
    root = make_folder(tmp_path, {"train": {"b_lesion": 2, "a_healthy": 1}, "val": {"b_lesion": 1}})
    (root / "train" / "a_healthy" / "notes.txt").write_text("not an image")
    train = folder_datalist(root, "train")
    assert [(p.split("/")[-2], label) for p, label in ((d["image"], d["label"]) for d in train)] == [
        ("a_healthy", 0), ("b_lesion", 1), ("b_lesion", 1)]
    assert [d["label"] for d in folder_datalist(root, "val")] == [1]  # labels of train/, not of val/


def test_folder_datalist_errors_name_the_problem(tmp_path):
    root = make_folder(tmp_path, {"train": {"a": 1}, "val": {"zzz": 1}})
    with pytest.raises(ValueError, match="zzz"):
        folder_datalist(root, "val")
    with pytest.raises(FileNotFoundError, match="test"):
        folder_datalist(root, "test")
    with pytest.raises(FileNotFoundError, match="train"):
        folder_datalist(tmp_path / "nowhere", "train")


def test_json_datalist_resolves_relative_paths(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"train": [{"image": "imgs/x.png", "label": 1}, {"image": "/abs/y.png", "label": 0}]}))
    items = make_datalist(path, "train")
    assert items == [{"image": str(tmp_path / "imgs/x.png"), "label": 1}, {"image": "/abs/y.png", "label": 0}]
    with pytest.raises(KeyError, match="'val'"):
        json_datalist(path, "val")
    path.write_text(json.dumps({"train": [{"label": 1}]}))
    with pytest.raises(ValueError, match="item 0"):
        json_datalist(path, "train")


def test_side_view_transform_matches_the_network():
    image = torch.rand(3, 64, 64)
    torch.testing.assert_close(SideViewd("x", 32)({"x": image})["x"], make_side_view(image[None], (32, 32))[0])


@pytest.mark.parametrize("train", [True, False])
def test_fpt_dataset_items(tmp_path, train):
    root = make_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    backbone = make_backbone()
    dataset = make_fpt_dataset(folder_datalist(root, "train"), 64, 32, [0.5] * 3, [0.5] * 3, train=train,
                               backbone=backbone, cache_dir=tmp_path / "cache", progress=False)
    item = dataset[3]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 1
    assert item["kv"].shape == backbone.shape.kv_shape and item["kv"].dtype == torch.float16
    assert "high_res" not in item


def test_evaluation_items_give_the_logits_of_the_single_image_network(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"a": 1, "b": 1}})
    datalist = folder_datalist(root, "train")
    backbone = make_backbone()
    net = FPTNet(backbone, num_classes=2, side_img_size=32, num_prompts=4, reduction=4).eval()
    online = make_fpt_dataset(datalist, 64, 32, [0.5] * 3, [0.5] * 3, train=False)
    cached = make_fpt_dataset(datalist, 64, 32, [0.5] * 3, [0.5] * 3, train=False, backbone=backbone,
                              cache_dir=tmp_path / "cache", kv_dtype="float32", progress=False)
    for index in range(2):
        high_res = online[index]["high_res"][None]
        expected = net(high_res)  # what inference on one image gives
        torch.testing.assert_close(online[index]["image"][None], net.side_view(high_res))
        got = net.forward_side(cached[index]["image"][None], cached[index]["kv"][None])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cache_needs_a_backbone(tmp_path):
    with pytest.raises(ValueError, match="backbone"):
        make_fpt_dataset([], 64, 32, [0.5] * 3, [0.5] * 3, train=False, cache_dir=tmp_path)


def test_training_and_evaluation_chains_share_one_cache(tmp_path):
    backbone = make_backbone()
    caches = {
        train: make_fpt_dataset([], 64, 32, [0.5] * 3, [0.5] * 3, train=train, backbone=backbone,
                                cache_dir=tmp_path, progress=False).cache_dir
        for train in (True, False)
    }
    assert caches[True] == caches[False]


def test_side_source_is_a_float16_copy_at_one_and_a_half_times_the_side_size():
    from fpt_monai.data import SideSourced
    from fpt_monai.preload.fingerprint import describe

    image = torch.rand(3, 64, 64)
    out = SideSourced("x", name="copy", size=16)({"x": image})
    assert out["x"] is image and out["copy"].dtype == torch.float16 and out["copy"].shape == (3, 24, 24)
    torch.testing.assert_close(out["copy"], make_side_view(image[None], (24, 24))[0].half())
    assert SideSourced("x", name="copy", size=48)({"x": image})["copy"].shape == (3, 64, 64)  # never above the image
    assert SideSourced("x", name="copy", size=(8, 12), scale=2)({"x": image})["copy"].shape == (3, 16, 24)
    # one description (cache fingerprint) for one stored copy: 16 and (16, 16) are the same size
    assert describe(SideSourced("x", name="copy", size=16)) == describe(SideSourced("x", name="copy", size=(16, 16)))
    assert "float16" in str(describe(SideSourced("x", name="copy", size=16)))
    with pytest.raises(ValueError, match="scale"):
        SideSourced("x", name="copy", size=16, scale=0.5)


def test_side_view_is_a_plain_tensor():
    from monai.data import MetaTensor

    view = SideViewd("x", 16)({"x": MetaTensor(torch.rand(3, 32, 32))})["x"]
    assert type(view) is torch.Tensor and view.shape == (3, 16, 16)


def test_training_side_views_come_from_the_cache_not_the_image_file(tmp_path, monkeypatch):
    """Once an item is cached, its training side view is made from the stored copy; evaluation reads the file."""
    from fpt_monai.data.readers import RGBImageReader

    root = make_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    datalist = folder_datalist(root, "train")
    backbone = make_backbone()
    datasets = {train: make_fpt_dataset(datalist, 64, 32, [0.5] * 3, [0.5] * 3, train=train, backbone=backbone,
                                        cache_dir=tmp_path / "cache", progress=False) for train in (True, False)}
    datasets[True].preload()
    stored = datasets[True]._cachecheck(datalist[0])["image"]
    assert stored.dtype == torch.float16 and stored.shape == (3, 48, 48)  # 1.5 times the side size

    def no_reading(*args, **kwargs):
        raise AssertionError("the image file was read")

    monkeypatch.setattr(RGBImageReader, "read", no_reading)
    item = datasets[True][0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32 and "high_res" not in item
    with pytest.raises(RuntimeError, match="LoadImageRGBd") as error:
        datasets[False][0]
    assert "was read" in str(error.value.__cause__)


def test_training_side_view_without_augmentation_is_the_stored_copy_resized(tmp_path):
    from monai.transforms import Compose

    from fpt_monai.data import fpt_transforms

    root = make_folder(tmp_path / "data", {"train": {"a": 1}})
    item = folder_datalist(root, "train")[0]
    chain = fpt_transforms(64, 32, [0.5] * 3, [0.5] * 3, train=True)
    *deterministic, copy = chain[:6]  # the side-view source ends the un-augmented part (before normalising)
    assert [type(t).__name__ for t in chain[6:]] == ["NormalizeIntensityd", "EnsureTyped", "RandTorchVisiond",
                                                    "RandTorchVisiond", "RandTorchVisiond", "TorchVisiond",
                                                    "SideViewd"]
    for transform in chain:  # no augmentation: full crop, no flip, no jitter
        if type(transform).__name__ == "RandTorchVisiond":
            trans = transform.trans.trans
            if hasattr(trans, "scale"):
                trans.scale, trans.ratio = (1.0, 1.0), (1.0, 1.0)
            if hasattr(trans, "p"):
                trans.p = 0.0
            if hasattr(trans, "brightness"):
                trans.brightness = trans.contrast = None
    out = Compose(chain)(dict(item))
    source = Compose([*deterministic, copy])(dict(item))["image"]
    expected = (make_side_view(source[None].float(), (32, 32))[0] - 0.5) / 0.5
    torch.testing.assert_close(out["image"], expected, atol=1e-5, rtol=1e-5)


def test_without_a_cached_side_source_training_reads_the_file_and_makes_the_same_side_views(tmp_path):
    """side_source=False: a smaller entry (no copy), and the same augmented side views, made from the image file."""
    root = make_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    datalist = folder_datalist(root, "train")
    backbone = make_backbone()
    datasets = {source: make_fpt_dataset(datalist, 64, 32, [0.5] * 3, [0.5] * 3, train=True, backbone=backbone,
                                         cache_dir=tmp_path / "cache", progress=False, side_source=source)
                for source in (True, False)}
    assert datasets[True].cache_dir != datasets[False].cache_dir  # the source is part of the cache's identity
    for dataset in datasets.values():
        dataset.preload()
    without = datasets[False]._cachecheck(datalist[0])
    assert "image" not in without or isinstance(without["image"], str)  # the path only
    entry = {source: datasets[source].entry_path(datalist[0]).stat().st_size for source in (True, False)}
    assert entry[True] - entry[False] > 0.99 * 3 * 48 * 48 * 2  # the float16 copy at 1.5 times the side size
    views = {}
    for source, dataset in datasets.items():
        torch.manual_seed(3)
        views[source] = [dataset[i]["image"] for i in range(len(datalist))]
    for a, b in zip(views[True], views[False]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_the_python_chains_are_the_packaged_bundle_lists(tmp_path, monkeypatch):
    """fpt_transforms, inference_transforms and image_transforms parse the bundle's configs: an edit there is theirs."""
    import functools
    import shutil

    from fpt_monai import bundle
    from fpt_monai.data import fpt_transforms, image_transforms, inference_transforms, pipeline

    shutil.copytree(bundle.bundle_dir() / "configs", tmp_path / "configs")
    train = json.loads((tmp_path / "configs" / "train.json").read_text())
    train["train"]["random_transforms"][2]["p"] = 0.25  # the side view's horizontal flip
    train["train"]["deterministic_transforms"][4]["mode"] = "bicubic"  # the high-resolution resizing
    (tmp_path / "configs" / "train.json").write_text(json.dumps(train))
    inference = json.loads((tmp_path / "configs" / "inference.json").read_text())
    inference["preprocessing"]["transforms"][3]["mode"] = "nearest"
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(inference))
    monkeypatch.setattr(pipeline, "config_files", functools.partial(bundle.config_files, root=tmp_path))

    def resize_modes(chain):
        return [t.mode[0] for t in chain if type(t).__name__ == "Resized"]

    chain = fpt_transforms(64, 32, [0.5] * 3, [0.5] * 3, train=True)
    flips = [t.trans.trans.p for t in chain if type(t).__name__ == "RandTorchVisiond" and hasattr(t.trans.trans, "p")]
    assert flips == [0.25]
    assert resize_modes(chain) == ["bicubic"]
    assert resize_modes(fpt_transforms(64, 32, [0.5] * 3, [0.5] * 3, train=False)) == ["bicubic", "bilinear"]
    assert resize_modes(inference_transforms(64, [0.5] * 3, [0.5] * 3)) == ["nearest"]
    assert resize_modes(image_transforms(64, [0.5] * 3, [0.5] * 3, train=False)) == ["bilinear"]  # baseline.json's


def test_reader_options_are_the_bundles_image_reader_settings(tmp_path):
    from fpt_monai.data import fpt_transforms

    chain = fpt_transforms(64, 32, [0.5] * 3, [0.5] * 3, train=False, reader={"volume_slice": "max"})
    readers = [t.reader for t in chain if type(t).__name__ == "LoadImageRGBd"]
    assert len(readers) == 2 and all(r.volume_slice == "max" and r.volume_axis == 2 for r in readers)
    with pytest.raises(ValueError, match="'volume_slise'.*volume_slice"):  # named, with the options there are
        fpt_transforms(64, 32, [0.5] * 3, [0.5] * 3, train=False, reader={"volume_slise": "max"})
