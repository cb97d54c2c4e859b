"""Images to classify from a real archive: the readable ones are kept, every unreadable one is named with its
reason (log and report file), and a folder where nothing is readable is a clear error."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from fpt_monai.data import DatalistError, image_datalist, readable_datalist


def _png(path: Path, size=(48, 40)) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _unknown_codec_dicom(path: Path) -> Path:
    """A DICOM whose transfer syntax (High-Throughput JPEG 2000) neither pydicom nor GDCM decodes here."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
    ds.PixelData = encapsulate([bytes(range(256)) * 4])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path)
    return path


@pytest.fixture
def archive(tmp_path):
    """A folder of images to classify: three readable, one of each kind of unreadable file."""
    root = tmp_path / "input"
    (root / "ward").mkdir(parents=True)
    good = [_png(root / "a_good.png"), root / "ward" / "b_good.dcm", _png(root / "ward" / "c_good.png", (64, 64))]
    good[1].write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (root / "notes.png").write_text("this is a text file, not an image")
    raw = good[0].read_bytes()
    (root / "cut.png").write_bytes(raw[: len(raw) // 2])
    (root / "empty.jpg").write_bytes(b"")
    _unknown_codec_dicom(root / "htj2k.dcm")
    _png(root / "tiny.png", (1, 1))
    os.symlink(root / "deleted.png", root / "ward" / "link.png")
    reasons = {
        "notes.png": "unreadable image: not a readable image",
        "cut.png": "unreadable image",
        "empty.jpg": "file is empty (0 bytes)",
        "htj2k.dcm": "cannot decode the DICOM pixel data (transfer syntax High-Throughput JPEG 2000",
        "tiny.png": "image is 1x1 pixels, smaller than the minimum 32 (min_size)",
        "link.png": f"broken symbolic link: its target {root / 'deleted.png'} does not exist",
    }
    return root, [str(p.absolute()) for p in good], reasons


def test_every_readable_image_is_kept_and_every_other_one_named(archive, tmp_path, caplog):
    root, good, reasons = archive
    datalist = image_datalist(root)
    assert len(datalist) == 9  # the broken link is listed, for the check to name it
    report = tmp_path / "inference" / "input_check.json"
    with caplog.at_level(logging.WARNING, logger="fpt_monai.data.validation"):
        kept = readable_datalist(datalist, report_path=report)
    assert sorted(item["image"] for item in kept) == sorted(good)
    written = json.loads(report.read_text())
    assert (written["items"], written["good"], written["bad"]) == (9, 3, 6)
    named = {Path(p["image"]).name: p["problem"] for p in written["problems"]}
    assert set(named) == set(reasons)
    for name, reason in reasons.items():
        assert reason in named[name], (name, named[name])
        assert f"{name}): " in caplog.text  # every unreadable file in the log too
    assert "skipped 6 bad items of 9" in caplog.text and str(report) in caplog.text


def test_nothing_readable_is_a_clear_error(archive, tmp_path):
    root, _, reasons = archive
    bad = [item for item in image_datalist(root) if Path(item["image"]).name in reasons]
    report = tmp_path / "input_check.json"
    with pytest.raises(DatalistError, match=r"none of the 6 images can be read") as raised:
        readable_datalist(bad, report_path=report)
    message = str(raised.value)
    assert all(name in message for name in reasons) and f"report: {report}" in message
    assert json.loads(report.read_text())["good"] == 0
    with pytest.raises(DatalistError, match="the split has no items"):
        readable_datalist([])


def test_inference_settings_follow_training(archive):
    root, good, _ = archive
    items = [{"image": path} for path in good]
    # a larger minimum drops the 48x40 image; decode=False reads headers only
    assert [item["image"] for item in readable_datalist(items, min_size=41)] == good[1:]
    cut = str(root / "cut.png")
    assert readable_datalist([{"image": cut}, *items], decode=True) == items
    with pytest.raises(ValueError, match="dicom_window must be one of"):
        readable_datalist(items, reader={"dicom_window": "lung"})
