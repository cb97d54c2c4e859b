"""The MONAI bundle end to end on a tiny run, as MONAI's tools and the Model Zoo's checks use it.

Training, evaluation and inference run through ``ConfigWorkflow`` with MONAI's property checks (the Model Zoo's
``check_workflow`` pattern: initialize, check, run, finalize); the zoo's CI commands (``verify_metadata``,
``verify_net_in_out``, ``ckpt_export``) run on ``configs/inference.json``.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fire.parser import DefaultParseValue
from monai.bundle import (
    ConfigParser,
    ConfigWorkflow,
    ckpt_export,
    download_large_files,
    verify_metadata,
    verify_net_in_out,
)
from PIL import Image
from pydicom.data import get_testdata_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_BUNDLE as TINY
from conftest import tiny_bundle_task
from fpt_monai.bundle import bundle_dir, config_files, export_bundle
from fpt_monai.config_check import check_overrides
from fpt_monai.data import SAMPLE_CLASSES, fpt_transforms
from fpt_monai.engine.onnx_runtime import OnnxRuntimeNetwork, onnx_class_names
from fpt_monai.networks.fpt import BACKBONE_REFERENCE_KEY
from fpt_monai.networks.labels import ClassNamesMismatchError, UncheckedClassNamesWarning
from fpt_monai.presets import PRESETS, create_fpt
from fpt_monai.preload import KVCacheDataset, default_num_workers, dtype_checked_collate, read_entry, scale_key
from fpt_monai.utils import escape_path, unescape_path
from fpt_monai.weights import random_weights_expected

BUNDLE = bundle_dir()
META = config_files("metadata")[0]
#: Overrides of inference.json for the tiny network (the standalone config has no img_size/epochs keys).
TINY_INFER = {"preset": "fpt_tiny", "network_def#img_size": 64, "network_def#side_img_size": 32, "num_workers": 0}


def check_workflow(names, workflow_type, **override):
    """The Model Zoo's unit-test pattern: initialize, check the properties, run, finalize."""
    workflow = ConfigWorkflow(
        config_file=config_files(*names), meta_file=META, logging_file=False, workflow_type=workflow_type, **override
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    result = workflow.run()
    workflow.finalize()
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run on the sample data with a local backbone weights file."""
    root = tmp_path_factory.mktemp("bundle")
    override = {**TINY, "bundle_root": str(root), **tiny_bundle_task(root)}
    check_workflow(["train"], "train", **override)
    return root, override


def root_cause(error: BaseException) -> BaseException:
    """The error a config expression raised (MONAI wraps it in ``RuntimeError("Failed to evaluate ...")``)."""
    while str(error).startswith(("Failed to evaluate", "Failed to instantiate")) and error.__cause__ is not None:
        error = error.__cause__
    return error


def infer_override(root: Path, weights: str, **extra) -> dict:
    return {**TINY_INFER, "bundle_root": str(root), "pretrained": weights, **extra}


# -- the configs as MONAI reads them ---------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["train"], ["train", "evaluate"], ["inference"]], ids="+".join)
def test_every_workflow_has_monai_entry_points_and_the_legacy_alias(names):
    parser = ConfigParser()
    parser.read_config(config_files(*names))
    parser.parse()
    for key in ("initialize", "run", "finalize"):
        assert isinstance(parser[key], list), key
    alias = {"train": "training", "evaluate": "evaluating", "inference": "inferring"}[names[-1]]
    assert parser[alias] == parser["run"]


def test_preprocessing_is_written_out_as_transform_lists():
    parser = ConfigParser()
    parser.read_config(config_files("train", "evaluate"))
    deterministic = parser["train#deterministic_transforms"]
    assert all("_target_" in t for t in deterministic + parser["train#random_transforms"])
    assert deterministic[-1]["_target_"] == "fpt_monai.preload.FrozenBackboneKVd"  # the cached part ends there
    assert [t["_target_"] for t in parser["train#random_transforms"]].count("RandTorchVisiond") == 3
    assert parser["train#preprocessing#transforms"] == (
        "$@train#deterministic_transforms + ([] if @side_source else @train#side_source_transforms) "
        "+ @train#random_transforms"
    )
    assert all("_target_" in t for t in parser["train#side_source_transforms"])
    # evaluation reuses the deterministic part by reference (the same K/V cache entries)
    for split in ("validate", "test"):
        assert "@train#deterministic_transforms" in parser[f"{split}#preprocessing#transforms"]
    assert parser["train#datalist#datalist#split"] == "train" and parser["test#datalist#split"] == "test"


def test_class_names_are_literals_shared_by_the_configs_and_the_metadata():
    meta = json.loads(Path(META).read_text())
    outputs = meta["network_data_format"]["outputs"]["pred"]
    for name in ("train", "inference"):
        parser = ConfigParser()
        parser.read_config(config_files(name))
        assert parser["class_names"] == list(SAMPLE_CLASSES) and parser["num_classes"] == len(SAMPLE_CLASSES)
    assert list(outputs["channel_def"].values()) == list(SAMPLE_CLASSES)
    assert outputs["num_channels"] == len(SAMPLE_CLASSES)


def test_metadata_describes_the_default_network():
    """What metadata.json says of the network is what the configs build by default (preset, counts, input)."""

    meta = json.loads(Path(META).read_text())
    assert meta["version"] in meta["changelog"]
    parser = ConfigParser()
    parser.read_config(config_files("inference"))
    preset = PRESETS[parser["preset"]]
    with random_weights_expected(), torch.device("meta"):
        net = create_fpt(parser["preset"], num_classes=parser["num_classes"], pretrained=False)
    counts = net.parameter_counts()
    assert f"preset {parser['preset']}" in meta["description"]
    assert f"{counts['learnable']:,}" in meta["description"] and f"{counts['frozen']:,}" in meta["description"]
    backbone_name = {"tf_efficientnet_lite0": "EfficientNet-Lite0"}.get(preset.model_name, preset.model_name)
    assert backbone_name in meta["description"]
    assert any(backbone_name.split("-")[0] in reference for reference in meta["references"])
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == list(net.shape.img_size)
    mean, std = net.backbone.mean, net.backbone.std
    assert image["value_range"] == pytest.approx([(0 - mean[0]) / std[0], (1 - mean[0]) / std[0]])


def test_inference_workers_follow_the_machine_and_can_be_overridden():
    parser = ConfigParser()
    parser.read_config(config_files("inference"))
    assert parser.get_parsed_content("num_workers") == default_num_workers(parser.get_parsed_content("device"))
    assert parser["dataloader#num_workers"] == "@num_workers"  # `--num_workers N` reaches the loader
    parser["num_workers"] = 3
    assert parser.get_parsed_content("num_workers") == 3


def test_logging_conf_filters_only_the_known_third_party_noise():
    """The bundle's logging.conf drops MONAI's note that the optional nvImageCodec is absent; a user's own
    warnings, logged or raised with ``warnings.warn``, still show."""
    code = (
        "import logging, logging.config, warnings; "
        f"logging.config.fileConfig({str(BUNDLE / 'configs' / 'logging.conf')!r}, disable_existing_loggers=False); "
        "logging.getLogger('monai.data.nvimgcodec_pydicom_plugin').warning('nvImageCodec is not available'); "
        "logging.getLogger('monai.data.nvimgcodec_pydicom_plugin').error('a real decoder error'); "
        "logging.getLogger('user.code').warning('a user warning'); "
        "warnings.warn('a user UserWarning')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert "nvImageCodec is not available" not in output
    assert "a real decoder error" in output and "a user warning" in output and "a user UserWarning" in output


def test_training_uses_mixed_precision_on_a_gpu_by_default():
    """MONAI's ``amp`` (float16 autocast and a gradient scaler) is on for a CUDA device and off on the CPU."""
    for device, expected in (("$torch.device('cuda:0')", True), ("cuda", True), ("$torch.device('cpu')", False)):
        parser = ConfigParser()
        parser.read_config(config_files("train"))
        parser["device"] = device
        assert parser.get_parsed_content("amp") is expected, device
    assert parser["train#trainer#amp"] == "@amp"  # `--amp False` turns it off


def test_metadata_verifies_offline_against_the_shipped_schema():
    verify_metadata(meta_file=META, filepath=str(BUNDLE / "schema" / "meta_schema.json"))


def test_metadata_lists_every_package_the_bundle_imports():
    """The exported bundle carries fpt_monai: its dependencies and the configs' imports must all be listed."""
    meta = json.loads(Path(META).read_text())
    listed = {name.lower() for name in meta["required_packages_version"]} | {"torch", "monai", "numpy"}
    project = tomllib.loads((BUNDLE.parent.parent / "pyproject.toml").read_text())["project"]
    required = {dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()
                for dep in project["dependencies"]}
    required -= {"matplotlib"}  # plotting of the benchmarks only
    assert required <= listed, required - listed
    distributions = packages_distributions()
    for config in (BUNDLE / "configs").glob("*.json"):
        content = json.loads(config.read_text())
        imports = content.get("imports", []) if isinstance(content, dict) else []
        for statement in imports:
            module = statement.split()[1].split(".")[0]
            if module in ("fpt_monai", "scripts") or module in sys.stdlib_module_names:
                continue
            assert {d.lower() for d in distributions[module]} & listed, (config.name, module)


def test_large_files_parse_with_monais_reader_and_download_offline_when_present(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "large_files.yml"))
    entries = parser.get()["large_files"]
    assert isinstance(entries, list)
    for entry in entries:
        assert not Path(entry["path"]).is_absolute() and ".." not in Path(entry["path"]).parts
        assert entry["path"].startswith("models/") and entry["url"].startswith("https://")
        assert entry.get("hash_type", "sha256") in ("md5", "sha1", "sha256", "sha512")
    # the documented step, as the Model Zoo's check runs it on an exported bundle with its checkpoint in place
    exported = export_bundle(tmp_path / "fpt_classification")
    (exported / "models").mkdir()
    (exported / "models" / "model.pt").write_bytes(b"a checkpoint")
    download_large_files(bundle_path=str(exported))


