"""Pictures of what FPT looked at and how it did: selection-map overlays and confusion matrices, as RGB arrays.

The frozen backbone keeps, per extracted block and head, only its most important tokens (FPT's important token
selection). :meth:`~fpt_monai.networks.FrozenBackbone.selection_map` says, per high-resolution patch, which
fraction of those (block, head) pairs kept it; :func:`selection_overlay` paints that map over the image. The
TensorBoard handlers (:mod:`fpt_monai.engine.tensorboard`), the inference PNGs and ``fpt-monai selection_map``
all draw with these functions; ``networks/`` stays free of plotting and files.

Drawn with numpy and Pillow (dependencies of the package). MONAI's ``blend_images`` would need matplotlib for its
colour maps, which the package does not require; the overlay's colour ramp is three anchors, linearly blended.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import rescale_array
from PIL import Image, ImageDraw

from fpt_monai.utils import atomic_write

__all__ = ["display_image", "selection_overlay", "confusion_matrix_image", "save_png", "unique_png_names"]


def display_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (C, H, W) image in any value range (e.g. normalised) as (H, W, 3) uint8, min-max scaled per image.

    One channel is shown grey; three as RGB; other counts show the first channel grey.
    """
    image = torch.as_tensor(image).detach().float().cpu()
    if image.ndim != 3:
        raise ValueError(f"expected one 2D image (C, H, W), got shape {tuple(image.shape)}.")
    if image.shape[0] != 3:
        image = image[:1].expand(3, -1, -1)
    scaled = rescale_array(image.numpy(), 0.0, 1.0)
    return (np.moveaxis(scaled, 0, -1) * 255 + 0.5).astype(np.uint8)


#: Colours of the selection ramp at fractions 0, 0.5 and 1: blue, cyan, white (they stand out on the red, brown
#: and grey tones of medical photographs and radiographs).
_RAMP = np.array([[0.0, 0.25, 1.0], [0.0, 0.9, 1.0], [1.0, 1.0, 1.0]], dtype=np.float32)


def _ramp(values: np.ndarray) -> np.ndarray:
    """Colours (..., 3) of values in [0, 1]: linear between the :data:`_RAMP` anchors."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.minimum(position.astype(np.int64), len(_RAMP) - 2)
    weight = (position - low)[..., None]
    return (1 - weight) * _RAMP[low] + weight * _RAMP[low + 1]


def selection_overlay(
    image: torch.Tensor | np.ndarray, selection: torch.Tensor | np.ndarray, alpha: float = 0.7
) -> np.ndarray:
    """Paint a selection map over its image: (H, W, 3) uint8.

    A patch that no (block, head) pair selected shows the image unchanged; a selected one is covered by a colour
    from blue (kept by few pairs) through cyan to white (kept by all), with an opacity from ``0.4 * alpha`` to
    ``alpha`` that grows with the fraction too. The map is enlarged to the image with nearest-neighbour sampling,
    so each cell is exactly one backbone patch.

    Args:
        image: (C, H, W) image, any value range (shown min-max scaled, see :func:`display_image`).
        selection: (h, w) fractions in [0, 1] on the patch grid
            (:meth:`~fpt_monai.networks.FrozenBackbone.selection_map` of one image).
        alpha: the opacity of a patch every pair selected, in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    base = display_image(image).astype(np.float32) / 255
    selection = torch.as_tensor(selection).detach().float().cpu()
    if selection.ndim != 2:
        raise ValueError(f"expected a 2D selection map (h, w), got shape {tuple(selection.shape)}.")
    fraction = F.interpolate(selection[None, None], size=base.shape[:2], mode="nearest")[0, 0].numpy()
    fraction = np.clip(fraction, 0.0, 1.0)
    weight = np.where(fraction > 0, alpha * (0.4 + 0.6 * fraction), 0.0)[..., None]
    return ((1 - weight) * base * 255 + weight * _ramp(fraction) * 255 + 0.5).astype(np.uint8)


