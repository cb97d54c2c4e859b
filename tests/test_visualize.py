"""Selection-map overlays, confusion-matrix pictures and PNG names (fpt_monai.visualize)."""

from __future__ import annotations

import numpy as np
import torch

from fpt_monai.engine import confusion_matrix
from fpt_monai.visualize import confusion_matrix_image, selection_overlay, unique_png_names


def test_overlay_paints_only_the_selected_patches_one_cell_per_patch():
    image = torch.rand(3, 8, 8)
    selection = torch.zeros(2, 2)
    selection[0, 1] = 1.0
    selection[1, 0] = 0.5
    overlay = selection_overlay(image, selection).astype(int)
    plain = selection_overlay(image, torch.zeros(2, 2)).astype(int)
    assert overlay.shape == (8, 8, 3) and overlay.dtype == int
    assert np.array_equal(overlay[:4, :4], plain[:4, :4]) and np.array_equal(overlay[4:, 4:], plain[4:, 4:])
    assert (overlay[:4, 4:, 0] >= plain[:4, 4:, 0]).all() and not np.array_equal(overlay[:4, 4:], plain[:4, 4:])
    assert not np.array_equal(overlay[4:, :4], plain[4:, :4])


def test_confusion_matrix_counts_and_picture():
    counts = confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    picture = confusion_matrix_image(counts, ["a", "b", "c"])
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.dtype == np.uint8 and picture.min() < 100


def test_png_names_are_unique_and_readable(tmp_path):
    files = [tmp_path / "a" / "scan.png", tmp_path / "b" / "scan.png", tmp_path / "other.jpg", tmp_path / "x.nii.gz"]
    names = unique_png_names(files)
    assert names[str(files[2])] == "other.png" and names[str(files[3])] == "x.png"
    assert names[str(files[0])] != names[str(files[1])] and names[str(files[0])].startswith("scan-")
    assert unique_png_names(reversed(files)) == names  # independent of the order
