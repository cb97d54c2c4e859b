"""Datalists: which image has which label, from a folder layout or a JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fpt_monai.data.readers import CONTENT_FORMATS, IMAGE_SUFFIXES, sniff_format
from fpt_monai.data.tables import is_label_table, read_label_table, table_datalist
from fpt_monai.utils import escape_path

__all__ = [
    "IMAGE_SUFFIXES",
    "SYSTEM_FILES",
    "Datalist",
    "check_class_names",
    "dataset_classes",
    "folder_classes",
    "folder_datalist",
    "image_datalist",
    "json_datalist",
    "make_datalist",
]

#: Files that operating systems and viewers leave in folders (never data): not read, and named as such.
SYSTEM_FILES = ("thumbs.db", "ehthumbs.db", "desktop.ini")


class Datalist(list):
    """Datalist items (a ``list``) that also carry the files a folder search did not take: ``not_read``, a list of
    ``{"image": path, "reason": why}``.

    :func:`~fpt_monai.data.validate_datalist` and :func:`~fpt_monai.data.readable_datalist` put them in their
    report and count them in the log, so that no file of a folder is left out without being named.
    """

    def __init__(self, items: Sequence = (), not_read: Sequence[dict] = ()) -> None:
        super().__init__(items)
        self.not_read = list(not_read)


def _not_read(path: Path) -> str | None:
    """Why a file found in a folder is not read as an image, or ``None`` when it is.

    A file with an image suffix is read without being opened here (the data check decodes it and names it when it
    is damaged, and names a broken link); any other file by at most its first 132 bytes: DICOM (PACS exports name
    files ``IM000001`` or by their UID), PNG, JPEG or TIFF whatever its name. Hidden files (``.*``), system files
    (:data:`SYSTEM_FILES`) and a ``DICOMDIR`` index are not read.
    """
    name = path.name
    if name.startswith("."):
        return "hidden file"
    if name.lower() in SYSTEM_FILES:
        return "system file (not data)"
    if name.upper() == "DICOMDIR":
        return "DICOMDIR index of a DICOM folder tree (no image; the image files it lists are read themselves)"
    if name.lower().endswith(IMAGE_SUFFIXES):
        return None
    if path.is_symlink() and not path.exists():
        return f"broken symbolic link: its target {os.readlink(path)} does not exist"
    if not path.is_file():
        return "not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as err:
        return f"cannot be opened to tell its format ({err.strerror or err})"
    kind = sniff_format(head)
    if kind in CONTENT_FORMATS:
        return None
    if not head:
        return "empty file (0 bytes)"
    if kind is not None:
        return f"{kind}: not a format that is read (convert it to PNG)"
    suffix = f"its suffix {path.suffix!r}" if path.suffix else "no suffix"
    return (
        f"not an image ({suffix}, and its first bytes are not those of DICOM, PNG, JPEG or TIFF; "
        f"read: {', '.join(IMAGE_SUFFIXES)} files and DICOM/PNG/JPEG/TIFF of any name)"
    )


def _search(root: Path) -> tuple[list[Path], list[dict]]:
    """The image files under ``root`` (searched recursively, sorted) and every other entry with why it is not read.

    Hidden folders (``.*``) and symbolic links to folders are not searched, and are named so.
    """
    found: list[Path] = []
    not_read: list[dict] = []

    def unsearchable(err: OSError) -> None:
        not_read.append({"image": str(err.filename), "reason": f"folder cannot be searched ({err.strerror or err})"})

    for folder, subfolders, files in os.walk(root, onerror=unsearchable):
        base = Path(folder)
        searched = []
        for name in subfolders:
            if name.startswith("."):
                not_read.append({"image": str(base / name), "reason": "hidden folder (not searched)"})
            elif (base / name).is_symlink():
                not_read.append({"image": str(base / name), "reason": "symbolic link to a folder (not searched)"})
            else:
                searched.append(name)
        subfolders[:] = sorted(searched)
        for name in files:
            reason = _not_read(base / name)
            if reason is None:
                found.append(base / name)
            else:
                not_read.append({"image": str(base / name), "reason": reason})
    return sorted(found), sorted(not_read, key=lambda entry: Path(entry["image"]))


def not_read_lines(not_read: Sequence[dict], shown: int = 20) -> str:
    """The files not read, one per line with the reason (the first ``shown``; paths escaped, see
    :func:`~fpt_monai.utils.escape_path`), for messages and the log."""
    lines = [f"  {escape_path(entry['image'])}: {escape_path(entry['reason'])}" for entry in not_read[:shown]]
    if len(not_read) > shown:
        lines.append(f"  ... and {len(not_read) - shown} more")
    return "\n".join(lines)


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
    is_item: Callable[[Path], bool] | None = None,
    items_name: str = "images",
) -> list[dict]:
    """``[{"image": path, "label": index}]`` from ``dataset_dir/split/<class>/<image files>``.

    By default each class folder is searched recursively (PACS exports nest ``patient/study/series/IM000001``) and
    files are taken by their name or content (see :func:`image_datalist`); the result is a :class:`Datalist` whose
    ``not_read`` names every other file (in a class folder, or beside the class folders) with why, for the data
    check's report.

    Args:
        dataset_dir: root holding ``train/``, ``val/``, ``test/``.
        split: the sub-folder to list.
        classes: class names in label order; by default those of ``train/`` (so every split shares labels).
        is_item: which entries of a class folder are listed (not searched recursively; e.g. volumes for 3D);
            ``None``: image files, searched as described above.
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
    if is_item is not None:
        return [
            {"image": str(path), "label": label}
            for label, name in enumerate(classes)
            if (root / name).is_dir()
            for path in sorted((root / name).iterdir())
            if is_item(path)
        ]
    items, not_read = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") and entry.is_dir():
            not_read.append({"image": str(entry), "reason": "hidden folder (not searched)"})
        elif not entry.is_dir():
            reason = _not_read(entry) or "an image beside the class folders, in none of them (no label)"
            not_read.append({"image": str(entry), "reason": reason})
    for label, name in enumerate(classes):
        if (root / name).is_dir():
            found, skipped = _search(root / name)
            items += [{"image": str(path), "label": label} for path in found]
            not_read += skipped
    return Datalist(items, not_read)


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
    dataset_dir: str | os.PathLike,
    split: str,
    strict: bool = True,
    missing_ok: bool = False,
    label_table: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
) -> list[dict]:
    """Datalist of ``split`` from ``dataset_dir``: a JSON datalist file, a label table, or a folder of class
    sub-folders.

    ``strict=False`` passes malformed JSON items on for :func:`~fpt_monai.data.validate_datalist` (see
    :func:`json_datalist`). ``missing_ok=True`` gives an empty list for a dataset without that split (no
    ``dataset_dir/split/`` folder, no such list in the JSON file): training checks the test split when there is one.
    A label table (``.csv``, ``.tsv``, ``.txt``: see :mod:`fpt_monai.data.tables`) is read with the options
    ``label_table`` and the class names ``classes``; its splits are made once and saved (``label_table#split_file``).
    """
    if is_label_table(dataset_dir):
        if classes is None:
            raise ValueError(f"the label table {escape_path(dataset_dir)} needs the class names (classes=...).")
        return table_datalist(dataset_dir, split, classes, label_table)
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

    In a folder, a file is an image by its suffix (``IMAGE_SUFFIXES``) or, whatever its name, by its first 132
    bytes: DICOM (PACS exports and DICOMDIR trees name files ``IM000001`` or by their UID), PNG, JPEG or TIFF.
    Every other file is left out with its reason in the result's ``not_read`` (a :class:`Datalist`), which
    :func:`~fpt_monai.data.readable_datalist` writes to its report and counts in the log: GIF, WebP and other
    formats, files that cannot be opened, a ``DICOMDIR`` index, hidden files and folders (``.*``, not searched),
    system files (:data:`SYSTEM_FILES`), symbolic links to folders (not searched). Broken symbolic links with an
    image suffix are listed, for the check to name. A file or list given explicitly is listed whatever its name.

    Raises ``FileNotFoundError`` naming the path when a given file or folder does not exist, and ``ValueError``
    naming the folder and every file in it with its reason when a folder holds no image.
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        root = Path(source)
        if root.is_dir():
            found, not_read = _search(root.absolute())
            if not found:
                listed = f":\n{not_read_lines(not_read)}" if not_read else " (it is empty)"
                raise ValueError(
                    f"no image files ({', '.join(IMAGE_SUFFIXES)}, or DICOM/PNG/JPEG/TIFF of any name) in "
                    f"{escape_path(root)}{listed}"
                )
            return Datalist([{"image": str(p)} for p in found], not_read)
        paths = [root]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"images not found: {missing}")
    return [{"image": str(p.absolute())} for p in paths]


def check_class_names(
    class_names: Sequence[str],
    num_classes: int,
    dataset_dir: str | os.PathLike | None = None,
    label_table: Mapping[str, Any] | None = None,
) -> list[str]:
    """Check a config's literal ``class_names`` against its ``num_classes`` and, given, the dataset's classes.

    The bundle's configs state the classes (the network and the outputs are built from them without any data);
    training checks that the dataset has exactly these classes, in label order. A label table (read with the
    options ``label_table``) must label its rows with these class names or their indices, and its one-hot
    columns must be among them (:class:`~fpt_monai.data.tables.LabelTableError` otherwise).

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
    if dataset_dir is not None and is_label_table(dataset_dir):
        read_label_table(dataset_dir, names, label_table)
    elif dataset_dir is not None:
        found = dataset_classes(dataset_dir)
        if found != names:
            raise ValueError(
                f"the dataset {dataset_dir} has the classes {found}, but the config's class_names are {names}: "
                f'pass --class_names "{found}" --num_classes {len(found)}.'
            )
    return names