def confusion_matrix_image(
    matrix: torch.Tensor | np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str], cell: int = 64
) -> np.ndarray:
    """A confusion matrix as a picture, (H, W, 3) uint8: rows are the true classes, columns the predicted ones.

    Each cell shows its count, shaded by the fraction of its row (white: none of the class, dark blue: all of
    it), so a good classifier shows a dark diagonal whatever the class sizes. Classes are numbered on the axes;
    the legend below the matrix names them.
    """
    matrix = np.asarray(torch.as_tensor(matrix).cpu(), dtype=np.int64)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"expected a {n} x {n} confusion matrix for classes {list(class_names)}, got {matrix.shape}.")
    margin, line = 28, 14
    width = max(margin + n * cell + 8, 8 + 7 * max(len(f"{i}: {name}") for i, name in enumerate(class_names)))
    height = margin + n * cell + 8 + line * (n + 1)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    rows = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=np.float64), where=rows > 0)
    for i in range(n):
        draw.text((margin + i * cell + cell // 2 - 3, 8), str(i), fill="black")
        draw.text((8, margin + i * cell + cell // 2 - 6), str(i), fill="black")
        for j in range(n):
            f = fractions[i, j]
            fill = tuple(int(255 - f * (255 - c)) for c in (8, 48, 107))  # white -> dark blue
            box = (margin + j * cell, margin + i * cell, margin + (j + 1) * cell - 1, margin + (i + 1) * cell - 1)
            draw.rectangle(box, fill=fill, outline="grey")
            text = str(int(matrix[i, j]))
            draw.text((box[0] + cell // 2 - 3 * len(text), box[1] + cell // 2 - 6), text,
                      fill="white" if f > 0.5 else "black")  # fmt: skip
    legend = margin + n * cell + 8
    draw.text((8, legend), "rows: true class, columns: predicted", fill="black")
    for i, name in enumerate(class_names):
        draw.text((8, legend + line * (i + 1)), f"{i}: {name}", fill="black")
    return np.asarray(picture)


def save_png(picture: np.ndarray, path: str | os.PathLike, colors: int | None = None) -> Path:
    """Write an (H, W, 3) uint8 picture as a PNG, atomically (no half-written file); returns the path.

    Args:
        picture: the picture.
        path: the PNG file (its folder is created).
        colors: store a palette of this many colours (median cut, no dithering) instead of full RGB: a smaller
            file, e.g. for documentation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(picture))
    if colors is not None:
        if not 2 <= int(colors) <= 256:
            raise ValueError(f"colors must be in [2, 256], got {colors}.")
        image = image.quantize(int(colors), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_write(path, "wb", what="PNG") as f:
        image.save(f, format="PNG", optimize=True)
    return path


def unique_png_names(filenames: Iterable[str | os.PathLike]) -> dict[str, str]:
    """One PNG file name per image file, unique among ``filenames``: ``<stem>.png``, or ``<stem>-<hash>.png``.

    An image whose stem is shared by another one (``a/img.png`` and ``b/img.png``, or ``img.png`` and
    ``img.jpg``) gets the first 8 hex digits of the SHA-256 of its absolute path appended, so names do not
    depend on the order of the files.

    Returns:
        ``{str(filename): png name}``.
    """
    paths = [str(f) for f in filenames]
    stems: dict[str, int] = {}
    for p in set(paths):
        stem = _stem(p)
        stems[stem] = stems.get(stem, 0) + 1
    names = {}
    for p in paths:
        stem = _stem(p)
        if stems[stem] > 1:
            stem += "-" + hashlib.sha256(str(Path(p).absolute()).encode()).hexdigest()[:8]
        names[p] = stem + ".png"
    return names


def _stem(filename: str) -> str:
    name = Path(filename).name
    for suffix in (".nii.gz", ".ome.tif", ".ome.tiff"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem
