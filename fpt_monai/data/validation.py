"""Checking a datalist before any compute is spent on it: every bad item named, or skipped with a report.

:func:`validate_datalist` looks at every item of a split and collects *all* problems before deciding:

- malformed items (not a dict, no ``"image"`` path, no ``"label"``);
- labels that are not integer class indices (strings, floats, booleans) or lie outside the classes;
- image files that are missing (a broken symbolic link is named as such), not regular files, unreadable,
  damaged, or smaller than ``min_size`` pixels on a side;
- duplicate entries: the same image twice in the split, or also in another split given as ``disjoint_from``,
  whatever its name: the same file (another spelling, a symbolic link, or a hard link: compared by device and
  inode) or a byte-identical copy (compared by content: :func:`~fpt_monai.utils.file_digest`, SHA-256 of the
  file's bytes, computed in the pass that reads the images). An image shared with another split can be accepted
  with ``allow_overlap=True``: a warning then names each pair;
- classes without any item, and an empty split;
- with ``decode=True``, images that decode to (nearly) constant pixels: every channel spans less than
  :data:`MIN_INTENSITY_SPREAD` (one 8-bit gray level), so there is nothing to classify.

Files that a folder search did not take as images (the ``not_read`` list of a
:class:`~fpt_monai.data.Datalist` from :func:`~fpt_monai.data.folder_datalist` or
:func:`~fpt_monai.data.image_datalist`: GIF, WebP and other formats, a DICOMDIR index, hidden and system files, ...)
are not items; each is named with its reason in the report (``"not_read"``) and a warning, and counted in the
log's summary line (``..., N kept, M files not read``).

Paths in the report, the log and the error messages are written through :func:`~fpt_monai.utils.escape_path`:
valid UTF-8 as they are, others in an escaped form from which :func:`~fpt_monai.utils.unescape_path` gives back the
bytes.

With ``on_error="raise"`` (default) it raises :class:`DatalistError`, whose message lists every bad item with
its index, file and problem; with ``on_error="skip"`` it drops the bad items, logs a warning naming each of
them and returns the rest. Either way ``report_path`` receives a JSON report of what was found. Problems of the
split as a whole (an empty class, no items) cannot be skipped and always raise.

Every image is decoded with the reader the pipeline uses (``decode=True``, the default): headers alone cannot
vouch for the pixel data of a truncated JPEG or a compressed DICOM. Decoding costs milliseconds per image, a
small fraction of preloading, which runs the frozen backbone on each image; ``decode=False`` reads headers
only (sizes, PNG checksums). Hashing a file costs less than a millisecond per image
(``benchmarks/results/file_digest.md``); a process hashes each file once (the cache's entries are named by the same
digests).

:func:`check_disjoint` makes the comparison with other splits alone, for a split that is not otherwise used
(training compares the test split with its training split).

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

import numpy as np

from fpt_monai.data.datalist import not_read_lines
from fpt_monai.data.readers import ImageReadError, RGBImageReader, check_pixel_count, image_size
from fpt_monai.utils import atomic_write, escape_path, file_digest

__all__ = [
    "BAD_ITEM_POLICIES",
    "MIN_INTENSITY_SPREAD",
    "DatalistError",
    "check_disjoint",
    "readable_datalist",
    "validate_datalist",
]

logger = logging.getLogger(__name__)

#: Values of ``on_error``.
BAD_ITEM_POLICIES = ("raise", "skip")
#: A decoded image (values in [0, 1]) whose every channel spans less than this, one gray level of an 8-bit
#: display, is (near) constant: it shows nothing to classify and is a bad item (checked with ``decode=True``).
MIN_INTENSITY_SPREAD = 1 / 255


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
    spread = None
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
            image = np.asarray(decoder.get_data(decoder.read(path))[0])
            height, width = image.shape[-2:]
            spread = _intensity_spread(image)
    except ImageReadError as err:
        return f"unreadable image: {str(err).removeprefix(f'{path}: ')}"
    except Exception as err:  # a reader failing in an unforeseen way is still a bad file, named
        return f"unreadable image ({type(err).__name__}: {err})"
    if min(height, width) < min_size:
        return f"image is {height}x{width} pixels, smaller than the minimum {min_size} (min_size)"
    if spread is not None and spread < MIN_INTENSITY_SPREAD:
        return (
            f"image is (nearly) constant: its intensities span {spread:.4f} of [0, 1] after reading, less than one "
            "8-bit gray level; it shows nothing to classify (check the file, or the reader's dicom_window/value_range)"
        )
    return None


def _intensity_spread(image: np.ndarray) -> float:
    """The largest max - min of the channels of a decoded ``(C, H, W)`` image (0 for a constant image)."""
    if image.size == 0:
        return 0.0
    channels = image.reshape(image.shape[0], -1) if image.ndim == 3 else image.reshape(1, -1)
    return float(np.nanmax(np.nanmax(channels, axis=1) - np.nanmin(channels, axis=1)))


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


def _content(path: str) -> str | None:
    """The :func:`~fpt_monai.utils.file_digest` of a regular file, or ``None`` for a path that is none or cannot be
    read (its own problem is reported by the image check)."""
    try:
        return file_digest(path) if os.path.isfile(path) else None
    except OSError:
        return None


def _overlaps(
    paths: Mapping[int, str],
    digests: Mapping[int, str | None],
    disjoint_from: Mapping[str, Sequence[Any]],
    image_key: str,
    pool: ThreadPoolExecutor,
) -> dict[int, list[str]]:
    """Item index -> ``also in split 's' (...)`` for each other split that holds the same file (device and inode,
    or path) or a byte-identical copy of it (digest), naming the item and path there."""
    found: dict[int, list[str]] = {}
    for other_split, other_items in disjoint_from.items():
        listed = [
            (i, os.fspath(it[image_key]))
            for i, it in enumerate(other_items)
            if isinstance(it, Mapping) and isinstance(it.get(image_key), (str, os.PathLike))
        ]
        by_file: dict[tuple, tuple[int, str]] = {}
        by_content: dict[str, tuple[int, str]] = {}
        for (i, other_path), digest in zip(listed, pool.map(_content, [p for _, p in listed])):
            by_file.setdefault(_file_identity(other_path), (i, other_path))
            if digest is not None:
                by_content.setdefault(digest, (i, other_path))
        for index, path in paths.items():
            if _file_identity(path) in by_file:
                i, other_path = by_file[_file_identity(path)]
                where = _same_file(i, path, other_path).replace(" (same file)", "")
            elif digests.get(index) is not None and digests[index] in by_content:
                i, other_path = by_content[digests[index]]
                where = f"item {i}: {other_path}, a byte-identical copy"
            else:
                continue
            found.setdefault(index, []).append(f"also in split '{other_split}' ({where})")
    return found


def _overlap_warning(split: str, overlaps: Mapping[int, list[str]], paths: Mapping[int, str], total: int) -> None:
    logger.warning(
        "datalist '%s': %d of %d items share their image with another split (allowed: allow_overlap, bundle: "
        "data_check#allow_split_overlap); evaluation on them measures memory, not generalisation:\n%s",
        split,
        len(overlaps),
        total,
        "\n".join(
            _item_line({"index": index, "image": paths[index], "problem": "; ".join(found)})
            for index, found in sorted(overlaps.items())
        ),
    )


def check_disjoint(
    datalist: Sequence[Any],
    split: str,
    disjoint_from: Mapping[str, Sequence[Any]],
    allow_overlap: bool = False,
    num_threads: int = 8,
    image_key: str = "image",
) -> list:
    """Check that no image of ``datalist`` is also in another split: the same file, or a byte-identical copy.

    Only the comparison of :func:`validate_datalist`'s ``disjoint_from``, for a split that is not otherwise read
    (the test split during training); malformed items and unreadable files are left to that split's own check.

    Args:
        datalist: the items of the split (``{"image": path, ...}``); an empty list passes.
        split: the split's name, for messages.
        disjoint_from: other splits by name (``{"train": train_items}``).
        allow_overlap: log a warning naming each shared image instead of raising.
        num_threads: threads hashing files.
        image_key: the items' image path key.

    Returns:
        ``datalist``, unchanged.

    Raises:
        DatalistError: naming every item that is also in another split (with its index and path there), unless
            ``allow_overlap``.
    """
    paths = {
        index: os.fspath(item[image_key])
        for index, item in enumerate(datalist)
        if isinstance(item, Mapping) and isinstance(item.get(image_key), (str, os.PathLike))
    }
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        digests = dict(zip(paths, pool.map(_content, paths.values())))
        overlaps = _overlaps(paths, digests, disjoint_from, image_key, pool)
    if overlaps and allow_overlap:
        _overlap_warning(split, overlaps, paths, len(datalist))
    elif overlaps:
        problems = [
            {"split": split, "index": index, "image": paths[index], "problem": "; ".join(found)}
            for index, found in sorted(overlaps.items())
        ]
        lines = [_item_line(p) for p in problems]
        raise DatalistError(
            f"datalist '{split}': {len(problems)} of {len(datalist)} items are also in another split:\n"
            + "\n".join(lines)
            + f"\n{_OVERLAP_ADVICE}",
            problems,
        )
    return datalist


#: What to do about images shared between splits.
_OVERLAP_ADVICE = (
    "An image in two splits makes the evaluation measure memory: remove it from one of them, or accept the overlap "
    "with allow_overlap=True (bundle: --data_check#allow_split_overlap True), which warns instead."
)


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
    allow_overlap: bool = False,
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
        disjoint_from: other splits by name (``{"train": train_items}``); an image that is also there (the same
            file or a byte-identical copy) is a problem (split leakage), named with its index and path there.
        reader: options of :class:`~fpt_monai.data.readers.RGBImageReader` (used with ``decode``; ``volume_axis``
            also for the header size of volumes, ``max_pixels`` also for the header check of the pixel count).
        num_threads: threads reading images (file access and decoders that release the GIL dominate).
        image_key: the items' image path key.
        label_key: the items' label key.
        allow_overlap: keep the items whose image is also in a ``disjoint_from`` split, with a warning naming each
            pair, instead of counting them as bad.

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
    # files a folder search left out (a Datalist's not_read): reported and counted, never dropped unnamed
    not_read = list(getattr(datalist, "not_read", None) or [])
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

    # duplicates (labelled items only: classifying an image twice is harmless): the same file twice here, by device
    # and inode before any file is read, then byte-identical copies by their digests, computed where the images are read
    identities = {index: _file_identity(path) for index, path in paths.items()} if labelled else {}
    seen: dict[tuple, int] = {}
    for index, identity in identities.items():
        if identity in seen:
            first = seen[identity]
            problems.setdefault(index, []).append(f"duplicate of {_same_file(first, paths[index], paths[first])}")
        else:
            seen[identity] = index
    unique = {
        index: path for index, path in paths.items() if index not in identities or seen[identities[index]] == index
    }

    def check(path: str) -> tuple[str | None, str | None]:
        return _image_problem(path, min_size, decoder, volume_axis, max_pixels), _content(path) if labelled else None

    # image files: checked (and hashed) concurrently (file access, decoding and hashing release the GIL)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        checked = dict(zip(unique, pool.map(check, unique.values())))
        digests = {index: checked[seen[identity]][1] for index, identity in identities.items()}
        # an item that is bad already (malformed, bad label) is no original: skipping it must not drop its copy too
        copies: dict[str, int] = {}
        for index, digest in digests.items():
            if digest is None or index not in unique or index in problems:
                continue
            if digest in copies:
                first = copies[digest]
                problems[index] = [f"duplicate of item {first} (a byte-identical copy: {paths[first]})"]
                checked[index] = (None, digest)  # what is wrong with the file itself is named at its original
            else:
                copies[digest] = index
        overlaps = _overlaps(paths, digests, disjoint_from or {}, image_key, pool) if labelled else {}
    if not allow_overlap:
        for index, found in overlaps.items():
            problems.setdefault(index, []).extend(found)
    for index, (reason, _) in checked.items():
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
        "files_not_read": len(not_read),
        "on_error": on_error,
        "settings": {
            "min_size": min_size,
            "decode": decode,
            "require_every_class": require_every_class and labelled,
            "classes": classes if labelled else None,
            "allow_overlap": allow_overlap,
        },
        "problems": all_problems,
        "not_read": not_read,
        "allowed_overlaps": (
            [
                {"split": split, "index": index, "image": paths[index], "problem": "; ".join(found)}
                for index, found in sorted(overlaps.items())
            ]
            if allow_overlap
            else []
        ),
        "seconds": round(seconds, 3),
    }
    if report_path is not None:
        _write_report(Path(report_path), report)
    where = f" (report: {escape_path(report_path)})" if report_path is not None else ""
    _log_not_read(split, not_read, where)
    if split_problems or (item_problems and on_error == "raise"):
        lines = [_item_line(p) for p in item_problems]
        lines += [f"  {p}" for p in split_problems]
        if not_read:
            also = " and in the report" if report_path is not None else ""
            lines.append(f"  ({len(not_read)} other files are not read: each named in the warning above{also})")
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
            if overlaps:
                advice += f"\n{_OVERLAP_ADVICE}"
        raise DatalistError(f"{header}{where}:\n" + "\n".join(lines) + f"\n{advice}", all_problems)
    if item_problems:
        logger.warning(
            "datalist '%s': skipped %d bad items of %d%s:\n%s",
            split,
            len(item_problems),
            len(datalist),
            where,
            "\n".join(_item_line(p) for p in item_problems),
        )
    if overlaps and allow_overlap:
        _overlap_warning(split, overlaps, paths, len(datalist))
    logger.info(
        "datalist '%s': %d items checked in %.1f s, %d kept%s",
        split,
        len(datalist),
        seconds,
        len(good),
        f", {len(not_read)} files not read{where}" if hasattr(datalist, "not_read") else "",
    )
    return good


def _item_line(problem: dict) -> str:
    """One bad item for a message: index, file (escaped, see :func:`~fpt_monai.utils.escape_path`) and problem."""
    image = escape_path(problem["image"]) if problem["image"] is not None else "no file"
    return f"  item {problem['index']} ({image}): {escape_path(problem['problem'])}"


def _log_not_read(split: str, not_read: list[dict], where: str) -> None:
    """A warning naming the files a folder search did not read (the first ones; the report has all)."""
    if not_read:
        logger.warning("datalist '%s': %d files not read%s:\n%s", split, len(not_read), where, not_read_lines(not_read))


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
    with the readable ones. The files a folder search did not take (``not_read`` of a
    :class:`~fpt_monai.data.Datalist`: GIF, WebP, a DICOMDIR index, ...) are named in the report and the log too.

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
    """Write the report atomically (a temporary file renamed into place), every text escaped (paths that are not
    valid UTF-8: see :func:`~fpt_monai.utils.escape_path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", what="datalist report", encoding="utf-8") as f:
        f.write(json.dumps(_escaped(report), indent=2, default=str) + "\n")


def _escaped(value: Any) -> Any:
    """``value`` with every string in it escaped by :func:`~fpt_monai.utils.escape_path`."""
    if isinstance(value, str):
        return escape_path(value)
    if isinstance(value, os.PathLike):
        return escape_path(value)
    if isinstance(value, Mapping):
        return {_escaped(k) if isinstance(k, str) else k: _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value
