"""Bad input is refused before any compute, with a message that names every bad item, file or key.

Datalists (items, labels, files, duplicates, classes), JSON datalist files, fuzzed datalists, and config
overrides (typos, wrong types), in Python and through ``python -m monai.bundle run``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import TINY_BUNDLE
from fpt_monai.bundle import bundle_dir, config_files, run_demo
from fpt_monai.config_check import ConfigOverrideError, check_command_line, check_overrides, command_line_overrides
from fpt_monai.data import DatalistError, dataset_classes, json_datalist, make_datalist, validate_datalist

CLASSES = ["healthy", "mild", "severe"]


def png(path: Path, size=(40, 40), value=100) -> str:
    """An image of gray ``value`` with a top half of 255 - ``value`` (a constant image is a bad item)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((*size, 3), value, np.uint8)
    pixels[: size[0] // 2] = 255 - value
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def good(tmp_path):
    """Six good items, two per class."""
    return [{"image": png(tmp_path / "img" / f"{i}.png", value=10 * i), "label": i % 3} for i in range(6)]


def problems_of(error: DatalistError) -> dict:
    return {p["index"]: p["problem"] for p in error.problems if p["index"] is not None}


# -- one bad item at a time: each is named with its index, file and problem -----------------------------
BAD_ITEMS = {
    "missing file": (lambda d: {"image": str(d / "nowhere.png"), "label": 0}, r"nowhere.png\): file not found"),
    "empty file": (lambda d: {"image": _write(d / "empty.png", b""), "label": 0}, r"file is empty \(0 bytes\)"),
    "folder": (lambda d: {"image": str(_mkdir(d / "folder.png")), "label": 0}, "not a regular file"),
    "not an image": (lambda d: {"image": _write(d / "notes.png", b"hello"), "label": 0}, "unreadable image"),
    "truncated png": (lambda d: {"image": _truncated_png(d), "label": 0}, r"cut.png\): unreadable image"),
    "dicom without image": (lambda d: {"image": get_testdata_file("rtplan.dcm"), "label": 0},
                            "unreadable image: not a readable DICOM image header"),
    "too small": (lambda d: {"image": png(d / "tiny.png", size=(20, 48)), "label": 0},
                  r"image is 20x48 pixels, smaller than the minimum 32 \(min_size\)"),
    "label out of range": (lambda d: {"image": png(d / "x.png"), "label": 3},
                           r"label 3 is outside the 3 classes 0..2 \('healthy', 'mild', 'severe'\)"),
    "negative label": (lambda d: {"image": png(d / "x.png"), "label": -1}, "label -1 is outside the 3 classes"),
    "label string": (lambda d: {"image": png(d / "x.png"), "label": "1"},
                     r"label '1' \(str\) is not an integer class index 0..2"),
    "label float": (lambda d: {"image": png(d / "x.png"), "label": 1.0}, r"label 1.0 \(float\) is not an integer"),
    "label bool": (lambda d: {"image": png(d / "x.png"), "label": True}, r"label True \(bool\) is not an integer"),
    "no label": (lambda d: {"image": png(d / "x.png")}, "no 'label' key"),
    "no image": (lambda d: {"label": 0}, "no 'image' key"),
    "image not a path": (lambda d: {"image": 42, "label": 0}, "'image' must be a file path, got 42"),
    "not a dict": (lambda d: "x.png", r"not an \{'image': path, 'label': index\} dict: 'x.png'"),
}


def _write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _truncated_png(folder: Path) -> str:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "noisy.png")
    raw = (folder / "noisy.png").read_bytes()
    return _write(folder / "cut.png", raw[: len(raw) // 2])


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_each_bad_item_is_named(good, tmp_path, case):
    make, message = BAD_ITEMS[case]
    datalist = good[:3] + [make(tmp_path)] + good[3:]
    with pytest.raises(DatalistError, match=r"datalist 'train': 1 of 7 items are bad") as raised:
        validate_datalist(datalist, CLASSES)
    assert list(problems_of(raised.value)) == [3]
    assert "item 3 (" in str(raised.value)
    assert re.search(message, str(raised.value)), str(raised.value)
    # the same item is skipped with on_error="skip"
    assert validate_datalist(datalist, CLASSES, on_error="skip") == good


def _truncated_jpeg(folder: Path) -> str:
    noisy = np.random.default_rng(1).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(folder / "whole.jpg", quality=95)
    raw = (folder / "whole.jpg").read_bytes()
    return _write(folder / "cut.jpg", raw[: len(raw) // 2])


def test_the_default_check_decodes_what_headers_cannot_vouch_for(good, tmp_path):
    # headers fine, pixel data cut short: a DICOM and a JPEG (Pillow reads the JPEG header without complaint)
    truncated = [{"image": get_testdata_file("MR_truncated.dcm"), "label": 1},
                 {"image": _truncated_jpeg(tmp_path), "label": 2}]
    assert validate_datalist(good + truncated, CLASSES, decode=False) == good + truncated  # headers only
    with pytest.raises(DatalistError, match=r"2 of 8 items are bad") as raised:
        validate_datalist(good + truncated, CLASSES)
    problems = problems_of(raised.value)
    assert problems[6].startswith("unreadable image: cannot decode the DICOM pixel data")
    assert problems[7].startswith("unreadable image: damaged or unsupported image") and "truncated" in problems[7]


def test_duplicates_within_a_split_and_across_splits(good, tmp_path):
    same_file_other_spelling = {"image": str(tmp_path / "img" / ".." / "img" / "0.png"), "label": 0}
    with pytest.raises(DatalistError, match=r"item 6 .*: duplicate of item 0 \(same file\)"):
        validate_datalist(good + [same_file_other_spelling], CLASSES)
    val = [{"image": good[4]["image"], "label": 1}, {"image": png(tmp_path / "v.png"), "label": 0}]
    with pytest.raises(DatalistError, match=r"item 0 .*4.png\): also in split 'train' \(item 4\)"):
        validate_datalist(val, CLASSES, split="val", require_every_class=False, disjoint_from={"train": good})


def test_hard_links_are_the_same_file(good, tmp_path):
    # a training image hard-linked under another label, and into the validation split
    other_label = tmp_path / "img" / "other_name.png"
    os.link(good[0]["image"], other_label)
    with pytest.raises(DatalistError) as raised:
        validate_datalist(good + [{"image": str(other_label), "label": 1}], CLASSES)
    assert problems_of(raised.value) == {
        6: f"duplicate of item 0 (same file: {good[0]['image']} and this path are hard links)"
    }
    val = [{"image": str(other_label), "label": 0}]
    with pytest.raises(DatalistError, match=r"item 0 .*other_name.png\): also in split 'train' \(item 0 \(same file: "):
        validate_datalist(val, CLASSES, split="val", require_every_class=False, disjoint_from={"train": good})


def test_broken_symbolic_link_in_a_class_folder_is_named(tmp_path):
    root = tmp_path / "data"
    for label, name in enumerate(CLASSES):
        png(root / "train" / name / "0.png", value=50 * label)
    os.symlink(root / "train" / "mild" / "moved_away.png", root / "train" / "mild" / "1.png")
    datalist = make_datalist(root, "train")
    assert len(datalist) == 4  # the broken link is listed, not silently left out
    with pytest.raises(DatalistError, match=r"1.png\): broken symbolic link: its target .*moved_away.png does not exist"):
        validate_datalist(datalist, CLASSES)
    assert len(validate_datalist(datalist, CLASSES, on_error="skip")) == 3


def test_json_item_without_label_is_not_called_missing(tmp_path):
    png(tmp_path / "imgs" / "x.png")
    png(tmp_path / "imgs" / "y.png")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"train": [{"image": "imgs/x.png"}, {"image": "imgs/y.png", "label": 0}]}))
    with pytest.raises(DatalistError) as raised:
        validate_datalist(make_datalist(path, "train", strict=False), CLASSES, require_every_class=False)
    assert problems_of(raised.value) == {0: "no 'label' key"}  # the file exists, relative to the JSON file


def test_every_bad_item_is_named_at_once_and_skipping_writes_a_report(good, tmp_path):
    datalist = list(good)
    datalist.insert(1, {"image": str(tmp_path / "missing.png"), "label": 1})
    datalist.insert(4, {"image": good[2]["image"], "label": 7})
    datalist.append({"image": png(tmp_path / "small.png", size=(8, 8)), "label": "severe"})
    report = tmp_path / "eval" / "data_check" / "train.json"
    with pytest.raises(DatalistError) as raised:
        validate_datalist(datalist, CLASSES, report_path=report)
    message = str(raised.value)
    assert "3 of 9 items are bad" in message and f"report: {report}" in message
    assert problems_of(raised.value) == {
        1: "file not found",
        4: "label 7 is outside the 3 classes 0..2 ('healthy', 'mild', 'severe'); duplicate of item 3 (same file)",
        8: "label 'severe' (str) is not an integer class index 0..2; image is 8x8 pixels, smaller than the minimum "
           "32 (min_size)",
    }
    assert "--data_check#on_error skip" in message
    kept = validate_datalist(datalist, CLASSES, on_error="skip", report_path=report)
    assert kept == good
    written = json.loads(report.read_text())
    assert (written["items"], written["good"], written["bad"], written["on_error"]) == (9, 6, 3, "skip")
    assert [p["index"] for p in written["problems"]] == [1, 4, 8] and written["problems"][0]["image"].endswith("missing.png")


def test_empty_class_and_empty_split_cannot_be_skipped(good):
    no_severe = [item for item in good if item["label"] != 2]
    for policy in ("raise", "skip"):
        with pytest.raises(DatalistError, match=r"class 'severe' \(label 2\) has no items"):
            validate_datalist(no_severe, CLASSES, on_error=policy)
    assert validate_datalist(no_severe, CLASSES, require_every_class=False) == no_severe
    # skipping the only item of a class empties it: said so, not a silent class without data
    broken = no_severe + [{"image": "/nowhere/severe.png", "label": 2}]
    with pytest.raises(DatalistError, match=r"class 'severe' \(label 2\) has no usable items"):
        validate_datalist(broken, CLASSES, on_error="skip")
    with pytest.raises(DatalistError, match="(?s)datalist 'val'.*the split has no items.*lists no image"):
        validate_datalist([], CLASSES, split="val")


def test_invalid_validation_settings_are_refused(good):
    with pytest.raises(ValueError, match="on_error must be one of \\('raise', 'skip'\\), got 'ignore'"):
        validate_datalist(good, CLASSES, on_error="ignore")
    with pytest.raises(ValueError, match="min_size must be a positive integer"):
        validate_datalist(good, CLASSES, min_size=0)
    with pytest.raises(DatalistError, match="must be a list of items, got a dict"):
        validate_datalist({"image": "x"}, CLASSES)


# -- JSON datalist files -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content,call,error,message",
    [
        ("{not json", "items", ValueError, "is not valid JSON"),
        ("[1, 2]", "items", ValueError, "must be a JSON object"),
        ('{"train": {"image": "a.png"}}', "items", ValueError, "'train' must be a list of items, got a dict"),
        ('{"val": []}', "items", KeyError, "has no 'train' list"),
        ('{"classes": ["a", "a"], "train": []}', "classes", ValueError, "'classes' has duplicate names"),
        ('{"classes": [], "train": []}', "classes", ValueError, "'classes' must be a non-empty list of names"),
        ('{"train": [{"image": "a.png", "label": "x"}]}', "classes", ValueError, "no 'classes' list and no item"),
        ('{"train": [{"label": 1}, 5]}', "strict", ValueError, r"item 0: .*; item 1: expected"),
    ],
)
def test_json_datalist_file_errors_name_the_file(tmp_path, content, call, error, message):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(error, match=message) as raised:
        if call == "classes":
            dataset_classes(path)
        else:
            json_datalist(path, "train", strict=call == "strict")
    assert str(path) in str(raised.value)


