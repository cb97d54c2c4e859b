"""A 3D sample dataset created offline and deterministically: CT-like volumes graded by counting tiny spots.

The 3D counterpart of :mod:`fpt_monai.data.sample`, for FPT on volumes (an extension of Huang et al., MICCAI
2024 / IEEE TNNLS 2025, whose experiments are 2D). Every volume is a synthetic CT scan in Hounsfield units: air
around an ellipsoidal body of soft tissue, an ellipsoidal "organ" with a smooth random texture, and scanner
noise. Inside the organ sit a fixed number of bright spots. Some are *calcifications*: tiny and sharp (a
Gaussian of sigma ~0.7 voxel at 64^3, so one or two voxels). The rest are *blobs*: wide and faint, with exactly
the same integrated brightness. The grade is the number of calcifications:

====================  ========================
class (folder)        calcifications per volume
====================  ========================
``0_none``            0
``1_few``             2-4
``2_many``            7-10
====================  ========================

Every volume has the same number of spots whatever its grade, and a calcification and a blob carry the same
total brightness, so once the volume is shrunk to the side network's resolution (64^3 averaged to 16^3 puts
4 x 4 x 4 voxels into one) both become the same faint sub-voxel smudge: only the high-resolution view tells the
grade apart, as in the 2D sample.

Volumes are written as gzipped NIfTI (``int16`` Hounsfield units, 1.5 mm isotropic voxels) in the folder layout
the bundle reads (``train/ val/ test/`` of class folders) with a ``sample_dataset.json`` record of the generator
version and settings. Like the 2D sample it is written into a staging folder renamed when complete, an existing
folder with the same record is reused, and a different record regenerates it
(:func:`~fpt_monai.data.sample.write_sample_dataset`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from fpt_monai.data.sample import check_sample_spec, sample_spec, write_sample_dataset

__all__ = ["SAMPLE_3D_CLASSES", "SampleVolumeSpec", "make_sample_dataset_3d", "render_sample_volume"]

#: Bump when the rendering changes, so cached sample folders are regenerated.
SAMPLE_3D_GENERATOR_VERSION = 1
#: Class folder names in label order (sorted order == grade order).
SAMPLE_3D_CLASSES = ("0_none", "1_few", "2_many")
#: Voxel spacing written into the NIfTI header (mm).
SAMPLE_3D_SPACING = 1.5


@dataclass(frozen=True)
class SampleVolumeSpec:
    """Settings of the 3D sample dataset (every field enters its record; change one and it is regenerated).

    Args:
        volume_size: side of the cubic volumes, in voxels (sizes below are in voxels at 64, scaled with it).
        num_train, num_val, num_test: volumes per split, spread evenly over the grades.
        spots_per_grade: inclusive (min, max) calcification count of each grade.
        spots_per_volume: inclusive (min, max) total spots (calcifications + blobs) of every volume.
        spot_sigma: (min, max) Gaussian sigma of a calcification.
        blob_sigma: (min, max) Gaussian sigma of a blob.
        spot_contrast: (min, max) peak brightness of a calcification in HU (a blob's is lower by the cubed
            sigma ratio, so both integrate to the same).
        noise: standard deviation of the voxel noise in HU.
        seed: the dataset seed; volume ``i`` of a split depends only on (seed, split, i).
    """

    volume_size: int = 64
    num_train: int = 60
    num_val: int = 30
    num_test: int = 30
    spots_per_grade: tuple[tuple[int, int], ...] = ((0, 0), (2, 4), (7, 10))
    spots_per_volume: tuple[int, int] = (10, 12)
    spot_sigma: tuple[float, float] = (0.6, 0.8)
    blob_sigma: tuple[float, float] = (2.0, 2.6)
    spot_contrast: tuple[float, float] = (300.0, 450.0)
    noise: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_sample_spec(self, "volume_size", 32, "spots_per_grade", "spots_per_volume", SAMPLE_3D_CLASSES)

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


def _smooth_field(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """A smooth random field (size^3) with values around [-1, 1]: coarse Gaussian noise, trilinearly enlarged."""
    coarse = torch.from_numpy(rng.normal(size=(1, 1, cells, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)[0, 0].numpy()


def _ellipsoid_radius(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoid radius of every voxel (1 on the surface)."""
    return np.sqrt((((grid - centre) / radii) ** 2).sum(-1))


