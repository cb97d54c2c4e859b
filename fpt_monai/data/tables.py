"""Label tables as data sets: a folder of images and a CSV, TSV or whitespace TXT of which image has which label.

Public data sets ship this way (the Kaggle diabetic-retinopathy sets: ``id_code,diagnosis`` with ids without a
file extension; ISIC 2018: ``image,MEL,NV,BCC,...`` one-hot columns; DDR: ``name label`` lines). A table given as
``dataset_dir`` is read by :func:`read_label_table` with the options of the bundle's ``label_table`` block
(:data:`TABLE_OPTIONS`):

- ``image_dir``: where the images are (default: the table's folder); ``extension``: appended to ids that name no
  file (by default the image suffixes :data:`~fpt_monai.data.readers.IMAGE_SUFFIXES` are tried in turn);
- ``image_column``/``label_column``: names (or 0-based indices) of the columns; by default detected from the
  common header names (:data:`IMAGE_COLUMNS`, :data:`LABEL_COLUMNS`), or the first and second column of a table
  without a header (a TXT whose first line is not a header);
- ``one_hot_columns``: the columns of a one-hot table, one per class (by default: every column that is not the
  image, split or group column, when the table has no label column);
- ``split_column``: which split each row belongs to (``train``/``training``, ``val``/``valid``/``validation``,
  ``test``/``testing``);
- ``group_column``: a patient or eye id; all rows of a group go to one split;
- ``val_fraction``, ``test_fraction``, ``seed``: the split made when the table gives no validation split (see
  :func:`split_rows`);
- ``split_file``: where the splits are saved (the bundle: ``<bundle_root>/datalist.json``).

Labels are class names (of the config's ``class_names``) or class indices. A table's structural problems (a column
it does not have, a label that is no class, a one-hot row without exactly one class, a group in two splits of
the ``split_column``) raise :class:`LabelTableError` naming the table, the lines and what to do. Items go on to
:func:`~fpt_monai.data.validate_datalist` like those of folders and JSON datalists: an id without a file, an index
outside the classes and duplicates (by content) are named there.

:func:`table_splits` makes the splits once and saves them as a JSON datalist (with ``"classes"``), written
atomically; later runs read it back, so the run reproduces and the split can be reused (``--dataset_dir
datalist.json``). A saved split that no longer matches the table (rows added, removed, relabelled, or moved
between the table's splits) is refused, naming the file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fpt_monai.data.readers import IMAGE_SUFFIXES
from fpt_monai.utils import atomic_write, escape_path, file_digest

__all__ = [
    "IMAGE_COLUMNS",
    "LABEL_COLUMNS",
    "SPLIT_NAMES",
    "TABLE_OPTIONS",
    "TABLE_SUFFIXES",
    "LabelTableError",
    "is_label_table",
    "read_label_table",
    "split_rows",
    "table_datalist",
    "table_splits",
]

logger = logging.getLogger(__name__)

#: Suffixes of label tables: comma-separated, tab-separated, and whitespace (or comma/tab) separated text.
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
#: Header names taken as the image column when none is given (compared case-insensitively, in this order).
IMAGE_COLUMNS = ("image", "image_id", "id_code", "image_name", "filename", "file", "path", "name", "id")
#: Header names taken as the label column when none is given (compared case-insensitively, in this order).
LABEL_COLUMNS = ("label", "diagnosis", "level", "grade", "class", "target", "category", "dr_grade")
#: Values of a ``split_column`` and the split each means (compared case-insensitively).
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
SPLITS = ("train", "val", "test")
#: The options of a label table (the bundle's ``label_table`` block) and their defaults.
TABLE_OPTIONS: dict[str, Any] = {
    "image_dir": None,
    "image_column": None,
    "label_column": None,
    "one_hot_columns": None,
    "extension": None,
    "split_column": None,
    "group_column": None,
    "val_fraction": 0.2,
    "test_fraction": 0.0,
    "seed": 0,
    "split_file": None,
}


class LabelTableError(ValueError):
    """A label table that cannot be read as a data set, or a saved split that no longer matches it."""


def is_label_table(path: str | os.PathLike) -> bool:
    """Whether ``dataset_dir`` names a label table (by its suffix: :data:`TABLE_SUFFIXES`)."""
    return str(path).lower().endswith(TABLE_SUFFIXES)


def _options(label_table: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(label_table or {})
    unknown = sorted(set(options) - set(TABLE_OPTIONS))
    if unknown:
        raise ValueError(f"label_table has no options {unknown}; its options: {', '.join(TABLE_OPTIONS)}.")
    options = {**TABLE_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("val_fraction", "test_fraction"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"label_table#{key} must be a fraction in [0, 1), got {value!r}.")
    if options["val_fraction"] + options["test_fraction"] >= 1:
        raise ValueError(
            f"label_table#val_fraction + label_table#test_fraction must leave rows for training, got "
            f"{options['val_fraction']} + {options['test_fraction']}."
        )
    return options


def _rows(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """The header (``None`` for a headerless TXT) and the ``(line number, fields)`` of every non-empty row."""
    if not path.is_file():
        raise FileNotFoundError(f"label table not found: {escape_path(path)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise LabelTableError(f"label table {escape_path(path)} is not UTF-8 text: {err}") from err
    lines = text.splitlines()
    suffix = path.suffix.lower()
    first = next((line for line in lines if line.strip()), "")
    if suffix == ".csv" or (suffix == ".txt" and "," in first):
        delimiter = ","
    elif suffix == ".tsv" or (suffix == ".txt" and "\t" in first):
        delimiter = "\t"
    else:
        delimiter = None  # whitespace
    if delimiter is None:
        rows = [(number, line.split()) for number, line in enumerate(lines, 1) if line.strip()]
    else:
        rows = [
            (number, [field.strip() for field in fields])
            for number, fields in enumerate(csv.reader(lines, delimiter=delimiter), 1)
            if any(field.strip() for field in fields)
        ]
    if not rows:
        raise LabelTableError(f"label table {escape_path(path)} is empty.")
    header = rows[0][1]
    # a CSV/TSV has a header; a whitespace TXT (DDR: "name label") has one only when it names known columns
    has_header = delimiter is not None or any(
        name.lower() in IMAGE_COLUMNS + LABEL_COLUMNS + ("split", "group") for name in header
    )
    if not has_header:
        return None, rows
    widths = {number: len(fields) for number, fields in rows[1:] if len(fields) != len(header)}
    if widths:
        shown = ", ".join(f"line {n}: {w}" for n, w in list(widths.items())[:5])
        raise LabelTableError(
            f"label table {escape_path(path)} has {len(header)} columns in its header but rows with other numbers "
            f"of fields ({shown})."
        )
    return header, rows[1:]


def _column(path: Path, header: list[str] | None, width: int, key: str, value: Any) -> int:
    """The index of the column that ``label_table#key`` names (a header name or a 0-based index)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < width:
            raise LabelTableError(
                f"label table {escape_path(path)} has {width} columns; label_table#{key} {value} is not one of them "
                f"(0-based indices 0..{width - 1})."
            )
        return value
    if header is not None and value in header:
        return header.index(value)
    if isinstance(value, str) and value.isdigit() and header is None:
        return _column(path, header, width, key, int(value))
    if header is None:
        raise LabelTableError(
            f"label table {escape_path(path)} has no header, so label_table#{key} must be a 0-based column index "
            f"(0..{width - 1}), got {value!r}."
        )
    raise LabelTableError(
        f"label table {escape_path(path)} has no column {value!r} (label_table#{key}); its columns: {header}."
    )


