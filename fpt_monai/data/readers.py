"""Reading the files clinicians have: DICOM, NIfTI, PNG (8/16-bit), JPEG, TIFF, BMP -> float RGB in [0, 1].

:class:`RGBImageReader` is a MONAI ``ImageReader``: ``LoadImaged(keys, reader=RGBImageReader(...))`` (or
:class:`LoadImageRGBd`, which uses it and nothing else) reads every supported file as a ``float32`` array of
shape ``(3, H, W)`` (rows first, as torchvision and the pre-trained backbones expect) with intensities in
[0, 1]; grayscale is repeated to three channels and an alpha channel is dropped. How raw values are mapped to
[0, 1] depends on the format:

==========================  =========================================================================================
format                      intensity scaling
==========================  =========================================================================================
PNG, JPEG, TIFF, BMP        integer images by their type's full range: 8-bit / 255, 16-bit / 65535 (a 12-bit X-ray
                            saved as 16-bit PNG therefore looks dark: give ``value_range=(0, 4095)``); float TIFFs by
                            their own min-max. Palette, CMYK, YCbCr images are converted to RGB by Pillow.
DICOM                       the modality LUT first (Rescale Slope/Intercept, e.g. CT Hounsfield units, or a Modality
                            LUT Sequence), then ``dicom_window``: ``"auto"`` (default) applies the file's first VOI
                            window (Window Center/Width, with its LINEAR/LINEAR_EXACT/SIGMOID function) when there is
                            one and otherwise maps the range the stored bits can hold (Bits Stored, signedness, after
                            rescaling) to [0, 1], unless the image's values span less than ``NARROW_DICOM_RANGE``
                            (1/8) of that range: then their own min-max, as viewers show such files (12-bit stored,
                            values 1000-1100: a flat gray otherwise); ``"stored"`` always uses the stored range;
                            ``"minmax"`` each image's own range. MONOCHROME1 images are inverted afterwards, so that
                            bright means high signal for every file. Colour DICOMs (RGB, YBR) are converted to RGB
                            and scaled by their bits stored; PALETTE COLOR through its lookup table.
NIfTI                       the header's scl_slope/scl_inter applied (nibabel), then each 2D image's own min-max.
==========================  =========================================================================================

``value_range=(low, high)`` replaces the per-format scaling for every format: raw values (after the DICOM
modality LUT and NIfTI scaling) are mapped linearly from [low, high] to [0, 1] and clipped.

Volumes become one 2D image: a 3D NIfTI (``volume_axis`` picks the axis, 2 by default) or a multi-frame DICOM
(frames) gives the slice ``volume_slice`` (an index, or ``"middle"``), or the ``"max"`` / ``"mean"``
intensity projection along that axis. NIfTI planes are shown with the array's first in-plane axis along the
columns and the second along the rows (as MONAI and ITK lay out images); voxels are not reoriented, so give
files of one dataset the same orientation. A multi-page TIFF gives its first page.

DICOM pixel data is decoded by pydicom where it has a decoder (uncompressed, deflate, RLE, JPEG baseline,
JPEG 2000 through Pillow) and otherwise by ITK's GDCM: JPEG Lossless (process 14), JPEG-LS, 12-bit JPEG,
and files without a File Meta header (no transfer syntax). Both give the same stored values, so the scaling
above is the same whichever decoded the file.

Which files are images: a file with one of the suffixes ``IMAGE_SUFFIXES``, or a DICOM, PNG, JPEG or TIFF file
of any name, recognised by its first 132 bytes (:func:`sniff_format`; PACS exports name DICOM files ``IM000001``
or by their UID). GIF, WebP and other formats are not read; :func:`sniff_format` names them for the reports.

Memory is bounded before any pixel is decoded: the size of the 2D image (one frame or slice of a volume) is read
from the file's header and an image of more than ``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`, 50
million) is refused with an :class:`ImageReadError` naming the file and the setting. Reading an image takes about
16 bytes per pixel at its peak (the decoded values and the ``float32`` RGB array), so 50 million pixels are about
0.8 GB; the largest usual medical photographs and radiographs (whole fundus photographs up to about 6000x4000,
mammograms about 4000x5000, scanned films) are 20-30 million. A small file can decode to a huge image (a
12000x12000 PNG of one colour is a few hundred KB and would need over 2 GB): raise ``max_pixels`` (``None``: no
limit) for data that needs it.

Known limits: 16-bit-per-channel colour PNG/TIFF are reduced to 8 bits by Pillow; 12-bit JPEG files (outside
DICOM) are not supported by Pillow; transfer syntaxes neither pydicom nor GDCM decode (e.g. High-Throughput
JPEG 2000 without ``pylibjpeg-openjpeg``) are refused with a message that names them.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import itk
import nibabel as nib
import numpy as np
import pydicom
import tifffile
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImaged
from monai.utils import ensure_tuple
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_windowing, get_decoder

__all__ = [
    "CONTENT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "DICOM_WINDOWS",
    "IMAGE_SUFFIXES",
    "NARROW_DICOM_RANGE",
    "ImageReadError",
    "LoadImageRGBd",
    "RGBImageReader",
    "check_pixel_count",
    "image_format",
    "image_size",
    "is_dicom_file",
    "read_image",
    "sniff_format",
]

#: Default ``max_pixels``: the largest 2D image (height x width) read, checked from the header before decoding.
DEFAULT_MAX_PIXELS = 50_000_000
#: Values of ``dicom_window``.
DICOM_WINDOWS = ("auto", "stored", "minmax")
#: ``dicom_window="auto"`` on a grayscale DICOM without VOI window: values that span less than this fraction of the
#: range the stored bits can hold are mapped by their own min-max (under the stored range they would look flat).
NARROW_DICOM_RANGE = 1 / 8
#: File suffixes of 2D images (files of other names are read by their content, see :func:`sniff_format`).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz")
_PROJECTIONS = ("middle", "max", "mean")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".dicom")
# ITK's lazily loaded modules and its reader objects are not meant for concurrent first use from threads
_ITK_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names the file and says why."""


