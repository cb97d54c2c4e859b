"""The per-image report keeps every file name: names that are not valid UTF-8 are written escaped, reversibly."""

from __future__ import annotations

import csv
import os

import torch
from ignite.engine import Engine

from fpt_monai.engine import ClassificationReport
from fpt_monai.utils import unescape_path


def test_predictions_csv_holds_every_file_name_escaped_and_reversible(tmp_path):
    raw = [b"/data/caf\xe9.png", "/data/Müller.png".encode(), b"/data/plain.png"]
    names = [os.fsdecode(name) for name in raw]
    report = ClassificationReport(tmp_path / "report", ["a", "b"])
    engine = Engine(lambda engine, batch: [{"pred": torch.tensor([0.3, 0.7])} for _ in batch])
    report.attach(engine)
    engine.run([[{"filename": name, "image": torch.zeros(3, 4, 4)} for name in names]], max_epochs=1)
    with open(tmp_path / "report" / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["filename"] for row in rows] == ["/data/caf\\xe9.png", "/data/Müller.png", "/data/plain.png"]
    assert [unescape_path(row["filename"]) for row in rows] == raw
    assert all(row["prediction"] == "b" for row in rows)
