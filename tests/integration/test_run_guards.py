"""Guards of ``python -m monai.bundle run``: memory bounded on a decompression bomb, one run per output folder,
overrides spelled the way users spell them (``--pretrained false``, ``--val_interval 0``)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from fpt_monai.bundle import bundle_dir
from fpt_monai.data import make_sample_dataset
from fpt_monai.presets import create_fpt
from fpt_monai.networks.fpt import BACKBONE_REFERENCE_KEY
from fpt_monai.weights import random_weights_expected
from image_helpers import huge_png
from test_bundle import TINY_INFER

#: Peak memory allowed for inference on one huge image (the run is killed above it, so that a regression cannot
#: take the machine's memory).
RSS_LIMIT = 2 * 2**30


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A backbone weights file, a checkpoint of the tiny network on it, and one of a random backbone (no digest)."""
    root = tmp_path_factory.mktemp("guards")
    torch.manual_seed(0)
    weights = root / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(weights))
    shape = {"img_size": TINY_INFER["network_def#img_size"], "side_img_size": TINY_INFER["network_def#side_img_size"]}
    (root / "on_weights" / "models").mkdir(parents=True)
    torch.save(create_fpt("fpt_tiny", 3, pretrained=str(weights), **shape).state_dict(),
               root / "on_weights" / "models" / "model.pt")
    with random_weights_expected():
        state = create_fpt("fpt_tiny", 3, pretrained=False, **shape).state_dict()
    state.pop(BACKBONE_REFERENCE_KEY)
    (root / "random" / "models").mkdir(parents=True)
    torch.save(state, root / "random" / "models" / "model.pt")
    images = root / "images"
    images.mkdir()
    # a small image with content (a one-colour image is reported as constant, not classified)
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(images / "small.png")
    return root, str(weights), images


def bundle_command(config: str, **overrides) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}.json"]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def run_bounded(command: list[str], folder: Path) -> tuple[int, str, int]:
    """(exit status, stderr, peak RSS in bytes) of ``command``, killed when its memory passes :data:`RSS_LIMIT`."""
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        process = subprocess.Popen(command, cwd=bundle_dir(), stdout=out, stderr=err)
    deadline, killed = time.monotonic() + 600, False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{process.pid}/status").read_text()
                       .splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            rss = 0
        if rss > RSS_LIMIT or time.monotonic() > deadline:
            process.kill()
            killed = True
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = (folder / "stderr.txt").read_text()
    assert not killed, f"killed at {rss / 2**30:.1f} GB resident (limit {RSS_LIMIT / 2**30:.0f} GB)\n{stderr[-2000:]}"
    return process.returncode, stderr, usage.ru_maxrss * 1024


def test_inference_names_a_decompression_bomb_and_stays_below_2_gb(models, tmp_path):
    root, weights, images = models
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "small.png").write_bytes((images / "small.png").read_bytes())
    huge_png(folder / "huge.png")  # 12000x12000, a few hundred KB
    assert (folder / "huge.png").stat().st_size < 1_000_000
    overrides = {**TINY_INFER, "bundle_root": root / "on_weights", "pretrained": weights, "input_dir": folder,
                 "output_dir": tmp_path / "eval"}
    status, stderr, peak = run_bounded(bundle_command("inference", **overrides), tmp_path)
    assert status == 0, stderr[-3000:]
    assert peak < RSS_LIMIT, f"peak RSS {peak / 2**30:.2f} GB"
    with open(tmp_path / "eval" / "inference" / "predictions.csv") as f:
        assert [Path(row["filename"]).name for row in csv.DictReader(f)] == ["small.png"]
    report = json.loads((tmp_path / "eval" / "inference" / "input_check.json").read_text())
    [problem] = report["problems"]
    assert Path(problem["image"]).name == "huge.png"
    assert problem["problem"].startswith("image too large: the image is 12000x12000 = 144.0 million pixels")
    assert "--image_reader#max_pixels" in problem["problem"]


#: A process that holds the lock of the folder argv[1] until it is killed.
HOLDER = "import sys, time; from fpt_monai.engine import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def test_a_second_run_in_a_folder_in_use_refuses_naming_the_running_one(models, tmp_path):
    root, weights, images = models
    data = make_sample_dataset(tmp_path / "data", num_train=3, num_val=3, num_test=0, image_size=64, progress=False)
    runs = {
        "inference": ({**TINY_INFER, "bundle_root": root / "on_weights", "pretrained": weights, "input_dir": images,
                       "output_dir": tmp_path / "eval"}, tmp_path / "eval" / "inference"),
        "train": ({"bundle_root": tmp_path, "dataset_dir": data, "num_workers": 0}, tmp_path / "eval"),
    }
    for config, (overrides, locked) in runs.items():
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(locked)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            result = subprocess.run(bundle_command(config, **overrides), cwd=bundle_dir(), capture_output=True,
                                    text=True, timeout=600)
        finally:
            holder.kill()
            holder.wait()
        assert result.returncode != 0, config
        assert f"{locked} is in use by another run (pid {holder.pid} on host " in result.stderr, result.stderr[-3000:]
        assert f"command: -c {locked}" in result.stderr  # the holder's command line (python -c ... FOLDER)
    assert not (tmp_path / "eval" / "inference" / "predictions.csv").exists()


def test_pretrained_false_on_the_command_line_is_the_bool(models, tmp_path):
    root, _, images = models
    overrides = {**TINY_INFER, "bundle_root": root / "random", "pretrained": "false", "input_dir": images,
                 "allow_missing_backbone_digest": True, "output_dir": tmp_path / "eval"}
    result = subprocess.run(bundle_command("inference", **overrides), cwd=bundle_dir(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM weights" in result.stderr  # built without weights, as pretrained=False says; not a file "false"
    assert (tmp_path / "eval" / "inference" / "predictions.csv").is_file()


def test_val_interval_0_names_the_key_and_its_range_before_anything_runs(tmp_path):
    command = bundle_command("train", bundle_root=tmp_path, dataset_dir=tmp_path / "no_data", val_interval=0)
    result = subprocess.run(command, cwd=bundle_dir(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "--val_interval: must be at least 1, got 0" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "eval").exists()
