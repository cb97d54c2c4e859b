"""The offline sample dataset: deterministic, reused when unchanged, regenerated when its settings change."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from fpt_monai.data import SAMPLE_CLASSES, SampleFundusSpec, dataset_classes, make_datalist, make_sample_dataset

SMALL = dict(num_train=6, num_val=3, num_test=3, image_size=96)


def _digests(root):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_layout_classes_and_counts(tmp_path):
    root = make_sample_dataset(tmp_path / "sample", progress=False, **SMALL)
    assert dataset_classes(root) == list(SAMPLE_CLASSES)
    for split, count in (("train", 6), ("val", 3), ("test", 3)):
        items = make_datalist(root, split)
        assert len(items) == count and sorted({i["label"] for i in items}) == [0, 1, 2]
    image = np.asarray(Image.open(make_datalist(root, "train")[0]["image"]))
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8


def test_same_settings_give_the_same_images_and_reuse_the_folder(tmp_path):
    first = make_sample_dataset(tmp_path / "a", progress=False, **SMALL)
    second = make_sample_dataset(tmp_path / "b", progress=False, **SMALL)
    assert _digests(first) == _digests(second)
    stamp = (first / "sample_dataset.json").stat().st_mtime_ns
    make_sample_dataset(first, progress=False, **SMALL)
    assert (first / "sample_dataset.json").stat().st_mtime_ns == stamp


def test_changed_settings_regenerate(tmp_path):
    root = make_sample_dataset(tmp_path / "s", progress=False, **SMALL)
    before = _digests(root)
    make_sample_dataset(root, progress=False, **{**SMALL, "seed": 1})
    assert _digests(root) != before
    assert json.loads((root / "sample_dataset.json").read_text())["spec"]["seed"] == 1


def test_refuses_to_overwrite_a_folder_that_is_not_a_sample_dataset(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sample dataset"):
        make_sample_dataset(tmp_path / "mine", progress=False, **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_every_grade_has_blots_so_the_spot_count_hides_the_grade():
    """Every image has as many spots whatever its grade: lesions are replaced by blots, never added."""
    spec = SampleFundusSpec()
    assert all(high <= spec.spots_per_image[0] for _, high in spec.lesions_per_grade)
    with pytest.raises(ValueError, match="spots_per_image"):
        SampleFundusSpec(lesions_per_grade=((0, 0), (2, 4), (7, 20)))


def test_the_sample_commands_take_every_spec_field_and_refuse_unknown_ones(tmp_path, capsys):
    """`fpt-monai sample_data` / `sample_data_3d`: each spec field is a flag (lists become the spec's tuples)."""
    import fire

    from fpt_monai.cli import Commands

    Commands().sample_data(str(tmp_path / "2d"), **SMALL, lesion_sigma=[1.0, 1.2])
    assert capsys.readouterr().out.strip() == str(tmp_path / "2d")
    assert json.loads((tmp_path / "2d" / "sample_dataset.json").read_text())["spec"]["lesion_sigma"] == [1.0, 1.2]
    Commands().sample_data_3d(str(tmp_path / "3d"), num_train=3, num_val=0, num_test=0, volume_size=32)
    assert len(list((tmp_path / "3d" / "train").rglob("*.nii.gz"))) == 3
    with pytest.raises(fire.core.FireError, match="bogus.*volume_size"):  # the unknown flag, then the known ones
        Commands().sample_data_3d(str(tmp_path / "other"), bogus=1)
    with pytest.raises(fire.core.FireError, match="image_size"):
        Commands().sample_data(str(tmp_path / "other"), image_size=8)
    assert not (tmp_path / "other").exists()