# -- training, evaluation, inference -------------------------------------------------------------------------------


def test_training_writes_trainable_only_checkpoints_and_tensorboard(trained):
    root, _ = trained
    models = root / "models"
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    assert list(models.glob("resume_checkpoint_epoch=2.pt"))
    state = torch.load(models / "model.pt", weights_only=True)
    assert BACKBONE_REFERENCE_KEY in state and not [k for k in state if k.startswith("backbone.")]
    resume = torch.load(next(models.glob("resume_checkpoint_epoch=*.pt")), weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(resume) and resume["trainer"]["iteration"] == 4

    tags = set()
    for events in (root / "eval" / "tensorboard").glob("events.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train_loss", "learning_rate", "grad_norm", "val_auc", "val_accuracy", "val_f1", "val_kappa"} <= tags


def event_tags(log_dir: Path) -> dict[str, set]:
    """Tags of every kind (scalars, images, tensors: text) in the event files of a TensorBoard folder."""
    tags: dict[str, set] = {}
    for events in log_dir.glob("events.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
        accumulator.Reload()
        for kind, names in accumulator.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, set()).update(names)
    return tags


def test_training_logs_selection_maps_side_views_confusion_matrix_and_settings(trained):
    root, override = trained
    log_dir = root / "eval" / "tensorboard"
    tags = event_tags(log_dir)
    # the 3 validation images (fewer than the 4 asked for), each with its selection map and side view
    assert {f"val/selection_map/{i}_CHW" for i in range(3)} <= tags["images"]
    assert {f"val/side_view/{i}_CHW" for i in range(3)} <= tags["images"]
    assert "val/selection_map/3_CHW" not in tags["images"]
    assert "val_confusion_matrix_CHW" in tags["images"]
    assert {"hparams/text_summary", "val/predictions/text_summary"} <= tags["tensors"]
    for events in log_dir.glob("events.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
        accumulator.Reload()
        if "val/selection_map/0_CHW" in accumulator.Tags()["images"]:
            maps = accumulator.Images("val/selection_map/0_CHW")
            assert [m.step for m in maps] == [1, 2]  # every validation
            assert maps[0].width == maps[0].height == override["network_def#img_size"]
            side = accumulator.Images("val/side_view/0_CHW")[0]
            assert side.width == override["network_def#side_img_size"]
        if "hparams/text_summary" in accumulator.Tags()["tensors"]:
            text = accumulator.Tensors("hparams/text_summary")[0].tensor_proto.string_val[0].decode()
            assert "| kv_dtype | float16 |" in text and "| preset | fpt_tiny |" in text
            assert f"| learning_rate | {override['learning_rate']} |" in text


def test_training_refuses_a_dataset_whose_classes_differ_from_class_names(trained, tmp_path):
    root, override = trained
    workflow = ConfigWorkflow(config_file=config_files("train"), meta_file=META, logging_file=False,
                              **{**override, "class_names": ["a", "b", "c"]})
    with pytest.raises(RuntimeError) as error:
        workflow.initialize()
    assert isinstance(root_cause(error.value), ValueError) and "pass --class_names" in str(root_cause(error.value))


def test_evaluation_reports_both_checkpoints(trained):
    root, override = trained
    results = check_workflow(["train", "evaluate"], "train", **override)[0]
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
    # the test metrics and confusion matrix of each checkpoint in TensorBoard
    tags = event_tags(root / "eval" / "tensorboard")
    for name in ("best", "final"):
        assert {f"test/{name}/{m}" for m in ("auc", "accuracy", "f1", "kappa")} <= tags["scalars"]
        assert f"test/{name}/confusion_matrix_CHW" in tags["images"]


def test_standalone_inference_needs_only_the_checkpoint_and_images(trained, tmp_path):
    root, override = trained
    run_root = tmp_path / "run"
    (run_root / "models").mkdir(parents=True)
    (run_root / "models" / "model.pt").write_bytes((root / "models" / "model.pt").read_bytes())
    # an archive as it comes: three readable images and two that cannot be classified
    images = tmp_path / "archive"
    for index, source in enumerate(sorted((root / "data" / "test").rglob("*.png"))):
        (images / str(index)).mkdir(parents=True)
        (images / str(index) / source.name).write_bytes(source.read_bytes())
    (images / "notes.png").write_text("not an image")
    (images / "cut.png").write_bytes(source.read_bytes()[:200])
    check_workflow(["inference"], "infer", **infer_override(run_root, override["pretrained"], input_dir=str(images)))
    with open(run_root / "eval" / "inference" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "label" not in rows[0]
    assert {Path(r["filename"]).name for r in rows} == {p.name for p in (root / "data" / "test").rglob("*.png")}
    assert [k for k in rows[0] if k.startswith("probability_")] == [f"probability_{c}" for c in SAMPLE_CLASSES]
    report = json.loads((run_root / "eval" / "inference" / "input_check.json").read_text())
    assert sorted(Path(p["image"]).name for p in report["problems"]) == ["cut.png", "notes.png"]
    assert not (run_root / "eval" / "inference" / "selection_maps").exists()  # off by default


def test_inference_writes_one_selection_map_png_per_image_on_demand(trained, tmp_path):
    root, override = trained
    run_root = tmp_path / "run"
    (run_root / "models").mkdir(parents=True)
    (run_root / "models" / "model.pt").write_bytes((root / "models" / "model.pt").read_bytes())
    source = sorted((root / "data" / "test").rglob("*.png"))[0]
    images = tmp_path / "images"
    for folder in ("a", "b"):  # the same file name in two folders
        (images / folder).mkdir(parents=True)
        (images / folder / "scan.png").write_bytes(source.read_bytes())
    (images / "other.png").write_bytes(source.read_bytes())
    # as the bundle README's command line gives it (fire parses `True`), checked like a command line
    check_overrides(config_files("inference"), {"selection_maps": DefaultParseValue("True")})
    check_workflow(["inference"], "infer",
                   **infer_override(run_root, override["pretrained"], input_dir=str(images), selection_maps=True))
    pngs = sorted((run_root / "eval" / "inference" / "selection_maps").iterdir())
    names = [p.name for p in pngs]
    assert len(pngs) == 3 and "other.png" in names, names
    assert sum(n.startswith("scan-") and n.endswith(".png") for n in names) == 2
    with Image.open(pngs[0]) as picture:
        assert picture.size == (TINY_INFER["network_def#img_size"],) * 2 and picture.mode == "RGB"


def test_inference_on_a_pacs_export_reads_dicoms_by_content_and_names_every_other_file(trained, tmp_path):
    """Through ``python -m monai.bundle run``: suffix-less DICOMs next to PNGs, a DICOMDIR tree and a file name
    that is not UTF-8 are all classified; GIF, WebP, other files and a constant image are named, not classified."""
    root, override = trained
    run_root = tmp_path / "run"
    (run_root / "models").mkdir(parents=True)
    (run_root / "models" / "model.pt").write_bytes((root / "models" / "model.pt").read_bytes())
    images = tmp_path / "export"
    rng = np.random.default_rng(0)
    classified = []
    for name, target in [("CT_small.dcm", "PAT1/IM000001"), ("MR_small.dcm", "PAT1/IM000002"),
                         ("CT_small.dcm", "PAT2/1.2.840.113619.2.55.3.604688119")]:
        (images / target).parent.mkdir(parents=True, exist_ok=True)
        (images / target).write_bytes(Path(get_testdata_file(name)).read_bytes())
        classified.append(images / target)
    cd = Path(get_testdata_file("DICOMDIR")).parent  # a DICOMDIR tree, its 16x16 CR images
    (images / "cd").mkdir()
    (images / "cd" / "DICOMDIR").write_bytes((cd / "DICOMDIR").read_bytes())
    for series, number in (("CR1", "6154"), ("CR2", "6247"), ("CR3", "6278")):
        (images / "cd" / "77654033" / series).mkdir(parents=True)
        (images / "cd" / "77654033" / series / number).write_bytes((cd / "77654033" / series / number).read_bytes())
        classified.append(images / "cd" / "77654033" / series / number)
    latin1 = Path(os.fsdecode(bytes(images) + b"/caf\xe9.png"))
    for path in (images / "photo.png", latin1):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path, "PNG")
        classified.append(path)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(images / "anim.gif")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / "x.webp")
    (images / "notes.txt").write_text("patient list")
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    Image.fromarray(np.full((48, 48, 3), 90, np.uint8)).save(images / "flat.png")
    options = {**infer_override(run_root, override["pretrained"]), "input_dir": images, "input_check#min_size": 16}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=600,
                            errors="backslashreplace")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_root / "eval" / "inference" / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["filename"] for row in rows) == sorted(escape_path(p) for p in classified)
    assert escape_path(latin1).endswith("/caf\\xe9.png")
    assert bytes(latin1) in [unescape_path(row["filename"]) for row in rows]
    report = json.loads((run_root / "eval" / "inference" / "input_check.json").read_text(encoding="utf-8"))
    not_read = {Path(e["image"]).name: e["reason"] for e in report["not_read"]}
    assert set(not_read) == {"anim.gif", "x.webp", "notes.txt", ".DS_Store", "DICOMDIR"}
    assert not_read["anim.gif"].startswith("GIF image") and not_read["x.webp"].startswith("WebP image")
    assert not_read["DICOMDIR"].startswith("DICOMDIR index")
    assert [(Path(p["image"]).name, p["problem"].split(":")[0]) for p in report["problems"]] == [
        ("flat.png", "image is (nearly) constant")
    ]
    assert f"{len(classified)} kept, 5 files not read" in result.stdout


