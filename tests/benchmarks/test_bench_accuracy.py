"""The accuracy benchmark: every method through the bundle with one schedule, merged tables, resumed runs."""

import pytest

pytestmark = pytest.mark.usefixtures("random_weights_quiet")  # the networks here have random weights


def test_accuracy_table_end_to_end(tmp_path):
    """One tiny run per kind of row: a baseline, FPT, and the n/a row of VPT; markdown and JSON written."""
    import json

    from benchmarks.accuracy import accuracy_table, write_accuracy
    from fpt_monai.data import make_sample_dataset

    data = make_sample_dataset(tmp_path / "data", num_train=6, num_val=3, num_test=3, image_size=64, progress=False)
    result = accuracy_table(
        tmp_path / "runs", methods=("vpt", "lora", "fpt", "fpt_plus"), num_epochs=1, dataset_dir=data, img_size=64,
        side_img_size=32, batch_size=3, num_workers=0, pretrained=False,  # the table's mechanics, not transfer
    )
    rows = {row["method"]: row for row in result["rows"]}
    assert "transformer tokens" in rows["vpt"]["reason"]
    assert rows["lora"]["learnable"] == 186_115 and rows["fpt"]["learnable"] > rows["fpt_plus"]["learnable"] > 0
    for method in ("lora", "fpt", "fpt_plus"):
        for checkpoint in ("best", "final"):
            assert 0.0 <= rows[method][checkpoint]["test_accuracy"] <= 1.0
            assert set(rows[method][checkpoint]) >= {"test_auc", "test_accuracy", "test_f1", "test_kappa"}
        assert rows[method]["seconds"] > 0
    # the baseline ran from the image (no cache), FPT from preloaded keys/values
    assert not (tmp_path / "runs" / "lora" / "cache").exists() and (tmp_path / "runs" / "fpt" / "cache").exists()
    # FPT+ trained from its own cache: keys/values of its 3 extracted blocks (FPT's has 6)
    from safetensors import safe_open

    for method, blocks in (("fpt", 6), ("fpt_plus", 3)):
        entry = next((tmp_path / "runs" / method / "cache").rglob("*.safetensors"))
        with safe_open(str(entry), framework="pt") as f:
            assert f.get_slice("kv").get_shape()[0] == blocks
    text = write_accuracy(result, tmp_path / "out", command="test")
    assert "| VPT-deep prompt tuning | n/a |" in text and "186,115" in text
    assert json.loads((tmp_path / "out" / "accuracy.json").read_text())["rows"][0]["method"] == "vpt"
    from benchmarks.report import write_markdown  # the accuracy section of `python -m benchmarks bench`

    report = write_markdown({"machine": "test", "command": "test", "accuracy": result}, tmp_path / "results.md")
    assert "## Accuracy on the bundle's sample task" in report and "| VPT-deep prompt tuning | n/a |" in report
    with pytest.raises(ValueError, match="methods must be"):
        accuracy_table(tmp_path / "runs", methods=("bitfit",), dataset_dir=data)
    # a typo is refused before any data is made or any method trains
    from fpt_monai.config_check import ConfigOverrideError

    with pytest.raises(ConfigOverrideError, match="num_epoch"):
        accuracy_table(tmp_path / "typo", methods=("linear", "fpt"), num_epoch=3)
    assert not (tmp_path / "typo").exists()


def test_accuracy_sample_data_follows_the_input_size(tmp_path):
    """Without a dataset folder the sample task is rendered at the networks' input size (a stated smaller size)."""
    from PIL import Image

    from benchmarks.accuracy import accuracy_markdown, accuracy_table

    result = accuracy_table(tmp_path, methods=("vpt",), num_epochs=1, img_size=64)
    assert result["dataset_dir"] == str(tmp_path / "data" / "fpt_sample_64")
    first = next((tmp_path / "data" / "fpt_sample_64" / "test").rglob("*.png"))
    assert Image.open(first).size == (64, 64)
    assert "images and networks at 64 px" in accuracy_markdown(result)


