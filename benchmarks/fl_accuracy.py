"""Federated FPT against central and single-site training on the sample task, split over sites by grade.

The sample data's ``train`` and ``val`` images are split over ``num_sites`` sites, not identically distributed:
site ``k`` holds 60% of grade ``k``'s images and 20% of each other grade's (3 sites, 3 grades). Three runs of FPT
on the demo network, each for the same number of epochs and with the demo's schedule, are tested on the common
``test`` split through the bundle's ``evaluate.json``:

- federated: ``fpt_monai.fl`` in NVIDIA FLARE's simulator, one local epoch per round, as many rounds as epochs;
  the best (FLARE's, by the sites' mean validation AUC) and the final global model;
- central: all the sites' data in one bundle run (what pooling the data would give);
- one site alone: site 1's data only (what a hospital gets without the federation).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

__all__ = ["fl_accuracy", "fl_accuracy_markdown", "split_over_sites"]

logger = logging.getLogger(__name__)

#: The demo's schedule (configs/demo.json), for every run.
SCHEDULE = {"batch_size": 16, "learning_rate": 0.001}


def _site_of(index: int, grade: int, num_sites: int) -> int:
    """The site of the ``index``-th image of ``grade``: 3 of 5 to site ``grade``, 1 of 5 to each of the next two."""
    pattern = [grade, grade, grade, grade + 1, grade + 2]
    return pattern[index % len(pattern)] % num_sites


def split_over_sites(dataset_dir: str | os.PathLike, output_dir: str | os.PathLike, num_sites: int = 3) -> list[dict]:
    """Split ``train`` and ``val`` of ``dataset_dir`` over ``num_sites`` dataset folders, skewed by grade; every
    site gets the whole ``test`` split (the common test set). Files are hard links (copies across file systems).

    Returns one ``{"dataset_dir", "counts": {split: {class: n}}}`` per site.
    """
    from fpt_monai.data import dataset_classes

    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    classes = dataset_classes(str(dataset_dir))
    sites = [{"dataset_dir": str(output_dir / f"site-{k + 1}"), "counts": {}} for k in range(num_sites)]
    for split in ("train", "val", "test"):
        for grade, name in enumerate(classes):
            files = sorted(p for p in (dataset_dir / split / name).iterdir() if p.is_file())
            for index, source in enumerate(files):
                targets = range(num_sites) if split == "test" else [_site_of(index, grade, num_sites)]
                for k in targets:
                    destination = output_dir / f"site-{k + 1}" / split / name / source.name
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    if not destination.exists():
                        try:
                            os.link(source, destination)
                        except OSError:
                            shutil.copy2(source, destination)
                    counts = sites[k]["counts"].setdefault(split, {})
                    counts[name] = counts.get(name, 0) + 1
    return sites


def _evaluate(bundle_root: Path, dataset_dir: str, overrides: dict) -> dict:
    """The bundle's test-set evaluation of ``bundle_root/models`` (``{"best": {...}, "final": {...}}``)."""
    from monai.bundle import ConfigWorkflow

    from fpt_monai.bundle import config_files

    workflow = ConfigWorkflow(
        config_file=config_files("train", "evaluate"),
        meta_file=config_files("metadata")[0],
        logging_file=False,
        workflow_type="train",
        bundle_root=str(bundle_root),
        dataset_dir=dataset_dir,
        **overrides,
    )
    workflow.initialize()
    result = workflow.run()[0]
    workflow.finalize()
    return result


def _site_checkpoint(site_models: Path, global_file: Path, output: Path) -> None:
    """A site's saved network (class names, backbone digest) with the global model's learnable parameters."""
    from fpt_monai.engine import load_checkpoint

    state = load_checkpoint(site_models / "model_final.pt")
    state = state.get("model", state)
    learnable = torch.load(global_file, map_location="cpu", weights_only=True)["model"]
    unknown = sorted(set(learnable) - set(state))
    if unknown:
        raise RuntimeError(f"{global_file} holds parameters the site's network lacks: {unknown[:5]}")
    state.update(learnable)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)


