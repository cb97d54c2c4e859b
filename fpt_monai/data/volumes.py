"""FPT on volumes: datalists of NIfTI files and DICOM series, and the two-view 3D transform chain.

FPT (Huang et al., MICCAI 2024) and FPT+ (IEEE TNNLS 2025) feed the frozen backbone an un-augmented
high-resolution view and the side network an augmented low-resolution view. On CT/MR volumes:

* high-resolution view (never augmented, so its keys/values can be preloaded): read the volume through MONAI's
  ``LoadImaged`` (NIfTI with its ``NibabelReader``; a DICOM series folder, ``.mha``, ``.nrrd`` with its
  ``ITKReader``, whose GDCM decodes compressed series as the 2D reader's does), channel first,
  optionally reoriented (``axcodes``) and resampled (``pixdim``), intensities scaled to [0, 1] (a fixed window
  such as CT Hounsfield units ``intensity_range=(-200, 600)``, or per-volume percentiles), resized to the
  backbone's input size, normalised with the backbone's mean/std ->
  :class:`~fpt_monai.preload.FrozenBackboneKVd`;
* side view: the same reading, shrunk to the side network's size exactly as ``FPTNet`` does
  (:class:`~fpt_monai.data.transforms.SideViewd`, area averaging), then, for training, light 3D augmentation
  (left-right flip, a small random rotation/scaling, intensity jitter) at the side resolution, where it is cheap.

The cache fingerprint covers every transform before the K/V transform with its parameters (window, percentiles,
spacing, orientation, sizes), so changing any of them never reads stale keys/values.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    CopyItemsd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import ensure_tuple_rep

from fpt_monai.data.datalist import folder_datalist, json_datalist
from fpt_monai.data.readers import is_dicom_file
from fpt_monai.data.transforms import SideViewd
from fpt_monai.networks.backbones import FrozenBackbone
from fpt_monai.preload import FrozenBackboneKVd

__all__ = [
    "VOLUME_SUFFIXES",
    "CheckVolumed",
    "fpt_transforms_3d",
    "inference_transforms_3d",
    "is_dicom_series",
    "load_volume",
    "make_volume_datalist",
    "volume_datalist",
    "volume_image_datalist",
]

#: File suffixes read as volumes (NIfTI with nibabel; MetaImage and NRRD with ITK). DICOM series are folders.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# files of a folder looked at to decide whether it is a DICOM series (a series can hold thousands)
_DICOM_PROBE = 4


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _looks_like_dicom(path: Path) -> bool:
    return path.name.lower().endswith(_DICOM_SUFFIXES) or is_dicom_file(path)


def is_dicom_series(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of DICOM files (one series, read as one volume by ITK)."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not _is_hidden(p)]
    return bool(files) and all(_looks_like_dicom(p) for p in files[:_DICOM_PROBE])


def _is_volume(path: Path) -> bool:
    if _is_hidden(path):
        return False
    if path.is_file():
        return path.name.lower().endswith(VOLUME_SUFFIXES)
    return is_dicom_series(path)


def volume_datalist(dataset_dir: str | os.PathLike, split: str, classes: list[str] | None = None) -> list[dict]:
    """``[{"image": path, "label": index}]`` from ``dataset_dir/split/<class>/<volumes>``.

    A volume is a NIfTI/MetaImage/NRRD file or a folder holding one DICOM series.

    Args:
        dataset_dir: root holding ``train/``, ``val/``, ``test/``.
        split: the sub-folder to list.
        classes: class names in label order; by default those of ``train/`` (so every split shares labels).
    """
    items = folder_datalist(dataset_dir, split, classes, is_item=_is_volume, items_name="volumes")
    if not items:
        root = Path(dataset_dir) / split
        raise ValueError(
            f"no volumes ({', '.join(VOLUME_SUFFIXES)} files or DICOM series folders) in {root}/<class name>/."
        )
    return items


def make_volume_datalist(dataset_dir: str | os.PathLike, split: str) -> list[dict]:
    """Datalist of ``split``: a JSON datalist file (images may name DICOM series folders), or class folders.

    Raises ``FileNotFoundError`` naming every listed volume that does not exist.
    """
    if str(dataset_dir).endswith(".json"):
        items = json_datalist(dataset_dir, split)
        missing = [item["image"] for item in items if not os.path.exists(item["image"])]
        if missing:
            shown = ", ".join(missing[:10]) + (f", ... (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            raise FileNotFoundError(f"datalist {dataset_dir}, '{split}': volumes not found: {shown}")
        return items
    return volume_datalist(dataset_dir, split)


def volume_image_datalist(source: str | os.PathLike | Sequence) -> list[dict]:
    """``[{"image": path}]`` of the volumes to classify: a folder (searched recursively; a DICOM series folder is
    one volume), one volume, or a list of them."""
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        root = Path(source)
        if root.is_dir() and not is_dicom_series(root):
            paths = []
            for folder, subfolders, files in os.walk(root):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                series = [Path(folder) / d for d in subfolders if is_dicom_series(Path(folder) / d)]
                paths += series
                subfolders[:] = [d for d in subfolders if Path(folder) / d not in series]
                paths += [Path(folder) / f for f in sorted(files) if _is_volume(Path(folder) / f)]
            paths = sorted(paths)
            if not paths:
                raise ValueError(f"no volumes ({', '.join(VOLUME_SUFFIXES)} files or DICOM series) in {root}.")
        else:
            paths = [root]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"volumes not found: {missing}")
    return [{"image": str(p.absolute())} for p in paths]


class CheckVolumed(MapTransform):
    """Check that an image read channel-first is a volume (C, D, H, W) with the expected channel count.

    A 2D image or a 4D series reaching a 3D network would fail deep inside the backbone; this names the file.
    """

    def __init__(self, keys: KeysCollection, channels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 4 or image.shape[0] != self.channels:
                source = getattr(image, "meta", {}).get("filename_or_obj", key)
                raise ValueError(
                    f"{source}: expected a volume of {self.channels} channel(s), read channel-first as "
                    f"({self.channels}, D, H, W); got shape {tuple(image.shape)}."
                )
        return d


def load_volume(
    keys: Hashable | Sequence[Hashable],
    img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    intensity_range: Sequence[float] | None = None,
    percentiles: Sequence[float] | None = (0.5, 99.5),
    pixdim: Sequence[float] | float | None = None,
    axcodes: str | None = None,
) -> list:
    """Read a volume, scale its intensities to [0, 1], resize it to ``img_size``, normalise by ``mean``/``std``.

    This is the frozen backbone's (un-augmented) view, and the start of the side view.

    Args:
        keys: the item key(s) holding the volume path (a file, or a DICOM series folder).
        img_size: output size, an int or (D, H, W).
        mean, std: normalisation after scaling to [0, 1], one value per channel (the backbone's).
        intensity_range: a fixed window ``(low, high)`` of raw values mapped to [0, 1] and clipped, e.g. CT
            Hounsfield units ``(-200, 600)`` (soft tissue and calcium). Takes precedence over ``percentiles``.
        percentiles: without a window, each volume's ``(lower, upper)`` percentiles are mapped to [0, 1]
            (per channel, clipped): the usual choice for MR, whose intensities have no absolute scale.
        pixdim: resample to this voxel spacing (mm) first (``Spacingd``), e.g. ``1.5``; ``None`` keeps the grid.
        axcodes: reorient to these axis codes first (``Orientationd``), e.g. ``"RAS"``; ``None`` keeps the array.
    """
    if intensity_range is None and percentiles is None:
        raise ValueError("give intensity_range (a fixed window) or percentiles (per-volume scaling).")
    if intensity_range is not None:
        low, high = (float(v) for v in intensity_range)
        if not high > low:
            raise ValueError(f"intensity_range must be (low, high) with high > low, got {tuple(intensity_range)}.")
        scale = ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    else:
        lower, upper = (float(v) for v in percentiles)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must be (lower, upper) with 0 <= lower < upper <= 100, got {percentiles}.")
        scale = ScaleIntensityRangePercentilesd(
            keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    if len(mean) != len(std):
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need one value per channel each.")
    spatial = ensure_tuple_rep(img_size, 3)
    transforms = [LoadImaged(keys, image_only=True, ensure_channel_first=True), CheckVolumed(keys, len(mean))]
    if axcodes is not None:
        transforms.append(Orientationd(keys, axcodes=axcodes))
    if pixdim is not None:
        transforms.append(Spacingd(keys, pixdim=ensure_tuple_rep(pixdim, 3), mode="bilinear"))
    return [
        *transforms,
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        scale,
        # antialiased (Gaussian prefilter) when shrinking a large scan to the backbone's size
        Resized(keys, spatial, mode="trilinear", anti_aliasing=True),
        NormalizeIntensityd(keys, subtrahend=list(mean), divisor=list(std), channel_wise=True),
    ]


def fpt_transforms_3d(
    img_size: Sequence[int] | int,
    side_img_size: Sequence[int] | int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    backbone: FrozenBackbone | None = None,
    kv_dtype: str = "float16",
    image_key: str = "image",
    high_res_key: str = "high_res",
    **read: Any,
) -> list:
    """The two-view transform chain of FPT for volumes (the 3D counterpart of ``fpt_transforms``).

    With a ``backbone``, the high-resolution view becomes keys/values under ``"kv"`` (and is dropped); without
    one it stays under ``high_res_key``. The side view ends under ``image_key``; the source path is kept as
    ``"filename"``. ``read``: the reading options of :func:`load_volume` (``intensity_range``, ``percentiles``,
    ``pixdim``, ``axcodes``; the bundle's ``volume_reader``).
    """
    high_res = [CopyItemsd(image_key, names=high_res_key), *load_volume(high_res_key, img_size, mean, std, **read)]
    if backbone is not None:
        if backbone.shape.spatial_dims != 3:
            raise ValueError(f"fpt_transforms_3d needs a 3D backbone, got spatial_dims={backbone.shape.spatial_dims}.")
        high_res.append(FrozenBackboneKVd(high_res_key, backbone, kv_key="kv", dtype=kv_dtype))
    side = [
        CopyItemsd(image_key, names="filename"),
        *load_volume(image_key, img_size, mean, std, **read),
        SideViewd(image_key, ensure_tuple_rep(side_img_size, 3)),
    ]
    if train:
        # light, anatomy-preserving augmentation of the low-resolution view (the side network is what learns);
        # left-right (first array axis of NIfTI/ITK volumes) is the only plausible mirror of a body
        side += [
            RandFlipd(image_key, prob=0.5, spatial_axis=0),
            RandAffined(
                image_key,
                prob=0.5,
                rotate_range=(math.pi / 18,) * 3,
                scale_range=(0.1,) * 3,
                mode="bilinear",
                padding_mode="border",
            ),
            RandScaleIntensityd(image_key, factors=0.1, prob=0.5),
            RandShiftIntensityd(image_key, offsets=0.1, prob=0.5),
        ]
    return [*high_res, *side]


def inference_transforms_3d(
    img_size: Sequence[int] | int, mean: Sequence[float], std: Sequence[float], image_key: str = "image", **read: Any
) -> list:
    """Transforms for a network that runs its backbone itself (``FPTNet.forward(volumes)``, an export).

    Only the high-resolution view (the network makes its side view); the source path is kept as ``"filename"``.
    ``read``: the reading options of :func:`load_volume`.
    """
    return [CopyItemsd(image_key, names="filename"), *load_volume(image_key, img_size, mean, std, **read)]