# -- augmentation overrides and the K/V cache ------------------------------------------------------------------------


def parsed(names, **override):
    parser = ConfigParser()
    parser.read_config(config_files(*names))
    for key, value in override.items():
        parser[key] = value
    return parser


def test_an_augmentation_changed_from_the_command_line_takes_effect(trained):
    root, override = trained
    flip = "train#random_transforms#2#p"
    check_overrides(config_files("train"), {flip: 1.0})  # what `--train#random_transforms#2#p 1.0` passes
    fixed = {"train#random_transforms#1#scale": [1.0, 1.0], "train#random_transforms#1#ratio": [1.0, 1.0],
             "train#random_transforms#3#brightness": 0.0, "train#random_transforms#3#contrast": 0.0}
    item = {"image": str(next((root / "data" / "train").rglob("*.png"))), "label": 0}
    views = {}
    for p in (0.0, 1.0):
        parser = parsed(["train"], **override, **fixed, **{flip: p})
        views[p] = parser.get_parsed_content("train#preprocessing")(dict(item))["image"]
    torch.testing.assert_close(views[1.0], views[0.0].flip(-1))


def test_the_cache_fingerprint_changes_when_and_only_when_a_transform_before_the_kv_transform_changes(trained):
    root, override = trained

    def fingerprint(**change):
        return parsed(["train"], **override, **change).get_parsed_content("train#dataset").fingerprint

    reference = fingerprint()
    assert fingerprint(**{"train#random_transforms#2#p": 1.0}) == reference  # augmentation: entries stay valid
    assert fingerprint(**{"train#random_transforms#1#scale": [0.5, 1.0]}) == reference
    assert fingerprint(**{"train#deterministic_transforms#4#mode": "bicubic"}) != reference  # high-res resizing
    assert fingerprint(**{"train#deterministic_transforms#5#scale": 3.0}) != reference  # the stored side-view source
    assert fingerprint(kv_dtype="float32") != reference
    assert fingerprint(kv_dtype="int8") != reference


