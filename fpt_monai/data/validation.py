"""Checking a datalist before any compute is spent on it: every bad item named, or skipped with a report.

:func:`validate_datalist` looks at every item of a split and collects *all* problems before deciding:

- malformed items (not a dict, no ``"image"`` path, no ``"label"``);
- labels that are not integer class indices (strings, floats, booleans) or lie outside the classes;
- image files that are missing (a broken symbolic link is named as such), not regular files, unreadable,
  damaged, or smaller than ``min_size`` pixels on a side;
- duplicate entries: the same file twice in the split, or also in another split given as ``disjoint_from``,
  whatever its name (another spelling, a symbolic link, or a hard link: files are compared by device and inode);
- classes without any item, and an empty split.

With ``on_error="raise"`` (default) it raises :class:`DatalistError`, whose message lists every bad item with
its index, file and problem; with ``on_error="skip"`` it drops the bad items, logs a warning naming each of
them and returns the rest. Either way ``report_path`` receives a JSON report of what was found. Problems of the
split as a whole (an empty class, no items) cannot be skipped and always raise.

Every image is decoded with the reader the pipeline uses (``decode=True``, the default): headers alone cannot
vouch for the pixel data of a truncated JPEG or a compressed DICOM. Decoding costs milliseconds per image, a
small fraction of preloading, which runs the frozen backbone on each image; ``decode=False`` reads headers
only (sizes, PNG checksums).

:func:`readable_datalist` applies the same image checks to unlabelled items (the images to classify): it keeps
the readable ones, names every other one, and raises only when none is readable.
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

from fpt_monai.data.readers import ImageReadError, RGBImageReader, check_pixel_count, image_size
from fpt_monai.utils import atomic_write

__all__ = ["BAD_ITEM_POLICIES", "DatalistError", "readable_datalist", "validate_datalist"]

logger = logging.getLogger(__name__)

#: Values of ``on_error``.
BAD_ITEM_POLICIES = ("raise", "skip")


class DatalistError(ValueError):
    """Bad items or an unusable split; ``problems`` lists them (``{"split", "index", "image", "problem"}``)."""

    def __init__(self, message: str, problems: list[dict]) -> None:
        super().__init__(message, problems)  # both in args: the error pickles (multi-process runs)
        self.problems = problems

    def __str__(self) -> str:
        return str(self.args[0])


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
    path: str, min_size: int, decoder: RGBImageReader | None, volume_axis: int, max_pixels: int | None = None
) -> str | None:
    """What is wrong with an image file, or ``None``. An image above ``max_pixels`` is named from its header,
    before it is decoded."""
    if not os.path.exists(path):
        if os.path.islink(path):
            return f"broken symbolic link: its target {os.readlink(path)} does not exist"
        return "file not found"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "file is not readable (permission denied)"
    if os.path.getsize(path) == 0:
        return "file is empty (0 bytes)"
    try:
        height, width = image_size(path, volume_axis=volume_axis)
    except ImageReadError as err:
        return f"unreadable image: {str(err).removeprefix(f'{path}: ')}"
    except Exception as err:  # a reader failing in an unforeseen way is still a bad file, named
        return f"unreadable image ({type(err).__name__}: {err})"
    try:
        check_pixel_count(path, height, width, max_pixels)
    except ImageReadError as err:
        return f"image too large: {str(err).removeprefix(f'{path}: ')}"
    try:
        if decoder is not None:
            height, width = decoder.get_data(decoder.read(path))[0].shape[-2:]
    except ImageReadError as err:
        return f"unreadable image: {str(err).removeprefix(f'{path}: ')}"
    except Exception as err:  # a reader failing in an unforeseen way is still a bad file, named
        return f"unreadable image ({type(err).__name__}: {err})"
    if min(height, width) < min_size:
        return f"image is {height}x{width} pixels, smaller than the minimum {min_size} (min_size)"
    return None


def _file_identity(path: str) -> tuple:
    """The file a path names: its device and inode (so hard links and symbolic links are the same file), or,
    for a path that cannot be examined, its resolved spelling."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):
        return ("path", os.path.normcase(os.path.realpath(path)))
    return ("inode", status.st_dev, status.st_ino)


