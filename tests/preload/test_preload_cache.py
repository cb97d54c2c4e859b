import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.transforms import Compose
from safetensors.torch import save as safetensors_save

import fpt_monai.preload.dataset as dataset_module
from fpt_monai.networks import FPTNet
from fpt_monai.preload import PreloadHandler, read_entry, write_entry
from fpt_monai.preload.dataset import CorruptCacheEntryError, KVCacheDataset
from preload_setup import make_dataset, make_transforms, make_backbone, write_images

TESTS = Path(__file__).resolve().parents[1]  # tests/: conftest.py, preload_setup.py


@pytest.fixture
def data(tmp_path):
    return write_images(tmp_path / "images")


def entries(dataset):
    return sorted(Path(dataset.cache_dir).glob("*.safetensors"))


def test_preload_fills_every_entry_once_and_resumes(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "cache")
    report = dataset.preload(batch_size=3)
    assert (report["total"], report["already_cached"], report["computed"]) == (4, 0, 4)
    assert len(entries(dataset)) == 4 and not list(Path(dataset.cache_dir).glob(".*.tmp"))
    # a new process (new dataset object, same configuration) finds the cache and computes nothing
    again = make_dataset(data, tmp_path / "cache")
    assert again.cache_dir == dataset.cache_dir
    assert again.preload(batch_size=3)["computed"] == 0
    # an interrupted preload resumes: remove two entries, only those two are computed
    for path in entries(dataset)[:2]:
        path.unlink()
    assert again.preload(batch_size=3)["computed"] == 2


def test_same_file_name_in_two_folders_never_collides(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "cache")
    dataset.preload()
    a, b = data[0], data[1]  # a/0001.png and b/0001.png
    assert Path(a["image"]).name == Path(b["image"]).name
    assert dataset.entry_path(a) != dataset.entry_path(b)
    assert not torch.equal(dataset[0]["kv"], dataset[1]["kv"])


def test_batched_preload_equals_lazy_single_item_computation(data, tmp_path):
    batched = make_dataset(data, tmp_path / "batched", dtype="float32")
    batched.preload(batch_size=4)
    lazy = make_dataset(data, tmp_path / "lazy", dtype="float32")
    for index in range(len(data)):
        torch.testing.assert_close(batched[index]["kv"], lazy[index]["kv"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        {"depth": 3},  # architecture
        {"seed": 1},  # weights
        {"img_size": 48},  # input size
        {"mean": 0.4},  # normalisation
        {"std": 0.25},  # normalisation
        {"token_ratio": 0.3},
        {"blocks": (0, 1)},
        {"dtype": "float32"},
        {"dtype": "bfloat16"},
        {"dtype": "int8"},
    ],
)
def test_any_feature_change_uses_a_new_cache(data, tmp_path, change):
    original = make_dataset(data, tmp_path / "cache")
    original.preload()
    changed = make_dataset(data, tmp_path / "cache", **change)
    assert changed.cache_dir != original.cache_dir
    assert not any(changed.is_cached(item) for item in data)
    assert changed.preload()["computed"] == len(data)


def test_cache_format_version_is_part_of_the_identity(data, tmp_path, monkeypatch):
    original = make_dataset(data, tmp_path / "cache")
    monkeypatch.setattr("fpt_monai.preload.fingerprint.CACHE_FORMAT_VERSION", 999)
    assert make_dataset(data, tmp_path / "cache").cache_dir != original.cache_dir


def test_edited_image_is_recomputed(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "cache")
    dataset.preload()
    old_path = dataset.entry_path(data[0])
    write_images(tmp_path / "images", names=("a/0001.png",), seed=7)
    assert dataset.entry_path(data[0]) != old_path and not dataset.is_cached(data[0])


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "foreign"])
def test_damaged_entry_is_detected_reported_and_recomputed(data, tmp_path, damage):
    dataset = make_dataset(data, tmp_path / "cache", augment=False)
    dataset.preload()
    expected = dataset[0]["kv"].clone()
    path = dataset.entry_path(data[0])
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_byte":
        path.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    else:  # a well-formed entry written for another cache
        write_entry(path, {"kv": expected, "label": 0}, fingerprint="someone-else")
    with pytest.warns(UserWarning, match=path.name):
        item = dataset[0]
    torch.testing.assert_close(item["kv"], expected)
    assert dataset.corrupt_entries == [path]
    torch.testing.assert_close(read_entry(path, dataset.fingerprint)["kv"], expected)  # rewritten, valid