def _is_dicom_head(head: bytes) -> bool:
    """A DICOM Part 10 ``DICM`` marker after the 128-byte preamble, or a data set written without preamble and
    File Meta header: its first tag is in group 0x0002 (File Meta) or 0x0008 (identification), little or big
    endian (no other supported format starts that way)."""
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


#: Leading bytes of the formats read whatever a file's name, besides DICOM (see :func:`sniff_format`).
_READ_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
#: Leading bytes of common files that are not read, so that reports can say what they are.
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF image"),
    (b"GIF89a", "GIF image"),
    (b"\xffO\xffQ", "JPEG 2000 codestream"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 image"),
    (b"\xff\x0a", "JPEG XL image"),
    (b"%PDF", "PDF document"),
    (b"PK\x03\x04", "ZIP archive (or an Office document)"),
    (b"\x1f\x8b", "gzip-compressed file (a NIfTI file keeps its .nii.gz suffix)"),
    (b"\xd0\xcf\x11\xe0", "Microsoft compound file (e.g. Thumbs.db, an old Office document)"),
)
#: Formats :func:`sniff_format` names that the reader reads.
CONTENT_FORMATS = ("DICOM", "PNG", "JPEG", "TIFF")


def sniff_format(head: bytes) -> str | None:
    """The format a file's first bytes (up to 132: the DICOM preamble and marker) show, or ``None``.

    ``"DICOM"``, ``"PNG"``, ``"JPEG"`` and ``"TIFF"`` (:data:`CONTENT_FORMATS`) are read whatever the file's name;
    the other names (``"GIF image"``, ``"WebP image"``, ``"PDF document"``, ...) are formats that are not read,
    given so that a report can say what a file is.
    """
    if head[128:132] == b"DICM":
        return "DICOM"
    for signature, name in _READ_SIGNATURES + _OTHER_SIGNATURES:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] in (b"WEBP", b"AVI "):
        return "WebP image" if head[8:12] == b"WEBP" else "AVI video"
    if head[4:8] == b"ftyp":  # ISO media: HEIF/AVIF photographs, MP4/QuickTime videos
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF image"
        return "AVIF image" if brand in (b"avif", b"avis") else "video or ISO media file"
    if _is_dicom_head(head):
        return "DICOM"
    return None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a DICOM file, whatever its name (see :func:`image_format`)."""
    try:
        with open(path, "rb") as f:
            return _is_dicom_head(f.read(132))
    except OSError:
        return False


def _content_format(path: str | os.PathLike) -> str | None:
    """:func:`sniff_format` of a file's first 132 bytes (``None`` when it cannot be opened)."""
    try:
        with open(path, "rb") as f:
            return sniff_format(f.read(132))
    except OSError:
        return None