def test_accuracy_resume_continues_a_stopped_run_and_shares_its_table(tmp_path, monkeypatch):
    """A run stopped after epoch 1 continues from its resume checkpoint; resuming is not a setting of the table."""
    from benchmarks.accuracy import accuracy_markdown, accuracy_table, merge_accuracy
    from fpt_monai.data import make_sample_dataset

    data = make_sample_dataset(tmp_path / "data", num_train=6, num_val=3, num_test=3, image_size=64, progress=False)
    common = {"methods": ("linear",), "dataset_dir": data, "img_size": 64, "batch_size": 3, "num_workers": 0,
              "pretrained": False}
    accuracy_table(tmp_path / "runs", num_epochs=1, **common)  # the "stopped" run: its last checkpoint is epoch 1
    import fpt_monai.engine

    loaded = []  # what the bundle's trainer was set to resume from (train.json calls fpt_monai.engine.attach_resume)
    attach = fpt_monai.engine.attach_resume
    monkeypatch.setattr(fpt_monai.engine, "attach_resume", lambda *a, **k: loaded.append(attach(*a, **k)))
    resumed = accuracy_table(tmp_path / "runs", num_epochs=2, resume=True, **common)
    assert [path.name for path in loaded] == ["resume_checkpoint_epoch=1.pt"]
    row = resumed["rows"][0]
    assert row["resumed_after_epoch"] == 1 and resumed["overrides"] == {"batch_size": 3, "num_workers": 0, "pretrained": False}
    assert (tmp_path / "runs" / "linear" / "models" / "resume_checkpoint_epoch=2.pt").exists()
    text = accuracy_markdown(resumed)
    assert "(epochs 2-2)" in text and "resumed after epoch 1" in text
    # an uninterrupted run of another method merges with it: same task, same schedule
    other = accuracy_table(tmp_path / "runs", num_epochs=2, **{**common, "methods": ("vpt",)})
    assert [r["method"] for r in merge_accuracy([resumed, other])["rows"]] == ["linear", "vpt"]
    # without a checkpoint there is nothing to resume from: the run starts over and the row says nothing
    fresh = accuracy_table(tmp_path / "fresh", num_epochs=1, resume=True, **common)
    assert "resumed_after_epoch" not in fresh["rows"][0]


def _accuracy_result(*methods, num_epochs=20, img_size=None, command=""):
    """A result shaped like accuracy_table's, one metrics row per method (values made up: only the merge is tested)."""
    rows = [
        {"method": m, "label": m, "learnable": 10 + i, "frozen": 100, "learnable_percent": 9.0, "seconds": 1.0,
         "best": dict.fromkeys(("test_auc", "test_accuracy", "test_f1", "test_kappa"), 0.5 + i / 10),
         "final": dict.fromkeys(("test_auc", "test_accuracy", "test_f1", "test_kappa"), 0.4)}
        for i, m in enumerate(methods)
    ]
    return {"command": command, "num_epochs": num_epochs, "dataset_dir": "/data/fpt_sample", "num_classes": 3,
            "img_size": img_size, "side_img_size": None, "overrides": {}, "rows": rows}


def test_merge_accuracy_joins_separate_runs_in_table_order():
    from benchmarks.accuracy import accuracy_markdown, merge_accuracy

    merged = merge_accuracy([_accuracy_result("fpt", command="python -m benchmarks accuracy --methods fpt"),
                             _accuracy_result("lora", "linear", command="python -m benchmarks accuracy --methods lora,linear")])
    assert [row["method"] for row in merged["rows"]] == ["linear", "lora", "fpt"]  # ACCURACY_METHODS order
    assert merged["num_epochs"] == 20 and merged["merged_commands"][0] == "python -m benchmarks accuracy --methods fpt"
    assert accuracy_markdown(merged).count("| linear |") == 1
    # a resumed row says which epochs its wall time covers
    merged["rows"][0]["resumed_after_epoch"] = 12
    assert "| 1 (epochs 13-20) |" in accuracy_markdown(merged) and "resumed after epoch 12" in accuracy_markdown(merged)
    merged["rows"][0]["resumed_after_epoch"] = 20
    assert "| 1 (none left) |" in accuracy_markdown(merged)


@pytest.mark.parametrize(
    "other,message",
    [
        (_accuracy_result("lora", num_epochs=3), "num_epochs=3"),  # another schedule
        (_accuracy_result("lora", img_size=256), "img_size=256"),  # another input size
        (_accuracy_result("fpt"), "'fpt' appears in more than one result"),
        ({"rows": "x"}, "not a result of accuracy_table"),
    ],
)
def test_merge_accuracy_refuses_runs_that_do_not_share_a_table(other, message):
    from benchmarks.accuracy import merge_accuracy

    with pytest.raises(ValueError, match=message):
        merge_accuracy([_accuracy_result("fpt"), other], sources=["a.json", "b.json"])
    with pytest.raises(ValueError, match="at least one"):
        merge_accuracy([])


def test_accuracy_merge_command_writes_the_table(tmp_path, capsys):
    import json

    from benchmarks.cli import Commands

    files = []
    for name, result in (("a", _accuracy_result("fpt", command="run a")), ("b", _accuracy_result("full", command="run b"))):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(result))
    Commands().accuracy_merge(*map(str, files), output_dir=str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert [row["method"] for row in written["rows"]] == ["full", "fpt"]
    markdown = (tmp_path / "out" / "accuracy.md").read_text()
    assert "- `run a`" in markdown and "- `run b`" in markdown and "| full |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cannot read the accuracy results .*missing.json"):
        Commands().accuracy_merge(str(tmp_path / "missing.json"), output_dir=str(tmp_path / "out"))
