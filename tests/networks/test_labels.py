"""Class names bound to a network: saved in its state dict, checked on load, mapped by name only on request."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from conftest import make_tiny_timm_vit
from fpt_monai.networks import (
    ClassNamesMismatchError,
    FPTNet,
    TimmViTBackbone,
    UncheckedClassNamesWarning,
    bind_class_names,
    class_names_of,
)
from fpt_monai.networks.labels import CLASS_NAMES_KEY, set_class_mapping

NAMES = ["normal", "benign", "malignant"]


_BACKBONE = []


def tiny_fpt(class_names=None):
    """A tiny FPTNet; every one shares the same frozen backbone (as a checkpoint and its network do)."""
    if not _BACKBONE:
        _BACKBONE.append(TimmViTBackbone(make_tiny_timm_vit(img_size=32, depth=2), token_ratio=0.5))
    torch.manual_seed(0)
    return FPTNet(_BACKBONE[0], num_classes=3, side_img_size=16, class_names=class_names).eval()


@pytest.fixture
def trained_state():
    return tiny_fpt(NAMES).state_dict()


def test_the_state_dict_carries_the_class_names_in_order(trained_state):
    assert CLASS_NAMES_KEY in trained_state and trained_state[CLASS_NAMES_KEY].dtype == torch.uint8
    assert class_names_of(trained_state) == NAMES
    assert class_names_of({"model": trained_state, "optimizer": {}}) == NAMES  # a resume checkpoint
    loaded = tiny_fpt(NAMES)
    loaded.load_state_dict(trained_state)  # strict
    assert class_names_of(loaded) == NAMES


@pytest.mark.parametrize(
    "names, hint",
    [(["benign", "normal", "malignant"], "another order"), (["cat", "dog", "bird"], "other names")],
    ids=["reordered", "other"],
)
def test_other_or_reordered_names_are_refused_showing_both_lists(trained_state, names, hint):
    network = tiny_fpt(names)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(ClassNamesMismatchError, match=hint) as error:
        network.load_state_dict(trained_state)
    assert str(NAMES) in str(error.value) and str(names) in str(error.value)
    for key, value in network.state_dict().items():  # refused before any weight was copied
        torch.testing.assert_close(value, before[key])


def test_mapping_by_name_reorders_the_outputs_to_the_networks_order():
    trained = tiny_fpt(NAMES)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained(images)
    reordered = ["malignant", "normal", "benign"]
    network = tiny_fpt(reordered)
    set_class_mapping(network, "by_name")
    network.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(network(images), expected[:, [2, 0, 1]])
    assert class_names_of(network) == reordered  # what the outputs are
    assert class_names_of(network.state_dict()) == NAMES  # what the weights are: saved again, nothing is lost
    other = tiny_fpt(["a", "b", "c"])
    set_class_mapping(other, "by_name")
    with pytest.raises(ClassNamesMismatchError):  # other names stay refused
        other.load_state_dict(trained.state_dict())
    with pytest.raises(ValueError, match="class_mapping"):
        set_class_mapping(network, "by_index")


def test_a_checkpoint_without_class_names_loads_with_exactly_one_warning(trained_state):
    old = {k: v for k, v in trained_state.items() if k != CLASS_NAMES_KEY}
    network = tiny_fpt(NAMES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        network.load_state_dict(old)  # strict
    unchecked = [w for w in caught if issubclass(w.category, UncheckedClassNamesWarning)]
    assert len(unchecked) == 1 and "cannot be checked" in str(unchecked[0].message)
    assert str(NAMES) in str(unchecked[0].message)
    assert class_names_of(network) == NAMES


def test_a_network_built_without_names_takes_the_checkpoints(trained_state):
    network = tiny_fpt()
    assert class_names_of(network) is None and CLASS_NAMES_KEY not in network.state_dict()
    network.load_state_dict(trained_state)
    assert class_names_of(network) == NAMES


def test_any_module_can_carry_class_names():
    network = bind_class_names(nn.Linear(4, 2), ["no", "yes"])
    state = network.state_dict()
    assert class_names_of(state) == ["no", "yes"]
    other = bind_class_names(nn.Linear(4, 2), ["yes", "no"])
    with pytest.raises(ClassNamesMismatchError):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="distinct"):
        bind_class_names(nn.Linear(4, 2), ["a", "a"])
