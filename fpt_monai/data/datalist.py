"""Datalists: which image has which label, from a folder layout or a JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from fpt_monai.data.readers import IMAGE_SUFFIXES

__all__ = [
    "IMAGE_SUFFIXES",
    "dataset_classes",
    "folder_classes",
    "folder_datalist",
    "image_datalist",
    "json_datalist",
    "make_datalist",
]


def _is_image(path: Path) -> bool:
    """An image file by its suffix; a broken symbolic link too, so that the data check names it."""
    name = path.name.lower()
    return (path.is_file() or path.is_symlink()) and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def folder_classes(dataset_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """Class names of ``dataset_dir/split/<class>/``, sorted; label i is the i-th name."""
    root = Path(dataset_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"no '{split}' folder in {dataset_dir}: expected {root}/<class name>/<images>.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: expected {root}/<class name>/<images>.")
    return classes


def folder_datalist(
    dataset_dir: str | os.PathLike,
    split: str,
    classes: list[str] | None = None,
    is_item: Callable[[Path], bool] = _is_image,
    items_name: str = "images",
) -> list[dict]:
    """``[{"image": path, "label": index}]`` from ``dataset_dir/split/<class>/<image files>``.

    Args:
        dataset_dir: root holding ``train/``, ``val/``, ``test/``.
        split: the sub-folder to list.
        classes: class names in label order; by default those of ``train/`` (so every split shares labels).
        is_item: which entries of a class folder are listed (image files by default; volumes for 3D).
        items_name: what those entries are called in error messages.
    """
    classes = classes if classes is not None else folder_classes(dataset_dir, "train")
    root = Path(dataset_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"no '{split}' folder in {dataset_dir} (expected {root}/<class name>/<{items_name}>).")
    unknown = sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name not in classes and not p.name.startswith(".")
    )
    if unknown:
        raise ValueError(f"{root} has class folders {unknown} that train/ does not have ({classes}).")
    return [
        {"image": str(path), "label": label}
        for label, name in enumerate(classes)
        if (root / name).is_dir()
        for path in sorted((root / name).iterdir())
        if is_item(path)
    ]


def _read_json_datalist(path: Path) -> dict:
    """The JSON object of a datalist file; errors name the file and say what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"datalist file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"datalist {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise ValueError(
            f'datalist {path} must be a JSON object {{"train": [...], "val": [...], ...}}, got a {type(content).__name__}.'
        )
    return content


def json_datalist(path: str | os.PathLike, split: str, strict: bool = True) -> list[dict]:
    """``[{"image", "label"}]`` from a JSON file ``{"train": [{"image": ..., "label": ...}], ...}``.

    Relative image paths are relative to the JSON file's folder.

    Args:
        path: the JSON datalist file.
        split: the list to read.
        strict: raise ``ValueError`` naming every item that is not an ``{"image": path, "label": ...}`` dict;
            with ``False`` such items are passed on unchanged, for :func:`~fpt_monai.data.validate_datalist` to
            report (and skip) together with every other problem.
    """
    path = Path(path)
    content = _read_json_datalist(path)
    if split not in content:
        raise KeyError(f"datalist {path} has no '{split}' list (it has {sorted(content)}).")
    if not isinstance(content[split], list):
        raise ValueError(f"datalist {path}: '{split}' must be a list of items, got a {type(content[split]).__name__}.")
    items, bad = [], []
    for index, item in enumerate(content[split]):
        has_image = isinstance(item, dict) and isinstance(item.get("image"), str) and bool(item["image"])
        if has_image and "\x00" not in item["image"]:  # relative to the JSON file, even when the item is malformed
            image = Path(item["image"])
            item = {**item, "image": str(image if image.is_absolute() else path.parent / image)}
        if not (has_image and "label" in item):
            bad.append(f"item {index}: expected {{'image': path, 'label': ...}}, got {item!r:.200}")
        items.append(item)
    if bad and strict:
        raise ValueError(f"datalist {path}, '{split}': " + "; ".join(bad))
    return items


def make_datalist(
    dataset_dir: str | os.PathLike, split: str, strict: bool = True, missing_ok: bool = False
) -> list[dict]:
    """Datalist of ``split`` from ``dataset_dir``: a JSON datalist file, or a folder of class sub-folders.

    ``strict=False`` passes malformed JSON items on for :func:`~fpt_monai.data.validate_datalist` (see
    :func:`json_datalist`). ``missing_ok=True`` gives an empty list for a dataset without that split (no
    ``dataset_dir/split/`` folder, no such list in the JSON file): training checks the test split when there is one.
    """
    if str(dataset_dir).endswith(".json"):
        if missing_ok and split not in _read_json_datalist(Path(dataset_dir)):
            return []
        return json_datalist(dataset_dir, split, strict=strict)
    if missing_ok and not (Path(dataset_dir) / split).is_dir():
        return []
    return folder_datalist(dataset_dir, split)


def dataset_classes(dataset_dir: str | os.PathLike) -> list[str]:
    """Class names in label order: the ``train/`` sub-folders, or a JSON datalist's ``"classes"`` list.

    A JSON datalist without ``"classes"`` gets the names ``"0" .. str(max label)`` from its ``train`` list.
    """
    if not str(dataset_dir).endswith(".json"):
        return folder_classes(dataset_dir, "train")
    path = Path(dataset_dir)
    content = _read_json_datalist(path)
    if "classes" in content:
        classes = content["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, (str, int)) for c in classes):
            raise ValueError(f"datalist {path}: 'classes' must be a non-empty list of names, got {classes!r:.200}.")
        if len(set(map(str, classes))) != len(classes):
            raise ValueError(f"datalist {path}: 'classes' has duplicate names: {classes!r:.200}.")
        return [str(c) for c in classes]
    # only well-formed integer labels count here; validate_datalist reports the others by item
    labels = [
        item["label"]
        for item in json_datalist(path, "train", strict=False)
        if isinstance(item, dict)
        and isinstance(item.get("label"), int)
        and not isinstance(item["label"], bool)
        and item["label"] >= 0
    ]
    if not labels:
        raise ValueError(
            f"datalist {path}: no 'classes' list and no item of 'train' with an integer label >= 0 to count them from."
        )
    return [str(i) for i in range(int(max(labels)) + 1)]


def image_datalist(source: str | os.PathLike | list) -> list[dict]:
    """``[{"image": path}]`` of the images to classify: a folder (searched recursively), one file, or a list.

    Raises ``FileNotFoundError`` naming the path when a given file or folder does not exist, and ``ValueError``
    when a folder holds no image. Broken symbolic links found in a folder are listed, for
    :func:`~fpt_monai.data.readable_datalist` to name.
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        root = Path(source)
        if root.is_dir():
            paths = sorted(p for p in root.rglob("*") if _is_image(p))
            if not paths:
                raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {root}.")
            return [{"image": str(p.absolute())} for p in paths]
        paths = [root]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"images not found: {missing}")
    return [{"image": str(p.absolute())} for p in paths]


def check_class_names(
    class_names: Sequence[str], num_classes: int, dataset_dir: str | os.PathLike | None = None
) -> list[str]:
    """Check a config's literal ``class_names`` against its ``num_classes`` and, given, the dataset's classes.

    The bundle's configs state the classes (the network and the outputs are built from them without any data);
    training checks that the dataset has exactly these classes, in label order.

    Raises:
        ValueError: naming the config keys to change and the classes found.
    """
    names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"class_names has {len(names)} entries {names} but num_classes is {num_classes}: make them agree."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicate names: {names}.")
    if dataset_dir is not None:
        found = dataset_classes(dataset_dir)
        if found != names:
            raise ValueError(
                f"the dataset {dataset_dir} has the classes {found}, but the config's class_names are {names}: "
                f'pass --class_names "{found}" --num_classes {len(found)}.'
            )
    return names