def _same_file(index: int, path: str, other_path: str) -> str:
    """``item i (same file)``, saying when the two paths are hard links of one file."""
    if os.path.normcase(os.path.realpath(path)) == os.path.normcase(os.path.realpath(other_path)):
        return f"item {index} (same file)"
    return f"item {index} (same file: {other_path} and this path are hard links)"


def validate_datalist(
    datalist: Sequence[Any],
    classes: Sequence[str] | None,
    split: str = "train",
    min_size: int = 32,
    on_error: str = "raise",
    report_path: str | os.PathLike | None = None,
    decode: bool = True,
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
        classes: class names in label order; ``None`` for unlabelled items (images to classify): no label or
            class checks, no duplicate check, and a split where no image is readable is an error.
        split: the split's name, for messages and the report.
        min_size: smallest allowed image height and width, in pixels.
        on_error: ``"raise"``: raise :class:`DatalistError` if any item is bad; ``"skip"``: drop bad items.
        report_path: JSON file that receives the report (written whenever given, problems or not).
        decode: read every image completely with the pipeline's reader (default; catches damaged pixel data in
            any format); ``False`` reads headers only (sizes, PNG checksums).
        require_every_class: a class without any (good) item is an error.
        disjoint_from: other splits by name (``{"train": train_items}``); an image that is also there is a
            duplicate (split leakage).
        reader: options of :class:`~fpt_monai.data.readers.RGBImageReader` (used with ``decode``; ``volume_axis``
            also for the header size of volumes, ``max_pixels`` also for the header check of the pixel count).
        num_threads: threads reading images (file access and decoders that release the GIL dominate).
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
    labelled = classes is not None
    classes = [str(c) for c in classes] if labelled else []
    if labelled and not classes:
        raise ValueError("classes must name at least one class.")
    reader = dict(reader or {})
    options = RGBImageReader(**reader)  # invalid options fail here, before any file is read
    decoder = options if decode else None
    volume_axis, max_pixels = options.volume_axis, options.max_pixels
    start = time.perf_counter()

    problems: dict[int, list[str]] = {}
    paths: dict[int, str] = {}
    for index, item in enumerate(datalist):
        reasons = []
        if not isinstance(item, Mapping):
            fields = f"'{image_key}': path, '{label_key}': index" if labelled else f"'{image_key}': path"
            problems[index] = [f"not an {{{fields}}} dict: {item!r:.80}"]
            continue
        image = item.get(image_key)
        if image_key not in item:
            reasons.append(f"no '{image_key}' key")
        elif not isinstance(image, (str, os.PathLike)) or not str(image).strip() or "\x00" in str(image):
            reasons.append(f"'{image_key}' must be a file path, got {image!r:.60}")
        else:
            paths[index] = os.fspath(image)
        if not labelled:
            pass
        elif label_key not in item:
            reasons.append(f"no '{label_key}' key")
        else:
            reason = _label_problem(item[label_key], len(classes), classes)
            if reason:
                reasons.append(reason)
        if reasons:
            problems[index] = reasons

    # duplicates: the same file twice here, or in another split (labelled items only: classifying an image
    # twice is harmless)
    identities = {index: _file_identity(path) for index, path in paths.items()} if labelled else {}
    seen: dict[tuple, int] = {}
    for index, identity in identities.items():
        if identity in seen:
            first = seen[identity]
            problems.setdefault(index, []).append(f"duplicate of {_same_file(first, paths[index], paths[first])}")
        else:
            seen[identity] = index
    for other_split, other_items in (disjoint_from or {}).items():
        other: dict[tuple, tuple[int, str]] = {}
        for i, it in enumerate(other_items):
            if isinstance(it, Mapping) and isinstance(it.get(image_key), (str, os.PathLike)):
                other.setdefault(_file_identity(os.fspath(it[image_key])), (i, os.fspath(it[image_key])))
        for index, identity in identities.items():
            if identity in other:
                i, other_path = other[identity]
                where = _same_file(i, paths[index], other_path).replace(" (same file)", "")
                problems.setdefault(index, []).append(f"also in split '{other_split}' ({where})")

    # image files: checked concurrently (file access and decoding)
    unique = {
        index: path
        for index, path in paths.items()
        if not any(reason.startswith("duplicate") for reason in problems.get(index, []))
    }
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = pool.map(
            lambda path: _image_problem(path, min_size, decoder, volume_axis, max_pixels), unique.values()
        )
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
    elif not labelled:
        if not good:
            split_problems.append(f"none of the {len(datalist)} images can be read")
    elif require_every_class:
        counts = [0] * len(classes)
        for item in good:
            counts[int(item[label_key])] += 1
        for label, (name, count) in enumerate(zip(classes, counts)):
            if count == 0:
                where = "no items" if not item_problems else "no usable items"
                split_problems.append(f"class {name!r} (label {label}) has {where}")
    all_problems = item_problems + [
        {"split": split, "index": None, "image": None, "problem": p} for p in split_problems
    ]

    seconds = time.perf_counter() - start
    report = {
        "split": split,
        "items": len(datalist),
        "good": len(good),
        "bad": len(item_problems),
        "on_error": on_error,
        "settings": {
            "min_size": min_size,
            "decode": decode,
            "require_every_class": require_every_class and labelled,
            "classes": classes if labelled else None,
        },
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
        elif not labelled:
            advice = "Check the input: no file of it can be read as an image (each reason above)."
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
            "datalist '%s': skipped %d bad items of %d%s:\n%s",
            split,
            len(item_problems),
            len(datalist),
            where,
            "\n".join(f"  item {p['index']} ({p['image'] or 'no file'}): {p['problem']}" for p in item_problems),
        )
    logger.info("datalist '%s': %d items checked in %.1f s, %d kept", split, len(datalist), seconds, len(good))
    return good