def render_sample_volume(spec: SampleVolumeSpec, grade: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, size) ``int16`` volume in Hounsfield units of ``grade`` (see the module docstring).

    Args:
        spec: the dataset settings.
        grade: 0, 1 or 2.
        rng: the random generator of this volume.
    """
    size, scale = spec.volume_size, spec.volume_size / 64.0
    axis = np.arange(size, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    middle = (size - 1) / 2

    # body: soft tissue in air, with a soft edge (no aliasing staircase for the resizing to pick up)
    body_radius = _ellipsoid_radius(grid, middle + rng.uniform(-1, 1, 3) * scale, size * rng.uniform(0.45, 0.49, 3))
    body = 1.0 / (1.0 + np.exp((body_radius - 1.0) * size / 2))
    tissue = 20.0 + 15.0 * _smooth_field(rng, size)
    volume = -1000.0 + body * (1000.0 + tissue)

    # organ: brighter, textured
    organ_centre = middle + rng.uniform(-0.06, 0.06, 3) * size
    organ_radii = size * rng.uniform(0.24, 0.30, 3)
    organ_radius = _ellipsoid_radius(grid, organ_centre, organ_radii)
    organ = 1.0 / (1.0 + np.exp((organ_radius - 1.0) * size / 3))
    volume += organ * (45.0 + 12.0 * _smooth_field(rng, size, cells=5))

    # spots: the grade's calcifications, blobs up to the volume's fixed spot count, equal integrated brightness
    low, high = spec.spots_per_grade[grade]
    num_spots_sharp = int(rng.integers(low, high + 1))
    num_spots = int(rng.integers(spec.spots_per_volume[0], spec.spots_per_volume[1] + 1))
    candidates = np.argwhere(organ_radius < 0.8)
    centres: list[np.ndarray] = []
    min_distance = 4.0 * scale  # spots do not merge, so counting them is well defined
    for index in rng.permutation(len(candidates)):
        centre = candidates[index] + rng.uniform(-0.5, 0.5, 3)
        if all(np.linalg.norm(centre - c) >= min_distance for c in centres):
            centres.append(centre)
            if len(centres) == num_spots:
                break
    sharp = np.arange(len(centres)) < num_spots_sharp
    sigmas = np.where(sharp, rng.uniform(*spec.spot_sigma, len(centres)), rng.uniform(*spec.blob_sigma, len(centres)))
    sigmas = sigmas * scale
    contrast = rng.uniform(*spec.spot_contrast, len(centres))
    reference_sigma = rng.uniform(*spec.spot_sigma, len(centres)) * scale  # blobs match a spot's integral
    amplitudes = np.where(sharp, contrast, contrast * (reference_sigma / sigmas) ** 3)
    for centre, sigma, amplitude in zip(centres, sigmas, amplitudes):
        g = [np.exp(-((axis - c) ** 2) / (2 * sigma**2)) for c in centre]
        volume += amplitude * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]

    volume += rng.normal(0.0, spec.noise, size=volume.shape)
    return np.clip(np.round(volume), -1024, 3071).astype(np.int16)


def _record(spec: SampleVolumeSpec) -> dict:
    return {
        "generator_version": SAMPLE_3D_GENERATOR_VERSION,
        "kind": "3d",
        "classes": list(SAMPLE_3D_CLASSES),
        "spacing_mm": SAMPLE_3D_SPACING,
        "spec": asdict(spec),
    }


def make_sample_dataset_3d(
    output_dir: str | os.PathLike, spec: SampleVolumeSpec | None = None, progress: bool = True, **spec_fields
) -> Path:
    """Create (or reuse) the 3D sample dataset in ``output_dir`` and return that folder.

    Args:
        output_dir: the dataset folder (``train/ val/ test/`` of class folders of ``.nii.gz`` files are made in it).
        spec: the settings; by default :class:`SampleVolumeSpec` built from ``spec_fields``.
        progress: show a progress bar.
        spec_fields: :class:`SampleVolumeSpec` fields, e.g. ``num_train=12`` (only without ``spec``).

    Raises:
        FileExistsError: ``output_dir`` is a non-empty folder that is not a sample dataset (never overwritten).
    """
    spec = sample_spec(SampleVolumeSpec, spec, spec_fields)
    affine = np.diag([SAMPLE_3D_SPACING] * 3 + [1.0])

    def write_volume(stem: Path, grade: int, rng: np.random.Generator) -> None:
        image = nib.Nifti1Image(render_sample_volume(spec, grade, rng), affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, f"{stem}.nii.gz")

    return write_sample_dataset(
        output_dir, spec, _record(spec), SAMPLE_3D_CLASSES, write_volume, progress, "3D sample dataset", stream=[3]
    )