def test_missing_datalist_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist file not found: .*absent.json"):
        make_datalist(tmp_path / "absent.json", "train")


# -- fuzzed datalists ----------------------------------------------------------------------------------
def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, 1, 2, -1, 3, 10**30, rng.randint(-5, 5)])
    if kind == "float":
        return rng.choice([0.0, 1.0, 2.5, float("1e308"), -0.0])
    if kind == "str":
        return rng.choice(["", "a.png", "train", "image", "label", "../x.png", "\x00", "é/ß.png", "1", "x" * 300])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["train", "val", "classes", "image", "label", "other"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_fuzzed_datalist_files_fail_only_with_named_errors(tmp_path):
    rng = random.Random(1234)
    png(tmp_path / "a.png")  # some fuzzed items point at real images
    png(tmp_path / "b.png", value=150)  # another image: byte-identical copies in one split are duplicates
    good_items = [{"image": "a.png", "label": 0}, {"image": "b.png", "label": 1}]
    path = tmp_path / "datalist.json"
    outcomes = {"ok": 0, "file error": 0, "item errors": 0}
    for case in range(300):
        if case % 10 == 0:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))  # garbage bytes
        else:
            content = _random_json(rng)
            if case % 3 == 0:  # mostly well-shaped files with fuzzed items
                fuzzed = [_random_json(rng) for _ in range(rng.choice([0, 0, 1, 3, 6]))]
                content = {"classes": ["a", "b"], "train": good_items + fuzzed}
            path.write_text(json.dumps(content))
        try:
            classes = dataset_classes(path)
            validate_datalist(make_datalist(path, "train", strict=False), classes, min_size=8)
            outcomes["ok"] += 1
        except DatalistError as err:  # item problems: every problem names its item
            assert all(p["index"] is None or f"item {p['index']} (" in str(err) for p in err.problems)
            outcomes["item errors"] += 1
        except (ValueError, KeyError, FileNotFoundError) as err:  # the file itself: named
            assert str(path) in str(err), (case, err)
            outcomes["file error"] += 1
    assert all(count > 0 for count in outcomes.values()), outcomes