def image_format(path: str | os.PathLike) -> str:
    """``"dicom"``, ``"nifti"`` or ``"pil"`` (everything Pillow opens), from the suffix and the file's first bytes.

    A DICOM file is recognised whatever its name (DICOM files often have no suffix): by its ``DICM`` marker, or,
    written without preamble and File Meta header, by its first tag.
    """
    name = str(path).lower()
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(_DICOM_SUFFIXES):
        return "dicom"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as err:
        raise ImageReadError(f"{path}: cannot open ({err.strerror or err}).") from err
    return "dicom" if _is_dicom_head(head) else "pil"


def _check_options(
    volume_slice: int | str, dicom_window: str, value_range: Sequence[float] | None, max_pixels: int | None = None
) -> None:
    if isinstance(volume_slice, bool) or not (isinstance(volume_slice, int) or volume_slice in _PROJECTIONS):
        raise ValueError(f"volume_slice must be a slice index or one of {_PROJECTIONS}, got {volume_slice!r}.")
    if dicom_window not in DICOM_WINDOWS:
        raise ValueError(f"dicom_window must be one of {DICOM_WINDOWS}, got {dicom_window!r}.")
    if value_range is not None:
        if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}.")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive integer (pixels) or None (no limit), got {max_pixels!r}.")


def check_pixel_count(path: Any, height: int, width: int, max_pixels: int | None) -> None:
    """Refuse an image of ``height`` x ``width`` (from its header) above ``max_pixels``, before it is decoded.

    Raises:
        ImageReadError: naming the file, its size, the limit and the setting that changes it.
    """
    if max_pixels is None or int(height) * int(width) <= max_pixels:
        return
    pixels = int(height) * int(width)
    raise ImageReadError(
        f"{path}: the image is {height}x{width} = {pixels / 1e6:.1f} million pixels, more than max_pixels = "
        f"{max_pixels} (reading it would take about {pixels * 16 / 2**30:.1f} GB of memory). Downscale the file, "
        "or raise the limit: the reader's max_pixels (in the bundle: --image_reader#max_pixels N; None: no limit)."
    )


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to [0, 1] and clip; a constant image (high == low) becomes zeros."""
    values = values.astype(np.float32, copy=False)
    if not high > low:
        return np.zeros_like(values)
    return np.clip((values - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _minmax(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.float32)
    return _scale(np.nan_to_num(values, nan=float(finite.min())), float(finite.min()), float(finite.max()))


def _take_slice(volume: np.ndarray, axis: int, volume_slice: int | str, path: Any) -> np.ndarray:
    """One 2D plane of ``volume`` along ``axis``: an index, the middle slice, or a max/mean projection."""
    if volume_slice == "max":
        return volume.max(axis=axis)
    if volume_slice == "mean":
        return volume.mean(axis=axis, dtype=np.float64)
    count = volume.shape[axis]
    index = count // 2 if volume_slice == "middle" else int(volume_slice)
    if not -count <= index < count:
        raise ImageReadError(f"{path}: slice {index} is outside the volume's {count} slices along axis {axis}.")
    return np.take(volume, index, axis=axis)


def _to_rgb(image: np.ndarray, path: Any) -> np.ndarray:
    """(H, W) or (H, W, C) in [0, 1] -> (3, H, W) float32: gray repeated, gray+alpha and RGBA without alpha."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ImageReadError(f"{path}: expected a 2D image, got an array of shape {image.shape}.")
    channels = image.shape[-1]
    if channels == 2:  # gray + alpha
        image = image[..., :1]
    elif channels == 4:  # RGBA
        image = image[..., :3]
    elif channels not in (1, 3):
        raise ImageReadError(f"{path}: cannot make RGB from {channels} channels (expected 1-4).")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)


def _integer_range(dtype: np.dtype) -> tuple[float, float]:
    info = np.iinfo(dtype)
    return (float(info.min), float(info.max)) if info.min < 0 else (0.0, float(info.max))


