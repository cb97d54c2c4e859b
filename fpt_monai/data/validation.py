"""Checking a datalist before any compute is spent on it: every bad item named, or skipped with a report.

:func:`validate_datalist` looks at every item of a split and collects *all* problems before deciding:

- malformed items (not a dict, no ``"image"`` path, no ``"label"``);
- labels that are not integer class indices (strings, floats, booleans) or lie outside the classes;
- image files that are missing, not regular files, unreadable, damaged (header, and PNG checksums), or
  smaller than ``min_size`` pixels on a side (optionally: every image fully decoded with the training reader);
- duplicate entries (the same file twice in the split, or also in another split given as ``disjoint_from``);
- classes without any item, and an empty split.

With ``on_error="raise"`` (default) it raises :class:`DatalistError`, whose message lists every bad item with
its index, file and problem; with ``on_error="skip"`` it drops the bad items, logs a warning and returns the
rest. Either way ``report_path`` receives a JSON report of what was found. Problems of the split as a whole
(an empty class, no items) cannot be skipped and always raise.

Images are checked from their headers (sizes) without decoding, so a split of thousands of images is checked
in seconds; ``decode=True`` reads every image with the training reader instead.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fpt_monai.data.readers import ImageReadError, image_size, read_image
from fpt_monai.utils import atomic_write

__all__ = ["BAD_ITEM_POLICIES", "DatalistError", "validate_datalist"]

logger = logging.getLogger(__name__)

#: Values of ``on_error``.
BAD_ITEM_POLICIES = ("raise", "skip")


class DatalistError(ValueError):
    """Bad items or an unusable split; ``problems`` lists them (``{"split", "index", "image", "problem"}``)."""

    def __init__(self, message: str, problems: list[dict]) -> None:
        super().__init__(message)
        self.problems = problems


def _describe_label(label: Any) -> str:
    return f"{label!r:.60} ({type(label).__name__})"


def _label_problem(label: Any, num_classes: int, classes: Sequence[str]) -> str | None:
    # bool is an int subclass, and a float such as 1.0 would silently become a float target: both refused
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        return f"label {_describe_label(label)} is not an integer class index 0..{num_classes - 1}"
    if not 0 <= int(label) < num_classes:
        shown = ", ".join(repr(c) for c in list(classes)[:10]) + (", ..." if num_classes > 10 else "")
        return f"label {int(label)} is outside the {num_classes} classes 0..{num_classes - 1} ({shown})"
    return None


def _image_problem(
    path: str, min_size: int, decode: bool, reader: Mapping[str, Any], volume_axis: int
) -> str | None:
    """What is wrong with an image file, or ``None``."""
    if not os.path.exists(path):
        return "file not found"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "file is not readable (permission denied)"
    if os.path.getsize(path) == 0:
        return "file is empty (0 bytes)"
    try:
        height, width = image_size(path, volume_axis=volume_axis)
        if decode:
            height, width = read_image(path, **reader).shape[-2:]
    except ImageReadError as err:
        return f"unreadable image: {str(err).removeprefix(f'{path}: ')}"
    except Exception as err:  # a reader failing in an unforeseen way is still a bad file, named
        return f"unreadable image ({type(err).__name__}: {err})"
    if min(height, width) < min_size:
        return f"image is {height}x{width} pixels, smaller than the minimum {min_size} (min_size)"
    return None


def _key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def validate_datalist(
    datalist: Sequence[Any],
    classes: Sequence[str],
    split: str = "train",
    min_size: int = 32,
    on_error: str = "raise",
    report_path: str | os.PathLike | None = None,
    decode: bool = False,
    require_every_class: bool = True,
    disjoint_from: Mapping[str, Sequence[Any]] | None = None,
    reader: Mapping[str, Any] | None = None,
    num_threads: int = 8,
    image_key: str = "image",
    label_key: str = "label",
) -> list[dict]:
    """Check every item of a datalist; raise naming all bad items, or drop them and report (see module doc).

    Args:
        datalist: the items (``{"image": path, "label": index, ...}``), e.g. from ``make_datalist(...,
            strict=False)``.
        classes: class names in label order.
        split: the split's name, for messages and the report.
        min_size: smallest allowed image height and width, in pixels.
        on_error: ``"raise"``: raise :class:`DatalistError` if any item is bad; ``"skip"``: drop bad items.
        report_path: JSON file that receives the report (written whenever given, problems or not).
        decode: read every image completely with the training reader (slower, catches damaged pixel data in
            any format); by default only headers are read (and PNG checksums verified).
        require_every_class: a class without any (good) item is an error.
        disjoint_from: other splits by name (``{"train": train_items}``); an image that is also there is a
            duplicate (split leakage).
        reader: options of :func:`~fpt_monai.data.readers.read_image` (used with ``decode``; ``volume_axis`` also
            for the header size of volumes).
        num_threads: threads reading image headers (file access dominates).
        image_key: the items' image path key.
        label_key: the items' label key.

    Returns:
        The good items, in order (all of them when nothing is wrong).

    Raises:
        DatalistError: listing every problem (``on_error="raise"``), or problems that skipping cannot fix.
        ValueError: for invalid arguments.
    """
    if on_error not in BAD_ITEM_POLICIES:
        raise ValueError(f"on_error must be one of {BAD_ITEM_POLICIES}, got {on_error!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive integer (pixels), got {min_size!r}.")
    if not isinstance(datalist, Sequence) or isinstance(datalist, (str, bytes)):
        raise DatalistError(
            f"datalist '{split}' must be a list of items, got a {type(datalist).__name__}.",
            [{"split": split, "index": None, "image": None, "problem": "not a list"}],
        )
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("classes must name at least one class.")
    reader = dict(reader or {})
    volume_axis = int(reader.get("volume_axis", 2))
    start = time.perf_counter()

    problems: dict[int, list[str]] = {}
    paths: dict[int, str] = {}
    for index, item in enumerate(datalist):
        reasons = []
        if not isinstance(item, Mapping):
            problems[index] = [f"not an {{'{image_key}': path, '{label_key}': index}} dict: {item!r:.80}"]
            continue
        image = item.get(image_key)
        if image_key not in item:
            reasons.append(f"no '{image_key}' key")
        elif not isinstance(image, (str, os.PathLike)) or not str(image).strip() or "\x00" in str(image):
            reasons.append(f"'{image_key}' must be a file path, got {image!r:.60}")
        else:
            paths[index] = os.fspath(image)
        if label_key not in item:
            reasons.append(f"no '{label_key}' key")
        else:
            reason = _label_problem(item[label_key], len(classes), classes)
            if reason:
                reasons.append(reason)
        if reasons:
            problems[index] = reasons

    # duplicates: the same file twice here, or in another split
    seen: dict[str, int] = {}
    for index, path in paths.items():
        key = _key(path)
        if key in seen:
            problems.setdefault(index, []).append(f"duplicate of item {seen[key]} (same file)")
        else:
            seen[key] = index
    for other_split, other_items in (disjoint_from or {}).items():
        other = {
            _key(os.fspath(it[image_key])): i for i, it in enumerate(other_items)
            if isinstance(it, Mapping) and isinstance(it.get(image_key), (str, os.PathLike))
            and "\x00" not in os.fspath(it[image_key])
        }
        for index, path in paths.items():
            if _key(path) in other:
                problems.setdefault(index, []).append(f"also in split '{other_split}' (item {other[_key(path)]})")

    # image files: checked concurrently (header reads are dominated by file access)
    unique = {
        index: path for index, path in paths.items()
        if not any(reason.startswith("duplicate") for reason in problems.get(index, []))
    }
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = pool.map(lambda path: _image_problem(path, min_size, decode, reader, volume_axis), unique.values())
        checked = dict(zip(unique, results))
    for index, reason in checked.items():
        if reason:
            problems.setdefault(index, []).append(reason)

    good = [item for index, item in enumerate(datalist) if index not in problems]
    item_problems = [
        {"split": split, "index": index, "image": paths.get(index), "problem": "; ".join(reasons)}
        for index, reasons in sorted(problems.items())
    ]
    split_problems = []
    if not datalist:
        split_problems.append("the split has no items")
    elif require_every_class:
        counts = [0] * len(classes)
        for item in good:
            counts[int(item[label_key])] += 1
        for label, (name, count) in enumerate(zip(classes, counts)):
            if count == 0:
                where = "no items" if not item_problems else "no usable items"
                split_problems.append(f"class {name!r} (label {label}) has {where}")
    all_problems = item_problems + [{"split": split, "index": None, "image": None, "problem": p} for p in split_problems]

    seconds = time.perf_counter() - start
    report = {
        "split": split,
        "items": len(datalist),
        "good": len(good),
        "bad": len(item_problems),
        "on_error": on_error,
        "settings": {"min_size": min_size, "decode": decode, "require_every_class": require_every_class,
                     "classes": classes},
        "problems": all_problems,
        "seconds": round(seconds, 3),
    }
    if report_path is not None:
        _write_report(Path(report_path), report)
    where = f" (report: {report_path})" if report_path is not None else ""
    if split_problems or (item_problems and on_error == "raise"):
        lines = [f"  item {p['index']} ({p['image'] or 'no file'}): {p['problem']}" for p in item_problems]
        lines += [f"  {p}" for p in split_problems]
        header = f"datalist '{split}': {len(item_problems)} of {len(datalist)} items are bad"
        if split_problems:
            header += f", {len(split_problems)} problem(s) with the split as a whole"
        if not datalist:
            advice = f"Check the dataset: its '{split}' split lists no image."
        elif split_problems:
            advice = (
                "A split needs items of every class (require_every_class=False, bundle: "
                "--data_check#require_every_class False, allows missing classes)."
            )
        else:
            advice = "Fix them, or drop bad items with on_error='skip' (bundle: --data_check#on_error skip)."
        raise DatalistError(f"{header}{where}:\n" + "\n".join(lines) + f"\n{advice}", all_problems)
    if item_problems:
        logger.warning(
            "datalist '%s': skipped %d bad items of %d%s: %s", split, len(item_problems), len(datalist), where,
            "; ".join(f"item {p['index']}: {p['problem']}" for p in item_problems[:5])
            + ("; ..." if len(item_problems) > 5 else ""),
        )
    logger.info("datalist '%s': %d items checked in %.1f s, %d kept", split, len(datalist), seconds, len(good))
    return good


def _write_report(path: Path, report: dict) -> None:
    """Write the report atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", what="datalist report") as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