def fl_accuracy(
    work_dir: str | os.PathLike = "fpt_fl_accuracy",
    num_epochs: int = 20,
    img_size: int = 512,
    num_sites: int = 3,
    sample: dict | None = None,
    **overrides,
) -> dict:
    """Federated, central and single-site FPT on the sample task split over ``num_sites`` sites (see the module).

    Args:
        work_dir: the sample data, the sites' folders and one bundle root per run.
        num_epochs: epochs of every run (federated: rounds of one local epoch).
        img_size: size of the sample images and of the network's input (256: about 4x cheaper than 512).
        num_sites: sites of the split (at least as many as there are grades, so that each has one to lean to).
        sample: :class:`fpt_monai.data.SampleFundusSpec` fields of the sample data (default: the full 240/90/90).
        overrides: bundle config overrides of every run (``num_workers=0``, ``pretrained=...``, ...).
    """
    from fpt_monai.bundle import run_demo
    from fpt_monai.data import make_sample_dataset
    from fpt_monai.fl.job import build_job

    work_dir = Path(work_dir).absolute()
    data = make_sample_dataset(work_dir / "data" / f"fpt_sample_{img_size}", image_size=img_size, **(sample or {}))
    sites = split_over_sites(data, work_dir / "sites", num_sites)
    settings = {**SCHEDULE, "network_def#img_size": int(img_size), **overrides}
    rows = []

    start = time.perf_counter()
    job = build_job(
        [work_dir / "federated" / f"site-{k + 1}" for k in range(num_sites)],
        num_rounds=int(num_epochs),
        work_dir=work_dir / "federated" / "job",
        overrides=settings,
        dataset_dirs=[s["dataset_dir"] for s in sites],
    )
    run_dir = job.simulate(work_dir / "federated" / "simulator")
    app = run_dir / "server" / "simulate_job" / "app_server"
    evaluation = work_dir / "federated" / "evaluation"
    site_models = work_dir / "federated" / "site-1" / "models"
    _site_checkpoint(site_models, app / "best_FL_global_model.pt", evaluation / "models" / "model.pt")
    _site_checkpoint(site_models, app / "FL_global_model.pt", evaluation / "models" / "model_final.pt")
    metrics = _evaluate(evaluation, str(data), settings)
    rows.append({"run": f"federated, {num_sites} sites", "seconds": time.perf_counter() - start, **metrics})

    for run, dataset in (("central", str(data)), ("site 1 alone", sites[0]["dataset_dir"])):
        start = time.perf_counter()
        root = work_dir / run.replace(" ", "_")
        # tested on the common test split: site 1's folder holds all of it
        metrics = run_demo(root, num_epochs=int(num_epochs), dataset_dir=dataset, **settings)
        rows.append({"run": run, "seconds": time.perf_counter() - start, **metrics})
        logger.info("fl_accuracy: %s: %s", run, metrics)
    return {
        "num_epochs": int(num_epochs),
        "img_size": int(img_size),
        "dataset_dir": str(data),
        "sites": sites,
        "overrides": settings,
        "rows": rows,
    }


def fl_accuracy_markdown(result: dict) -> str:
    """The test metrics of :func:`fl_accuracy` (best and final checkpoint of each run) and the sites' split."""
    lines = ["| run | test AUC (best) | test AUC (final) | accuracy (final) | kappa (final) | minutes |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        best, final = row["best"], row["final"]
        lines.append(f"| {row['run']} | {best['test_auc']:.3f} | {final['test_auc']:.3f} "
                     f"| {final['test_accuracy']:.3f} | {final['test_kappa']:.3f} | {row['seconds'] / 60:.1f} |")
    lines += ["", "| site | train images per grade | val images per grade |", "|---|---|---|"]
    for k, site in enumerate(result["sites"]):
        train = ", ".join(str(n) for n in site["counts"]["train"].values())
        val = ", ".join(str(n) for n in site["counts"]["val"].values())
        lines.append(f"| site-{k + 1} | {train} | {val} |")
    return "\n".join(lines)
