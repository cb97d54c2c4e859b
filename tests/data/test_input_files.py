"""Files as hospitals hand them over: DICOM files found by their content whatever their name (PACS exports,
DICOMDIR trees), every file that is not read named with its reason, file names that are not valid UTF-8, and
decodes that show nothing (narrow-range DICOMs made visible, constant images reported)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from fpt_monai.data import (
    DatalistError,
    folder_datalist,
    image_datalist,
    make_datalist,
    read_image,
    readable_datalist,
    sniff_format,
    validate_datalist,
)
from fpt_monai.utils import escape_path, unescape_path


def _png(path: Path, size=(48, 40), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, "PNG")
    return path


def _copy(name: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(get_testdata_file(name), path)
    return path


def _pacs_export(root: Path) -> tuple[list[Path], dict[str, str]]:
    """A folder as a PACS export and a user's copy leave it: suffix-less DICOMs next to PNGs and files that are not
    read. Returns the images and, by file name, the reason each other file is not read."""
    images = [
        _copy("CT_small.dcm", root / "PAT1" / "IM000001"),
        _copy("MR_small.dcm", root / "PAT1" / "IM000002"),
        _copy("CT_small.dcm", root / "PAT2" / "1.2.840.113619.2.55.3.604688119"),
        _png(root / "photo.png"),
        _png(root / "scans" / "png_without_suffix", seed=1),
    ]
    frames = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (0, 255)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "x.webp")
    (root / "notes.txt").write_text("patient list")
    (root / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" + bytes(200))
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _png(root / ".thumbnails" / "cached.png")
    reasons = {
        "anim.gif": "GIF image: not a format that is read",
        "x.webp": "WebP image: not a format that is read",
        "notes.txt": "not an image (its suffix '.txt'",
        "Thumbs.db": "system file (not data)",
        ".DS_Store": "hidden file",
        ".thumbnails": "hidden folder (not searched)",
    }
    return images, reasons


def test_suffix_less_dicoms_are_found_by_content_and_every_other_file_is_named(tmp_path, caplog):
    root = tmp_path / "export"
    images, reasons = _pacs_export(root)
    datalist = image_datalist(root)
    assert sorted(item["image"] for item in datalist) == sorted(str(p.absolute()) for p in images)
    assert {Path(e["image"]).name: e["reason"] for e in datalist.not_read}.keys() == reasons.keys()
    report = tmp_path / "inference" / "input_check.json"
    with caplog.at_level(logging.INFO, logger="fpt_monai.data.validation"):
        kept = readable_datalist(datalist, report_path=report)
    assert kept == list(datalist)  # every image is read, the DICOMs by their content
    for path in images:
        assert read_image(path).shape[0] == 3
    written = json.loads(report.read_text())
    assert written["files_not_read"] == len(reasons) and written["good"] == len(images)
    named = {Path(e["image"]).name: e["reason"] for e in written["not_read"]}
    for name, reason in reasons.items():
        assert reason in named[name], (name, named[name])
        assert name in caplog.text  # named in the log too
    assert f"{len(images)} kept, {len(reasons)} files not read" in caplog.text  # the summary line counts them


def test_sniffing_reads_at_most_132_bytes_of_a_file_without_a_known_suffix(tmp_path, monkeypatch):
    root = tmp_path / "export"
    _pacs_export(root)
    sizes = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.f.close()

        def read(self, size=-1):
            sizes.append(size)
            return self.f.read(size)

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Counting(f) if "b" in mode else f

    monkeypatch.setattr("builtins.open", counting_open)
    image_datalist(root)
    # only the files without an image suffix are opened (3 DICOMs, the suffix-less PNG, GIF, WebP, notes), not
    # the PNG, nor Thumbs.db and the hidden files (by their names)
    assert sizes == [132] * 7


def test_formats_are_named_by_their_first_bytes():
    assert sniff_format(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:132]) == "DICOM"
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + bytes(20)) == "PNG"
    assert sniff_format(b"GIF89a....") == "GIF image"
    assert sniff_format(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "WebP image"
    assert sniff_format(b"%PDF-1.7") == "PDF document"
    assert sniff_format(b"hello") is None


def test_a_dicomdir_tree_is_read_file_by_file_and_its_index_named(tmp_path):
    source = Path(get_testdata_file("DICOMDIR")).parent
    root = tmp_path / "cd"
    root.mkdir()
    shutil.copyfile(source / "DICOMDIR", root / "DICOMDIR")
    for patient in ("77654033", "98892001", "98892003"):
        shutil.copytree(source / patient, root / patient)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    datalist = image_datalist(root)
    assert [item["image"] for item in datalist] == [str(p) for p in files] and len(files) > 20
    assert [(Path(e["image"]).name, e["reason"].split(" (")[0]) for e in datalist.not_read] == [
        ("DICOMDIR", "DICOMDIR index of a DICOM folder tree")
    ]
    # the CD's images are 16x16 pixels: checked with a minimum size below that. A few CT slices are black
    # under their own VOI window: reported, not classified
    kept = readable_datalist(datalist, min_size=16, report_path=tmp_path / "report.json")
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["not_read"][0]["image"] == str(root / "DICOMDIR")
    constant = {p["image"] for p in written["problems"] if p["problem"].startswith("image is (nearly) constant")}
    assert len(kept) > 20 and len(constant) == written["bad"] < 5
    assert sorted([item["image"] for item in kept] + list(constant)) == [str(p) for p in files]


def test_a_dicom_without_pixel_data_is_named(tmp_path):
    _copy("rtplan.dcm", tmp_path / "input" / "RT000001")  # suffix-less, found as DICOM by content
    _png(tmp_path / "input" / "a.png")
    report = tmp_path / "report.json"
    kept = readable_datalist(image_datalist(tmp_path / "input"), report_path=report)
    assert [Path(item["image"]).name for item in kept] == ["a.png"]
    (problem,) = json.loads(report.read_text())["problems"]
    assert problem["image"].endswith("RT000001") and "a DICOM file without an image" in problem["problem"]


def test_a_folder_of_files_that_are_not_read_names_each(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "scan.gif")
    (root / "DICOMDIR").write_bytes(Path(get_testdata_file("DICOMDIR")).read_bytes())
    with pytest.raises(ValueError, match=str(root)) as error:
        image_datalist(root)
    assert "scan.gif: GIF image" in str(error.value) and "DICOMDIR: DICOMDIR index" in str(error.value)


def test_training_folders_find_dicoms_by_content_and_report_every_file_not_read(tmp_path, caplog):
    data = tmp_path / "data"
    for split in ("train", "val"):
        _copy("CT_small.dcm", data / split / "a" / "PAT1" / "SER1" / "IM000001")
        _png(data / split / "b" / "0001.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(data / "train" / "b" / "0002.gif")
    _png(data / "train" / "stray.png")  # beside the class folders: no label
    train = make_datalist(data, "train", strict=False)
    assert [(Path(item["image"]).name, item["label"]) for item in train] == [("IM000001", 0), ("0001.png", 1)]
    assert {Path(e["image"]).name: e["reason"] for e in train.not_read} == {
        "0002.gif": "GIF image: not a format that is read (convert it to PNG)",
        "stray.png": "an image beside the class folders, in none of them (no label)",
    }
    assert len(folder_datalist(data, "val")) == 2 and folder_datalist(data, "val").not_read == []
    report = tmp_path / "data_check" / "train.json"
    with caplog.at_level(logging.INFO, logger="fpt_monai.data.validation"):
        assert validate_datalist(train, ["a", "b"], report_path=report) == list(train)
    written = json.loads(report.read_text())
    assert written["files_not_read"] == 2 and {Path(e["image"]).name for e in written["not_read"]} == {
        "0002.gif", "stray.png"}
    assert "2 kept, 2 files not read" in caplog.text and "0002.gif: GIF image" in caplog.text


# -- file names that are not valid UTF-8 ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [b"caf\xe9.png", b"a\\b\xff", "Müller.png".encode(), b"C:\\xab\\f", b"plain.png", b"a\\\\xe9\xff", b"\\\\srv\\x"],
)
def test_escaped_paths_give_back_their_bytes(raw):
    text = escape_path(os.fsdecode(raw))
    text.encode("utf-8")  # any UTF-8 file can hold it
    assert unescape_path(text) == raw and escape_path(raw) == text
    if raw == b"caf\xe9.png":
        assert text == "caf\\xe9.png"
    elif raw in (b"plain.png", "Müller.png".encode()):
        assert text == raw.decode()  # valid UTF-8 kept as it is


def test_a_name_that_is_not_utf8_is_read_by_every_reader_and_reported_escaped(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    png = _png(Path(os.fsdecode(bytes(root) + b"/caf\xe9.png")))
    dicom = Path(os.fsdecode(bytes(root) + b"/IM\xe90001"))
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # written without File Meta: decoded by ITK's GDCM
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.preamble = None
    ds.save_as(dicom, enforce_file_format=False, implicit_vr=True, little_endian=True)
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(Path(os.fsdecode(bytes(root) + b"/flat\xff.png")))
    report = tmp_path / "input_check.json"
    kept = readable_datalist(image_datalist(root), report_path=report)
    assert sorted(item["image"] for item in kept) == sorted([str(dicom), str(png)])
    np.testing.assert_array_equal(read_image(dicom), read_image(get_testdata_file("MR_small.dcm")))
    text = report.read_text(encoding="utf-8")  # valid UTF-8 throughout
    (problem,) = json.loads(text)["problems"]
    assert problem["image"] == escape_path(bytes(root) + b"/flat\xff.png")
    assert unescape_path(problem["image"]) == bytes(root) + b"/flat\xff.png"


# -- degenerate decodes --------------------------------------------------------------------------------------------
def _twelve_bit(path: Path, pixels: np.ndarray) -> Path:
    """A 12-bit-stored MONOCHROME2 DICOM without VOI window holding ``pixels``."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for keyword in ("WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path)
    return path