def test_fuzzed_items_exactly_the_bad_ones_are_named_and_skipped(tmp_path):
    """Random mixes of good items and 12 kinds of bad ones: the error names exactly the bad indices."""
    rng = random.Random(7)
    images = [png(tmp_path / "pool" / f"{i}.png", value=i) for i in range(80)]
    small = png(tmp_path / "small.png", size=(10, 10))
    broken = _write(tmp_path / "broken.png", b"\x89PNG\r\n\x1a\n garbage")
    bad_makers = [
        lambda: {"image": str(tmp_path / f"missing{rng.random()}.png"), "label": 0},
        lambda: {"image": small, "label": 1},
        lambda: {"image": broken, "label": 2},
        lambda: {"image": images.pop(), "label": rng.choice([3, -1, 99])},
        lambda: {"image": images.pop(), "label": rng.choice(["0", 0.0, None, True, [1], {"a": 1}])},
        lambda: {"image": images.pop()},
        lambda: {"label": 0},
        lambda: {"image": rng.choice([None, 3, "", " ", ["a"], "a\x00b"]), "label": 0},
        lambda: rng.choice([None, 1, "a.png", [], ["a.png", 0]]),
    ]
    for trial in range(6):
        datalist, expected_bad = [], set()
        for _ in range(6):  # every class present among the good items
            datalist.append({"image": images.pop(), "label": len(datalist) % 3})
        for _ in range(rng.randint(1, 6)):
            position = rng.randint(0, len(datalist))
            datalist.insert(position, rng.choice(bad_makers)())
            expected_bad = {i + (i >= position) for i in expected_bad} | {position}
        if rng.random() < 0.5:  # a duplicate of a good item, appended last
            first_good = next(i for i, item in enumerate(datalist) if i not in expected_bad)
            datalist.append(dict(datalist[first_good]))
            expected_bad.add(len(datalist) - 1)
        with pytest.raises(DatalistError) as raised:
            validate_datalist(datalist, CLASSES)
        assert set(problems_of(raised.value)) == expected_bad, (trial, raised.value)
        for index in expected_bad:
            assert f"item {index} (" in str(raised.value)
        kept = validate_datalist(datalist, CLASSES, on_error="skip")
        assert kept == [item for i, item in enumerate(datalist) if i not in expected_bad]


