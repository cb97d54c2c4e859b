"""The 2D reading stack: :class:`RGBImageReader` inside MONAI's ``LoadImaged``, and DICOM of every transfer syntax
pydicom ships a test file of (JPEG-LS, JPEG 2000, JPEG baseline and 12-bit extended, RLE, big endian, no File
Meta), plus JPEG Lossless (process 14) files made here with ITK's GDCM. Each must give the pixels of an
uncompressed copy of the same image, through the same intensity scaling."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import itk
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGLossless, JPEGLosslessSV1

from fpt_monai.data import ImageReadError, LoadImageRGBd, RGBImageReader, read_image, validate_datalist
from fpt_monai.preload.fingerprint import describe

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"  # High-Throughput JPEG 2000: decoded by neither pydicom nor GDCM here


def dicom(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom does not ship {name} locally"
    return path


def read(path, **options) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decoders' notes about 12-bit JPEG and the like
        return read_image(path, **options)


def gdcm_jpeg_lossless_frame(pixels: np.ndarray, scratch: Path) -> bytes:
    """One 2D frame JPEG Lossless (process 14, selection value 1) compressed by ITK's GDCM."""
    image_io = itk.GDCMImageIO.New()
    image_io.SetCompressionType(itk.GDCMImageIOEnums.Compression_JPEG)
    itk.imwrite(itk.image_from_array(np.ascontiguousarray(pixels)), str(scratch), imageio=image_io, compression=True)
    encoded = pydicom.dcmread(scratch)
    assert encoded.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    return next(generate_frames(encoded.PixelData, number_of_frames=1))


def jpeg_lossless(ds: pydicom.Dataset, path: Path, syntax: str = JPEGLosslessSV1) -> Path:
    """A copy of ``ds`` (every tag kept) whose stored pixels are JPEG Lossless (process 14) compressed by GDCM."""
    frames = ds.pixel_array if int(ds.get("NumberOfFrames", 1)) > 1 else [ds.pixel_array]
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = syntax
    out.PixelData = encapsulate([gdcm_jpeg_lossless_frame(frame, path.with_name("gdcm.dcm")) for frame in frames])
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    out.save_as(path)
    return path


def without_file_meta(source: str, path: Path, implicit_vr: bool, little_endian: bool) -> Path:
    """The data set of ``source`` written without preamble and File Meta header (no transfer syntax)."""
    ds = pydicom.dcmread(source)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=implicit_vr, little_endian=little_endian)
    assert "TransferSyntaxUID" not in pydicom.dcmread(path, force=True).file_meta
    return path


# -- the reader inside MONAI's loaders ----------------------------------------------------------------
def test_reader_plugs_into_load_imaged_by_instance_and_by_name():
    path = dicom("CT_small.dcm")
    expected = read(path, dicom_window="minmax")
    for reader in (RGBImageReader(dicom_window="minmax"), "fpt_monai.data.RGBImageReader"):
        options = {"dicom_window": "minmax"} if isinstance(reader, str) else {}
        image = LoadImaged("image", reader=reader, **options)({"image": path})["image"]
        assert isinstance(image, MetaTensor) and image.meta["filename_or_obj"] == path
        np.testing.assert_array_equal(image.numpy(), expected)
    assert RGBImageReader().verify_suffix(path) and RGBImageReader().verify_suffix("x.nii.gz")
    assert not RGBImageReader().verify_suffix("volume.mha") and not RGBImageReader().verify_suffix(["a.png", "b.png"])


def test_load_image_rgbd_reports_the_readers_own_error(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    load = LoadImageRGBd("image", dicom_window="stored")
    assert load.reader.dicom_window == "stored"
    # the cache fingerprint describes this reader and its options, not the other readers MONAI has installed
    description = json.dumps(describe(load))
    assert '"dicom_window": "stored"' in description and "PILReader" not in description
    # a bare LoadImage would hand the file to its other readers after a failure and lose the reason
    with pytest.raises(ImageReadError, match="notes.png: not an image file"):
        load({"image": str(tmp_path / "notes.png")})
    with pytest.raises(ImageReadError, match="item key 'image': expected an image file path, got int"):
        load({"image": 3})
    image = load({"image": dicom("MR_small.dcm"), "label": 1})
    assert image["label"] == 1 and isinstance(image["image"], torch.Tensor) and image["image"].shape == (3, 64, 64)


# -- DICOM transfer syntaxes against an uncompressed copy of the same image ----------------------------
@pytest.mark.parametrize(
    "name, reference",
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless: GDCM
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless
        ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
        ("MR_small_expb.dcm", "MR_small.dcm"),
        ("MR_small_implicit.dcm", "MR_small.dcm"),
    ],
)
def test_lossless_transfer_syntaxes_give_the_uncompressed_pixels(name, reference):
    for window in ("auto", "stored"):
        np.testing.assert_array_equal(read(dicom(name), dicom_window=window), read(dicom(reference), dicom_window=window))


@pytest.mark.parametrize(
    "name, tolerance",
    [
        ("SC_rgb_jls_lossy_line.dcm", 2), ("SC_rgb_jls_lossy_sample.dcm", 2),  # JPEG-LS near-lossless (NEAR=2)
        ("SC_rgb_jpeg_dcmtk.dcm", 6), ("SC_rgb_jpeg_gdcm.dcm", 6),  # JPEG baseline, YBR colour
    ],
)
def test_lossy_colour_transfer_syntaxes_stay_close_to_the_lossless_copy(name, tolerance):
    reference = read(dicom("SC_rgb_rle.dcm"))  # the same colour bars, RLE lossless
    image = read(dicom(name))
    assert image.shape == reference.shape == (3, 100, 100)
    assert np.abs(image - reference).max() <= tolerance / 255 + 1e-6


