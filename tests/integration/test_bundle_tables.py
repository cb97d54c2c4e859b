"""Public data sets as they ship: the bundle trains from a label table through ``python -m monai.bundle run``.

Three shapes, on tiny generated stand-ins: a Kaggle-style CSV with extension-less ids (``id_code,diagnosis``), an
ISIC-style one-hot CSV (``image,MEL,NV,BCC``) with a lesion id as group column, and a DDR-style whitespace TXT
(``name label``). Each is a single labelled list: the run makes a stratified split and saves it in
``<bundle_root>/datalist.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY_BUNDLE as TINY
from fpt_monai.bundle import bundle_dir
from fpt_monai.data.normalization import NORMALIZATION_KEY

BUNDLE = bundle_dir()


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


def kaggle(root: Path) -> tuple[Path, dict]:
    """``train.csv`` of ``id_code,diagnosis`` (ids without extension), the images in ``train_images/``."""
    lines = ["id_code,diagnosis"]
    for i in range(12):
        _image(root / "train_images" / f"{i:04x}c1434d8d7.png", i)
        lines.append(f"{i:04x}c1434d8d7,{i % 3}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    options = {
        "class_names": json.dumps(["0", "1", "2"]),
        "label_table#image_dir": root / "train_images",
        "conventions": "authors",  # with the data set's statistics
    }
    return root / "train.csv", options


def isic(root: Path) -> tuple[Path, dict]:
    """A one-hot ground-truth CSV ``image,MEL,NV,BCC,lesion_id`` beside its JPEGs; two images per lesion."""
    classes = ["MEL", "NV", "BCC"]
    lines = ["image,MEL,NV,BCC,lesion_id"]
    root.mkdir(parents=True)
    for i in range(18):
        label = (i // 2) % 3
        Image.fromarray(np.random.default_rng(100 + i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / f"ISIC_{i:07d}.jpg", quality=95
        )
        lines.append(f"ISIC_{i:07d}," + ",".join("1.0" if c == label else "0.0" for c in range(3)) + f",L{i // 2}")
    (root / "GroundTruth.csv").write_text("\n".join(lines) + "\n")
    options = {
        "class_names": json.dumps(classes),
        "label_table#one_hot_columns": json.dumps(classes),
        "label_table#group_column": "lesion_id",
        "label_table#val_fraction": 0.34,
    }
    return root / "GroundTruth.csv", options


def ddr(root: Path) -> tuple[Path, dict]:
    """A headerless ``name label`` TXT with the images in ``images/``; a test split is made too."""
    lines = []
    for i in range(15):
        _image(root / "images" / f"007-{i:04d}-000.jpg", 200 + i)
        lines.append(f"007-{i:04d}-000.jpg {i % 3}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    options = {
        "class_names": json.dumps(["none", "mild", "severe"]),
        "label_table#image_dir": root / "images",
        "label_table#test_fraction": 0.2,
        "mean": "dataset",
        "std": "dataset",
    }
    return root / "train.txt", options


def bundle_command(entry: str, configs: list[str], options: dict) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", entry, "--config_file", json.dumps(configs)]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    return command


def inference_options(run_root: Path, weights: Path, table_options: dict) -> dict:
    """Options of the standalone inference.json for the tiny network a table's training run made."""
    return {
        "preset": TINY["preset"],
        "network_def#img_size": TINY["network_def#img_size"],
        "network_def#side_img_size": TINY["network_def#side_img_size"],
        "num_workers": 0,
        "bundle_root": run_root,
        "pretrained": weights,
        "class_names": table_options["class_names"],
        "num_classes": 3,
    }


def run_bundle(entry: str, configs: list[str], options: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(bundle_command(entry, configs, options), cwd=BUNDLE, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(path))
    return path


@pytest.mark.parametrize("shape", [kaggle, isic, ddr], ids=lambda f: f.__name__)
def test_each_table_shape_trains_one_epoch_and_saves_its_split(shape, weights, tmp_path):
    table, table_options = shape(tmp_path / "data")
    run_root = tmp_path / "run"
    options = {
        **TINY,
        "num_epochs": 1,
        "bundle_root": run_root,
        "dataset_dir": table,
        "pretrained": weights,
        "num_classes": 3,
        **table_options,
    }
    result = run_bundle("training", ["configs/train.json"], options)
    assert (run_root / "models" / "model_final.pt").is_file()
    saved = json.loads((run_root / "datalist.json").read_text())
    assert saved["classes"] == json.loads(table_options["class_names"])
    assert len(saved["train"]) + len(saved["val"]) + len(saved["test"]) == len(table.read_text().split("\n")) - 1 - (
        table.suffix == ".csv"
    )
    for split in ("train", "val"):  # stratified: every class in each split
        assert sorted({item["label"] for item in saved[split]}) == [0, 1, 2], split
    if shape is ddr:
        assert sorted({item["label"] for item in saved["test"]}) == [0, 1, 2]
        # the train split's statistics normalise the input, are logged and recorded in the checkpoint
        pixels = np.stack([np.asarray(Image.open(item["image"]), np.float64) / 255 for item in saved["train"]])
        recorded = torch.load(run_root / "models" / "model_final.pt", weights_only=True)[NORMALIZATION_KEY]
        np.testing.assert_allclose(recorded.numpy(), [pixels.mean((0, 1, 2)), pixels.std((0, 1, 2))], atol=1e-3)
        assert "input normalisation: mean" in result.stdout + result.stderr
        # evaluation reuses the saved split (its test list) and reads the statistics back from the checkpoint
        run_bundle("evaluating", ["configs/train.json", "configs/evaluate.json"], options)
        assert (run_root / "eval").is_dir()
        # inference reads them back from the checkpoint too; without --mean/--std dataset it refuses, saying so
        infer = {**inference_options(run_root, weights, table_options), "input_dir": table.parent / "images"}
        run_bundle("run", ["configs/inference.json"], {**infer, "mean": "dataset", "std": "dataset"})
        with open(run_root / "eval" / "inference" / "predictions.csv") as f:
            assert len(f.read().splitlines()) == 1 + 15
        refused = subprocess.run(bundle_command("run", ["configs/inference.json"], infer), cwd=BUNDLE,
                                 capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0 and "--mean dataset --std dataset" in refused.stderr
    if shape is kaggle:
        assert NORMALIZATION_KEY in torch.load(run_root / "models" / "model_final.pt", weights_only=True)
        assert "the authors' numerical conventions" in result.stdout + result.stderr
        # inference of a model trained with the authors' conventions takes the same switch
        infer = {**inference_options(run_root, weights, table_options), "input_dir": table.parent / "train_images"}
        run_bundle("run", ["configs/inference.json"], {**infer, "conventions": "authors"})
        assert (run_root / "eval" / "inference" / "predictions.csv").is_file()
    if shape is isic:  # both images of a lesion in one split
        split_of = {Path(i["image"]).stem: s for s in ("train", "val", "test") for i in saved[s]}
        assert all(split_of[f"ISIC_{2 * k:07d}"] == split_of[f"ISIC_{2 * k + 1:07d}"] for k in range(9))