def _detect(header: list[str], names: Sequence[str]) -> int | None:
    lowered = [h.lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _image_path(image_dir: Path, name: str, extension: str | None) -> str:
    """The file of an id: ``image_dir/name`` when it exists, else with ``extension`` (or the first image suffix
    that gives an existing file); an id that names no file keeps its first candidate, for the data check to name."""
    base = image_dir / name
    if base.is_file():
        return str(base)
    suffixes = [extension if extension.startswith(".") else f".{extension}"] if extension else list(IMAGE_SUFFIXES)
    candidates = [base.with_name(base.name + suffix) for suffix in suffixes]
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        return str(found)
    return str(candidates[0] if extension else base)


def _label_index(value: str, classes: Sequence[str]) -> int | None:
    """A label given as a class name or an index (``"2"``, ``"2.0"``); ``None`` when it is neither."""
    if value in classes:
        return list(classes).index(value)
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _is_one(value: str) -> bool:
    try:
        return float(value) == 1
    except ValueError:
        return False


def read_label_table(
    path: str | os.PathLike, classes: Sequence[str], label_table: Mapping[str, Any] | None = None
) -> list[dict]:
    """The rows of a label table as items ``{"image": path, "label": index, "line": n}``, with ``"split"`` (given
    ``split_column``) and ``"group"`` (given ``group_column``).

    Args:
        path: the table (``.csv``, ``.tsv`` or ``.txt``).
        classes: the class names in label order (the config's ``class_names``).
        label_table: the options (:data:`TABLE_OPTIONS`; see the module docstring).

    Raises:
        LabelTableError: naming the table and every line at fault: a column it does not have, a label that is
            neither a class name nor an index, a one-hot row without exactly one class, an unknown split name.
        FileNotFoundError: when the table or ``image_dir`` does not exist.
    """
    path = Path(path)
    options = _options(label_table)
    classes = [str(c) for c in classes]
    header, rows = _rows(path)
    width = len(header) if header is not None else max(len(fields) for _, fields in rows)
    # absolute: the saved split is read back from another folder (paths of a JSON datalist are relative to it)
    image_dir = (Path(options["image_dir"]) if options["image_dir"] is not None else path.parent).absolute()
    if not image_dir.is_dir():
        raise FileNotFoundError(f"label_table#image_dir {escape_path(image_dir)} is not a folder.")

    def column(key: str, detected: int | None = None) -> int | None:
        return _column(path, header, width, key, options[key]) if options[key] is not None else detected

    image = column("image_column", (_detect(header, IMAGE_COLUMNS) if header else None) or 0)
    split = column("split_column")
    group = column("group_column")
    label = column("label_column", _detect(header, LABEL_COLUMNS) if header else (1 if width > 1 else None))
    one_hot: list[int] = []
    if options["one_hot_columns"] is not None:
        names = options["one_hot_columns"]
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"label_table#one_hot_columns must be a list of columns, got {names!r}.")
        one_hot = [_column(path, header, width, "one_hot_columns", name) for name in names]
        label = None
    elif label is None:
        one_hot = [i for i in range(width) if i not in (image, split, group)]
        label = None
        if len(one_hot) == 1:
            label, one_hot = one_hot[0], []
    if label is None and len(one_hot) < 2:
        raise LabelTableError(
            f"label table {escape_path(path)}: no label column found (columns: {header}); set label_table#label_column"
            f" or label_table#one_hot_columns."
        )
    one_hot_names = [header[i] if header is not None else str(i) for i in one_hot]
    if one_hot:
        unknown = [name for name in one_hot_names if name not in classes]
        if unknown:
            raise LabelTableError(
                f"label table {escape_path(path)}: the one-hot columns {unknown} are not among the class_names "
                f'{classes}: pass --class_names "{one_hot_names}" --num_classes {len(one_hot_names)}.'
            )

    items, bad_labels, bad_rows, bad_splits = [], {}, [], {}
    for number, fields in rows:
        if len(fields) <= max(c for c in (image, label, split, group, *one_hot) if c is not None):
            bad_rows.append(f"line {number}: {len(fields)} fields")
            continue
        if one_hot:
            hot = [name for name, i in zip(one_hot_names, one_hot) if _is_one(fields[i])]
            if len(hot) != 1:
                bad_rows.append(f"line {number}: {len(hot)} one-hot columns set ({hot})")
                continue
            index = classes.index(hot[0])
        else:
            index = _label_index(fields[label], classes)
            if index is None:
                bad_labels.setdefault(fields[label], []).append(number)
                continue
        item = {"image": _image_path(image_dir, fields[image], options["extension"]), "label": index, "line": number}
        if split is not None:
            name = SPLIT_NAMES.get(fields[split].lower())
            if name is None:
                bad_splits.setdefault(fields[split], []).append(number)
                continue
            item["split"] = name
        if group is not None:
            item["group"] = fields[group]
        items.append(item)
    problems = [
        f"label {value!r} (line{'s' if len(lines) > 1 else ''} {_lines(lines)}) is neither one of the class_names "
        f"{classes} nor a class index 0..{len(classes) - 1}"
        for value, lines in bad_labels.items()
    ]
    problems += [
        f"split {value!r} (label_table#split_column, lines {_lines(lines)}) is not one of {sorted(SPLIT_NAMES)}"
        for value, lines in bad_splits.items()
    ]
    problems += bad_rows
    if problems:
        raise LabelTableError(f"label table {escape_path(path)}:\n  " + "\n  ".join(problems[:20]))
    if not items:
        raise LabelTableError(f"label table {escape_path(path)} has no rows.")
    return items