def test_an_int8_cache_gives_the_training_loader_float16_keys_values(trained, tmp_path):
    _, override = trained
    parser = parsed(["train"], **{**override, "kv_dtype": "int8", "cache_dir": str(tmp_path / "cache")})
    loader = parser.get_parsed_content("train#dataloader")
    assert parser.get_parsed_content("train#dataloader#collate_fn") is dtype_checked_collate
    batch = next(iter(loader))
    backbone = parser.get_parsed_content("backbone")
    assert batch["kv"].dtype == torch.float16 and tuple(batch["kv"].shape[1:]) == tuple(backbone.shape.kv_shape)
    assert scale_key("kv") not in batch


def test_without_a_cached_side_source_the_bundle_trains_from_the_image_files(trained, tmp_path):
    _, override = trained
    settings = {**override, "cache_dir": str(tmp_path / "cache")}
    with_source = parsed(["train"], **settings).get_parsed_content("train#dataset")
    parser = parsed(["train"], **settings, side_source=False)
    dataset = parser.get_parsed_content("train#dataset")
    assert dataset.fingerprint != with_source.fingerprint
    dataset.preload()
    entry = read_entry(dataset.entry_path(dataset.data[0]), dataset.fingerprint)
    assert not isinstance(entry.get("image"), torch.Tensor)  # no stored copy: the item's path only
    torch.manual_seed(0)
    ours = dataset[0]["image"]
    with_source.preload()
    torch.manual_seed(0)
    torch.testing.assert_close(ours, with_source[0]["image"], atol=0, rtol=0)  # the same side view
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape[2:] == ours.shape[1:]


