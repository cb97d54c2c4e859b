"""Reading real medical and ordinary image files: pydicom's test DICOMs, nibabel's NIfTI test data,
scikit-image's fundus and histology images. Each file must become float RGB (3, H, W) in [0, 1] with the
documented per-format intensity scaling."""

from __future__ import annotations

import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import skimage
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from fpt_monai.data import ImageReadError, LoadImageRGBd, image_format, image_size, make_fpt_dataset, read_image
from preload_setup import make_backbone

SKIMAGE_DATA = os.path.dirname(skimage.data.__file__)
NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def dicom(name: str) -> str:
    return get_testdata_file(name)


def gray_rgb(expected: np.ndarray) -> np.ndarray:
    return np.repeat(expected[None].astype(np.float32), 3, axis=0)


def dicom_linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM LINEAR VOI function (PS3.3 C.11.2.1.2.1) onto [0, 1], written out independently."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)


def assert_unit_rgb(image: np.ndarray, shape: tuple[int, int]) -> None:
    assert image.dtype == np.float32 and image.shape == (3, *shape)
    assert 0.0 <= image.min() and image.max() <= 1.0


# -- DICOM -----------------------------------------------------------------------------------------
def test_dicom_8bit_is_scaled_by_its_stored_bits():
    image = read_image(dicom("image_dfl.dcm"))  # 8-bit MONOCHROME2, deflate transfer syntax
    pixels = pydicom.dcmread(dicom("image_dfl.dcm")).pixel_array
    assert_unit_rgb(image, pixels.shape)
    np.testing.assert_allclose(image, gray_rgb(pixels / 255.0), atol=1e-6)


def test_dicom_12bit_uses_the_files_window_or_the_12_bit_range():
    path = dicom("examples_overlay.dcm")  # 12 bits stored, windows (450, 790) and (200, 443)
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
    np.testing.assert_allclose(read_image(path), gray_rgb(dicom_linear_window(pixels, 450, 790)), atol=1e-5)
    np.testing.assert_allclose(read_image(path, dicom_window="stored"), gray_rgb(pixels / 4095.0), atol=1e-6)
    np.testing.assert_allclose(
        read_image(path, dicom_window="minmax"), gray_rgb(pixels / pixels.max()), atol=1e-6
    )


def test_dicom_16bit_signed_with_window():
    path = dicom("MR_small.dcm")  # 16-bit signed, window 600/1600
    pixels = pydicom.dcmread(path).pixel_array.astype(np.float64)
    image = read_image(path)
    assert_unit_rgb(image, (64, 64))
    np.testing.assert_allclose(image, gray_rgb(dicom_linear_window(pixels, 600, 1600)), atol=1e-5)


