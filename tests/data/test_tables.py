"""Label tables as data sets: reading the common shapes, splits made, saved and grouped, and bad tables named."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fpt_monai.data import (
    DatalistError,
    LabelTableError,
    check_class_names,
    make_datalist,
    read_label_table,
    table_splits,
    validate_datalist,
)

CLASSES = ["a", "b", "c"]


def images(folder: Path, names, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        pixels = np.random.default_rng(seed + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


def table(path: Path, lines) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_kaggle_csv_with_extension_less_ids_and_index_labels(tmp_path, monkeypatch):
    images(tmp_path / "img", ["x1.png", "x2.png", "x3.jpg"])
    path = table(tmp_path / "train.csv", ["id_code,diagnosis", "x1,0", "x2,2", "x3,1"])
    items = read_label_table(path, CLASSES, {"image_dir": tmp_path / "img"})
    assert [(Path(i["image"]).name, i["label"]) for i in items] == [("x1.png", 0), ("x2.png", 2), ("x3.jpg", 1)]
    # paths are absolute (the saved split is read back from another folder), whatever the table's path
    monkeypatch.chdir(tmp_path)
    assert read_label_table("train.csv", CLASSES, {"image_dir": "img"})[0]["image"] == str(tmp_path / "img" / "x1.png")
    # an explicit extension is the one tried
    items = read_label_table(path, CLASSES, {"image_dir": tmp_path / "img", "extension": "png"})
    assert Path(items[2]["image"]).name == "x3.png"


def test_an_isic_one_hot_csv_and_labels_given_as_class_names(tmp_path):
    images(tmp_path, ["i1.jpg", "i2.jpg"])
    path = table(tmp_path / "gt.csv", ["image,b,a,c", "i1,0.0,1.0,0.0", "i2,1.0,0.0,0.0"])
    assert [i["label"] for i in read_label_table(path, CLASSES)] == [0, 1]  # by name, in class_names order
    path = table(tmp_path / "names.tsv", ["image\tclass", "i1.jpg\tc", "i2.jpg\ta"])
    assert [i["label"] for i in read_label_table(path, CLASSES)] == [2, 0]


def test_a_ddr_whitespace_txt_without_header(tmp_path):
    images(tmp_path, ["007-1.jpg", "007-2.jpg"])
    path = table(tmp_path / "train.txt", ["007-1.jpg 2", "007-2.jpg  1"])
    items = read_label_table(path, CLASSES)
    assert [(Path(i["image"]).name, i["label"]) for i in items] == [("007-1.jpg", 2), ("007-2.jpg", 1)]


def test_an_unknown_column_is_named_with_the_columns_the_table_has(tmp_path):
    path = table(tmp_path / "t.csv", ["id_code,diagnosis", "x,0"])
    with pytest.raises(LabelTableError, match=r"no column 'grade' \(label_table#label_column\).*id_code"):
        read_label_table(path, CLASSES, {"label_column": "grade"})
    with pytest.raises(LabelTableError, match=r"no column 'patient' \(label_table#group_column\)"):
        read_label_table(path, CLASSES, {"group_column": "patient"})
    with pytest.raises(LabelTableError, match="one-hot columns .'MEL'. are not among the class_names"):
        read_label_table(table(tmp_path / "o.csv", ["image,MEL,a", "x,1,0"]), CLASSES)


def test_a_label_outside_the_classes_is_named(tmp_path):
    images(tmp_path, ["x.png", "y.png", "z.png"])
    path = table(tmp_path / "t.csv", ["image,label", "x.png,a", "y.png,dog", "z.png,dog"])
    with pytest.raises(LabelTableError, match=r"label 'dog' \(lines 3, 4\) is neither one of the class_names"):
        read_label_table(path, CLASSES)
    with pytest.raises(LabelTableError, match="label 'dog'"):
        check_class_names(CLASSES, 3, path)
    # an index outside the classes goes to the data check, which names it like any datalist's
    path = table(tmp_path / "i.csv", ["image,label", "x.png,0", "y.png,7"])
    with pytest.raises(DatalistError, match="label 7 is outside the 3 classes"):
        validate_datalist(read_label_table(path, CLASSES), CLASSES, require_every_class=False, min_size=8)


def test_an_id_with_no_file_and_a_duplicate_by_content_are_named_by_the_data_check(tmp_path):
    images(tmp_path, ["x.png", "y.png"])
    shutil.copy(tmp_path / "x.png", tmp_path / "copy.png")
    path = table(tmp_path / "t.csv", ["image,label", "x,0", "missing,1", "copy,0", "y,2"])
    items = read_label_table(path, CLASSES)
    with pytest.raises(DatalistError) as raised:
        validate_datalist(items, CLASSES, min_size=8)
    message = str(raised.value)
    assert "missing" in message and "file not found" in message
    assert "duplicate of item 0" in message


def test_a_group_that_spans_splits_of_the_split_column_is_named(tmp_path):
    images(tmp_path, ["1.png", "2.png", "3.png"])
    path = table(
        tmp_path / "t.csv", ["image,label,patient,split", "1.png,0,P1,train", "2.png,1,P7,train", "3.png,1,P7,test"]
    )
    with pytest.raises(LabelTableError, match=r"group 'P7' is in train \(lines 3\) and test \(lines 4\)"):
        table_splits(path, CLASSES, {"group_column": "patient", "split_column": "split"})


def single_list(tmp_path: Path, rows: int = 30) -> Path:
    names = [f"{i:03d}.png" for i in range(rows)]
    images(tmp_path, names)
    lines = ["image,label,eye"] + [f"{name},{CLASSES[(i // 2) % 3]},E{i // 2}" for i, name in enumerate(names)]
    return table(tmp_path / "train.csv", lines)


def test_a_single_list_gets_a_saved_stratified_grouped_split_reused_by_the_next_run(tmp_path):
    path = single_list(tmp_path)
    options = {"group_column": "eye", "val_fraction": 0.2, "test_fraction": 0.2, "split_file": tmp_path / "dl.json"}
    splits = table_splits(path, CLASSES, options)
    saved = json.loads((tmp_path / "dl.json").read_text())
    assert saved["classes"] == CLASSES and {k: saved[k] for k in ("train", "val", "test")} == {
        k: splits[k] for k in ("train", "val", "test")
    }
    # stratified: 5 eyes per class, 1 to val, 1 to test, 3 to train
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        assert Counter(i["label"] for i in saved[split]) == {0: count, 1: count, 2: count}, split
    # grouped: both images of an eye in one split
    split_of = {int(Path(i["image"]).stem): s for s in ("train", "val", "test") for i in saved[s]}
    assert all(split_of[2 * k] == split_of[2 * k + 1] for k in range(15))
    # the bundle reads it back as a JSON datalist, and a second run reuses it (another seed does not re-split)
    assert make_datalist(tmp_path / "dl.json", "val") == saved["val"]
    assert make_datalist(path, "test", label_table={**options, "seed": 5}, classes=CLASSES) == saved["test"]
    # the split does not depend on the order of the rows
    lines = path.read_text().splitlines()
    reordered = table(tmp_path / "reordered.csv", [lines[0]] + lines[:0:-1])
    again = table_splits(reordered, CLASSES, {**options, "split_file": None})
    assert [sorted(i["image"] for i in again[s]) for s in ("train", "val", "test")] == [
        sorted(i["image"] for i in saved[s]) for s in ("train", "val", "test")
    ]


def test_a_saved_split_that_no_longer_matches_the_table_is_refused_naming_the_file(tmp_path):
    path = single_list(tmp_path, rows=12)
    options = {"split_file": tmp_path / "dl.json"}
    table_splits(path, CLASSES, options)
    lines = path.read_text().splitlines()
    table(path, lines[:-1] + [lines[-1].replace(",c,", ",a,")])  # one row relabelled
    with pytest.raises(
        LabelTableError,
        match=r"dl.json no longer matches the label table .*train.csv: 1 row.s. with another label .lines 13.",
    ):
        table_splits(path, CLASSES, options)


def test_a_split_column_with_train_and_test_gets_a_validation_split_from_train(tmp_path):
    images(tmp_path, [f"{i}.png" for i in range(14)])
    lines = ["image,label,set"] + [f"{i}.png,{i % 2},{'testing' if i >= 10 else 'training'}" for i in range(14)]
    splits = table_splits(table(tmp_path / "t.csv", lines), CLASSES, {"split_column": "set", "val_fraction": 0.4})
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 4, 4]
    assert all(int(Path(i["image"]).stem) >= 10 for i in splits["test"])
    assert Counter(i["label"] for i in splits["val"]) == {0: 2, 1: 2}


def test_the_bundle_accepts_the_label_table_options_and_checks_their_values():
    from fpt_monai.bundle import config_files
    from fpt_monai.config_check import ConfigOverrideError, check_overrides

    good = {
        "dataset_dir": "/data/train.csv",
        "label_table#image_dir": "/data/images",
        "label_table#image_column": "id_code",
        "label_table#one_hot_columns": ["MEL", "NV"],
        "label_table#group_column": "patient",
        "label_table#val_fraction": 0.1,
        "mean": "dataset",
        "std": [0.2, 0.2, 0.2],
    }
    check_overrides(config_files("train"), good)
    check_overrides(config_files("train", "evaluate"), good)
    bad = {"label_table#val_fraction": 1.5, "mean": "datset", "label_table#image_colum": "x"}
    with pytest.raises(ConfigOverrideError) as raised:
        check_overrides(config_files("train"), bad)
    message = str(raised.value)
    assert "--label_table#val_fraction: must be a fraction in [0, 1), got 1.5" in message
    assert "--mean: must be 'dataset' or a list of per-channel values, got 'datset'" in message
    assert "did you mean 'label_table::image_column'" in message


def test_the_documented_table_commands_pass_the_bundles_override_check():
    import re
    import shlex

    from fpt_monai.bundle import config_files
    from fpt_monai.config_check import check_overrides, command_line_overrides

    docs = Path(__file__).parents[2] / "docs" / "data.md"
    blocks = re.findall(r"^```bash\n(.*?)^```$", docs.read_text(encoding="utf-8"), flags=re.S | re.M)
    lines = "\n".join(line for block in blocks for line in block.splitlines() if not line.startswith("#"))
    commands = [
        shlex.split(command.replace("\\\n", " "))
        for command in re.split(r"\n(?=python )", lines)
        if "--label_table#" in command
    ]
    assert len(commands) == 3
    for words in commands:
        arguments, overrides = command_line_overrides(["/x/monai/bundle/__main__.py", *words[3:]])
        assert arguments["config_file"] == "configs/train.json"
        assert str(overrides["dataset_dir"]).endswith((".csv", ".txt"))
        check_overrides(config_files("train"), overrides)