def readable_datalist(
    datalist: Sequence[Any],
    report_path: str | os.PathLike | None = None,
    min_size: int = 32,
    decode: bool = True,
    reader: Mapping[str, Any] | None = None,
    num_threads: int = 8,
    image_key: str = "image",
    split: str = "inference",
) -> list[dict]:
    """The items whose images can be classified; every other one named, with its reason, in the log and report.

    The image checks of training (:func:`validate_datalist`: missing files, broken links, damaged or unsupported
    files, images decoded with the pipeline's reader, images below ``min_size``) on unlabelled items
    (``{"image": path}``, e.g. from :func:`~fpt_monai.data.image_datalist`). Bad items are skipped; a run goes on
    with the readable ones.

    Args:
        datalist: the items to classify.
        report_path: JSON file that receives the report (every unreadable file and why; written whenever given).
        min_size: smallest allowed image height and width, in pixels (use the training setting).
        decode: decode every image (default); ``False`` reads headers only.
        reader: options of :class:`~fpt_monai.data.readers.RGBImageReader` (the pipeline's ``reader``).
        num_threads: threads reading images.
        image_key: the items' image path key.
        split: the name used in messages and the report.

    Returns:
        The readable items, in order.

    Raises:
        DatalistError: when no item is readable (or the list is empty), naming every file and its problem.
    """
    return validate_datalist(
        datalist,
        None,
        split=split,
        min_size=min_size,
        on_error="skip",
        report_path=report_path,
        decode=decode,
        reader=reader,
        num_threads=num_threads,
        image_key=image_key,
    )


def _write_report(path: Path, report: dict) -> None:
    """Write the report atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", what="datalist report") as f:
        f.write(json.dumps(report, indent=2, default=str) + "\n")