def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path):
    ds = pydicom.dcmread(dicom("CT_small.dcm"))  # 16-bit signed CT, intercept -1024
    stored = ds.pixel_array.astype(np.float64)
    # as shipped: Hounsfield units = stored - 1024; no window, so "stored" maps the 16-bit signed range after
    # rescaling; the values (128..2191 stored) span 3% of it, so "auto" maps their own min-max (NARROW_DICOM_RANGE)
    low, high = -32768 - 1024, 32767 - 1024
    np.testing.assert_allclose(
        read_image(dicom("CT_small.dcm"), dicom_window="stored"),
        gray_rgb((stored - 1024 - low) / (high - low)), atol=1e-6,
    )
    hounsfield = stored - 1024
    np.testing.assert_allclose(
        read_image(dicom("CT_small.dcm")),
        gray_rgb((hounsfield - hounsfield.min()) / (hounsfield.max() - hounsfield.min())), atol=1e-6,
    )
    # a fixed range in Hounsfield units (a soft-tissue window given by the user)
    np.testing.assert_allclose(
        read_image(dicom("CT_small.dcm"), value_range=(-160, 240)),
        gray_rgb(np.clip((stored - 1024 + 160) / 400, 0, 1)), atol=1e-6,
    )
    # another slope/intercept and a window in the rescaled units: the window applies after the rescale
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 1500, 2000
    path = tmp_path / "ct_rescaled.dcm"
    ds.save_as(path)
    np.testing.assert_allclose(read_image(path), gray_rgb(dicom_linear_window(stored * 2 - 100, 1500, 2000)), atol=1e-5)


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dicom("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"  # low values displayed bright
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    for window in ("auto", "stored", "minmax"):
        mono2 = read_image(dicom("MR_small.dcm"), dicom_window=window)
        np.testing.assert_allclose(read_image(path, dicom_window=window), 1.0 - mono2, atol=1e-6)


def test_dicom_colour_and_palette():
    rgb = read_image(dicom("examples_rgb_color.dcm"))
    pixels = pydicom.dcmread(dicom("examples_rgb_color.dcm")).pixel_array
    np.testing.assert_allclose(rgb, np.moveaxis(pixels, -1, 0) / 255.0, atol=1e-6)
    palette = read_image(dicom("examples_palette.dcm"))  # PALETTE COLOR: through the colour lookup table
    assert_unit_rgb(palette, (350, 800))
    assert not np.allclose(palette[0], palette[1])  # really coloured, not gray


def test_multi_frame_dicom_slice_or_projection():
    path = dicom("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array / 255.0  # (2, H, W, 3)
    np.testing.assert_allclose(read_image(path, volume_slice=1), np.moveaxis(frames[1], -1, 0), atol=1e-6)
    np.testing.assert_allclose(read_image(path, volume_slice="max"), np.moveaxis(frames.max(0), -1, 0), atol=1e-6)
    with pytest.raises(ImageReadError, match="slice 5 is outside the volume's 2 slices"):
        read_image(path, volume_slice=5)


def test_dicom_without_suffix_is_recognised_by_its_magic(tmp_path):
    path = tmp_path / "IM000001"
    shutil.copy(dicom("MR_small.dcm"), path)
    assert image_format(path) == "dicom"
    np.testing.assert_array_equal(read_image(path), read_image(dicom("MR_small.dcm")))
    assert image_size(path) == (64, 64)


def test_dicom_errors_name_the_file():
    with pytest.raises(ImageReadError, match="rtplan.dcm: DICOM file without pixel data"):
        read_image(dicom("rtplan.dcm"))
    with pytest.raises(ImageReadError, match="MR_truncated.dcm: cannot decode the DICOM pixel data"):
        read_image(dicom("MR_truncated.dcm"))


# -- NIfTI -----------------------------------------------------------------------------------------
def test_nifti_3d_slice_and_projections():
    path = os.path.join(NIBABEL_DATA, "anatomical.nii")  # (33, 41, 25) int16
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float64)

    def unit(plane):
        return gray_rgb(((plane - plane.min()) / (plane.max() - plane.min())).T)

    np.testing.assert_allclose(read_image(path), unit(volume[:, :, 12]), atol=1e-6)  # middle of axis 2
    np.testing.assert_allclose(read_image(path, volume_slice=3, volume_axis=0), unit(volume[3]), atol=1e-6)
    np.testing.assert_allclose(read_image(path, volume_slice="max"), unit(volume.max(2)), atol=1e-6)
    np.testing.assert_allclose(read_image(path, volume_slice="mean", volume_axis=1), unit(volume.mean(1)), atol=1e-5)
    assert image_size(path) == (41, 33) and image_size(path, volume_axis=0) == (25, 41)
    with pytest.raises(ImageReadError, match="anatomical.nii: slice 40 is outside the volume's 25 slices"):
        read_image(path, volume_slice=40)
    with pytest.raises(ImageReadError, match="functional.nii: a 4D NIfTI image"):
        read_image(os.path.join(NIBABEL_DATA, "functional.nii"))


def test_nifti_2d_reads_like_the_png_it_was_made_from(tmp_path):
    photo = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "microaneurysms.png")))  # fundus detail, gray
    for name, data in (("flat.nii.gz", photo.T), ("slab.nii", photo.T[:, :, None])):  # (x, y) and (x, y, 1)
        path = tmp_path / name
        nib.save(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), path)
        expected = (photo - photo.min()) / (photo.max() - photo.min())  # NIfTI: per-image min-max
        np.testing.assert_allclose(read_image(path), gray_rgb(expected), atol=1e-6)
        assert image_size(path) == photo.shape


# -- PNG / JPEG / TIFF -------------------------------------------------------------------------------
def test_png_8_and_16_bit(tmp_path):
    camera = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "camera.png")))
    np.testing.assert_allclose(read_image(os.path.join(SKIMAGE_DATA, "camera.png")), gray_rgb(camera / 255.0), atol=1e-6)
    path16 = tmp_path / "camera16.png"
    Image.fromarray(camera.astype(np.uint16) * 257).save(path16)  # full 16-bit range
    assert Image.open(path16).mode == "I;16"
    np.testing.assert_allclose(read_image(path16), gray_rgb(camera / 255.0), atol=1e-6)
    # a 12-bit detector image stored in a 16-bit PNG: the full type range makes it dark, value_range fixes it
    path12 = tmp_path / "xray12.png"
    Image.fromarray((camera.astype(np.uint16) * 16)).save(path12)
    assert read_image(path12).max() < 0.07
    np.testing.assert_allclose(read_image(path12, value_range=(0, 4095)), gray_rgb(camera.astype(np.float64) * 16 / 4095.0), atol=1e-6)


def test_fundus_jpeg_and_non_square_orientation():
    path = os.path.join(SKIMAGE_DATA, "retina.jpg")  # a real fundus photograph
    image = read_image(path)
    assert_unit_rgb(image, (1411, 1411))
    np.testing.assert_allclose(image, np.moveaxis(np.asarray(Image.open(path)), -1, 0) / 255.0, atol=1e-6)
    chelsea = os.path.join(SKIMAGE_DATA, "chelsea.png")  # 300 rows x 451 columns: rows first, never transposed
    assert read_image(chelsea).shape == (3, 300, 451) and image_size(chelsea) == (300, 451)


