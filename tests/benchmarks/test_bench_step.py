"""The training-step benchmark: both recompute settings and the yardstick, rows and table."""

import pytest


YARDSTICK = '''
import torch, torch.nn as nn


class PlainFPT(nn.Module):
    def __init__(self, variant, num_classes=5):
        super().__init__()
        self.variant, self.head = variant, nn.Linear(3, num_classes)

    def forward(self, side_images, kv):
        return self.head(side_images.mean(dim=(2, 3))) + kv.float().mean() * 0
'''


def test_step_comparison_reports_both_settings_and_the_yardstick(tmp_path):
    from benchmarks.step import step_table, training_step_comparison

    path = tmp_path / "plain.py"
    path.write_text(YARDSTICK)
    rows = training_step_comparison(("fpt_plus_tiny",), batch_size=2, repeats=1, yardstick=path)
    assert [row["arm"] for row in rows] == ["recompute", "stored", "yardstick"]
    recompute, stored, plain = rows
    assert plain["speed_ratio"] == 1.0 and plain["kv_dtype"] == "float32" and recompute["kv_dtype"] == "float16"
    assert all(row["images_per_second"] > 0 and row["speed_ratio"] > 0 for row in rows)
    # the stored setting keeps the side ViT's attention probabilities and GELU outputs: more activations
    assert stored["saved_for_backward_bytes"] > recompute["saved_for_backward_bytes"]
    assert "| fpt_plus_tiny | stored |" in step_table(rows)


def test_a_missing_or_wrong_yardstick_is_named(tmp_path):
    from benchmarks.step import load_yardstick

    with pytest.raises(FileNotFoundError, match="nowhere.py"):
        load_yardstick(tmp_path / "nowhere.py")
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(AttributeError, match="no PlainFPT"):
        load_yardstick(tmp_path / "other.py")
