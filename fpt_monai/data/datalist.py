"""Datalists: which image has which label, from a folder layout or a JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "dataset_classes",
    "folder_classes",
    "folder_datalist",
    "image_datalist",
    "json_datalist",
    "make_datalist",
]

#: File suffixes read as images from a folder layout (a DICOM file may also have no suffix in a JSON datalist).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".nii.gz")


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def folder_classes(dataset_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """Class names of ``dataset_dir/split/<class>/``, sorted; label i is the i-th name."""
    root = Path(dataset_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"no '{split}' folder in {dataset_dir}: expected {root}/<class name>/<images>.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: expected {root}/<class name>/<images>.")
    return classes


def folder_datalist(dataset_dir: str | os.PathLike, split: str, classes: list[str] | None = None) -> list[dict]:
    """``[{"image": path, "label": index}]`` from ``dataset_dir/split/<class>/<image files>``.

    Args:
        dataset_dir: root holding ``train/``, ``val/``, ``test/``.
        split: the sub-folder to list.
        classes: class names in label order; by default those of ``train/`` (so every split shares labels).
    """
    classes = classes if classes is not None else folder_classes(dataset_dir, "train")
    root = Path(dataset_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"no '{split}' folder in {dataset_dir} (expected {root}).")
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes and not p.name.startswith("."))
    if unknown:
        raise ValueError(f"{root} has class folders {unknown} that train/ does not have ({classes}).")
    return [
        {"image": str(path), "label": label}
        for label, name in enumerate(classes)
        if (root / name).is_dir()
        for path in sorted((root / name).iterdir())
        if _is_image(path)
    ]


def json_datalist(path: str | os.PathLike, split: str) -> list[dict]:
    """``[{"image", "label"}]`` from a JSON file ``{"train": [{"image": ..., "label": ...}], ...}``.

    Relative image paths are relative to the JSON file's folder.
    """
    path = Path(path)
    with open(path) as f:
        content = json.load(f)
    if split not in content:
        raise KeyError(f"datalist {path} has no '{split}' list (it has {sorted(content)}).")
    items = []
    for index, item in enumerate(content[split]):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise ValueError(f"datalist {path}, '{split}' item {index}: expected {{'image': ..., 'label': ...}}, got {item!r}.")
        image = Path(item["image"])
        items.append({**item, "image": str(image if image.is_absolute() else path.parent / image)})
    return items


def make_datalist(dataset_dir: str | os.PathLike, split: str) -> list[dict]:
    """Datalist of ``split`` from ``dataset_dir``: a JSON datalist file, or a folder of class sub-folders."""
    if str(dataset_dir).endswith(".json"):
        return json_datalist(dataset_dir, split)
    return folder_datalist(dataset_dir, split)


def dataset_classes(dataset_dir: str | os.PathLike) -> list[str]:
    """Class names in label order: the ``train/`` sub-folders, or a JSON datalist's ``"classes"`` list.

    A JSON datalist without ``"classes"`` gets the names ``"0" .. str(max label)`` from its ``train`` list.
    """
    if not str(dataset_dir).endswith(".json"):
        return folder_classes(dataset_dir, "train")
    path = Path(dataset_dir)
    with open(path) as f:
        content = json.load(f)
    if "classes" in content:
        classes = content["classes"]
        if not isinstance(classes, list) or not classes:
            raise ValueError(f"datalist {path}: 'classes' must be a non-empty list of names, got {classes!r}.")
        return [str(c) for c in classes]
    labels = [item["label"] for item in json_datalist(path, "train")]
    if not labels:
        raise ValueError(f"datalist {path} has an empty 'train' list.")
    return [str(i) for i in range(int(max(labels)) + 1)]


def image_datalist(source: str | os.PathLike | list) -> list[dict]:
    """``[{"image": path}]`` of the images to classify: a folder (searched recursively), one file, or a list.

    Raises ``FileNotFoundError`` naming the path when a given file or folder does not exist, and ``ValueError``
    when a folder holds no image.
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        root = Path(source)
        if root.is_dir():
            paths = sorted(p for p in root.rglob("*") if _is_image(p))
            if not paths:
                raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {root}.")
        else:
            paths = [root]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"images not found: {missing}")
    return [{"image": str(p.absolute())} for p in paths]