def test_failed_write_leaves_no_partial_entry(data, tmp_path, monkeypatch):
    dataset = make_dataset(data, tmp_path / "cache")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset_module.os, "replace", disk_full)
    with pytest.raises(OSError, match="could not write cache entry .*No space left"):
        dataset.preload()
    assert list(Path(dataset.cache_dir).iterdir()) == [Path(dataset.cache_dir) / "fingerprint.json"]


def test_entry_fields_that_cannot_be_stored_are_named(tmp_path):
    with pytest.raises(TypeError, match="'meta'"):
        write_entry(tmp_path / "x.safetensors", {"kv": torch.zeros(2), "meta": object()}, "f")


def test_read_entry_rejects_files_without_checksum(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(safetensors_save({"kv": torch.zeros(3)}))
    with pytest.raises(CorruptCacheEntryError):
        read_entry(path, "f")


def test_two_processes_filling_one_cache_leave_it_correct(data, tmp_path):
    worker = textwrap.dedent(
        f"""
        import sys, json
        sys.path.insert(0, {str(TESTS)!r})
        from preload_setup import make_dataset
        data = json.loads(sys.argv[1])
        for _ in range(3):  # race repeatedly on the same entries
            dataset = make_dataset(data, {str(tmp_path / "cache")!r}, dtype="float32")
            for path in dataset.cache_dir.glob("*.safetensors"):
                path.unlink(missing_ok=True)
            dataset.preload(batch_size=1)
        """
    )
    import json

    procs = [subprocess.Popen([sys.executable, "-c", worker, json.dumps(data)]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    dataset = make_dataset(data, tmp_path / "cache", dtype="float32")
    reference = make_dataset(data, tmp_path / "reference", dtype="float32")
    assert len(entries(dataset)) == len(data) and not list(Path(dataset.cache_dir).glob(".*.tmp"))
    for item in data:
        cached = read_entry(dataset.entry_path(item), dataset.fingerprint)  # verifies the checksum
        expected = reference._cachecheck(item)
        torch.testing.assert_close(cached["kv"], expected["kv"], atol=1e-5, rtol=1e-5)


def test_random_transform_before_kv_is_refused(data, tmp_path):
    transforms = make_transforms(make_backbone())
    kv_index = next(i for i, t in enumerate(transforms) if type(t).__name__ == "FrozenBackboneKVd")
    transforms.insert(kv_index, transforms.pop())  # move the RandFlipd in front of the K/V transform
    with pytest.raises(ValueError, match="RandFlipd.*un-augmented"):
        KVCacheDataset(data, transforms, tmp_path / "cache")
    with pytest.raises(ValueError, match="exactly one FrozenBackboneKVd"):
        KVCacheDataset(data, transforms[:kv_index], tmp_path / "cache")


def training_step(net, side, kv, labels):
    net.zero_grad()
    logits = net.forward_side(side, kv)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    return logits.detach(), loss.detach(), grads


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_cached_training_step_equals_online_step(data, tmp_path, dtype, tolerance):
    dataset = make_dataset(data, tmp_path / "cache", dtype=dtype, augment=False)
    dataset.preload(batch_size=2)
    backbone = dataset.kv_transform.backbone
    torch.manual_seed(0)
    net = FPTNet(backbone, num_classes=2, side_img_size=32, num_prompts=4, reduction=4, fusion_dropout=0.0)
    batch = [dataset[i] for i in range(len(data))]
    side = torch.stack([item["image"] for item in batch]).float()
    labels = torch.tensor([item["label"] for item in batch])
    cached = training_step(net, side, torch.stack([item["kv"] for item in batch]), labels)
    # online: the same items through the same transforms without the cache; the backbone runs in the step
    before_kv = Compose(make_transforms(backbone, dtype=dtype, augment=False)[:6])
    online_items = [before_kv(dict(item)) for item in data]
    high_res = torch.stack([torch.as_tensor(item["high_res"]) for item in online_items])
    online = training_step(net, side, backbone(high_res), labels)
    torch.testing.assert_close(cached[0], online[0], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(cached[1], online[1], atol=tolerance, rtol=tolerance)
    for name in online[2]:
        torch.testing.assert_close(cached[2][name], online[2][name], atol=tolerance, rtol=max(tolerance, 1e-4))


def test_training_from_the_cache_never_calls_the_backbone(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "cache")
    dataset.preload(batch_size=4)
    backbone = dataset.kv_transform.backbone
    calls = []
    backbone.register_forward_pre_hook(lambda *args: calls.append(1))
    net = FPTNet(backbone.shape, num_classes=2, side_img_size=32, num_prompts=4, reduction=4)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    for _ in range(2):  # two epochs
        for batch in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net.forward_side(batch["image"].float(), batch["kv"]), batch["label"]).backward()
            optimizer.step()
    assert calls == []


def test_preload_handler_fills_caches_when_the_engine_starts(data, tmp_path):
    train = make_dataset(data[:2], tmp_path / "cache")
    val = make_dataset(data[2:], tmp_path / "cache")
    handler = PreloadHandler([train, val], batch_size=2)
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    assert [r["computed"] for r in handler.reports] == [2, 2]
    assert all(train.is_cached(item) for item in data[:2]) and all(val.is_cached(item) for item in data[2:])
    with pytest.raises(TypeError, match="KVCacheDataset"):
        PreloadHandler([object()])


@pytest.mark.parametrize("preset_blocks,expected", [(12, 7_557_120), (6, 3_778_560)])
def test_vit_b_entry_bytes_in_float16(tmp_path, preset_blocks, expected):
    kv = torch.zeros(preset_blocks, 2, 12, 205, 64, dtype=torch.float16)  # FPT: 12 blocks, FPT+: 6
    assert kv.numel() * kv.element_size() == expected
    path = tmp_path / "entry.safetensors"
    write_entry(path, {"kv": kv, "label": 4, "image": "/data/messidor/test/4/20051020_57622_0100_PP.png"}, "f" * 64)
    header = os.path.getsize(path) - expected
    assert 0 < header < 1024


def test_entry_round_trip_keeps_dtypes_scalars_and_fields(tmp_path):
    path = tmp_path / "entry.safetensors"
    item = {"kv": torch.randn(2, 3).to(torch.bfloat16), "label": torch.tensor(3), "image": "/x/0001.png", "id": 7}
    write_entry(path, item, "fingerprint")
    back = read_entry(path, "fingerprint")
    assert back["kv"].dtype == torch.bfloat16 and torch.equal(back["kv"], item["kv"])
    assert torch.equal(back["label"], item["label"]) and back["image"] == item["image"] and back["id"] == 7


def test_backbone_device_is_not_part_of_the_identity(data, tmp_path):
    backbone = make_backbone()
    on_cpu = KVCacheDataset(data, make_transforms(backbone), tmp_path / "cache")
    transforms = make_transforms(backbone)
    transforms[6].device = torch.device("meta")  # e.g. another GPU of a multi-process run
    assert KVCacheDataset(data, transforms, tmp_path / "cache").cache_dir == on_cpu.cache_dir


def test_supervised_trainer_trains_from_the_cache_through_prepare_batch(data, tmp_path):
    from monai.engines import PrepareBatchExtraInput, SupervisedTrainer

    dataset = make_dataset(data, tmp_path / "cache")
    backbone = dataset.kv_transform.backbone
    calls = []
    backbone.register_forward_pre_hook(lambda *args: calls.append(1))
    net = FPTNet(backbone, num_classes=2, side_img_size=32, num_prompts=4, reduction=4)
    head_before = net.side.head.weight.clone()
    preload = PreloadHandler(dataset, batch_size=4)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, network=net,
        train_data_loader=torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True),
        optimizer=torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2),
        loss_function=torch.nn.CrossEntropyLoss(), prepare_batch=PrepareBatchExtraInput({"kv": "kv"}),
        train_handlers=[preload],
    )
    trainer.run()
    assert len(calls) == 1  # one batched preload pass over the 4 images, none during the 2 epochs
    assert preload.reports[0]["computed"] == 4 and trainer.state.iteration == 4
    assert not torch.equal(net.side.head.weight, head_before)
