"""The same image in two splits, or twice in one, is found by its content: byte-identical copies under other
names as well as the same path listed twice, in folder layouts and JSON datalists."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fpt_monai.utils as utils
from fpt_monai.data import DatalistError, check_disjoint, make_datalist, validate_datalist

CLASSES = ["a", "b"]


def noise_png(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def folders(tmp_path) -> Path:
    """train/ val/ test/ of two classes, two distinct images per class and split."""
    root = tmp_path / "data"
    for s, split in enumerate(("train", "val", "test")):
        for label, name in enumerate(CLASSES):
            for i in range(2):
                noise_png(root / split / name / f"{i}.png", seed=100 * s + 10 * label + i)
    return root


def problems_of(error: DatalistError) -> dict:
    return {p["index"]: p["problem"] for p in error.problems if p["index"] is not None}


def test_byte_copy_of_a_training_image_in_val_is_named_with_both_paths(folders):
    copy = folders / "val" / "b" / "renamed.png"
    shutil.copyfile(folders / "train" / "a" / "1.png", copy)
    train = validate_datalist(make_datalist(folders, "train"), CLASSES)
    val = make_datalist(folders, "val")
    with pytest.raises(DatalistError, match="datalist 'val': 1 of 5 items are bad") as raised:
        validate_datalist(val, CLASSES, split="val", disjoint_from={"train": train})
    index = [item["image"] for item in val].index(str(copy))
    train_index = [item["image"] for item in train].index(str(folders / "train" / "a" / "1.png"))
    assert problems_of(raised.value) == {
        index: f"also in split 'train' (item {train_index}: {folders / 'train' / 'a' / '1.png'}, a byte-identical copy)"
    }
    assert f"item {index} ({copy}): also in split 'train'" in str(raised.value)
    assert "--data_check#allow_split_overlap True" in str(raised.value)
    # skipping drops the copy from val, as other bad items
    assert str(copy) not in [item["image"] for item in validate_datalist(
        val, CLASSES, split="val", disjoint_from={"train": train}, on_error="skip")]


def test_allowed_overlap_warns_naming_each_pair_and_keeps_the_items(folders, tmp_path, caplog):
    copy = folders / "val" / "a" / "copy.png"
    shutil.copyfile(folders / "train" / "b" / "0.png", copy)
    train = make_datalist(folders, "train")
    val = make_datalist(folders, "val")
    report = tmp_path / "val.json"
    with caplog.at_level(logging.WARNING, logger="fpt_monai.data.validation"):
        kept = validate_datalist(
            val, CLASSES, split="val", disjoint_from={"train": train}, allow_overlap=True, report_path=report
        )
    assert kept == val
    assert "share their image with another split" in caplog.text
    assert str(copy) in caplog.text and str(folders / "train" / "b" / "0.png") in caplog.text
    written = json.loads(report.read_text())
    assert written["problems"] == [] and written["settings"]["allow_overlap"] is True
    assert [p["image"] for p in written["allowed_overlaps"]] == [str(copy)]


def test_json_datalist_same_path_and_byte_copy_across_train_and_test(folders, tmp_path):
    train_image = folders / "train" / "a" / "0.png"
    copy = tmp_path / "elsewhere" / "IM000001.png"
    copy.parent.mkdir()
    shutil.copyfile(folders / "train" / "b" / "1.png", copy)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({
        "train": [{"image": str(p), "label": CLASSES.index(p.parent.name)}
                  for p in sorted((folders / "train").rglob("*.png"))],
        "test": [{"image": str(folders / "test" / "a" / "0.png"), "label": 0},
                 {"image": str(train_image), "label": 0},  # the same path listed in both
                 {"image": "elsewhere/IM000001.png", "label": 1}],  # a byte copy, relative to the JSON file
    }))
    train, test = make_datalist(path, "train"), make_datalist(path, "test")
    with pytest.raises(DatalistError, match="datalist 'test': 2 of 3 items are also in another split") as raised:
        check_disjoint(test, "test", {"train": train})
    assert problems_of(raised.value) == {
        1: "also in split 'train' (item 0)",
        2: f"also in split 'train' (item 3: {folders / 'train' / 'b' / '1.png'}, a byte-identical copy)",
    }
    assert f"item 1 ({train_image})" in str(raised.value) and f"item 2 ({copy})" in str(raised.value)
    with pytest.raises(DatalistError, match=r"item 2 .*IM000001.png\): also in split 'train' \(item 3: "):
        validate_datalist(test, CLASSES, split="test", disjoint_from={"train": train})
    assert check_disjoint(test, "test", {"train": train}, allow_overlap=True) is test
    assert check_disjoint([], "test", {"train": train}) == []


def test_byte_copies_inside_one_split_are_duplicates(folders):
    copy = folders / "train" / "b" / "z_copy.png"
    shutil.copyfile(folders / "train" / "a" / "0.png", copy)  # under another name and another label
    train = make_datalist(folders, "train")
    with pytest.raises(DatalistError, match="1 of 5 items are bad") as raised:
        validate_datalist(train, CLASSES)
    assert problems_of(raised.value) == {
        4: f"duplicate of item 0 (a byte-identical copy: {folders / 'train' / 'a' / '0.png'})"
    }
    assert validate_datalist(train, CLASSES, on_error="skip") == train[:4]


def test_a_split_is_hashed_once_for_its_own_check_and_the_others(folders, monkeypatch):
    monkeypatch.setattr(utils, "_RECENT_NS", 0)  # the images count as old enough to keep their digests
    hashed = []
    sha256 = hashlib.sha256
    monkeypatch.setattr(utils.hashlib, "sha256", lambda: hashed.append(1) or sha256())
    utils._digests.clear()
    train = validate_datalist(make_datalist(folders, "train"), CLASSES)
    validate_datalist(make_datalist(folders, "val"), CLASSES, split="val", disjoint_from={"train": train})
    check_disjoint(make_datalist(folders, "test"), "test", {"train": train})
    assert len(hashed) == 12  # 4 images in each of 3 splits


def test_make_datalist_of_a_split_the_dataset_does_not_have(folders, tmp_path):
    assert make_datalist(folders, "holdout", missing_ok=True) == []
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"train": []}))
    assert make_datalist(path, "test", missing_ok=True) == []
    with pytest.raises(KeyError):
        make_datalist(path, "test")