# -- Pillow formats ----------------------------------------------------------------------------------
def _read_pil(path: Any, value_range: Sequence[float] | None, max_pixels: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as image:  # reads the header only
            image.seek(0)  # first page of a multi-page TIFF
            check_pixel_count(path, image.height, image.width, max_pixels)
            mode = image.mode
            if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
            elif mode == "1":
                image = image.convert("L")
            elif mode.startswith("I;16"):
                pixels = np.asarray(image).astype(np.uint16)  # native byte order whatever the file's
                image = None
            if image is not None:
                pixels = np.asarray(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError as err:
        if str(path).lower().endswith((".tif", ".tiff")):
            return _read_tifffile(path, value_range, max_pixels)
        raise ImageReadError(f"{path}: not an image file Pillow can read (nor DICOM, nor NIfTI).") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or damaged files
        raise ImageReadError(f"{path}: damaged or unsupported image ({err}).") from err
    return _scale_pixels(pixels, value_range)


def _read_tifffile(path: Any, value_range: Sequence[float] | None, max_pixels: int | None = None) -> np.ndarray:
    """TIFFs Pillow cannot open (e.g. float or planar colour) through tifffile, first page."""
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            check_pixel_count(path, *_tiff_plane(page.shape), max_pixels)
            pixels = np.asarray(page.asarray())
    except ImageReadError:
        raise
    except Exception as err:  # tifffile raises many types for damaged files
        raise ImageReadError(f"{path}: damaged or unsupported TIFF ({err}).") from err
    if pixels.ndim == 3 and pixels.shape[0] in (1, 2, 3, 4) and pixels.shape[-1] not in (1, 2, 3, 4):
        pixels = np.moveaxis(pixels, 0, -1)  # planar (C, H, W) storage
    return _scale_pixels(pixels, value_range)


def _scale_pixels(pixels: np.ndarray, value_range: Sequence[float] | None) -> np.ndarray:
    if value_range is not None:
        return _scale(pixels, *map(float, value_range))
    if np.issubdtype(pixels.dtype, np.bool_):
        return pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.integer):
        return _scale(pixels, *_integer_range(pixels.dtype))
    return _minmax(pixels)


# -- DICOM ------------------------------------------------------------------------------------------
def _dicom_stored_range(ds: Any) -> tuple[float, float]:
    """The values the stored bits can hold, after the modality LUT (the output range DICOM windowing uses)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) != 0
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return float(low), float(high)


def _pydicom_decoder_missing(syntax: Any) -> str | None:
    """Why pydicom cannot decode this transfer syntax here (``None`` when it has a decoder)."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"pydicom has no decoder for {getattr(syntax, 'name', syntax)}"
    if decoder.is_available:
        return None
    return f"pydicom's decoders for {syntax.name} need a plugin ({'; '.join(decoder.missing_dependencies)})"


def _itk_error(err: Exception) -> str:
    """The last line of an ITK exception (the lines before it name ITK's own source files)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[-1] if lines else type(err).__name__
    return message.split("): ", 1)[-1] if message.startswith("ITK ERROR") else message


@contextmanager
def _utf8_path(path: Any) -> Iterator[str]:
    """A name of ``path`` that ITK can open: ITK takes UTF-8 paths only, so a path that is not valid UTF-8 (see
    :func:`~fpt_monai.utils.escape_path`) is opened through a symbolic link with a plain name in a temporary
    folder."""
    name = os.path.abspath(os.fspath(path))
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="fpt-monai-") as folder:
            link = os.path.join(folder, "image")
            os.symlink(name, link)
            yield link
        return
    yield name


def _itk_dicom_pixels(ds: Any, path: Any) -> np.ndarray:
    """The stored pixel values decoded by ITK's GDCM, laid out and typed as pydicom's ``pixel_array``.

    GDCM hands out modality values: it inverts MONOCHROME1 stored values (signed: ``~v``, unsigned:
    ``2**BitsStored - 1 - v``) and then applies Rescale Slope/Intercept. Both are undone here so that the
    scaling of this module applies to the stored values, as for files pydicom decodes. PALETTE COLOR comes out
    through its lookup table (RGB), colour YBR as RGB, like pydicom's.
    """
    with _ITK_LOCK, _utf8_path(path) as name:
        image_io = itk.GDCMImageIO.New()
        pixels = np.asarray(itk.array_from_image(itk.imread(name, imageio=image_io)))
        slope, intercept = float(image_io.GetRescaleSlope()), float(image_io.GetRescaleIntercept())
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    colour = int(ds.get("SamplesPerPixel", 1)) > 1 or photometric == "PALETTE COLOR"
    if frames == 1 and pixels.ndim == (4 if colour else 3) and pixels.shape[0] == 1:
        pixels = pixels[0]  # ITK reads a single frame as a volume of one slice
    if colour:
        return pixels
    bits_allocated = int(ds.get("BitsAllocated", 8 * pixels.dtype.itemsize))
    if bits_allocated == 1:  # GDCM expands single-bit images to 0/255
        return (pixels > 0).astype(np.uint8)
    signed = int(ds.get("PixelRepresentation", 0)) != 0
    values = pixels.astype(np.float64)
    if slope != 1.0 or intercept != 0.0:
        values = (values - intercept) / slope
    if photometric == "MONOCHROME1":
        values = -values - 1.0 if signed else float(2 ** int(ds.get("BitsStored", bits_allocated)) - 1) - values
    standard = bits_allocated in (8, 16, 32, 64)  # the dtype pydicom gives
    dtype = np.dtype(f"{'int' if signed else 'uint'}{bits_allocated}") if standard else pixels.dtype
    return np.rint(values).astype(dtype)


#: The Pixel Data tag (7FE0,0010) as it is written, little and big endian.
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_TRUNCATED_HINT = "the file was probably cut short in a copy, a download or an export: copy it again from its source"


def _dicom_cut_in_pixel_data(path: Any) -> str | None:
    """Why a DICOM file whose data set has no Pixel Data element is truncated, or ``None``.

    pydicom drops an element that the end of the file cuts off: a compressed (encapsulated) image cut anywhere
    in its fragments then reads as a file without pixel data. Its Pixel Data tag is still in the file's bytes.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    for tag in _PIXEL_DATA_TAGS:
        start = raw.rfind(tag)
        if start >= 0:
            return (
                f"it ends {len(raw) - start} bytes into its pixel data, before the data is complete ({_TRUNCATED_HINT})"
            )
    return None


def _dicom_short_pixel_data(ds: Any) -> str | None:
    """Why an uncompressed DICOM image's pixel data is truncated (shorter than its header says), or ``None``."""
    try:
        syntax = ds.file_meta.TransferSyntaxUID
        if syntax.is_compressed:
            return None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        values = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("SamplesPerPixel", 1))
        expected = (values * int(ds.BitsAllocated) + 7) // 8
        present = len(ds.PixelData)
    except Exception:  # missing tags: not a question of length
        return None
    if present >= expected:
        return None
    return f"its pixel data holds {present} of the {expected} bytes its header describes ({_TRUNCATED_HINT})"


