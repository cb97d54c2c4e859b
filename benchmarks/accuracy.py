"""Accuracy of FPT and the baselines on the bundle's sample task, every method with the same schedule.

Every method trains and is tested through the bundle (:func:`fpt_monai.bundle.run_demo`): the same sample data
(240 train / 90 val / 90 test fundus-like images, 3 grades), the same seed, optimizer (AdamW), learning rate,
weight decay, cosine schedule, batch size, gradient clipping, epochs and augmentation; only the network (and,
for FPT, its two-view input with preloaded keys/values) differs. The one ImageNet-pre-trained network available
offline is the demo's EfficientNet-Lite0, so every method uses it
(:func:`fpt_monai.presets.create_demo_baseline`, :func:`fpt_monai.presets.create_demo_fpt`):

- ``full``: every weight of EfficientNet-Lite0 and a new head learn.
- ``linear``: a new head on the frozen network's globally average-pooled ``conv_head`` features.
- ``lora``: LoRA, rank 8, on every pointwise (1x1) convolution.
- ``adapter``: AdaptFormer-style bottleneck (16, scale 0.1) beside every MBConv block.
- ``vpt``: not run; VPT-deep needs transformer tokens, which a CNN does not have (the row says so).
- ``fpt``: FPT with the frozen network behind the CNN adapter, side ViT at 112.
- ``fpt_plus``: FPT+ on the same frozen network: its last three extracted blocks, side ViT at 64
  (the ``fpt_plus_demo`` preset of :data:`fpt_monai.presets.PRESETS`).

Per method: the test metrics (macro one-vs-rest AUC, accuracy, macro F1, quadratic weighted kappa) of the best
(validation AUC) and the final checkpoint, the learnable and frozen parameter counts, and the wall time of the
whole run (training with validation every epoch, and testing both checkpoints; for FPT and FPT+ it includes
preloading the keys/values of the 420 images).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import check_run_arguments
from fpt_monai.bundle import config_files, demo_config_names, run_demo
from fpt_monai.config_check import check_overrides
from fpt_monai.data import SampleFundusSpec, dataset_classes, make_sample_dataset
from fpt_monai.engine.resume import checkpoint_epoch, latest_checkpoint
from fpt_monai.networks.baselines import check_cnn_method
from fpt_monai.networks.methods import method_names
from fpt_monai.weights import random_weights_expected

__all__ = ["ACCURACY_LABELS", "ACCURACY_METHODS", "accuracy_markdown", "accuracy_table", "merge_accuracy", "write_accuracy"]

logger = logging.getLogger(__name__)

#: The rows that are FPT networks (the bundle's FPT path, ``method=fpt``, with ``network_def#preset`` set).
_FPT_VARIANTS = ("fpt", "fpt_plus")

#: The methods of the table, in order (``vpt`` gives an n/a row).
ACCURACY_METHODS = method_names()
#: Row labels (the default method settings).
ACCURACY_LABELS = {
    "full": "full fine-tuning",
    "linear": "linear probing (pooled conv_head features)",
    "vpt": "VPT-deep prompt tuning",
    "lora": "LoRA (r=8, every 1x1 convolution)",
    "adapter": "AdaptFormer-style adapter (bottleneck 16, every MBConv block)",
    "fpt": "FPT (frozen network at the input size, side ViT at 112)",
    "fpt_plus": "FPT+ (last 3 of FPT's 6 blocks, side ViT at 64)",
}


def _parameter_counts(method: str, num_classes: int, network_kwargs: dict) -> dict:
    """Learnable/frozen parameters of the network a run builds (random weights: the counts do not depend on them)."""
    from fpt_monai.presets import create_fpt
    from fpt_monai.presets import create_demo_baseline

    with random_weights_expected():
        if method in _FPT_VARIANTS:
            network = dict(network_kwargs)
            net = create_fpt(network.pop("preset", "fpt_demo"), num_classes, pretrained=False, **network)
        else:
            net = create_demo_baseline(method, num_classes, pretrained=False, **network_kwargs)
    counts = net.parameter_counts()
    total = counts["learnable"] + counts["frozen"]
    return {"learnable": counts["learnable"], "frozen": counts["frozen"],
            "learnable_percent": 100 * counts["learnable"] / total}


def _bundle_method(method: str) -> str:
    """The bundle's ``method`` of a row: FPT+ is the bundle's FPT path with another network."""
    return "fpt" if method in _FPT_VARIANTS else method


def accuracy_table(
    work_dir: str | os.PathLike = "fpt_accuracy",
    methods: Sequence[str] = ACCURACY_METHODS,
    num_epochs: int = 20,
    dataset_dir: str | os.PathLike | None = None,
    img_size: int | None = None,
    side_img_size: int | None = None,
    resume: bool = False,
    **overrides,
) -> dict:
    """Train and test every method on the sample task through the bundle, with the same settings.

    Args:
        work_dir: parent folder: the sample data (``data/fpt_sample``, made once and shared) and one bundle root
            per method (``<work_dir>/<method>``: cache, checkpoints, reports, TensorBoard logs).
        methods: out of :data:`ACCURACY_METHODS`; ``vpt`` gives a row with the reason instead of metrics.
        num_epochs: training epochs of every method (the demo schedule has 20).
        dataset_dir: a dataset folder to use instead of the sample data (``train/ val/ test/`` class folders).
        img_size: input size of every network (default 512) and, without ``dataset_dir``, the size of the
            generated sample images (whose lesions scale with it): 256 makes every epoch about 4x cheaper.
        side_img_size: the side-view size of FPT and FPT+ (default 112 and 64; smaller only for tests).
        resume: continue each method's run from its newest resume checkpoint (``<work_dir>/<method>/models``)
            instead of starting over, e.g. after a crash or a stop. The resumed epochs replay the uninterrupted
            run's (see :mod:`fpt_monai.engine.resume`), so the result shares a table with uninterrupted runs; the
            row records ``resumed_after_epoch``, and its ``seconds`` count only the epochs trained in this call.
        overrides: bundle config overrides given to every run, e.g. ``batch_size=8``, ``num_workers=0``,
            ``pretrained=False`` (tests only).

    Returns:
        ``{"num_epochs", "dataset_dir", "overrides", "rows"}``; a row is ``{"method", "label", "learnable",
        "frozen", "learnable_percent", "seconds", "best": {metric: value}, "final": {...}, "work_dir"}`` (plus
        ``"resumed_after_epoch"`` when ``resume`` found a checkpoint), or
        ``{"method", "label", "reason"}`` for a method that cannot run on the demo network.
    """
    unknown = [m for m in methods if m not in ACCURACY_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty selection of {ACCURACY_METHODS}, got {list(methods)}.")
    check_run_arguments(
        "accuracy_table", overrides, ("method", "num_epochs", "dataset_dir", "bundle_root"), num_epochs=num_epochs
    )
    skipped: dict[str, str] = {}
    runnable = []
    for method in methods:
        try:
            if method not in _FPT_VARIANTS:
                check_cnn_method(method)
            runnable.append(method)
        except ValueError as err:  # vpt: no tokens in a CNN
            skipped[method] = str(err)

    def network_kwargs(method: str) -> dict:
        network = {"img_size": img_size} if img_size is not None else {}
        if method == "fpt_plus":
            network["preset"] = "fpt_plus_demo"
        if method in _FPT_VARIANTS and side_img_size is not None:
            network["side_img_size"] = side_img_size
        return network

    if overrides.get("check_overrides", True):  # refuse typos before hours of training
        for method in runnable:
            check_overrides(config_files(*demo_config_names(_bundle_method(method), evaluate=True)),
                            {**overrides, **{f"network_def#{k}": v for k, v in network_kwargs(method).items()}})
    work_dir = Path(work_dir).absolute()
    if dataset_dir is None:  # demo.json's default dataset, or the same task rendered at the networks' input size
        default_size = SampleFundusSpec().image_size
        size = default_size if img_size is None else int(img_size)
        folder = "fpt_sample" if size == default_size else f"fpt_sample_{size}"
        dataset_dir = make_sample_dataset(work_dir / "data" / folder, image_size=size)
    dataset_dir = Path(dataset_dir).absolute()
    num_classes = len(dataset_classes(str(dataset_dir)))
    settings = {**overrides, "num_epochs": int(num_epochs), "dataset_dir": str(dataset_dir)}
    rows = []
    for method in methods:
        label = ACCURACY_LABELS[method]
        if method in skipped:
            rows.append({"method": method, "label": label, "reason": skipped[method]})
            continue
        network = network_kwargs(method)
        run_overrides = {**settings, **{f"network_def#{k}": v for k, v in network.items()}}
        # the bundle's resume names the same file (its resume saver writes resume_checkpoint_epoch=N.pt to models/)
        checkpoint = latest_checkpoint(work_dir / method / "models") if resume else None
        logger.info("accuracy: %s, %d epochs%s ...", method, int(num_epochs),
                    f", resuming from {checkpoint}" if checkpoint else "")
        start = time.perf_counter()
        metrics = run_demo(work_dir / method, method=_bundle_method(method), **run_overrides,
                           **({"resume": True} if resume else {}))
        seconds = time.perf_counter() - start
        rows.append({
            "method": method, "label": label, **_parameter_counts(method, num_classes, network),
            "seconds": seconds, "best": metrics["best"], "final": metrics["final"], "work_dir": str(work_dir / method),
        })
        if checkpoint is not None:
            rows[-1]["resumed_after_epoch"] = checkpoint_epoch(checkpoint)
        logger.info("accuracy: %s done in %.0f s: %s", method, seconds, metrics)
    return {"num_epochs": int(num_epochs), "dataset_dir": str(dataset_dir), "num_classes": num_classes,
            "img_size": img_size, "side_img_size": side_img_size, "overrides": overrides, "rows": rows}


#: What must agree for runs of different methods to share one table: the same task and the same schedule.
_SHARED_SETTINGS = ("num_epochs", "dataset_dir", "num_classes", "img_size", "side_img_size", "overrides")


def merge_accuracy(results: Sequence[dict], sources: Sequence[str] | None = None) -> dict:
    """One table from :func:`accuracy_table` results of separate runs (one method each, say, hours apart).

    The runs must share the task and the schedule (epochs, dataset, input and side-view sizes, bundle overrides)
    and give each method once; the rows come out in the order of :data:`ACCURACY_METHODS`.

    Args:
        results: results as :func:`accuracy_table` returns them or ``accuracy.json`` holds them.
        sources: a name per result (e.g. its file) for the error messages; default ``result 0``, ``result 1``, ...

    Raises:
        ValueError: when the runs differ in a shared setting, a method appears twice, or nothing is given.
    """
    if not results:
        raise ValueError("merge_accuracy needs at least one result.")
    sources = list(sources) if sources is not None else [f"result {i}" for i in range(len(results))]
    first = results[0]
    rows: dict[str, dict] = {}
    commands = []
    for source, result in zip(sources, results):
        if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
            raise ValueError(f"{source} is not a result of accuracy_table (no 'rows' list).")
        for key in _SHARED_SETTINGS:
            if result.get(key) != first.get(key):
                raise ValueError(
                    f"{source} has {key}={result.get(key)!r} but {sources[0]} has {first.get(key)!r}; only runs with "
                    "the same task and schedule share a table."
                )
        for row in result["rows"]:
            if row["method"] in rows:
                raise ValueError(f"method {row['method']!r} appears in more than one result (again in {source}).")
            rows[row["method"]] = row
        if result.get("command"):
            commands.append(result["command"])
    merged = {key: first.get(key) for key in _SHARED_SETTINGS}
    merged["rows"] = [rows[m] for m in ACCURACY_METHODS if m in rows]
    if commands:
        merged["merged_commands"] = commands
    return merged


def accuracy_markdown(result: dict) -> str:
    """The rows of :func:`accuracy_table` as a markdown table (metrics of the best and the final checkpoint)."""
    lines = [
        f"Test split of the sample task, images and networks at {result.get('img_size') or 512} px, "
        f"{result['num_epochs']} epoch{'s' if result['num_epochs'] != 1 else ''} per method, same schedule and seed; "
        "best = the checkpoint of the best validation AUC.\n",
        "| method | learnable | learnable % | test AUC (best) | test AUC (final) | accuracy (best) | accuracy (final) "
        "| macro F1 (final) | kappa (final) | wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for row in result["rows"]:
        if "reason" in row:
            lines.append(f"| {row['label']} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
            notes.append(f"{row['label']}: n/a. {row['reason']}")
            continue
        best, final = row["best"], row["final"]
        seconds = f"{row['seconds']:.0f}"
        if "resumed_after_epoch" in row:
            after = row["resumed_after_epoch"]
            seconds += f" (epochs {after + 1}-{result['num_epochs']})" if after < result["num_epochs"] else " (none left)"
            notes.append(f"{row['label']}: resumed after epoch {row['resumed_after_epoch']} from its resume "
                         "checkpoint; the wall time counts only the epochs trained after it.")
        lines.append(
            f"| {row['label']} | {row['learnable']:,} | {row['learnable_percent']:.2f} | {best['test_auc']:.3f} | "
            f"{final['test_auc']:.3f} | {best['test_accuracy']:.3f} | {final['test_accuracy']:.3f} | "
            f"{final['test_f1']:.3f} | {final['test_kappa']:.3f} | {seconds} |"
        )
    lines.append("")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_accuracy(result: dict, output_dir: str | os.PathLike, command: str = "") -> str:
    """Write ``accuracy.json`` and ``accuracy.md`` (with ``command``) to ``output_dir``; returns the markdown."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    date = result.get("date") or time.strftime("%Y-%m-%d", time.gmtime())
    (output / "accuracy.json").write_text(json.dumps({"command": command, **result, "date": date}, indent=2))
    header = "# Accuracy on the bundle's sample task\n\n" + (f"Command: `{command}`. " if command else "")
    header += f"Date: {date}.\n\n"
    if result.get("merged_commands"):
        header += "Merged from the runs of:\n\n" + "".join(f"- `{c}`\n" for c in result["merged_commands"]) + "\n"
    text = header + accuracy_markdown(result)
    (output / "accuracy.md").write_text(text)
    return text
