"""Federated learning with the bundle as shipped: MONAI FL's client by contract, and NVIDIA FLARE's simulator.

The in-process test plays the server itself: two sites (each its own bundle root, data and cache) run
:class:`fpt_monai.fl.FPTMonaiAlgo` on ``configs/train.json`` (+ ``evaluate.json``) for two rounds of FedAvg on the
tiny preset, and everything a site hands back is inspected.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from pathlib import Path

import pytest
import timm
import torch
from monai.fl.utils.constants import FlStatistics, WeightType
from monai.fl.utils.exchange_object import ExchangeObject
from safetensors.torch import save_file

from conftest import TINY_BUNDLE as TINY
from fpt_monai.bundle import config_files
from fpt_monai.data import make_sample_dataset
from fpt_monai.fl import FPTMonaiAlgo, learnable_names, learnable_state_dict

ROUNDS = 2
#: MonaiAlgo warns, rightly, that a site executes the bundle it is given; these are the tests' own configs.
pytestmark = pytest.mark.filterwarnings("ignore:executing the bundle config:UserWarning")


def make_sites(root: Path, count: int) -> tuple[Path, list[dict]]:
    """``count`` site folders with their own sample data (another seed each) and one local weights file."""
    torch.manual_seed(0)
    weights = root / "vit_tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), str(weights))
    sites = []
    for index in range(count):
        site = root / f"site-{index + 1}"
        data = make_sample_dataset(
            site / "data", num_train=6, num_val=3, num_test=3, image_size=64, seed=index, progress=False
        )
        sites.append({"bundle_root": str(site), "dataset_dir": str(data)})
    return weights, sites


def leaves(obj, path=()):
    """Every (path, value) leaf of nested dicts/lists/tuples and objects' attributes (an ExchangeObject)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*path, "<key>"), key
            yield from leaves(value, (*path, key))
    elif isinstance(obj, (list, tuple, set)):
        for index, value in enumerate(obj):
            yield from leaves(value, (*path, index))
    elif isinstance(obj, ExchangeObject):
        for name, value in vars(obj).items():
            yield from leaves(value, (*path, name))
    else:
        yield path, obj


def assert_nothing_else_leaves(sent: ExchangeObject, network: torch.nn.Module, site: dict, weight_type) -> None:
    """The exchanged object holds the learnable parameters as CPU tensors, and numbers otherwise: no frozen
    backbone, no cache entry, no image, no path."""
    names = learnable_names(network)
    by_identity = {id(p) for p in network.trainable_parameters()}
    assert {id(dict(network.named_parameters())[n]) for n in names} == by_identity
    assert sent.weight_type == weight_type
    assert list(sent.weights) == names
    assert not any(n.startswith("backbone.") or n in ("class_names", "backbone_sha256") for n in sent.weights)
    params = dict(network.named_parameters())
    for name, tensor in sent.weights.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.shape == params[name].shape
    assert sum(t.numel() for t in sent.weights.values()) == network.parameter_counts()["learnable"]
    assert sent.optim is None and sent.metrics in (None, {})
    assert sent.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] == 2  # 6 images, batch 4
    kv_shape = tuple(network.shape.kv_shape)
    for path, value in leaves(sent):
        if path[-1] == "<key>":
            assert isinstance(value, str) and os.sep not in value, path
        elif path[0] == "weights":
            assert isinstance(value, torch.Tensor) and tuple(value.shape[-len(kv_shape) :]) != kv_shape, path
            assert value.dim() < 3 or tuple(value.shape[-2:]) != (64, 64), path  # no image
        else:
            assert value is None or isinstance(value, (numbers.Number, WeightType)), (path, value)
        text = repr(value)
        assert site["bundle_root"] not in text and site["dataset_dir"] not in text and ".png" not in text, path


