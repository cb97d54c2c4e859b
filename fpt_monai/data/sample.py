"""A sample dataset created offline and deterministically: fundus photographs graded by counting tiny lesions.

Every image is a randomly warped and re-coloured copy of scikit-image's real fundus photograph (``retina``)
carrying a fixed number of dark spots. Some spots are *lesions*: tiny and sharp, like microaneurysms (a
Gaussian of sigma ~1 px at 512). The rest are *blots*: wide and faint, with exactly the same integrated
darkening. The grade is the number of lesions:

====================  ==================
class (folder)        lesions per image
====================  ==================
``0_no_lesions``      0
``1_few_lesions``     2-4
``2_many_lesions``    7-11
====================  ==================

Every image has the same number of spots whatever its grade, and a lesion and a blot have the same total
contrast, so once the image is downsampled to the side network's resolution (a 512 image at 112 averages
~4.6 x 4.6 pixels into one) both become the same sub-pixel smudge: only the high-resolution view tells the
grade. That is the situation FPT is for.

The dataset is written in the folder layout the bundle reads (``train/ val/ test/`` of class folders, PNG,
8-bit RGB) with a ``sample_dataset.json`` that records the generator version and settings; an existing folder
with the same record is reused, anything else is regenerated. Generation writes into a temporary folder
that is renamed when complete, so an interrupted run leaves nothing half-made.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.data import retina
from tqdm.auto import tqdm

__all__ = [
    "SAMPLE_CLASSES",
    "SampleFundusSpec",
    "make_sample_dataset",
    "check_sample_spec",
    "render_sample_image",
    "reuse_dataset_folder",
    "sample_spec",
    "write_dataset_atomically",
    "write_sample_dataset",
]

logger = logging.getLogger(__name__)

#: Bump when the rendering changes, so cached sample folders are regenerated.
SAMPLE_GENERATOR_VERSION = 1
#: Class folder names in label order (sorted order == grade order).
SAMPLE_CLASSES = ("0_no_lesions", "1_few_lesions", "2_many_lesions")
_RECORD = "sample_dataset.json"


@dataclass(frozen=True)
class SampleFundusSpec:
    """Settings of the sample dataset (every field enters its record; change one and it is regenerated).

    Args:
        image_size: side of the square PNG images.
        num_train, num_val, num_test: images per split, spread evenly over the grades.
        lesions_per_grade: inclusive (min, max) lesion count of each grade.
        spots_per_image: inclusive (min, max) total spots (lesions + blots) of every image.
        lesion_sigma: (min, max) Gaussian sigma of a lesion, in pixels at 512 (scaled with ``image_size``).
        blot_sigma: (min, max) Gaussian sigma of a blot, in pixels at 512.
        lesion_contrast: (min, max) peak darkening of a lesion (a blot's is lower by the squared sigma ratio).
        noise: standard deviation of the per-pixel sensor noise, intensities in [0, 1].
        seed: the dataset seed; image ``i`` of a split depends only on (seed, split, i).
    """

    image_size: int = 512
    num_train: int = 240
    num_val: int = 90
    num_test: int = 90
    lesions_per_grade: tuple[tuple[int, int], ...] = ((0, 0), (2, 4), (7, 11))
    spots_per_image: tuple[int, int] = (12, 14)
    lesion_sigma: tuple[float, float] = (0.9, 1.3)
    blot_sigma: tuple[float, float] = (3.0, 3.8)
    lesion_contrast: tuple[float, float] = (0.35, 0.55)
    noise: float = 0.015
    seed: int = 0

    def __post_init__(self) -> None:
        check_sample_spec(self, "image_size", 64, "lesions_per_grade", "spots_per_image", SAMPLE_CLASSES)

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}


_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def _fundus_photograph(size: int) -> torch.Tensor:
    """scikit-image's fundus photograph as (3, size, size) float in [0, 1] (antialiased resize)."""
    photo = torch.from_numpy(retina()).permute(2, 0, 1).float()[None] / 255.0
    return F.interpolate(photo, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _gaussian_spots(size: int, centres: np.ndarray, sigmas: np.ndarray, amplitudes: np.ndarray) -> torch.Tensor:
    """Sum of isotropic Gaussians (size, size) with the given peak amplitudes."""
    coords = torch.arange(size, dtype=torch.float32)
    field = torch.zeros(size, size)
    for (y, x), sigma, amplitude in zip(centres, sigmas, amplitudes):
        gy = torch.exp(-((coords - y) ** 2) / (2 * sigma**2))
        gx = torch.exp(-((coords - x) ** 2) / (2 * sigma**2))
        field += float(amplitude) * gy[:, None] * gx[None, :]
    return field


def render_sample_image(
    spec: SampleFundusSpec, grade: int, rng: np.random.Generator, photo: torch.Tensor
) -> np.ndarray:
    """One (size, size, 3) uint8 fundus image of ``grade`` (see the module docstring).

    Args:
        spec: the dataset settings.
        grade: 0, 1 or 2.
        rng: the random generator of this image.
        photo: the source photograph from :func:`_fundus_photograph` (passed in so it is decoded once).
    """
    size, scale = spec.image_size, spec.image_size / 512.0
    # random view of the photograph: rotation, mirror, zoom, shift (outside the fundus stays black)
    angle = rng.uniform(0, 2 * np.pi)
    zoom = rng.uniform(0.95, 1.1)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    shift = rng.uniform(-0.03, 0.03, size=2)
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    theta = torch.tensor([[flip * cos, -sin, shift[0]], [flip * sin, cos, shift[1]]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 3, size, size], align_corners=False)
    source = torch.cat([photo, torch.ones(1, *photo.shape[1:])])[None]  # 4th channel: inside the photograph
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    image, inside = warped[:3], warped[3]
    fundus = (image.mean(0) > 0.12) & (inside > 0.99)

    # colour: per-channel gain and gamma, and a smooth illumination field
    gain = torch.tensor(rng.uniform(0.85, 1.15, size=3), dtype=torch.float32)[:, None, None]
    gamma = torch.tensor(rng.uniform(0.8, 1.25, size=3), dtype=torch.float32)[:, None, None]
    light = torch.tensor(rng.uniform(0.85, 1.15, size=(1, 1, 4, 4)), dtype=torch.float32)
    light = F.interpolate(light, size=(size, size), mode="bicubic", align_corners=True)[0]
    image = (image.clamp(0, 1) ** gamma) * gain * light

    # spots: the grade's lesions, blots up to the image's fixed spot count, equal integrated darkening
    low, high = spec.lesions_per_grade[grade]
    num_lesions = int(rng.integers(low, high + 1))
    num_spots = int(rng.integers(spec.spots_per_image[0], spec.spots_per_image[1] + 1))
    margin = int(np.ceil(8 * scale))
    candidates = torch.nonzero(fundus[margin:-margin, margin:-margin]).numpy() + margin
    centres = candidates[rng.choice(len(candidates), size=num_spots, replace=False)] + rng.uniform(
        -0.5, 0.5, (num_spots, 2)
    )
    lesion = np.arange(num_spots) < num_lesions
    sigmas = (
        np.where(lesion, rng.uniform(*spec.lesion_sigma, num_spots), rng.uniform(*spec.blot_sigma, num_spots)) * scale
    )
    contrast = rng.uniform(*spec.lesion_contrast, num_spots)
    reference_sigma = rng.uniform(*spec.lesion_sigma, num_spots) * scale  # blots match a lesion's total darkening
    amplitudes = np.where(lesion, contrast, contrast * (reference_sigma / sigmas) ** 2)
    darkening = _gaussian_spots(size, centres, sigmas, amplitudes).clamp(max=0.9)
    red_weight = torch.tensor([0.6, 1.0, 1.0])[:, None, None]  # red lesions on a red fundus: G and B drop most
    image = image * (1 - red_weight * darkening)

    image = image + torch.from_numpy(rng.normal(0.0, spec.noise, size=image.shape).astype(np.float32))
    image = image * fundus
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _record(spec: SampleFundusSpec) -> dict:
    return {"generator_version": SAMPLE_GENERATOR_VERSION, "classes": list(SAMPLE_CLASSES), "spec": asdict(spec)}


def make_sample_dataset(
    output_dir: str | os.PathLike, spec: SampleFundusSpec | None = None, progress: bool = True, **spec_fields
) -> Path:
    """Create (or reuse) the sample dataset in ``output_dir`` and return that folder.

    Args:
        output_dir: the dataset folder (``train/ val/ test/`` of class folders are created in it).
        spec: the settings; by default :class:`SampleFundusSpec` built from ``spec_fields``.
        progress: show a progress bar.
        spec_fields: :class:`SampleFundusSpec` fields, e.g. ``num_train=60`` (only without ``spec``).
    """
    spec = sample_spec(SampleFundusSpec, spec, spec_fields)
    # decoded once, and only when the images are made (a reused folder needs no photograph)
    photo = functools.cache(lambda: _fundus_photograph(int(round(spec.image_size * 1.15))))

    def write_image(stem: Path, grade: int, rng: np.random.Generator) -> None:
        pixels = render_sample_image(spec, grade, rng, photo())
        Image.fromarray(pixels).save(f"{stem}.png", optimize=False)

    return write_sample_dataset(output_dir, spec, _record(spec), SAMPLE_CLASSES, write_image, progress=progress)


def sample_spec(spec_type: type, spec: Any | None, spec_fields: Mapping[str, Any]) -> Any:
    """``spec``, or a ``spec_type`` built from ``spec_fields`` (lists, as JSON and the command line give them,
    become the dataclass's tuples).

    Raises:
        ValueError: both ``spec`` and ``spec_fields`` were given.
        TypeError: a field ``spec_type`` does not have.
    """
    if spec is not None:
        if spec_fields:
            raise ValueError("give either spec or spec fields, not both.")
        return spec
    known = {field.name for field in dataclasses.fields(spec_type)}
    unknown = sorted(set(spec_fields) - known)
    if unknown:
        raise TypeError(f"{spec_type.__name__} has no field(s) {unknown}; its fields: {sorted(known)}.")
    return spec_type(**{name: _as_tuples(value) for name, value in spec_fields.items()})


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_sample_spec(
    spec: Any, size_field: str, min_size: int, per_grade_field: str, per_item_field: str, classes: Sequence[str]
) -> None:
    """Check the settings every graded sample dataset shares; fields are named as ``spec`` names them.

    ``per_grade_field``: one inclusive (min, max) count of sharp spots per class; ``per_item_field``: the
    (min, max) total spots of every item, at least the largest sharp count, so every grade has wide spots and
    the number of spots never tells the grade.
    """
    per_grade, per_item = getattr(spec, per_grade_field), getattr(spec, per_item_field)
    if len(per_grade) != len(classes):
        raise ValueError(f"{per_grade_field} needs {len(classes)} (min, max) pairs, got {per_grade}.")
    if max(high for _, high in per_grade) > per_item[0]:
        raise ValueError(
            f"{per_item_field} must be at least the largest count of {per_grade_field}, so every grade has wide spots."
        )
    if getattr(spec, size_field) < min_size:
        raise ValueError(f"{size_field} must be >= {min_size}, got {getattr(spec, size_field)}.")
    if min(spec.split_sizes().values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {spec.split_sizes()}.")


def write_sample_dataset(
    output_dir: str | os.PathLike,
    spec: Any,
    record: dict,
    classes: Sequence[str],
    write_item: Callable[[Path, int, np.random.Generator], None],
    progress: bool = True,
    name: str = "sample dataset",
    stream: Sequence[int] = (),
) -> Path:
    """Reuse ``output_dir`` if it holds a dataset made with ``record``; otherwise generate it, atomically.

    Item ``index`` of a split gets grade ``index % len(classes)``, the class folder of that grade and its own
    random generator, seeded by ``(spec.seed, split, index, *stream)`` only (so each item is reproducible alone;
    ``stream`` keeps the generators of different kinds of data apart). ``write_item(stem, grade, rng)`` writes the
    item's file(s) at ``stem`` (a path without suffix).

    Args:
        output_dir: the dataset folder (``train/ val/ test/`` of class folders).
        spec: the settings: ``seed`` and ``split_sizes()`` (items per split) are read here.
        record: what the folder's record file holds (:func:`reuse_dataset_folder`).
        classes: class folder names in grade order.
        write_item: renders and writes one item.
        progress: show a progress bar.
        name: what the progress bar and the log call the dataset.
        stream: extra seed entries of this kind of dataset.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    if reuse_dataset_folder(output_dir, record):
        return output_dir
    jobs = [(split, index) for split, count in spec.split_sizes().items() for index in range(count)]

    def fill(staging: Path) -> None:
        for split, index in tqdm(jobs, desc=name, disable=not progress, unit="item"):
            grade = index % len(classes)
            folder = staging / split / classes[grade]
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([spec.seed, _SPLIT_SEEDS[split], index, *stream])
            write_item(folder / f"{split}_{index:04d}", grade, rng)

    write_dataset_atomically(output_dir, record, fill)
    logger.info("%s: wrote %d items to %s", name, len(jobs), output_dir)
    return output_dir


def reuse_dataset_folder(output_dir: Path, record: dict, record_name: str = _RECORD) -> bool:
    """Whether ``output_dir`` already holds a generated dataset made with exactly ``record`` (then reuse it).

    ``False`` when the folder is missing, empty, or holds a generated dataset with another record (it is then
    regenerated). A non-empty folder without a record file is someone else's data: refused, never overwritten.

    Raises:
        FileExistsError: ``output_dir`` is a non-empty folder without ``record_name``.
    """
    record_file = output_dir / record_name
    if record_file.is_file():
        try:
            existing = json.loads(record_file.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == json.loads(json.dumps(record)):
            logger.info("sample dataset: reusing %s", output_dir)
            return True
        logger.warning("sample dataset in %s was made with other settings; regenerating it.", output_dir)
    elif output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(
            f"{output_dir} exists and is not a sample dataset (no {record_name}); choose an empty or new folder."
        )
    return False


def write_dataset_atomically(
    output_dir: Path, record: dict, fill: Callable[[Path], None], record_name: str = _RECORD
) -> None:
    """Generate a dataset into a temporary sibling folder, then rename it to ``output_dir`` in one step.

    ``fill(staging)`` writes the files; the record goes last, so an interrupted run leaves no folder that
    :func:`reuse_dataset_folder` would take for complete (the staging folder is removed on any error).
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        fill(staging)
        (staging / record_name).write_text(json.dumps(record, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
