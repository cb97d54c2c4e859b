"""Memory bounded before decoding (``max_pixels`` from the header) and truncated DICOM files named as truncated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from fpt_monai.data import DEFAULT_MAX_PIXELS, ImageReadError, LoadImageRGBd, RGBImageReader, validate_datalist
from image_helpers import huge_png


def test_an_image_above_max_pixels_is_refused_from_its_header_naming_the_file_and_the_setting(tmp_path):
    path = huge_png(tmp_path / "huge.png")
    assert path.stat().st_size < 1_000_000 and DEFAULT_MAX_PIXELS == 50_000_000
    with pytest.raises(ImageReadError) as refused:
        RGBImageReader().read(path)  # the default limit; decoding would take gigabytes
    message = str(refused.value)
    assert message.startswith(f"{path}: the image is 12000x12000 = 144.0 million pixels, more than max_pixels = ")
    assert "--image_reader#max_pixels" in message
    with pytest.raises(ImageReadError, match="more than max_pixels = 1000"):
        LoadImageRGBd("image", max_pixels=1000)({"image": str(huge_png(tmp_path / "small.png", 40, 40))})
    assert LoadImageRGBd("image", max_pixels=1600)({"image": str(tmp_path / "small.png")})["image"].shape == (3, 40, 40)


@pytest.mark.parametrize("max_pixels", [0, -5, 1.5, True, "many"])
def test_max_pixels_must_be_a_positive_integer_or_none(max_pixels):
    with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
        RGBImageReader(max_pixels=max_pixels)
    assert RGBImageReader(max_pixels=None).max_pixels is None


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"])
def test_dicom_files_above_max_pixels_are_refused_before_decoding(name):
    with pytest.raises(ImageReadError, match=r"the image is \d+x\d+ = \d+\.\d million pixels, more than max_pixels = 100"):
        RGBImageReader(max_pixels=100).read(get_testdata_file(name))


def test_the_data_check_names_an_image_above_max_pixels_with_or_without_decoding(tmp_path):
    images = []
    for i in range(2):  # two distinct, non-constant small images: the check keeps them
        pixels = (np.arange(48 * 48).reshape(48, 48) % 200 + 20 * i).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        images.append({"image": str(tmp_path / f"{i}.png"), "label": 0})
    images.append({"image": str(huge_png(tmp_path / "huge.png")), "label": 0})
    for decode in (True, False):
        kept = validate_datalist(images, ["one"], on_error="skip", decode=decode)
        assert kept == images[:2]
    with pytest.raises(ValueError, match=r"huge.png\): image too large: the image is 12000x12000"):
        validate_datalist(images, ["one"], decode=False)


# -- truncated DICOM ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, keep",
    [("SC_rgb_jpeg_dcmtk.dcm", 0.9), ("MR_small_RLE.dcm", 0.5), ("JPEG2000.dcm", 0.95),
     ("CT_small.dcm", 0.8)],
)
def test_a_truncated_dicom_is_reported_as_truncated_by_the_reader_and_the_data_check(tmp_path, name, keep):
    raw = Path(get_testdata_file(name)).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ImageReadError) as refused:
        RGBImageReader().read(cut)
    assert str(refused.value).startswith(f"{cut}: ") and "the file is truncated" in str(refused.value)
    assert "cut short in a copy, a download or an export" in str(refused.value)
    assert "without pixel data (no image)" not in str(refused.value)
    items = [{"image": str(cut), "label": 0}, {"image": str(huge_png(tmp_path / "ok.png", 40, 40)), "label": 0}]
    with pytest.raises(ValueError) as reported:
        validate_datalist(items, ["one"])
    assert "the file is truncated" in str(reported.value)


def test_a_whole_dicom_without_an_image_is_still_named_as_such():
    with pytest.raises(ImageReadError, match="rtplan.dcm: DICOM file without pixel data"):
        RGBImageReader().read(get_testdata_file("rtplan.dcm"))
    assert RGBImageReader().read(get_testdata_file("MR_small_RLE.dcm")).shape == (3, 64, 64)


def test_huge_png_is_a_valid_png(tmp_path):
    with Image.open(huge_png(tmp_path / "x.png", 50, 60)) as image:
        assert image.size == (60, 50) and np.asarray(image).max() == 128
