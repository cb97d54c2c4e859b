"""The MONAI bundle end to end on a tiny run: config parsing, training, evaluation, inference, export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from safetensors.torch import save_file

from conftest import TINY_BUNDLE as TINY
from fpt_monai.bundle import bundle_dir, config_files, export_bundle
from fpt_monai.data import make_sample_dataset
from fpt_monai.networks.fpt import BACKBONE_REFERENCE_KEY

BUNDLE = bundle_dir()


def run_workflow(names, run_id, **override):
    workflow = ConfigWorkflow(
        config_file=config_files(*names), meta_file=config_files("metadata"), logging_file=False,
        run_id=run_id, workflow_type=None, **override,
    )
    workflow.initialize()
    result = workflow.run()
    workflow.finalize()
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run on the sample data with a local backbone weights file."""
    root = tmp_path_factory.mktemp("bundle")
    data = make_sample_dataset(root / "data", num_train=6, num_val=3, num_test=3, image_size=64, progress=False)
    torch.manual_seed(0)
    weights = root / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(weights))
    override = {**TINY, "bundle_root": str(root), "dataset_dir": str(data), "pretrained": str(weights)}
    run_workflow(["train"], "training", **override)
    return root, override


def test_configs_parse_and_name_every_workflow():
    parser = ConfigParser()
    parser.read_config(config_files("train", "evaluate", "inference"))
    parser.read_meta(config_files("metadata"))
    for key in ("training", "evaluating", "inferring", "train#trainer", "validate#evaluator", "test#evaluator",
                "infer#evaluator", "network_def", "optimizer", "train#lr_scheduler"):
        assert key in parser, key
    assert parser["optimizer"]["weight_decay"] == "@weight_decay" and parser["weight_decay"] == 0.1
    assert parser["grad_clip_norm"] == 1.0
    demo = ConfigParser()
    demo.read_config(config_files("train", "demo"))
    assert demo["network_def"]["_target_"] == "fpt_monai.pretrained.create_demo_fpt" and demo["pretrained"] is True
    assert "make_sample_dataset" in demo["dataset_dir"]


def test_metadata_verifies_offline_against_the_shipped_schema():
    verify_metadata(meta_file=config_files("metadata")[0], filepath=str(BUNDLE / "schema" / "meta_schema.json"))


def test_training_writes_trainable_only_checkpoints_and_tensorboard(trained):
    root, _ = trained
    models = root / "models"
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    assert list(models.glob("resume_checkpoint_epoch=2.pt"))
    state = torch.load(models / "model.pt", weights_only=True)
    assert BACKBONE_REFERENCE_KEY in state and not [k for k in state if k.startswith("backbone.")]
    resume = torch.load(next(models.glob("resume_checkpoint_epoch=*.pt")), weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(resume) and resume["trainer"]["iteration"] == 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (root / "eval" / "tensorboard").glob("events.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train_loss", "learning_rate", "grad_norm", "val_auc", "val_accuracy", "val_f1", "val_kappa"} <= tags


def test_evaluation_reports_both_checkpoints(trained):
    root, override = trained
    results = run_workflow(["train", "evaluate"], "evaluating", **override)[0]
    assert set(results) == {"best", "final"}
    for name in ("best", "final"):
        report = root / "eval" / name
        metrics = json.loads((report / "metrics.json").read_text())
        assert set(metrics["metrics"]) == {"test_auc", "test_accuracy", "test_f1", "test_kappa"}
        assert metrics["num_images"] == 3 and sum(map(sum, metrics["confusion_matrix"])) == 3
        assert metrics["checkpoint_name"] == name
        with open(report / "predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 3 and all(Path(row["filename"]).is_file() for row in rows)
        assert abs(sum(float(v) for k, v in rows[0].items() if k.startswith("probability_")) - 1) < 1e-4
        assert (report / "confusion_matrix.csv").is_file()


def test_inference_writes_probabilities_for_a_folder(trained):
    root, override = trained
    images = root / "data" / "test"
    run_workflow(["train", "inference"], "inferring", **override, input_dir=str(images))
    with open(root / "eval" / "inference" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "label" not in rows[0]
    assert {Path(r["filename"]).name for r in rows} == {p.name for p in images.rglob("*.png")}


def test_ckpt_export_matches_the_eager_network_and_verifies(trained):
    root, override = trained
    target = root / "models" / "model.ts"
    args = {k: v for k, v in override.items()}
    ckpt_export(
        net_id="network_def", filepath=str(target), ckpt_file=str(root / "models" / "model.pt"),
        meta_file=config_files("metadata")[0], config_file=config_files("train"), use_trace=True,
        input_shape=[1, 3, 64, 64], **args,
    )
    exported = torch.jit.load(str(target))
    parser = ConfigParser()
    parser.read_config(config_files("train"))
    for key, value in override.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    net.eval()
    images = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(exported(images), net(images), rtol=1e-4, atol=1e-5)
    verify_net_in_out(
        net_id="network_def", meta_file=config_files("metadata")[0], config_file=config_files("train"), device="cpu",
        **args, **{"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64]},
    )


def test_exported_bundle_runs_with_its_own_copy_of_the_package(trained, tmp_path):
    root, override = trained
    exported = export_bundle(tmp_path / "fpt_classification")
    train = json.loads((exported / "configs" / "train.json").read_text())
    assert train["imports"][0] == "$import scripts"
    assert (exported / "scripts" / "fpt_monai" / "networks" / "fpt.py").is_file()
    assert (exported / "configs" / "metadata.json").is_file() and (exported / "LICENSE").is_file()
    # the export's package shadows the installed one: run from the bundle folder, as the Model Zoo does
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
               "--bundle_root", str(tmp_path / "run"), "--num_epochs", "1"]
    for key, value in override.items():
        if key not in ("bundle_root", "num_epochs"):
            command += [f"--{key}", str(value)]
    command += ["--training", "$[print('FPT_MONAI_FROM', fpt_monai.__file__), @train#trainer.run()]"]
    result = subprocess.run(command, cwd=exported, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("FPT_MONAI_FROM"))
    assert str(exported / "scripts" / "fpt_monai") in line
    assert (tmp_path / "run" / "models" / "model_final.pt").is_file()