def test_a_cache_preloaded_from_python_or_the_cli_is_the_bundles(trained, tmp_path):
    """`fpt-monai preload` and make_fpt_dataset build the chain in Python: the same entries as the bundle's."""
    _, override = trained
    parser = parsed(["train"], **override)
    backbone = parser.get_parsed_content("backbone")
    side = parser.get_parsed_content("side_img_size")
    for side_img_size in (side, side[0]):  # the bundle's (from the network) and the CLI's (the preset's int)
        chain = fpt_transforms(parser.get_parsed_content("img_size"), side_img_size, backbone.mean, backbone.std,
                               train=True, backbone=backbone)
        python = KVCacheDataset([], chain, tmp_path, progress=False).fingerprint
        assert python == parser.get_parsed_content("train#dataset").fingerprint


# -- the Model Zoo's CI commands --------------------------------------------------------------------------------------


def test_zoo_verify_net_in_out_on_inference_json(trained):
    _, override = trained
    verify_net_in_out(
        net_id="network_def", meta_file=META, config_file=config_files("inference")[0], device="cpu",
        **infer_override(BUNDLE, override["pretrained"]),
        **{"_meta_#network_data_format#inputs#image#spatial_shape": [64, 64]},
    )


def test_zoo_ckpt_export_scripts_the_network_and_torch_export_matches(trained):
    root, override = trained
    target = root / "models" / "model.ts"
    infer = infer_override(root, override["pretrained"])
    ckpt_export(net_id="network_def", filepath=str(target), ckpt_file=str(root / "models" / "model.pt"),
                meta_file=META, config_file=config_files("inference")[0], **infer)  # scripting, its default
    exported = torch.jit.load(str(target))
    net = parsed(["inference"], **infer).get_parsed_content("network_def")
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    net.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(images)
        torch.testing.assert_close(exported(images), expected, rtol=1e-4, atol=1e-5)
        program = torch.export.export(net, (images,), dynamic_shapes=({0: torch.export.Dim("batch", max=256)},))
        torch.testing.assert_close(program.module()(images), expected, rtol=1e-4, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------------------------


def test_an_unknown_run_id_is_a_one_line_error_naming_it():
    workflow = ConfigWorkflow(config_file=config_files("inference"), meta_file=META, logging_file=False,
                              workflow_type="infer", run_id="predicting")
    with pytest.raises(ValueError, match="'predicting'"):
        workflow.run()


def test_inference_without_a_checkpoint_names_the_file_and_writes_nothing(trained, tmp_path):
    _, override = trained
    workflow = ConfigWorkflow(config_file=config_files("inference"), meta_file=META, logging_file=False,
                              workflow_type="infer", **infer_override(tmp_path, override["pretrained"]))
    with pytest.raises(RuntimeError) as error:
        workflow.initialize()
    assert isinstance(root_cause(error.value), FileNotFoundError)
    assert str(tmp_path / "models" / "model.pt") in str(root_cause(error.value))
    assert not (tmp_path / "eval").exists()


def test_inference_refuses_a_checkpoint_of_another_class_count(trained, tmp_path):
    root, override = trained
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes((root / "models" / "model.pt").read_bytes())
    workflow = ConfigWorkflow(
        config_file=config_files("inference"), meta_file=META, logging_file=False, workflow_type="infer",
        **infer_override(tmp_path, override["pretrained"], class_names=["a", "b"], num_classes=2),
    )
    with pytest.raises(RuntimeError) as error:
        workflow.initialize()
    assert isinstance(root_cause(error.value), ValueError)
    assert "model.pt does not fit this network" in str(root_cause(error.value))


def test_monai_bundle_run_inference_refuses_reordered_class_names_and_maps_them_on_request(trained, tmp_path):
    root, override = trained
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes((root / "models" / "model.pt").read_bytes())
    reordered = [SAMPLE_CLASSES[1], SAMPLE_CLASSES[0], *SAMPLE_CLASSES[2:]]
    options = infer_override(tmp_path, override["pretrained"], input_dir=root / "data" / "test")

    def run(**extra):
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config_files("inference")[0])]
        for key, value in {**options, "class_names": json.dumps(reordered), **extra}.items():
            command += [f"--{key}", str(value)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    refused = run()
    assert refused.returncode != 0 and not (tmp_path / "eval" / "inference" / "predictions.csv").exists()
    message = [line for line in refused.stderr.splitlines() if "ClassNamesMismatchError: " in line][-1]
    assert str(list(SAMPLE_CLASSES)) in message and str(reordered) in message
    mapped = run(class_mapping="by_name")
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    with open(tmp_path / "eval" / "inference" / "predictions.csv") as f:
        columns = [k for k in next(csv.DictReader(f)) if k.startswith("probability_")]
    assert columns == [f"probability_{c}" for c in reordered]


def test_inference_on_a_folder_without_images_names_the_folder(trained, tmp_path):
    root, override = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(RuntimeError) as error:
        check_workflow(["inference"], "infer", **infer_override(root, override["pretrained"], input_dir=str(empty)))
    assert isinstance(root_cause(error.value), ValueError) and str(empty) in str(root_cause(error.value))


# -- the exported, self-contained bundle ---------------------------------------------------------------------------------


def test_exported_bundle_runs_monai_bundle_commands_with_its_own_copy_of_the_package(trained, tmp_path):
    root, override = trained
    exported = export_bundle(tmp_path / "fpt_classification")
    train = json.loads((exported / "configs" / "train.json").read_text())
    assert train["imports"][0] == "$import scripts"
    assert (exported / "scripts" / "fpt_monai" / "networks" / "fpt.py").is_file()
    for name in ("configs/metadata.json", "configs/inference.json", "LICENSE", "large_files.yml", "docs/README.md"):
        assert (exported / name).is_file(), name
    env = {**os.environ, "PYTHONPATH": ""}

    def monai_bundle_run(config_file, options):
        # the export's package shadows the installed one: run from the bundle folder, as the Model Zoo does
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file]
        for key, value in options.items():
            command += [f"--{key}", str(value)]
        result = subprocess.run(command, cwd=exported, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run_root = tmp_path / "run"
    options = {k: v for k, v in override.items() if k not in ("bundle_root", "num_epochs")}
    result = monai_bundle_run("configs/train.json", {
        **options, "bundle_root": run_root, "num_epochs": 1,
        "run": "$[print('FPT_MONAI_FROM', fpt_monai.__file__), @train#trainer.run()]",
    })
    line = next(line for line in result.stdout.splitlines() if line.startswith("FPT_MONAI_FROM"))
    assert str(exported / "scripts" / "fpt_monai") in line
    assert (run_root / "models" / "model.pt").is_file()
    images = root / "data" / "test"
    inference = monai_bundle_run("configs/inference.json", {
        **infer_override(run_root, override["pretrained"]), "input_dir": images,
    })
    for run in (result, inference):  # quiet runs: no warning of the package, no known third-party noise
        output = run.stdout + run.stderr
        assert "nvImageCodec" not in output and "NvImgCodec" not in output
        assert "Warning" not in output and "requires_grad" not in output, output[-3000:]
        assert not [line for line in output.splitlines() if " - fpt_monai" in line and " - WARNING - " in line]
    with open(run_root / "eval" / "inference" / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    # the Model Zoo's commands, as the bundle's README shows them, on the export (tiny network and input size)
    (exported / "models").mkdir()
    (exported / "models" / "model.pt").write_bytes((run_root / "models" / "model.pt").read_bytes())
    tiny = [f"--{k}={v}" for k, v in infer_override(exported, override["pretrained"]).items() if k != "num_workers"]
    zoo = [
        "verify_metadata --meta_file configs/metadata.json --filepath schema/meta_schema.json",
        "verify_net_in_out --net_id network_def --meta_file configs/metadata.json --config_file configs/inference.json",
        "ckpt_export --net_id network_def --filepath models/model.ts --ckpt_file models/model.pt "
        "--meta_file configs/metadata.json --config_file configs/inference.json",
    ]
    shape = "--_meta_#network_data_format#inputs#image#spatial_shape=[64,64]"
    for command in zoo:
        extra = [] if command.startswith("verify_metadata") else [*tiny, shape]
        result = subprocess.run([sys.executable, "-m", "monai.bundle", *command.split(), *extra], cwd=exported,
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    assert torch.jit.load(str(exported / "models" / "model.ts"))(torch.rand(2, 3, 64, 64)).shape == (2, 3)


def test_a_built_wheel_carries_the_bundle_and_exports_it_without_the_clone(tmp_path):
    root = BUNDLE.parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "wheel").glob("fpt_monai-*.whl"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    assert not (tmp_path / "site" / "fpt_monai" / "bundle_files").is_symlink()
    code = ("import fpt_monai, fpt_monai.bundle as b; print(fpt_monai.__file__); "
            f"b.export_bundle({str(tmp_path / 'exported')!r})")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(str(tmp_path / "site"))
    exported = tmp_path / "exported"
    assert (exported / "configs" / "inference.json").read_text() != ""
    assert not (exported / "scripts" / "fpt_monai" / "bundle_files").exists()


#: The monai.bundle commands of the bundle's docs; each is run by a test above (with tiny-network overrides).
TESTED_COMMANDS = {
    "python -m monai.bundle run --config_file \"['configs/train.json','configs/demo.json']\"",
    "python -m monai.bundle run --config_file configs/train.json --dataset_dir /data/my_dataset",
    "python -m monai.bundle run --config_file \"['configs/train.json','configs/evaluate.json','configs/demo.json']\"",
    "python -m monai.bundle run --config_file \"['configs/train.json','configs/evaluate.json']\" "
    "--dataset_dir /data/my_dataset",
    "python -m monai.bundle run --config_file configs/inference.json --input_dir /data/new_images",
    # the selection-map PNGs: test_inference_writes_one_selection_map_png_per_image_on_demand
    "python -m monai.bundle run --config_file configs/inference.json --input_dir /data/new_images "
    "--selection_maps True",
    "python -m monai.bundle download_large_files --bundle_path .",
    "python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath schema/meta_schema.json",
    "python -m monai.bundle verify_net_in_out --net_id network_def --meta_file configs/metadata.json "
    "--config_file configs/inference.json",
    "python -m monai.bundle ckpt_export --net_id network_def --filepath models/model.ts --ckpt_file models/model.pt "
    "--meta_file configs/metadata.json --config_file configs/inference.json",
    # ONNX: test_onnx_export_as_documented_has_a_dynamic_batch_and_the_overlay_predicts_as_eager
    "python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt "
    "--meta_file configs/metadata.json --config_file configs/inference.json --converter_kwargs "
    """'{"input_names": ["image"], "output_names": ["pred"], "dynamic_axes": {"image": [0], "pred": [0]}}'""",
    "python -m monai.bundle run --config_file \"['configs/inference.json','configs/inference_onnx.json']\" "
    "--input_dir /data/new_images",
}


def test_the_bundle_readme_shows_the_tested_commands():
    lines = [line.strip() for line in (BUNDLE / "docs" / "README.md").read_text().splitlines()]
    shown = {line for line in lines if line.startswith("python -m monai.bundle")}
    assert shown == TESTED_COMMANDS


# -- ONNX -----------------------------------------------------------------------------------------------------------


def documented_command(start: str) -> list[str]:
    """The bundle README's bash line that starts with ``start``, split as the shell would."""
    readme = (BUNDLE / "docs" / "README.md").read_text()
    return shlex.split(next(line for line in readme.splitlines() if line.startswith(f"{start} ")))


def test_onnx_export_as_documented_has_a_dynamic_batch_and_the_overlay_predicts_as_eager(trained, tmp_path):
    root, override = trained
    exported = export_bundle(tmp_path / "fpt_classification")
    (exported / "models").mkdir()
    (exported / "models" / "model.pt").write_bytes((root / "models" / "model.pt").read_bytes())
    tiny = [f"--{k}={v}" for k, v in infer_override(exported, override["pretrained"]).items() if k != "bundle_root"]
    shape = ["--_meta_#network_data_format#inputs#image#spatial_shape=[64,64]"]
    command = documented_command("python -m monai.bundle onnx_export")
    assert "models/model.onnx" in command and "models/model.pt" in command
    result = subprocess.run([sys.executable, *command[1:], *tiny, *shape], cwd=exported, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    model = onnx.load(str(exported / "models" / "model.onnx"))
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # the batch is dynamic
    with pytest.warns(UncheckedClassNamesWarning, match="no class names"):  # MONAI's exporter writes none
        OnnxRuntimeNetwork(exported / "models" / "model.onnx", class_names=list(SAMPLE_CLASSES))
    command = documented_command("fpt-monai onnx_class_names")
    result = subprocess.run([sys.executable, "-m", "fpt_monai", *command[1:]], cwd=exported, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == list(SAMPLE_CLASSES)
    assert onnx_class_names(exported / "models" / "model.onnx") == list(SAMPLE_CLASSES)
    reordered = list(reversed(SAMPLE_CLASSES))
    with pytest.raises(ClassNamesMismatchError, match=r"exported for the classes \['0_no_lesions'.*are \['2_many"):
        OnnxRuntimeNetwork(exported / "models" / "model.onnx", class_names=reordered)
    by_name = OnnxRuntimeNetwork(exported / "models" / "model.onnx", class_names=reordered, class_mapping="by_name")
    assert by_name.class_names == reordered

    parser = ConfigParser()
    parser.read_config(config_files("inference"))
    parser.update({k.replace("#", "::"): v for k, v in infer_override(root, override["pretrained"]).items()})
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    runtime = OnnxRuntimeNetwork(exported / "models" / "model.onnx")
    for batch in (1, 3):
        images = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(runtime(images), network(images), atol=1e-4, rtol=0)
            torch.testing.assert_close(by_name(images), network(images).flip(-1), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"model\.onnx takes input of shape \(N, 3, 64, 64\), got \[1, 3, 32, 32\]"):
        runtime(torch.rand(1, 3, 32, 32))

    # the overlay runs the same folder inference with ONNX Runtime: the same predictions as PyTorch
    images = root / "data" / "test"
    tables = {}
    for name, configs in (("eager", ["inference"]), ("onnx", ["inference", "inference_onnx"])):
        out = tmp_path / name
        (out / "models").mkdir(parents=True)
        for file in ("model.pt", "model.onnx"):
            (out / "models" / file).write_bytes((exported / "models" / file).read_bytes())
        check_workflow(configs, "infer", **infer_override(out, override["pretrained"], input_dir=str(images)))
        with open(out / "eval" / "inference" / "predictions.csv") as f:
            tables[name] = list(csv.DictReader(f))
    assert len(tables["onnx"]) == 3
    for eager, runtime_row in zip(tables["eager"], tables["onnx"]):
        assert eager["filename"] == runtime_row["filename"] and eager["prediction"] == runtime_row["prediction"]
        for key in eager:
            if key.startswith("probability_"):
                assert abs(float(eager[key]) - float(runtime_row[key])) <= 1e-4


def test_the_onnx_overlay_names_a_missing_export(trained, tmp_path):
    root, override = trained
    with pytest.raises(RuntimeError) as error:
        check_workflow(["inference", "inference_onnx"], "infer",
                       **infer_override(tmp_path, override["pretrained"], input_dir=str(root / "data" / "test")))
    assert isinstance(root_cause(error.value), FileNotFoundError)
    assert "model.onnx" in str(root_cause(error.value)) and "onnx_export" in str(root_cause(error.value))
