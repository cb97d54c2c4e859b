"""The MONAI bundle ``bundles/fpt_classification``: locate it, run its sample-data demo, export it self-contained.

The bundle's configs reference this package by dotted ``_target_`` paths. :func:`export_bundle` writes a copy
that carries the package under ``scripts/`` (the Model Zoo's place for custom code), so it runs where only the
third-party packages named in its ``metadata.json`` are installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

import fpt_monai
from fpt_monai.config_check import ConfigOverrideError, check_overrides
from fpt_monai.networks.baselines import check_cnn_method
from fpt_monai.networks.methods import method_names
from fpt_monai.utils import BUNDLE_FILES, bundle_dir, config_files

__all__ = [
    "DEMO_METHODS",
    "bundle_dir",
    "config_files",
    "demo_config_names",
    "run_demo",
    "run_workflow",
    "export_bundle",
]

logger = logging.getLogger(__name__)

BUNDLE_NAME = "fpt_classification"

#: Methods :func:`run_demo` trains on the sample task: FPT, and the baselines on the same demo network.
DEMO_METHODS = ("fpt", *method_names(baseline=True, on_cnn=True))


def demo_config_names(method: str = "fpt", evaluate: bool = False) -> list[str]:
    """The bundle configs, in layering order, of a sample-task run of ``method`` (training, or evaluation).

    FPT: ``train + demo`` (evaluation: ``train + evaluate + demo``). A baseline on the demo network
    (:func:`fpt_monai.presets.create_demo_baseline`): ``train + demo + baseline + demo_baseline``
    (evaluation: ``train + evaluate + demo + baseline + demo_baseline + evaluate_baseline``), with ``method`` set.

    Raises:
        ValueError: ``method`` is not one of :data:`DEMO_METHODS` (``vpt``: the demo network has no tokens).
    """
    if method != "fpt":
        check_cnn_method(method)
    names = ["train", "evaluate", "demo"] if evaluate else ["train", "demo"]
    if method != "fpt":
        names += ["baseline", "demo_baseline"] + (["evaluate_baseline"] if evaluate else [])
    return names


def run_demo(work_dir: str | os.PathLike = "fpt_demo", evaluate: bool = True, method: str = "fpt", **overrides) -> dict:
    """Train FPT (or a baseline) on the sample dataset with the bundle, then evaluate the best and final checkpoints.

    The same runs as::

        python -m monai.bundle run --config_file "['configs/train.json','configs/demo.json']" --bundle_root <work_dir>
        python -m monai.bundle run \\
            --config_file "['configs/train.json','configs/evaluate.json','configs/demo.json']" --bundle_root <work_dir>

    with, for a baseline, the overlays of :func:`demo_config_names` and ``--method <method>``.

    Args:
        work_dir: bundle root of the run: sample data, cache, checkpoints (``models/``), reports and TensorBoard
            logs (``eval/``) go there.
        evaluate: also run the test-set evaluation.
        method: ``fpt``, or a baseline on the same demo network: ``full``, ``linear``, ``lora``, ``adapter``.
        overrides: config overrides, e.g. ``num_epochs=2``.

    Returns:
        ``{"best": {metric: value}, "final": {...}}`` of the test set (empty without ``evaluate``).
    """
    train_names, evaluate_names = demo_config_names(method), demo_config_names(method, evaluate=True)
    if method != "fpt":
        if overrides.setdefault("method", method) != method:
            raise ValueError(f"method={method!r} and the override method={overrides['method']!r} disagree.")
    work_dir = Path(work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    common = {"bundle_root": str(work_dir), **overrides}
    if overrides.get("check_overrides", True):  # refuse typos and mistyped values before any work
        try:
            check_overrides(config_files(*train_names), overrides)
        except ConfigOverrideError as error:
            if not evaluate:
                raise
            # an override must fit one of the two runs: `--checkpoints#...` is the evaluation's, `--resume` training's
            check_overrides(config_files(*evaluate_names), {key: overrides[key] for key in error.problems})
    run_workflow(train_names, **common)
    if not evaluate:
        return {}
    return run_workflow(evaluate_names, **common)[0]


def run_workflow(names: Sequence[str], run_id: str = "run", **kwargs: Any) -> list[Any]:
    """Run the bundle's configs ``names`` as one MONAI ``ConfigWorkflow``: initialize, run ``run_id``, finalize.

    What ``python -m monai.bundle run <run_id> --config_file <names>`` does, in this process: the bundle's
    ``metadata.json`` and ``logging.conf`` unless ``kwargs`` say otherwise.

    Args:
        names: config names, later ones overriding earlier ones, e.g. ``["train", "evaluate"]``.
        run_id: the config item to run (the bundle's configs name it ``run``, ``training`` in train.json and
            ``evaluating`` in evaluate.json are its aliases).
        kwargs: ``ConfigWorkflow`` arguments (``workflow_type``, ``logging_file``, ...) and config overrides, e.g.
            ``bundle_root="runs/a"`` or ``**{"network_def#img_size": 224}``.

    Returns:
        what running ``run_id`` returned (a list: one value per expression of the item).
    """
    workflow = ConfigWorkflow(
        config_file=config_files(*names), meta_file=config_files("metadata")[0], run_id=run_id, **kwargs
    )
    workflow.initialize()
    result = workflow.run()
    workflow.finalize()
    return result


#: Files and folders of the bundle that an export carries.
_BUNDLE_CONTENT = ("configs", "docs", "schema", "LICENSE", "large_files.yml")

_SCRIPTS_INIT = '''"""Custom code of this bundle: the fpt_monai package, carried with it (see docs/README.md)."""

import os
import sys

# `$import scripts` (first in every config's imports) makes the carried package importable as `fpt_monai`.
_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)
'''


def export_bundle(output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a self-contained copy of the bundle to ``output_dir``: configs, docs, licence, and the package.

    ``fpt_monai`` is copied to ``scripts/fpt_monai`` and every config that imports it gets ``$import scripts``
    first, which puts ``scripts/`` on ``sys.path``. Run the export from its folder (the Model Zoo's convention):
    ``cd <output_dir> && python -m monai.bundle run training --config_file configs/train.json ...``.

    Args:
        output_dir: the new bundle folder (must not exist unless ``overwrite``).
        overwrite: replace an existing folder.
    """
    source = bundle_dir()
    output_dir = Path(output_dir).absolute()
    if output_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{output_dir} exists; pass overwrite=True to replace it.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    for name in _BUNDLE_CONTENT:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, output_dir / name)
        elif path.is_file():
            shutil.copy2(path, output_dir / name)
    package = Path(fpt_monai.__file__).resolve().parent
    shutil.copytree(
        package,
        output_dir / "scripts" / "fpt_monai",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", BUNDLE_FILES),
    )
    (output_dir / "scripts" / "__init__.py").write_text(_SCRIPTS_INIT)
    for config in sorted((output_dir / "configs").glob("*.json")):
        content = json.loads(config.read_text())
        imports = content.get("imports") if isinstance(content, dict) else None
        if isinstance(imports, list) and "$import scripts" not in imports:
            content["imports"] = ["$import scripts", *imports]
            config.write_text(json.dumps(content, indent=4) + "\n")
    logger.info("exported bundle to %s", output_dir)
    return output_dir