def _lines(lines: Sequence[int], shown: int = 8) -> str:
    return ", ".join(map(str, lines[:shown])) + (f", ... ({len(lines)} in all)" if len(lines) > shown else "")


def _check_groups(path: Path, items: Sequence[dict]) -> None:
    """Raise naming every group whose rows lie in more than one split."""
    splits: dict[str, dict[str, list[int]]] = {}
    for item in items:
        splits.setdefault(item["group"], {}).setdefault(item["split"], []).append(item["line"])
    spanning = {group: found for group, found in splits.items() if len(found) > 1}
    if spanning:
        shown = [
            f"group {group!r} is in " + " and ".join(f"{s} (lines {_lines(lines, 4)})" for s, lines in found.items())
            for group, found in list(spanning.items())[:10]
        ]
        raise LabelTableError(
            f"label table {escape_path(path)}: {len(spanning)} group(s) of label_table#group_column span splits of "
            f"label_table#split_column (the same patient or eye in two splits is leakage):\n  " + "\n  ".join(shown)
        )


def split_rows(items: Sequence[dict], fractions: Mapping[str, float], seed: int = 0) -> dict[str, list[dict]]:
    """A seeded, stratified split of ``items`` into ``fractions`` (``{"val": 0.2, "test": 0.1}``; train keeps the rest).

    The units are the items, or their groups (``"group"`` key): a group goes to one split whole, stratified by its
    most common label. In each class the units are shuffled with ``random.Random(seed)`` and split by rounded
    fractions, keeping at least one unit for training; the result does not depend on the items' order.
    """
    units: dict[str, list[dict]] = {}
    for item in items:
        units.setdefault(str(item.get("group", item["image"])), []).append(item)
    by_class: dict[Any, list[str]] = {}
    for key, members in units.items():
        counts = Counter(member["label"] for member in members)
        label = min(counts, key=lambda lab: (-counts[lab], lab))
        by_class.setdefault(label, []).append(key)
    rng = random.Random(seed)
    split_of: dict[str, str] = {}
    for label in sorted(by_class):
        keys = sorted(by_class[label])
        rng.shuffle(keys)
        count = len(keys)
        taken = 0
        for name in ("val", "test"):
            size = min(int(count * fractions.get(name, 0.0) + 0.5), max(count - 1 - taken, 0))
            split_of.update({key: name for key in keys[taken : taken + size]})
            taken += size
        split_of.update({key: "train" for key in keys[taken:]})
    result: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for item in items:
        result[split_of[str(item.get("group", item["image"]))]].append(item)
    return result