def _dicom_pixels(ds: Any, path: Any) -> tuple[np.ndarray, str]:
    """The decoded pixel data and its decoder (``"pydicom"`` or ``"itk"``).

    pydicom decodes when it has a decoder for the transfer syntax; ITK's GDCM decodes the others (JPEG Lossless,
    JPEG-LS, 12-bit JPEG, ...), files without a File Meta header (no transfer syntax), and files pydicom's
    decoder fails on (e.g. its Pillow plugin and 12-bit JPEG). A file neither decodes is named with both reasons.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax is None:
        pydicom_reason = "no transfer syntax (no File Meta header)"
    else:
        pydicom_reason = _pydicom_decoder_missing(syntax)
        if pydicom_reason is None:
            try:
                return ds.pixel_array, "pydicom"  # decompressed; YBR colour converted to RGB
            except Exception as err:  # damaged data, or a plugin that cannot handle this variant
                pydicom_reason = f"pydicom: {err}".replace("\n", " ")
    try:
        return _itk_dicom_pixels(ds, path), "itk"
    except Exception as err:
        itk_reason = _itk_error(err)
    what = f"transfer syntax {syntax.name}" if syntax is not None else "no transfer syntax"
    truncated = _dicom_short_pixel_data(ds)
    if truncated:
        raise ImageReadError(
            f"{path}: cannot decode the DICOM pixel data ({what}): the file is truncated: {truncated}."
        )
    raise ImageReadError(
        f"{path}: cannot decode the DICOM pixel data ({what}): {pydicom_reason}; ITK (GDCM): {itk_reason}."
    )


def _read_dicom(
    path: Any,
    volume_slice: int | str,
    dicom_window: str,
    value_range: Sequence[float] | None,
    max_pixels: int | None = None,
) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as err:  # pydicom raises InvalidDicomError, OSError, struct errors...
        raise ImageReadError(f"{path}: not a readable DICOM file ({err}).") from err
    if "PixelData" not in ds:
        truncated = _dicom_cut_in_pixel_data(path)
        if truncated:
            raise ImageReadError(f"{path}: cannot decode the DICOM pixel data: the file is truncated: {truncated}.")
        if "Rows" in ds and "Columns" in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise ImageReadError(
                f"{path}: no DICOM pixel data: the file is truncated: its header describes a {ds.Rows}x{ds.Columns} "
                f"image but the file ends before its pixel data ({_TRUNCATED_HINT})."
            )
        raise ImageReadError(f"{path}: DICOM file without pixel data (no image).")
    try:
        height, width = int(ds.Rows), int(ds.Columns)
    except Exception as err:  # missing or malformed tags
        raise ImageReadError(f"{path}: DICOM image without valid Rows/Columns ({err}).") from err
    check_pixel_count(path, height, width, max_pixels)
    pixels, decoder = _dicom_pixels(ds, path)
    try:
        return _dicom_to_unit_rgb(ds, pixels, decoder, volume_slice, dicom_window, value_range, path)
    except ImageReadError:
        raise
    except Exception as err:  # inconsistent tags (bits, LUTs, windows) surface here
        raise ImageReadError(f"{path}: cannot interpret the DICOM pixel values ({type(err).__name__}: {err}).") from err


def _narrow(values: np.ndarray, low: float, high: float) -> bool:
    """Whether ``values`` span less than :data:`NARROW_DICOM_RANGE` of the stored range ``[low, high]`` (and more
    than a single value: a constant image stays constant, for the data check to name)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or not high > low:
        return False
    span = float(finite.max()) - float(finite.min())
    return 0 < span < NARROW_DICOM_RANGE * (high - low)