def test_a_narrow_range_dicom_without_window_is_made_visible(tmp_path):
    pixels = np.random.default_rng(0).integers(1000, 1101, (48, 48))
    path = _twelve_bit(tmp_path / "IM000001", pixels)
    image = read_image(path)
    assert image.min() == 0 and image.max() == 1  # min-max: 1000 -> 0, 1100 -> 1
    np.testing.assert_allclose(image[0], (pixels - pixels.min()) / (pixels.max() - pixels.min()), atol=1e-6)
    stored = read_image(path, dicom_window="stored")  # the stored range: a flat gray
    assert stored.max() - stored.min() < 0.025
    wide = _twelve_bit(tmp_path / "IM000002", np.random.default_rng(0).integers(0, 4096, (48, 48)))
    np.testing.assert_array_equal(read_image(wide), read_image(wide, dicom_window="stored"))


def test_a_constant_image_is_reported_not_classified(tmp_path):
    good = _png(tmp_path / "good.png")
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((48, 48, 3), 120, np.uint8)).save(flat)
    flat_dicom = _twelve_bit(tmp_path / "IM000003", np.full((48, 48), 1000))
    items = [{"image": str(p)} for p in (good, flat, flat_dicom)]
    report = tmp_path / "report.json"
    assert readable_datalist(items, report_path=report) == items[:1]
    problems = {Path(p["image"]).name: p["problem"] for p in json.loads(report.read_text())["problems"]}
    assert set(problems) == {"flat.png", "IM000003"}
    assert all(p.startswith("image is (nearly) constant") for p in problems.values())
    with pytest.raises(DatalistError, match=r"flat.png\): image is \(nearly\) constant"):
        validate_datalist([{"image": str(flat), "label": 0}, {"image": str(good), "label": 0}], ["a"])
    assert readable_datalist(items, decode=False) == items  # headers only: no pixels to judge


def test_the_narrow_range_rule_enters_the_cache_fingerprint():
    from fpt_monai.data import LoadImageRGBd
    from fpt_monai.preload.fingerprint import describe

    assert '"narrow_dicom_range": 0.125' in json.dumps(describe(LoadImageRGBd("image")))