def _plain(items: Sequence[dict]) -> list[dict]:
    return [{"image": item["image"], "label": item["label"]} for item in items]


def _make_splits(path: Path, items: list[dict], options: Mapping[str, Any]) -> dict[str, list[dict]]:
    if "split" in items[0]:
        if "group" in items[0]:
            _check_groups(path, items)
        given = {name: [item for item in items if item["split"] == name] for name in SPLITS}
        if not given["train"]:
            raise LabelTableError(f"label table {escape_path(path)}: no row of label_table#split_column is 'train'.")
        if given["val"]:
            return given
        made = split_rows(given["train"], {"val": options["val_fraction"]}, options["seed"])
        return {"train": made["train"], "val": made["val"], "test": given["test"]}
    return split_rows(items, {"val": options["val_fraction"], "test": options["test_fraction"]}, options["seed"])


def table_splits(
    path: str | os.PathLike, classes: Sequence[str], label_table: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The splits of a label table: ``{"classes": [...], "train": [...], "val": [...], "test": [...]}``.

    Read from ``label_table#split_file`` when it exists and still matches the table (the same rows, labels and
    given splits); made otherwise (see :func:`split_rows`: the table's ``split_column``, with a validation split
    carved from its training rows when it has none, or a split of all rows) and written there atomically.

    Raises:
        LabelTableError: see :func:`read_label_table`; a group in two given splits; a saved split that no longer
            matches the table (named, with what differs and what to do).
    """
    path = Path(path)
    options = _options(label_table)
    classes = [str(c) for c in classes]
    items = read_label_table(path, classes, options)
    split_file = Path(options["split_file"]) if options["split_file"] else None
    if split_file is not None and split_file.is_file():
        saved = _read_saved(split_file)
        _check_saved(split_file, path, saved, items, classes)
        if saved.get("source", {}).get("options") != _split_options(options):
            logger.warning(
                "%s: reusing the split saved in %s (made with %s); delete that file to split again with %s.",
                escape_path(path),
                escape_path(split_file),
                saved.get("source", {}).get("options"),
                _split_options(options),
            )
        return saved
    splits = {name: _plain(found) for name, found in _make_splits(path, items, options).items()}
    content = {
        "classes": classes,
        **splits,
        "source": {"table": str(path.absolute()), "sha256": file_digest(path), "options": _split_options(options)},
    }
    counts = ", ".join(f"{len(splits[name])} {name}" for name in SPLITS)
    if split_file is not None:
        split_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(split_file, "w", what="split file", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
        logger.info("%s: split into %s, saved in %s.", escape_path(path), counts, escape_path(split_file))
    else:
        logger.info("%s: split into %s (not saved: no label_table#split_file).", escape_path(path), counts)
    return content


def _split_options(options: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("split_column", "group_column", "val_fraction", "test_fraction", "seed")
    return {key: options[key] for key in keys}


def _read_saved(split_file: Path) -> dict:
    try:
        saved = json.loads(split_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LabelTableError(f"saved split {escape_path(split_file)} is not valid JSON ({err}): delete it.") from err
    if not isinstance(saved, dict) or not all(isinstance(saved.get(name), list) for name in SPLITS):
        raise LabelTableError(
            f"saved split {escape_path(split_file)} is not a datalist with 'train', 'val' and 'test' lists: delete it."
        )
    return saved


def _check_saved(split_file: Path, path: Path, saved: dict, items: list[dict], classes: list[str]) -> None:
    """Raise when the saved split no longer matches the table: other classes, rows or labels, or rows that the
    table's ``split_column`` puts in another split."""
    mismatch = f"the split saved in {escape_path(split_file)} no longer matches the label table {escape_path(path)}"
    advice = "delete that file to split the table again, or restore the table it was made from"
    if saved.get("classes") != classes:
        raise LabelTableError(f"{mismatch}: it has the classes {saved.get('classes')}, not {classes}; {advice}.")
    saved_split: dict[str, tuple[str, Any]] = {}
    for name in SPLITS:
        for item in saved[name]:
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise LabelTableError(f"{mismatch}: its '{name}' list has an item {item!r:.100}; {advice}.")
            saved_split[os.path.abspath(item["image"])] = name, item["label"]
    table = {os.path.abspath(item["image"]): item for item in items}
    added = [item["line"] for image, item in table.items() if image not in saved_split]
    removed = [image for image in saved_split if image not in table]
    relabelled = [
        item["line"] for image, item in table.items() if image in saved_split and saved_split[image][1] != item["label"]
    ]
    moved = [  # a row the table puts in another split (a validation split carved from its training rows is kept)
        item["line"]
        for image, item in table.items()
        if "split" in item
        and image in saved_split
        and saved_split[image][0] != item["split"]
        and (item["split"], saved_split[image][0]) != ("train", "val")
    ]
    found = []
    if added:
        found.append(f"{len(added)} row(s) not in it (lines {_lines(added, 5)})")
    if removed:
        found.append(f"{len(removed)} of its images no longer in the table (e.g. {escape_path(removed[0])})")
    if relabelled:
        found.append(f"{len(relabelled)} row(s) with another label (lines {_lines(relabelled, 5)})")
    if moved:
        found.append(f"{len(moved)} row(s) in another split (lines {_lines(moved, 5)})")
    if found:
        raise LabelTableError(f"{mismatch}: {'; '.join(found)}; {advice}.")


def table_datalist(
    path: str | os.PathLike, split: str, classes: Sequence[str], label_table: Mapping[str, Any] | None = None
) -> list[dict]:
    """``[{"image", "label"}]`` of ``split`` (``"train"``, ``"val"`` or ``"test"``) of a label table, from
    :func:`table_splits` (the split made and saved once)."""
    if split not in SPLITS:
        raise KeyError(f"a label table has the splits {list(SPLITS)}, not '{split}'.")
    return [dict(item) for item in table_splits(path, classes, label_table)[split]]