def _dicom_to_unit_rgb(
    ds: Any,
    pixels: np.ndarray,
    decoder: str,
    volume_slice: int | str,
    dicom_window: str,
    value_range: Sequence[float] | None,
    path: Any,
) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if frames > 1:  # (frames, H, W[, C]): one frame or a projection over frames
        pixels = _take_slice(pixels, 0, volume_slice, path)
    if photometric == "PALETTE COLOR":
        if decoder == "pydicom":  # ITK hands out the colours already
            pixels = apply_color_lut(pixels, ds)
        return _to_rgb(_scale_pixels(pixels, value_range), path)
    if samples > 1:  # RGB (YBR already converted): scaled by the bits stored
        bits = int(ds.get("BitsStored", 8))
        scaled = _scale(pixels, *value_range) if value_range is not None else _scale(pixels, 0.0, 2.0**bits - 1)
        return _to_rgb(scaled, path)
    values = apply_modality_lut(pixels, ds)
    if value_range is not None:
        scaled = _scale(values, *map(float, value_range))
    elif dicom_window == "minmax":
        scaled = _minmax(values.astype(np.float64))
    else:
        low, high = _dicom_stored_range(ds)
        if dicom_window == "auto" and "WindowCenter" in ds and "WindowWidth" in ds:
            values = apply_windowing(values.astype(np.float64), ds)  # into [low, high], per the VOI LUT function
        elif dicom_window == "auto" and _narrow(values, low, high):
            low, high = float(np.nanmin(values)), float(np.nanmax(values))  # min-max, as viewers show such files
        scaled = _scale(values, low, high)
    if photometric == "MONOCHROME1":  # low values are displayed bright: invert so bright means high everywhere
        scaled = 1.0 - scaled
    return _to_rgb(scaled, path)


# -- NIfTI ------------------------------------------------------------------------------------------
def _read_nifti(
    path: Any, volume_slice: int | str, volume_axis: int, value_range: Sequence[float] | None
) -> np.ndarray:
    try:
        image = nib.load(str(path))
        shape = image.shape
        # nibabel's array proxy reads only the requested slice from disk
        squeezed = [size for size in shape if size != 1]
        if len(squeezed) <= 2:
            plane = np.asarray(image.dataobj).reshape([s for s in shape if s != 1] or [1, 1])
        elif len(shape) == 3 or (len(shape) > 3 and all(s == 1 for s in shape[3:])):
            volume = image.dataobj
            axis = volume_axis % 3
            if isinstance(volume_slice, int) or volume_slice == "middle":
                index = shape[axis] // 2 if volume_slice == "middle" else int(volume_slice)
                if not -shape[axis] <= index < shape[axis]:
                    raise ImageReadError(
                        f"{path}: slice {index} is outside the volume's {shape[axis]} slices along axis {axis}."
                    )
                selection = [slice(None)] * 3 + [0] * (len(shape) - 3)
                selection[axis] = index
                plane = np.asarray(volume[tuple(selection)])
            else:
                plane = _take_slice(np.asarray(volume).reshape(shape[:3]), axis, volume_slice, path)
        else:
            raise ImageReadError(f"{path}: a {len(shape)}D NIfTI image of shape {shape}; expected 2D or 3D.")
    except ImageReadError:
        raise
    except Exception as err:  # nibabel: ImageFileError, EOFError, zlib errors for damaged files
        raise ImageReadError(f"{path}: not a readable NIfTI file ({err}).") from err
    plane = np.asarray(plane, dtype=np.float64).T  # (x, y) -> rows = y, columns = x
    scaled = _scale(plane, *map(float, value_range)) if value_range is not None else _minmax(plane)
    return _to_rgb(scaled, path)