# -- config overrides ----------------------------------------------------------------------------------
TRAIN = config_files("train")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_epoch": 3}, r"--num_epoch: no such key; did you mean 'num_epochs'\?"),
        ({"batch_size": "abc"}, r"--batch_size: expects int \(the config has 16\), got str 'abc'"),
        ({"num_epochs": True}, r"--num_epochs: expects int .*got bool True"),
        ({"learning_rate": "fast"}, r"--learning_rate: expects int or float .*got str 'fast'"),
        ({"data_check#on_eror": "skip"}, r"'data_check' has no key 'on_eror'; did you mean 'data_check::on_error'\?"),
        ({"image_reader#volume_slice": ["x"]}, r"--image_reader#volume_slice: expects str"),
        ({"optimizer#weight_decy": 0.1}, r"torch.optim.AdamW has no argument 'weight_decy'; did you mean 'weight_decay'\?"),
        ({"train#handlers#99#max_norm": 1}, r"'train::handlers' is a list of \d+ items; there is no item '99'"),
        ({"resume": "yes"}, r"--resume: expects bool"),
    ],
)
def test_bad_override_names_the_key(overrides, message):
    with pytest.raises(ConfigOverrideError, match=message) as raised:
        check_overrides(TRAIN, overrides)
    assert set(raised.value.problems) == set(overrides)