def fedavg(global_weights: dict, updates: list[tuple[dict, int]]) -> dict:
    """FedAvg of weight differences, each site weighted by its number of training steps."""
    total = sum(steps for _, steps in updates)
    return {
        name: value + sum(diff[name] * (steps / total) for diff, steps in updates)
        for name, value in global_weights.items()
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Two sites, two rounds of FedAvg in-process; every exchanged object kept for the assertions."""
    root = tmp_path_factory.mktemp("fl")
    weights, sites = make_sites(root, 2)
    work = root / "working_folder"
    work.mkdir()
    algos = []
    for index, site in enumerate(sites):
        overrides = {**TINY, "dataset_dir": site["dataset_dir"], "pretrained": str(weights), "num_epochs": ROUNDS}
        algo = FPTMonaiAlgo(
            bundle_root=site["bundle_root"],
            local_epochs=1,
            send_weight_diff=True,
            config_train_filename=config_files("train"),
            config_evaluate_filename=config_files("train", "evaluate"),
            train_kwargs=dict(overrides),
            eval_kwargs=dict(overrides),
        )
        with contextlib.chdir(work):  # the process's working folder, which a site's run must leave alone
            algo.initialize({"fl_client_name": f"site-{index + 1}"})
        algos.append(algo)
    assert not any(work.iterdir()), sorted(work.rglob("*"))  # outputs and run locks are in the sites' folders
    global_weights = learnable_state_dict(algos[0].trainer.network)
    history = []
    for _ in range(ROUNDS):
        updates, sent = [], []
        for algo in algos:
            algo.train(ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS))
            diff = algo.get_weights()
            algo.send_weight_diff = False
            full = algo.get_weights()
            algo.send_weight_diff = True
            metrics = algo.evaluate(ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS))
            updates.append((diff.weights, diff.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS]))
            sent.append((diff, full, metrics))
        history.append((global_weights, sent))
        global_weights = fedavg(global_weights, updates)
    yield algos, sites, history, global_weights
    for algo in algos:
        algo.finalize()


def test_sites_send_only_the_learnable_parameters_as_weights_and_as_differences(federation):
    algos, sites, history, _ = federation
    for global_weights, sent in history:
        for algo, site, (diff, full, metrics) in zip(algos, sites, sent):
            network = algo.trainer.network
            assert_nothing_else_leaves(diff, network, site, WeightType.WEIGHT_DIFF)
            assert_nothing_else_leaves(full, network, site, WeightType.WEIGHTS)
            for name, value in full.weights.items():
                torch.testing.assert_close(value, global_weights[name] + diff.weights[name])
            # evaluation sends numbers only: the validation metrics of the global model
            assert metrics.weights is None and set(metrics.metrics) >= {"val_auc", "val_accuracy"}
            for path, value in leaves(metrics):
                if path[-1] != "<key>":
                    assert value is None or isinstance(value, numbers.Real), (path, value)
    # the sites trained on different data: their updates differ, and training moved the weights
    _, sent = history[-1]
    first, second = sent[0][0].weights, sent[1][0].weights
    assert any(not torch.equal(first[n], second[n]) for n in first)
    assert any(bool(first[n].abs().sum() > 0) for n in first)


def test_the_aggregated_model_loads_back_into_each_site(federation):
    algos, _, _, global_weights = federation
    for algo in algos:
        # the evaluator's network takes the global weights (MonaiAlgo's own loading path) ...
        algo.evaluate(ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS))
        network = algo.evaluator.network
        for name, value in learnable_state_dict(network).items():
            torch.testing.assert_close(value, global_weights[name])
        # ... and the site's full checkpoint format (class names, backbone digest) loads strictly
        state = network.state_dict()
        state.update(global_weights)
        network.load_state_dict(state, strict=True)


def test_a_site_refuses_global_weights_that_are_not_its_learnable_parameters(federation):
    algos, _, _, global_weights = federation
    algo = algos[0]
    state = algo.trainer.network.state_dict()  # adds the class names and the backbone digest
    with pytest.raises(ValueError, match="not learnable here: .*backbone_sha256"):
        algo.train(ExchangeObject(weights=state, weight_type=WeightType.WEIGHTS))
    partial = dict(list(global_weights.items())[1:])
    with pytest.raises(ValueError, match="missing"):
        algo.evaluate(ExchangeObject(weights=partial, weight_type=WeightType.WEIGHTS))


# -- NVIDIA FLARE ----------------------------------------------------------------------------------------------------


def test_the_documented_command_runs_fedavg_over_two_sites_in_nvflares_simulator(tmp_path, capsys):
    """``fpt-monai fl_job`` (the docs' command) on the tiny preset: 2 sites x 2 rounds in FLARE's simulator, each
    site one process on its own bundle root, data and cache; the server holds only the learnable parameters."""
    import json

    from fpt_monai.cli import main
    from fpt_monai.data import SAMPLE_CLASSES
    from fpt_monai.presets import create_fpt

    weights, sites = make_sites(tmp_path, 2)
    tiny = {k: v for k, v in TINY.items() if k != "num_epochs"}  # the job sets rounds x local epochs
    argv = ["fl_job", "--sites", ",".join(s["bundle_root"] for s in sites), "--num_rounds", "2"]
    argv += ["--work_dir", str(tmp_path / "job"), "--pretrained", str(weights)]
    argv += [f"--{key}={value}" for key, value in tiny.items()]
    main(argv)
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.rindex('{\n  "run"') :])
    run_dir = Path(result["run"])
    server = run_dir / "server" / "simulate_job" / "app_server"
    assert result["global_model"] == str(server / "FL_global_model.pt") and result["sites"] == ["site-1", "site-2"]
    global_model = torch.load(server / "FL_global_model.pt", map_location="cpu", weights_only=True)["model"]
    initial = torch.load(tmp_path / "job" / "fpt_initial_learnable.pt", map_location="cpu", weights_only=True)

    network = create_fpt(
        "fpt_tiny",
        num_classes=3,
        class_names=list(SAMPLE_CLASSES),
        pretrained=str(weights),
        img_size=64,
        side_img_size=32,
    )
    assert list(global_model) == learnable_names(network) == list(initial)
    assert any(not torch.equal(global_model[n], initial[n]) for n in initial)  # two rounds moved it
    state = network.state_dict()
    state.update(global_model)
    network.load_state_dict(state, strict=True)  # the global model loads into a site's network
    for site in sites:  # each site kept its checkpoints and its cache at home
        root = Path(site["bundle_root"])
        assert (root / "models" / "model_final.pt").is_file() and any((root / "cache").iterdir())
    # what the job carried: the initial learnable weights to the server, the script and its overrides to each site
    assert sorted(p.name for p in (server / "custom").iterdir()) == ["fpt_initial_learnable.pt"]
    for index in (1, 2):
        custom = run_dir / f"site-{index}" / "simulate_job" / f"app_site-{index}" / "custom"
        assert sorted(p.name for p in custom.iterdir()) == ["fpt_fl_client.py", f"site-{index}.json"]


def test_the_job_exports_for_a_real_deployment_with_each_sites_files_in_its_app(tmp_path, capsys):
    """``fpt-monai fl_job --export_dir``: the job folder ``nvflare job submit`` takes; the package is not copied in
    (sites run the fpt_monai they installed), each site's overrides go to that site only."""
    import json

    from fpt_monai.cli import main

    argv = ["fl_job", "--sites", f"{tmp_path}/a,{tmp_path}/b", "--dataset_dirs", "/data/a,/data/b"]
    argv += ["--work_dir", str(tmp_path / "job"), "--export_dir", str(tmp_path / "export"), "--pretrained", "False"]
    argv += ["--preset", "fpt_tiny", "--network_def#img_size", "64", "--network_def#side_img_size", "32"]
    main(argv)
    printed = capsys.readouterr().out
    job = Path(json.loads(printed[printed.rindex('{\n  "job"') :])["job"])
    files = sorted(str(p.relative_to(job)) for p in job.rglob("*") if p.is_file())
    assert not any("fpt_monai" in f for f in files), files
    assert "app_server/custom/fpt_initial_learnable.pt" in files
    for site, other, data in (("site-1", "site-2", "/data/a"), ("site-2", "site-1", "/data/b")):
        app = job / f"app_{site}"
        assert sorted(p.name for p in (app / "custom").iterdir()) == ["fpt_fl_client.py", f"{site}.json"]
        assert json.loads((app / "custom" / f"{site}.json").read_text())["dataset_dir"] == data
        client = (app / "config" / "config_fed_client.json").read_text()
        assert f"{site}.json" in client and f"{other}.json" not in client
        assert '"python3",' in client  # the sites' interpreter, not this machine's