class RGBImageReader(ImageReader):
    """MONAI ``ImageReader`` of 2D images: DICOM, NIfTI, PNG, JPEG, TIFF, BMP -> ``float32`` RGB ``(3, H, W)`` in [0, 1].

    Plug it into MONAI's loaders, ``LoadImaged(keys, reader=RGBImageReader(dicom_window="stored"))``, or by name
    with its options, ``LoadImaged(keys, reader="fpt_monai.data.RGBImageReader", volume_slice="max")``. Every
    format is scaled as the module docstring describes; a volume (3D NIfTI, multi-frame DICOM) gives one slice
    or projection. Errors are :class:`ImageReadError` naming the file. (A ``LoadImage`` given several readers
    tries the next one when a reader fails; :class:`LoadImageRGBd` uses this reader only, so that a damaged
    file is reported with its reason rather than read by another library.)

    Args:
        volume_slice: for a 3D NIfTI or multi-frame DICOM: slice index, ``"middle"``, ``"max"`` or ``"mean"``.
        volume_axis: the axis of a 3D NIfTI that ``volume_slice`` runs along.
        dicom_window: ``"auto"``, ``"stored"`` or ``"minmax"`` (how grayscale DICOM values become [0, 1]).
        value_range: ``(low, high)`` of raw values mapped to [0, 1] for every format, instead of the defaults.
        max_pixels: the largest 2D image (height x width, one slice or frame of a volume) read; a larger one is
            refused from its header, before decoding (see the module docstring). ``None``: no limit.
    """

    def __init__(
        self,
        volume_slice: int | str = "middle",
        volume_axis: int = 2,
        dicom_window: str = "auto",
        value_range: Sequence[float] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        _check_options(volume_slice, dicom_window, value_range, max_pixels)
        self.volume_slice = volume_slice
        self.volume_axis = int(volume_axis)
        self.dicom_window = dicom_window
        self.value_range = tuple(float(v) for v in value_range) if value_range is not None else None
        # the rule of dicom_window="auto" for narrow-range files: an attribute, so that it enters a preloading
        # cache's fingerprint (a cache filled under another rule is not reused)
        self.narrow_dicom_range = NARROW_DICOM_RANGE
        self.max_pixels = max_pixels

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        """One file with a 2D image suffix, or a DICOM, PNG, JPEG or TIFF file of any name (by its content)."""
        names = ensure_tuple(filename)
        if len(names) != 1 or not isinstance(names[0], (str, os.PathLike)):
            return False
        return str(names[0]).lower().endswith(IMAGE_SUFFIXES) or _content_format(names[0]) in CONTENT_FORMATS

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> np.ndarray:
        """The image of one file, ``float32`` ``(3, H, W)`` in [0, 1].

        Raises:
            ImageReadError: naming the file, when it is missing, damaged, not a supported image, or larger than
                ``max_pixels``.
        """
        names = ensure_tuple(data)
        if len(names) != 1:
            raise ValueError(f"{type(self).__name__} reads one file at a time, got {len(names)}: {names!r:.200}.")
        path = names[0]
        if not isinstance(path, (str, os.PathLike)):
            raise ImageReadError(f"expected an image file path, got {type(path).__name__} {path!r:.60}.")
        if not os.path.isfile(path):
            raise ImageReadError(f"{path}: file not found.")
        kind = image_format(path)
        if kind == "dicom":
            return _read_dicom(path, self.volume_slice, self.dicom_window, self.value_range, self.max_pixels)
        if kind == "nifti":
            check_pixel_count(path, *image_size(path, self.volume_axis), self.max_pixels)  # header only
            return _read_nifti(path, self.volume_slice, self.volume_axis, self.value_range)
        return _to_rgb(_read_pil(path, self.value_range, self.max_pixels), path)

    def get_data(self, img: np.ndarray) -> tuple[np.ndarray, dict]:
        """The image and its metadata (channel first, spatial shape ``(H, W)``)."""
        return img, {"original_channel_dim": 0, "spatial_shape": np.asarray(img.shape[1:])}


def read_image(
    path: str | os.PathLike,
    volume_slice: int | str = "middle",
    volume_axis: int = 2,
    dicom_window: str = "auto",
    value_range: Sequence[float] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image file as a ``float32`` RGB array ``(3, H, W)`` in [0, 1] with :class:`RGBImageReader`.

    Args:
        path: a DICOM, NIfTI, PNG, JPEG, TIFF or BMP file.
        volume_slice, volume_axis, dicom_window, value_range, max_pixels: the reader's options (see
            :class:`RGBImageReader`).

    Raises:
        ImageReadError: naming the file, when it is missing, damaged, not a supported image, or larger than
            ``max_pixels``.
        ValueError: for invalid options.
    """
    reader = RGBImageReader(volume_slice, volume_axis, dicom_window, value_range, max_pixels)
    return reader.get_data(reader.read(path))[0]


def image_size(path: str | os.PathLike, volume_axis: int = 2) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, without decoding the pixels.

    For a volume, the size of the 2D image :func:`read_image` makes of it: the plane across ``volume_axis``
    (NIfTI) or one frame (DICOM).

    Raises:
        ImageReadError: naming the file, when it is missing or its header cannot be read.
    """
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: file not found.")
    kind = image_format(path)
    if kind == "dicom":
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "Rows" not in ds or "Columns" not in ds:
                raise ValueError("no Rows/Columns: a DICOM file without an image, e.g. a report, a plan or an index")
            return int(ds.Rows), int(ds.Columns)
        except Exception as err:
            raise ImageReadError(f"{path}: not a readable DICOM image header ({err}).") from err
    if kind == "nifti":
        try:
            shape = nib.load(str(path)).shape
        except Exception as err:
            raise ImageReadError(f"{path}: not a readable NIfTI header ({err}).") from err
        sizes = [size for size in shape if size != 1]
        if len(sizes) >= 3:  # a volume: the plane across volume_axis
            sizes = [size for axis, size in enumerate(shape[:3]) if axis != volume_axis % 3]
        sizes = (sizes + [1, 1])[:2]
        return int(sizes[1]), int(sizes[0])  # rows = second axis (see read_image)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "PNG":
                image.verify()  # checks the chunk checksums without decoding: catches damaged files early
    except Exception as err:
        if str(path).lower().endswith((".tif", ".tiff")):
            return _tifffile_size(path, err)
        raise ImageReadError(f"{path}: not a readable image ({err}).") from err
    return int(height), int(width)


def _tifffile_size(path: Any, pil_error: Exception) -> tuple[int, int]:
    try:
        with tifffile.TiffFile(path) as tiff:
            shape = tiff.pages[0].shape
    except Exception as err:
        raise ImageReadError(f"{path}: not a readable TIFF ({pil_error}; {err}).") from err
    return _tiff_plane(shape)


def _tiff_plane(shape: Sequence[int]) -> tuple[int, int]:
    """(height, width) of a TIFF page's shape, interleaved (H, W, C) or planar (C, H, W)."""
    if len(shape) == 3 and shape[0] in (1, 2, 3, 4) and shape[-1] not in (1, 2, 3, 4):
        shape = shape[1:]
    return int(shape[0]), int(shape[1])


class LoadImageRGBd(LoadImaged):
    """``LoadImaged`` with :class:`RGBImageReader`: image files (paths under ``keys``) as ``float32`` RGB ``(3, H, W)``
    in [0, 1] (a ``MetaTensor`` with the file name in its metadata).

    The reader is the only one used (a failure is reported with its reason, never handed to another library).
    The reader and its options are attributes, so they enter a preloading cache's fingerprint. See
    :class:`RGBImageReader` for the options and the module docstring for each format's intensity scaling.
    """

    def __init__(
        self,
        keys: KeysCollection,
        volume_slice: int | str = "middle",
        volume_axis: int = 2,
        dicom_window: str = "auto",
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.reader = RGBImageReader(volume_slice, volume_axis, dicom_window, value_range, max_pixels)
        with warnings.catch_warnings():
            # LoadImage builds every installed reader first; the ones dropped below warn about their optional
            # decoders (nvImageCodec) although they never read a file here
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            super().__init__(
                keys, reader=self.reader, dtype=np.float32, image_only=True, allow_missing_keys=allow_missing_keys
            )
        # this reader only: LoadImage also registers every installed reader, which would read what this one
        # refuses and make a cache's fingerprint depend on which optional packages are installed
        self._loader.readers = [self.reader]

    def __call__(self, data: Mapping[Hashable, Any], reader: ImageReader | None = None) -> dict:
        for key in self.key_iterator(dict(data)):
            if not isinstance(data[key], (str, os.PathLike)):
                raise ImageReadError(f"item key {key!r}: expected an image file path, got {type(data[key]).__name__}.")
        return super().__call__(data, reader or self.reader)
