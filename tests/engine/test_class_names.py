"""The bundle's loading and reporting use the class names a checkpoint carries."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine

from fpt_monai.engine import ClassificationReport, evaluate_checkpoints, load_weights
from fpt_monai.networks import ClassNamesMismatchError, UncheckedClassNamesWarning, bind_class_names, class_names_of
from fpt_monai.networks.labels import CLASS_NAMES_KEY

NAMES = ["normal", "benign", "malignant"]


def network(names=None):
    torch.manual_seed(0)
    return bind_class_names(nn.Linear(4, 3), names)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(network(NAMES).state_dict(), path)
    return path


@pytest.mark.parametrize("names", [["benign", "normal", "malignant"], ["a", "b", "c"]], ids=["reordered", "other"])
def test_load_weights_refuses_other_class_names_naming_the_file_and_both_lists(checkpoint, names):
    with pytest.raises(ClassNamesMismatchError) as error:
        load_weights(network(names), checkpoint)
    message = str(error.value)
    assert str(checkpoint) in message and str(NAMES) in message and str(names) in message


def test_load_weights_maps_by_name_only_when_asked(checkpoint):
    reordered = ["malignant", "normal", "benign"]
    net = load_weights(network(reordered), checkpoint, class_mapping="by_name")
    x = torch.rand(2, 4)
    trained = network(NAMES)
    trained.load_state_dict(torch.load(checkpoint, weights_only=True))
    torch.testing.assert_close(net(x), trained(x)[:, [2, 0, 1]])
    with pytest.raises(ValueError, match="class_mapping"):
        load_weights(network(reordered), checkpoint, class_mapping="by_position")


def test_an_old_checkpoint_loads_with_one_warning(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in network(NAMES).state_dict().items() if k != CLASS_NAMES_KEY}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = load_weights(network(NAMES), path)
    assert len([w for w in caught if issubclass(w.category, UncheckedClassNamesWarning)]) == 1
    assert class_names_of(net) == NAMES


def run_report(report, probabilities):
    engine = Engine(lambda e, b: b)
    report.attach(engine)
    batch = [{"pred": p, "filename": f"{i}.png"} for i, p in enumerate(probabilities)]
    engine.run([batch], max_epochs=1)


def test_predictions_csv_uses_the_checkpoints_class_names(checkpoint, tmp_path):
    net = load_weights(network(), checkpoint)  # a network built without names takes the checkpoint's
    report = ClassificationReport(tmp_path / "out", network=net)
    run_report(report, torch.tensor([[0.1, 0.7, 0.2]]))
    with open(tmp_path / "out" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["prediction"] == "benign"
    assert [k for k in rows[0] if k.startswith("probability_")] == [f"probability_{c}" for c in NAMES]
    mismatched = ClassificationReport(tmp_path / "other", class_names=["a", "b", "c"], network=net)
    with pytest.raises(ValueError, match="differ"):
        run_report(mismatched, torch.tensor([[0.1, 0.7, 0.2]]))


def test_evaluate_checkpoints_refuses_a_checkpoint_of_reordered_classes(checkpoint, tmp_path):
    reordered = ["benign", "normal", "malignant"]
    report = ClassificationReport(tmp_path / "out", class_names=reordered)
    with pytest.raises(ClassNamesMismatchError, match="another order"):
        evaluate_checkpoints(Engine(lambda e, b: b), network(reordered), {"best": checkpoint}, report, tmp_path)
    assert not (tmp_path / "best").exists()