def test_all_bad_overrides_at_once_and_good_ones_pass(tmp_path):
    with pytest.raises(ConfigOverrideError) as raised:
        check_overrides(TRAIN, {"num_epoch": 3, "batch_size": "abc", "num_epochs": 2})
    assert set(raised.value.problems) == {"num_epoch", "batch_size"}
    check_overrides(TRAIN, {  # overrides the tests, the docs and the demo use
        "preset": "fpt_tiny", "network_def#img_size": 64, "network_def#side_img_size": 32, "num_epochs": 2,
        "batch_size": 4, "num_workers": 0, "learning_rate": 1, "pretrained": str(tmp_path / "w.safetensors"),
        "device": "cpu", "dataset_dir": "/data/x.json", "data_check#on_error": "skip", "resume": True,
        "image_reader#value_range": [-1000, 1000], "training": "$@train#trainer.run()", "_meta_#version": "9.9",
    })


def test_command_line_parsing_follows_fire_and_reads_the_args_file(tmp_path):
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": "configs/train.json", "num_epochs": "abc", "seed": 3}))
    main = str(Path(bundle_dir().parent.parent, ".venv", "x", "monai", "bundle", "__main__.py"))
    parsed = command_line_overrides([main, "run", "training", "--args_file", str(args_file), "--seed=5",
                                     "--resume", "--batch_size", "-1", "--", "--help"])
    arguments, overrides = parsed
    assert arguments == {"run_id": "training", "args_file": str(args_file), "config_file": "configs/train.json"}
    assert overrides == {"num_epochs": "abc", "seed": 5, "resume": True, "batch_size": -1}
    assert command_line_overrides(["pytest", "run"]) is None  # not monai.bundle: nothing to check
    with pytest.raises(ConfigOverrideError, match="--num_epoch: no such key"):
        check_command_line(argv=[main, "run", "training", "--config_file", TRAIN[0], "--num_epoch", "3"])
    check_command_line(False, argv=[main, "run", "training", "--config_file", TRAIN[0], "--num_epoch", "3"])