def test_histology_rgba_and_gray_alpha_drop_alpha(tmp_path):
    ihc = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "ihc.png")))  # immunohistochemistry slide
    expected = np.moveaxis(ihc, -1, 0) / 255.0
    np.testing.assert_allclose(read_image(os.path.join(SKIMAGE_DATA, "ihc.png")), expected, atol=1e-6)
    rgba = tmp_path / "ihc_rgba.png"
    Image.fromarray(np.dstack([ihc, np.full(ihc.shape[:2], 7, np.uint8)])).save(rgba)
    np.testing.assert_allclose(read_image(rgba), expected, atol=1e-6)
    gray_alpha = tmp_path / "gray_alpha.png"
    Image.fromarray(np.dstack([ihc[..., 0], ihc[..., 1]]), mode="LA").save(gray_alpha)
    np.testing.assert_allclose(read_image(gray_alpha), gray_rgb(ihc[..., 0] / 255.0), atol=1e-6)
    palette = tmp_path / "palette.png"
    Image.fromarray(ihc).convert("P").save(palette)
    np.testing.assert_allclose(read_image(palette), np.moveaxis(np.asarray(Image.open(palette).convert("RGB")), -1, 0) / 255.0)


def test_tiff_8_16_bit_multipage_and_float(tmp_path):
    ihc = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "ihc.png")))
    path = tmp_path / "ihc.tif"
    Image.fromarray(ihc).save(path)
    np.testing.assert_allclose(read_image(path), np.moveaxis(ihc, -1, 0) / 255.0, atol=1e-6)
    gray16 = (ihc[..., 1].astype(np.uint16) * 257)
    path16 = tmp_path / "gray16.tif"
    Image.fromarray(gray16).save(path16)
    np.testing.assert_allclose(read_image(path16), gray_rgb(gray16 / 65535.0), atol=1e-6)
    multipage = os.path.join(SKIMAGE_DATA, "multipage.tif")  # 2 pages: the first one
    with Image.open(multipage) as tiff:
        first = np.asarray(tiff)
    np.testing.assert_allclose(read_image(multipage), gray_rgb(first / 255.0), atol=1e-6)
    planar = read_image(os.path.join(SKIMAGE_DATA, "multipage_rgb.tif"))  # float64, planar: Pillow cannot
    assert_unit_rgb(planar, (10, 10))
    assert planar.min() == 0.0 and planar.max() == 1.0  # float images: their own min-max


def test_damaged_and_foreign_files_are_named(tmp_path):
    png = tmp_path / "cut.png"
    raw = open(os.path.join(SKIMAGE_DATA, "camera.png"), "rb").read()
    png.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageReadError, match="cut.png: damaged or unsupported image"):
        read_image(png)
    with pytest.raises(ImageReadError, match="cut.png: not a readable image"):
        image_size(png)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png: not an image file"):
        read_image(text)
    with pytest.raises(ImageReadError, match="nothing.png: file not found"):
        read_image(tmp_path / "nothing.png")


def test_invalid_reader_options_are_refused():
    with pytest.raises(ValueError, match="dicom_window must be one of"):
        LoadImageRGBd("image", dicom_window="lung")
    with pytest.raises(ValueError, match="volume_slice must be a slice index or one of"):
        LoadImageRGBd("image", volume_slice="median")
    with pytest.raises(ValueError, match="value_range must be"):
        LoadImageRGBd("image", value_range=(5, 1))


# -- through the FPT pipeline -------------------------------------------------------------------------
def test_every_format_goes_through_the_fpt_pipeline_and_reader_options_change_the_cache(tmp_path):
    camera = np.asarray(Image.open(os.path.join(SKIMAGE_DATA, "camera.png")))
    Image.fromarray(camera.astype(np.uint16) * 257).save(tmp_path / "c16.png")
    datalist = [
        {"image": dicom("CT_small.dcm"), "label": 0},
        {"image": os.path.join(NIBABEL_DATA, "anatomical.nii"), "label": 1},
        {"image": str(tmp_path / "c16.png"), "label": 0},
        {"image": os.path.join(SKIMAGE_DATA, "microaneurysms.png"), "label": 1},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online = make_fpt_dataset(datalist, 64, 32, [0.5] * 3, [0.5] * 3, train=True)  # no backbone: both views
        for index in range(len(datalist)):
            item = online[index]
            assert item["high_res"].shape == (3, 64, 64) and item["image"].shape == (3, 32, 32)
            assert torch.isfinite(item["high_res"]).all() and torch.isfinite(item["image"]).all()
    backbone = make_backbone()
    caches = [
        make_fpt_dataset(datalist, 64, 32, [0.5] * 3, [0.5] * 3, train=True, backbone=backbone,
                         cache_dir=tmp_path / "cache", progress=False, reader=reader).cache_dir
        for reader in (None, {"volume_slice": "max"}, {"dicom_window": "minmax"}, {"value_range": (0, 10)})
    ]
    assert len(set(caches)) == 4  # reader options are part of the cache identity
