"""The README's Python code runs as written: every ```python block, in order, in one fresh interpreter, from an
empty folder (what a reader who copies the blocks after the README's install does)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_python_blocks_are_found():
    blocks = python_blocks("a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n")
    assert blocks == ["x = 1\n", "y = 2\n"]


def test_readme_python_blocks_run_in_order_from_an_empty_folder(tmp_path):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "the README shows the network API and training in MONAI's SupervisedTrainer"
    assert any("SupervisedTrainer" in block for block in blocks)
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(blocks), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (work / "fpt_demo.pt").is_file()  # the last block's checkpoint: the whole script ran