def test_12_bit_jpeg_extended_gives_the_picture_of_its_jpeg_2000_copy():
    # pydicom's Pillow plugin cannot decode 12-bit JPEG: GDCM does
    lossy = read(dicom("JPEG-lossy.dcm"), value_range=(0, 300))
    j2k = read(dicom("JPEG2000.dcm"), value_range=(0, 300))  # the same image, JPEG 2000 compressed
    assert lossy.shape == j2k.shape == (3, 1024, 256)
    assert np.abs(lossy - j2k).mean() < 0.03 and np.corrcoef(lossy[0].ravel(), j2k[0].ravel())[0, 1] > 0.9
    np.testing.assert_array_equal(read(dicom("JPGExtended.dcm")), read(dicom("JPEG-lossy.dcm")))


@pytest.mark.parametrize("name", ["JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm"])
def test_jpeg_ls_near_lossless_grayscale_is_read(name):
    ds = pydicom.dcmread(dicom(name))
    image = read(dicom(name), dicom_window="minmax")
    assert image.shape == (3, ds.Rows, ds.Columns) and image.min() == 0.0 and image.max() == 1.0


@pytest.mark.parametrize("implicit_vr, little_endian", [(True, True), (False, True), (False, False)])
def test_dicom_without_file_meta_is_read(tmp_path, implicit_vr, little_endian):
    source = dicom("MR_small.dcm" if little_endian else "MR_small_bigendian.dcm")
    path = without_file_meta(source, tmp_path / "IM0001", implicit_vr, little_endian)
    np.testing.assert_array_equal(read(path), read(dicom("MR_small.dcm")))


def _mono1(ds):
    ds.PhotometricInterpretation = "MONOCHROME1"
    return ds


def _rescaled(ds):
    ds.RescaleSlope, ds.RescaleIntercept = 3, 7
    return _mono1(ds)


@pytest.mark.parametrize(
    "name, change",
    [
        ("MR_small.dcm", None),  # 16-bit signed, VOI window
        ("CT_small.dcm", None),  # Rescale Intercept -1024
        ("MR_small.dcm", _mono1),  # MONOCHROME1, signed
        ("examples_overlay.dcm", _mono1),  # MONOCHROME1, 12 bits stored unsigned, windows
        ("examples_overlay.dcm", _rescaled),  # MONOCHROME1 and rescaled
    ],
    ids=["signed-window", "rescaled-ct", "mono1-signed", "mono1-12bit", "mono1-rescaled"],
)
@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLossless], ids=["process14-sv1", "process14"])
def test_jpeg_lossless_made_by_gdcm_reads_like_the_uncompressed_file(tmp_path, name, change, syntax):
    ds = pydicom.dcmread(dicom(name))
    if change is not None:
        ds = change(ds)
    uncompressed = tmp_path / "uncompressed.dcm"
    ds.save_as(uncompressed)
    compressed = jpeg_lossless(ds, tmp_path / "jpeg_lossless.dcm", syntax)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == syntax
    for window in ("auto", "stored", "minmax"):
        np.testing.assert_array_equal(read(compressed, dicom_window=window), read(uncompressed, dicom_window=window))
    np.testing.assert_array_equal(read(compressed, value_range=(-100, 900)), read(uncompressed, value_range=(-100, 900)))


def test_jpeg_lossless_palette_colour_and_frames(tmp_path):
    palette = jpeg_lossless(pydicom.dcmread(dicom("examples_palette.dcm")), tmp_path / "palette.dcm")
    np.testing.assert_allclose(read(palette), read(dicom("examples_palette.dcm")), atol=1 / 255 + 1e-6)
    ds = pydicom.dcmread(dicom("MR_small.dcm"))
    frames = np.stack([ds.pixel_array, ds.pixel_array // 2, ds.pixel_array // 4])
    ds.NumberOfFrames, ds.PixelData = 3, frames.tobytes()
    ds.save_as(tmp_path / "frames.dcm")
    compressed = jpeg_lossless(ds, tmp_path / "frames_ll.dcm")
    for volume_slice in (2, "max", "mean"):
        np.testing.assert_array_equal(
            read(compressed, volume_slice=volume_slice), read(tmp_path / "frames.dcm", volume_slice=volume_slice)
        )


def test_a_transfer_syntax_no_decoder_has_is_named(tmp_path):
    ds = pydicom.dcmread(dicom("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = HTJ2K_LOSSLESS
    ds.PixelData = encapsulate([bytes(range(256)) * 4])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(tmp_path / "htj2k.dcm")
    with pytest.raises(ImageReadError) as raised:
        read(tmp_path / "htj2k.dcm")
    message = str(raised.value)
    assert "htj2k.dcm: cannot decode the DICOM pixel data (transfer syntax High-Throughput JPEG 2000" in message
    assert "pydicom" in message and "ITK (GDCM)" in message


def test_the_data_check_decodes_gdcm_files_from_several_threads(tmp_path):
    items = []
    for index in range(8):  # JPEG-LS: decoded by GDCM, from the check's thread pool
        path = tmp_path / f"{index}.dcm"
        ds = pydicom.dcmread(dicom("MR_small_jpeg_ls_lossless.dcm"))
        ds.InstanceNumber = index  # distinct files: byte-identical copies would be duplicates of one image
        ds.save_as(path)
        items.append({"image": str(path), "label": index % 2})
    assert validate_datalist(items, ["a", "b"], num_threads=4) == items
