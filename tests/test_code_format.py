"""The package is the bundle's custom code (``scripts/fpt_monai`` of an export): the Model Zoo's format settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fpt_monai"
#: The Model Zoo's flake8 settings (its setup.cfg) and black options (its runtests.sh).
FLAKE8 = ["--max-line-length", "120", "--select", "B,C,E,F,N,P,T4,W,B9",
          "--ignore", "E203,E501,E741,W503,W504,C408,N812,B023,B905,B028,B907,C419"]
BLACK = ["--check", "--line-length", "120", "--skip-magic-trailing-comma"]


@pytest.mark.parametrize("tool", ["black", "flake8"])
def test_the_package_passes_the_model_zoo_format_checks(tool):
    options = BLACK if tool == "black" else FLAKE8
    result = subprocess.run([sys.executable, "-m", tool, *options, str(PACKAGE)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
