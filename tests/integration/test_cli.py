import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args, console_script=False):
    command = [str(Path(sys.executable).parent / "fpt-monai")] if console_script else [sys.executable, "-m", "fpt_monai"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "preset,learnable,console_script", [("fpt", 1_602_341, True), ("fpt_plus", 900_965, False)]
)
def test_params_prints_the_paper_counts_without_downloading(preset, learnable, console_script):
    result = run_cli("params", "--preset", preset, "--num_classes", "5", console_script=console_script)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["learnable"] == learnable
    assert counts["frozen"] == 86_434_560
    assert counts["learnable_ratio"] == round(learnable / (learnable + 86_434_560), 6)
    assert "random" not in result.stderr  # counting builds no weights, so no random-weights warning


def test_unknown_preset_is_named():
    result = run_cli("params", "--preset", "vit_huge")
    assert result.returncode != 0
    assert "vit_huge" in result.stderr and "fpt_plus" in result.stderr


@pytest.mark.parametrize("command,argument", [("demo", "work_dir"), ("preload", "splits"), ("params", "preset")])
def test_help_documents_the_command_and_runs_nothing(command, argument, tmp_path):
    # demo takes **overrides: a plain --help must not become an override that starts a run
    result = subprocess.run([sys.executable, "-m", "fpt_monai", command, "--help"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env={**os.environ, "PAGER": "cat"})
    assert result.returncode == 0, result.stderr
    assert argument in result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    assert list(tmp_path.iterdir()) == []  # no sample data, cache or run folder made


def test_presets_lists_all():
    result = run_cli("presets")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"fpt", "fpt_plus", "fpt_tiny", "fpt_plus_tiny", "fpt_3d", "fpt_plus_3d",
                                              "fpt_3d_tiny", "fpt_demo", "fpt_plus_demo"}


def test_preload_command_fills_and_reuses_the_cache(tmp_path):
    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    weights = tmp_path / "vit_tiny.safetensors"  # fixed weights, so a second run finds the same cache
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), weights)
    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((48, 40, 3), 99, dtype=np.uint8)).save(folder / "0001.png")
    args = ["preload", "--dataset_dir", str(tmp_path / "data"), "--cache_dir", str(tmp_path / "cache"),
            "--preset", "fpt_plus_tiny", "--pretrained", str(weights), "--splits", "train,val", "--batch_size", "2"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert [report["splits"][s]["computed"] for s in ("train", "val")] == [2, 2]
    assert report["kv_bytes"] == 6 * 2 * 3 * int(257 * 0.2) * 64 * 2  # FPT+ tiny: 6 blocks, 3 heads, fp16
    side_source = 2 * 3 * 96 * 96  # the float16 copy the training side views are made from: 1.5 times the side size
    assert report["kv_bytes"] + side_source < report["entry_bytes"] < report["kv_bytes"] + side_source + 1024
    second = json.loads(run_cli(*args).stdout)
    assert [second["splits"][s]["already_cached"] for s in ("train", "val")] == [2, 2]


def test_help_lists_the_commands_of_the_method():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout + result.stderr
    for command in ("presets", "params", "preload", "demo", "export_bundle", "sample_data", "sample_data_3d",
                    "selection_map", "onnx_class_names", "fl_job"):
        assert f"\n     {command}\n" in listed, command
    assert "accuracy" not in listed and "memory" not in listed  # the benchmarks live in python -m benchmarks


def test_selection_map_command_writes_the_image_beside_its_selection_map(tmp_path, capsys):
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from fpt_monai.cli import Commands

    torch.manual_seed(0)
    weights = tmp_path / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(weights))
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(image)
    output = tmp_path / "docs" / "map.png"
    Commands().selection_map(str(image), output=str(output), preset="fpt_tiny", pretrained=str(weights), size=128)
    assert capsys.readouterr().out.strip() == str(output)
    with Image.open(output) as picture:
        assert picture.size == (256, 128) and picture.mode == "RGB"  # the image and its map, side by side
        pixels = np.asarray(picture)
    assert not np.array_equal(pixels[:, :128], pixels[:, 128:])  # the right half is painted