def test_monai_bundle_run_exits_non_zero_naming_the_bad_keys(tmp_path):
    """The real command line: refused in `initialize`, before any data, network or cache is touched."""
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
               "--bundle_root", str(tmp_path), "--dataset_dir", str(tmp_path / "no_data"),
               "--num_epoch", "3", "--batch_size", "abc"]
    result = subprocess.run(command, cwd=bundle_dir(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--num_epoch: no such key; did you mean 'num_epochs'?" in result.stderr
    assert "--batch_size: expects int (the config has 16), got str 'abc'" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was created


def test_demo_refuses_a_typo_before_creating_anything(tmp_path):
    with pytest.raises(ConfigOverrideError, match="--num_epoch: no such key; did you mean 'num_epochs'"):
        run_demo(tmp_path / "demo", num_epoch=2)
    assert not any((tmp_path / "demo").iterdir())


# -- the same image in two splits, through the bundle ------------------------------------------------------------
def _noise_png(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def _split_folders(root: Path) -> Path:
    """train/ val/ test/ of the three classes, two distinct images per class and split."""
    for s, split in enumerate(("train", "val", "test")):
        for label, name in enumerate(CLASSES):
            for i in range(2):
                _noise_png(root / split / name / f"{i}.png", seed=100 * s + 10 * label + i)
    return root


def _bundle_override(tmp_path: Path, dataset_dir) -> dict:
    return {**TINY_BUNDLE, "bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(dataset_dir),
            "class_names": CLASSES, "num_classes": 3, "pretrained": False, "num_epochs": 1, "device": "cpu"}


def _workflow_error(names, override) -> BaseException:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=config_files(*names), logging_file=False, workflow_type="train", **override)
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    error = raised.value
    while not isinstance(error, DatalistError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, DatalistError), raised.value
    return error


def test_monai_bundle_run_names_byte_copies_across_train_and_val(tmp_path):
    data = _split_folders(tmp_path / "data")
    original = data / "train" / "mild" / "1.png"
    copy = data / "val" / "severe" / "scan_0042.png"
    shutil.copyfile(original, copy)
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
               "--bundle_root", str(tmp_path / "bundle"), "--dataset_dir", str(data), "--pretrained", "False",
               "--class_names", json.dumps(CLASSES), "--num_classes", "3", "--num_epochs", "1", "--device", "cpu",
               *[str(a) for k, v in TINY_BUNDLE.items() if k != "num_epochs" for a in (f"--{k}", v)]]
    result = subprocess.run(command, cwd=bundle_dir(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert f"({copy}): also in split 'train' (item 3: {original}, a byte-identical copy)" in result.stderr
    assert "--data_check#allow_split_overlap True" in result.stderr
    assert not (tmp_path / "bundle" / "models").exists()  # refused before training


def test_training_refuses_a_test_image_copied_from_train_in_a_json_datalist(tmp_path):
    data = _split_folders(tmp_path / "data")
    original = data / "train" / "healthy" / "0.png"
    copy = tmp_path / "export" / "IM000001.png"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    items = {split: [{"image": str(p), "label": CLASSES.index(p.parent.name)}
                     for p in sorted((data / split).rglob("*.png"))] for split in ("train", "val", "test")}
    items["test"].append({"image": "export/IM000001.png", "label": 0})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"classes": CLASSES, **items}))
    error = _workflow_error(["train"], _bundle_override(tmp_path, datalist))
    assert "datalist 'test': 1 of 7 items are also in another split" in str(error)
    assert f"item 6 ({copy}): also in split 'train' (item 0: {original}, a byte-identical copy)" in str(error)


def test_allowed_split_overlap_trains_with_a_warning_naming_the_pairs(tmp_path, caplog):
    from monai.bundle import ConfigWorkflow

    data = _split_folders(tmp_path / "data")
    shutil.copyfile(data / "train" / "mild" / "0.png", data / "val" / "mild" / "copy.png")
    shutil.copyfile(data / "train" / "severe" / "1.png", data / "test" / "severe" / "copy.png")
    override = {**_bundle_override(tmp_path, data), "data_check#allow_split_overlap": True}
    workflow = ConfigWorkflow(config_file=config_files("train"), logging_file=False, workflow_type="train", **override)
    workflow.initialize()
    with caplog.at_level(logging.WARNING, logger="fpt_monai.data.validation"):
        workflow.run()
    for split, original in (("val", "mild/0.png"), ("test", "severe/1.png")):
        assert f"datalist '{split}': 1 of 7 items share their image with another split" in caplog.text
        assert str(data / split / original.split("/")[0] / "copy.png") in caplog.text
        assert str(data / "train" / original) in caplog.text
    assert (tmp_path / "bundle" / "models" / "model_final.pt").is_file()


def test_evaluation_refuses_a_test_split_that_shares_images_with_train(tmp_path):
    data = _split_folders(tmp_path / "data")
    original = data / "train" / "severe" / "0.png"
    copy = data / "test" / "healthy" / "again.png"
    shutil.copyfile(original, copy)
    error = _workflow_error(["train", "evaluate"], _bundle_override(tmp_path, data))
    assert f"({copy}): also in split 'train' (item 4: {original}, a byte-identical copy)" in str(error)
    assert "datalist 'test'" in str(error)
