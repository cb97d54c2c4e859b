import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args, console_script=False):
    command = [str(Path(sys.executable).parent / "fpt-monai")] if console_script else [sys.executable, "-m", "fpt_monai"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "preset,learnable,console_script", [("fpt", 1_602_341, True), ("fpt_plus", 900_965, False)]
)
def test_params_prints_the_paper_counts_without_downloading(preset, learnable, console_script):
    result = run_cli("params", "--preset", preset, "--num_classes", "5", console_script=console_script)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert counts["learnable"] == learnable
    assert counts["frozen"] == 86_434_560
    assert counts["learnable_ratio"] == round(learnable / (learnable + 86_434_560), 6)
    assert "random" not in result.stderr  # counting builds no weights, so no random-weights warning


def test_unknown_preset_is_named():
    result = run_cli("params", "--preset", "vit_huge")
    assert result.returncode != 0
    assert "vit_huge" in result.stderr and "fpt_plus" in result.stderr


def test_presets_lists_all():
    result = run_cli("presets")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"fpt", "fpt_plus", "fpt_tiny", "fpt_plus_tiny"}
