"""What several benchmarks share: their argument checks and Markdown tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["check_run_arguments", "markdown_table"]


def check_run_arguments(runner: str, overrides: Mapping[str, Any], own_keys: Sequence[str], **counts: int) -> None:
    """Refuse counts below 1 and bundle overrides of the config keys that a benchmark sets itself.

    Args:
        runner: the benchmark, as its errors name it (e.g. ``"accuracy_table"``).
        overrides: the bundle config overrides it was given.
        own_keys: the config keys it sets from its arguments (``bundle_root``, ``num_epochs``, ...).
        counts: ``name=value`` of the arguments that count something (at least 1).
    """
    for name, value in counts.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    for key in own_keys:
        if key in overrides:
            raise ValueError(
                f"{key!r} is set by {runner} itself: leave it out of the overrides (pass it as an argument where "
                f"{runner} has one)."
            )


def markdown_table(titles: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: a header of ``titles``, then one line per row of cells (written with ``str``).

    Args:
        titles: the column titles.
        align: one letter per column: ``l`` left-aligned (names), ``r`` right-aligned (numbers).
        rows: the cells of each row, one per column.
    """
    if len(align) != len(titles) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one 'l' or 'r' per column of {list(titles)}, got {align!r}.")
    lines = [_line(titles), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for cells in rows:
        if len(cells) != len(titles):
            raise ValueError(f"a row of {len(cells)} cells in a table of columns {list(titles)}: {list(cells)}.")
        lines.append(_line(cells))
    return "\n".join(lines)


def _line(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
