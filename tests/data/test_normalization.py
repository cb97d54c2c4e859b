"""Normalisation like the FPT authors: the train split's own per-channel statistics, computed once and recorded."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.transforms import NormalizeIntensityd
from PIL import Image

from fpt_monai.data import InputNormalization, dataset_statistics
from fpt_monai.data.normalization import NORMALIZATION_KEY
from fpt_monai.preload.fingerprint import cache_fingerprint


@pytest.fixture
def train_split(tmp_path):
    rng = np.random.default_rng(0)
    arrays, items = [], []
    for i in range(4):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        pixels[..., 0] //= 2  # channels with different statistics
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        arrays.append(pixels.astype(np.float64) / 255)
        items.append({"image": str(tmp_path / f"{i}.png"), "label": i % 2})
    return items, np.stack(arrays)


def test_dataset_statistics_reproduce_a_hand_computed_mean_and_std(train_split, tmp_path):
    items, pixels = train_split
    mean, std = dataset_statistics(items, 32, cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), atol=1e-3)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), atol=1e-3)
    assert mean[0] < mean[1] - 0.1
    # computed once: a second call reads the saved statistics
    saved = list((tmp_path / "cache" / "normalization").glob("*.json"))
    assert len(saved) == 1
    saved[0].write_text(saved[0].read_text().replace(str(mean[0]), "0.123"))
    assert dataset_statistics(items, 32, cache_dir=tmp_path / "cache")[0][0] == 0.123
    # another input size is other statistics
    assert dataset_statistics(items, 16, cache_dir=tmp_path / "cache")[0][0] != 0.123


def test_dataset_normalisation_is_logged_fingerprinted_and_recorded_in_the_checkpoint(train_split, tmp_path, caplog):
    items, pixels = train_split
    network = nn.Linear(3, 2)
    with caplog.at_level(logging.INFO, logger="fpt_monai.data.normalization"):
        norm = InputNormalization("dataset", "dataset", items, 32, cache_dir=tmp_path, network=network)
    assert "input normalisation: mean" in caplog.text and "train split's statistics (4 images" in caplog.text
    np.testing.assert_allclose(norm.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-3)
    # the cache fingerprint follows the statistics (they are the normalisation transform's parameters)
    backbone = nn.Linear(1, 1)

    def fingerprint(mean, std):
        transform = NormalizeIntensityd("high_res", subtrahend=mean, divisor=std, channel_wise=True)
        return cache_fingerprint(backbone, [transform], torch.float16)[0]

    assert fingerprint(norm.mean, norm.std) != fingerprint([0.5] * 3, [0.5] * 3)
    # the checkpoint records them
    state = network.state_dict()
    np.testing.assert_allclose(state[NORMALIZATION_KEY].numpy(), [norm.mean, norm.std], rtol=1e-6)
    torch.save(state, tmp_path / "model.pt")
    # evaluation reads them back from the checkpoint; a network normalised otherwise refuses it
    again = InputNormalization("dataset", "dataset", checkpoint=tmp_path / "model.pt", network=nn.Linear(3, 2))
    assert again.mean == pytest.approx(norm.mean, abs=1e-6)
    other = nn.Linear(3, 2)
    InputNormalization([0.5] * 3, [0.25] * 3, network=other)
    assert NORMALIZATION_KEY not in other.state_dict()  # the default records nothing: checkpoints stay as they were
    with pytest.raises(ValueError, match="normalised with mean/std .*--mean dataset --std dataset"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="records no dataset statistics"):
        torch.save(other.state_dict(), tmp_path / "plain.pt")
        InputNormalization("dataset", "dataset", checkpoint=tmp_path / "plain.pt")


def test_mean_and_std_values_are_checked():
    with pytest.raises(ValueError, match="mean must be a list of per-channel values or 'dataset', got 'datset'"):
        InputNormalization("datset", [0.5] * 3)
    with pytest.raises(ValueError, match="need the train split"):
        InputNormalization("dataset", "dataset")
    assert InputNormalization([0.1, 0.2, 0.3], (0.5, 0.5, 0.5)).std == [0.5, 0.5, 0.5]
