"""A K/V cache entry is bound to its item: a misplaced or edited entry is reported, recomputed, never used."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from monai.engines import PrepareBatchExtraInput, SupervisedEvaluator

from fpt_monai.engine import ClassificationReport
from fpt_monai.networks import FPTNet
from fpt_monai.preload import CorruptCacheEntryError, item_identity, read_entry, write_entry
from preload_setup import make_dataset, write_images


@pytest.fixture
def data(tmp_path):
    items = write_images(tmp_path / "images")
    return [{**item, "filename": item["image"]} for item in items]  # the bundle's items name their file


@pytest.fixture
def dataset(data, tmp_path):
    dataset = make_dataset(data, tmp_path / "cache", augment=False)
    dataset.preload()
    return dataset


def evaluate(dataset, output_dir) -> list[dict]:
    """predictions.csv of an evaluation over ``dataset`` (every image once, in datalist order)."""
    torch.manual_seed(0)
    net = FPTNet(dataset.kv_transform.backbone.shape, num_classes=2, side_img_size=32, num_prompts=4, reduction=4)
    report = ClassificationReport(output_dir, class_names=["zero", "one"])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=torch.utils.data.DataLoader(dataset, batch_size=2),
        network=net.eval(), prepare_batch=PrepareBatchExtraInput({"kv": "kv"}), val_handlers=[report],
    )
    evaluator.run()
    with open(output_dir / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_entry_copied_over_another_items_entry_is_refused_and_recomputed(data, dataset, tmp_path, caplog):
    # b/0001.png has label 1; a/0001.png's entry (label 0, other K/V) is copied over its file
    expected = [{**item, "kv": dataset[index]["kv"].clone()} for index, item in enumerate(data)]
    before = evaluate(dataset, tmp_path / "before")
    victim = dataset.entry_path(data[1])
    shutil.copyfile(dataset.entry_path(data[0]), victim)
    refused = rf"{victim.name} was stored for another item .*path: '.*a/0001\.png' != '.*b/0001\.png'"
    with pytest.warns(UserWarning, match=refused), caplog.at_level(logging.WARNING):
        item = dataset[1]
    assert str(victim) in caplog.text and "Recomputing it" in caplog.text
    assert item["filename"] == data[1]["filename"] and item["label"] == 1
    torch.testing.assert_close(item["kv"], expected[1]["kv"])
    assert dataset.corrupt_entries == [victim]
    read_entry(victim, dataset.fingerprint, item_identity(data[1]))  # rewritten for its own item

    shutil.copyfile(dataset.entry_path(data[0]), victim)  # again, now seen by an evaluation
    with pytest.warns(UserWarning, match=victim.name):
        after = evaluate(dataset, tmp_path / "after")
    assert [row["filename"] for row in after] == [item["filename"] for item in data]  # every image once
    assert [row["label"] for row in after] == ["zero", "one", "zero", "one"]
    assert after == before


def test_label_edited_in_an_entrys_metadata_is_refused_and_recomputed(data, dataset, caplog):
    path = dataset.entry_path(data[1])
    raw = path.read_bytes()
    # the returned fields are a JSON string in the safetensors JSON header: {..., \"label\": 1, ...}
    stored, edited = b'\\"label\\": 1', b'\\"label\\": 0'  # same length: the header stays valid
    at = raw.index(stored, raw.index(b'"fpt_monai.fields"'))
    path.write_bytes(raw[:at] + edited + raw[at + len(stored):])
    with pytest.raises(CorruptCacheEntryError, match="fails its checksum"):
        read_entry(path, dataset.fingerprint)
    with pytest.warns(UserWarning, match=rf"{path.name} fails its checksum"), caplog.at_level(logging.WARNING):
        item = dataset[1]
    assert str(path) in caplog.text
    assert item["label"] == 1 and dataset.corrupt_entries == [path]
    assert read_entry(path, dataset.fingerprint, item_identity(data[1]))["label"] == 1  # rewritten


def test_item_identity_covers_label_path_size_and_mtime(data, tmp_path):
    item = data[0]
    identity = item_identity(item)
    assert item_identity({**item, "label": 1}) != identity
    assert item_identity({**item, "image": data[2]["image"]}) != identity
    shutil.copyfile(item["image"], tmp_path / "copy.png")  # same bytes, another file
    assert item_identity({**item, "image": str(tmp_path / "copy.png")}) != identity
    link = tmp_path / "link.png"
    link.symlink_to(item["image"])
    assert item_identity({**item, "image": str(link)}) == identity  # a link names the same file


def test_entry_of_another_item_or_without_identity_is_refused(tmp_path):
    path = tmp_path / "entry.safetensors"
    first, second = item_identity({"image": "x.png", "label": 0}), item_identity({"image": "x.png", "label": 2})
    write_entry(path, {"kv": torch.zeros(2), "label": 0}, "fingerprint", first)
    assert read_entry(path, "fingerprint", first)["label"] == 0
    with pytest.raises(CorruptCacheEntryError, match=r"another item .*label: 0 != 2"):
        read_entry(path, "fingerprint", second)
    write_entry(path, {"kv": torch.zeros(2), "label": 0}, "fingerprint")
    with pytest.raises(CorruptCacheEntryError, match="no item identity stored"):
        read_entry(path, "fingerprint", first)


def _stored_png(path, seed: int) -> bytes:
    """An uncompressed PNG (its length depends on its size only) of random pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=0
    )
    return buffer.getvalue()


def test_image_rewritten_with_its_size_and_mtime_kept_is_recomputed(tmp_path):
    # cp -p, rsync -t and tar extraction keep a changed file's size and modification time
    data = []
    for index, name in enumerate(("a/0001.png", "b/0001.png")):
        path = tmp_path / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_stored_png(path, seed=index))
        data.append({"image": str(path), "label": index})
    dataset = make_dataset(data, tmp_path / "cache", augment=False)
    dataset.preload()
    stale = dataset[0]["kv"].clone()
    status = os.stat(data[0]["image"])
    new = _stored_png(data[0]["image"], seed=7)
    assert len(new) == status.st_size
    with open(data[0]["image"], "r+b") as f:
        f.write(new)
    os.utime(data[0]["image"], ns=(status.st_atime_ns, status.st_mtime_ns))
    assert os.stat(data[0]["image"]).st_mtime_ns == status.st_mtime_ns

    expected = make_dataset(data, tmp_path / "fresh", augment=False)[0]["kv"]  # from the new pixels
    assert not torch.equal(expected, stale)
    later = make_dataset(data, tmp_path / "cache", augment=False)  # a later run on the same cache
    assert later.preload()["computed"] == 1
    torch.testing.assert_close(later[0]["kv"], expected)
    torch.testing.assert_close(later[1]["kv"], dataset[1]["kv"])
    torch.testing.assert_close(dataset[0]["kv"], expected)  # the first dataset, in the same process
