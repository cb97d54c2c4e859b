"""A bundle training epoch against the bare training step: how much of the step's speed the data path keeps.

Per preset, in one process:

- ``epoch``: the bundle's own training (``configs/train.json`` run by MONAI's ``ConfigWorkflow``, its
  ``initialize`` and ``run``): the real dataloader with the bundle's batch size, workers and transforms (cache
  reads, side views and their augmentation, collation), the ``SupervisedTrainer`` iteration and its handlers.
  An epoch is timed from ``EPOCH_STARTED`` to ``EPOCH_COMPLETED``; the time spent inside the iterations
  (``ITERATION_STARTED`` to ``ITERATION_COMPLETED``: the step and the per-iteration handlers) is recorded too, the
  rest of the epoch being the wait for data (worker start-up included).
- ``bare step``: the same network, loss, optimizer and gradient clipping on one batch of in-memory tensors of the
  epoch's shapes and dtypes (side views, keys/values in the cache's dtype, labels), as many steps as an epoch has.

The arms alternate: epoch 1 is a warm-up, then each further epoch is followed by one bare-step round (run from
an ``EPOCH_COMPLETED`` handler, when the epoch's workers are idle); the medians are reported with their ratio
``epoch_to_bare``. Validation is switched off (``val_interval`` beyond the last epoch): this measures training.

CPU time is recorded next to the wall time, per image: the training process's (all its threads) and, on Linux,
the data-loading workers' (``/proc``), for the epochs and the bare step. On a machine shared with other work the
wall times move with the load; the CPU times much less, and their difference between the epoch and the bare step
is what the data path costs.

Data: the sample dataset (``fpt_monai.data.make_sample_dataset``) with ``num_train`` training images. Networks have
random weights (``pretrained=False``): speed does not depend on their values. The K/V cache is filled before the
timed run and is reused by later runs with the same settings; ``fill="random"`` writes entries of the right
shapes and dtype with random values through the dataset's own preload (seconds; the frozen backbone's values do
not change the timing), ``fill="backbone"`` runs the frozen backbone as training would (ViT-B/16 at 512: about 1.5 s
per image on a 2-core CPU).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from benchmarks.common import check_run_arguments
from fpt_monai.bundle import config_files
from fpt_monai.data import make_sample_dataset
from fpt_monai.weights import random_weights_expected

__all__ = ["EPOCH_PRESETS", "FILLS", "epoch_markdown", "epoch_throughput", "run_epoch_benchmark"]

logger = logging.getLogger(__name__)

#: The presets the command times by default: the papers' ViT-B/16 settings.
EPOCH_PRESETS = ("fpt", "fpt_plus")
#: How the K/V cache is filled before the timed run.
FILLS = ("random", "backbone")


def _workers_cpu_seconds() -> float:
    """CPU seconds of this process's children, finished (``RUSAGE_CHILDREN``) and running (Linux ``/proc``)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for tasks in Path("/proc/self/task").glob("*/children"):
        for pid in tasks.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # finished meanwhile
                continue
            seconds += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return seconds


def _fill_cache(dataset, fill: str, batch_size: int) -> dict:
    """Fill ``dataset``'s missing entries; ``random``: random keys/values of the backbone's shape and the cache's
    dtype instead of the backbone's output (everything else, fields and checksums, as the preload writes it)."""
    transform = dataset.kv_transform
    if fill == "backbone":
        return dataset.preload(batch_size=batch_size)
    shape = transform.backbone.shape.kv_shape
    generator = torch.Generator().manual_seed(0)
    transform.compute = lambda images: torch.randn(len(images), *shape, generator=generator).to(transform.dtype)
    try:
        return dataset.preload(batch_size=batch_size)
    finally:
        del transform.compute  # the class's method again


def epoch_throughput(
    preset: str,
    dataset_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    repeats: int = 3,
    fill: str = "random",
    **overrides,
) -> dict:
    """Images/s of bundle training epochs and of the bare step of the same network, alternating (see the module).

    Args:
        preset: the bundle's ``preset`` (``fpt``, ``fpt_plus``, ``fpt_demo``, ...).
        dataset_dir: the dataset (``train/`` is trained on; ``val/`` must exist for the config, it is not read).
        work_dir: bundle root of the run (checkpoints, logs); the cache goes to ``work_dir/../cache_<fill>``.
        repeats: timed epochs (and bare rounds) after the warm-up epoch.
        fill: ``random`` or ``backbone`` (see the module).
        overrides: bundle config overrides, e.g. ``batch_size=8``, ``num_workers=0``.

    Returns:
        ``{"preset", "batch_size", "num_workers", "images", "img_size", "side_img_size", "kv_shape", "kv_dtype",
        "entry_bytes", "preload", "epoch_images_per_s", "bare_step_images_per_s", "epoch_to_bare",
        "epoch_seconds", "iteration_seconds", "bare_seconds", "data_wait_share", "cpu_ms_per_image"}``; the
        ``*_seconds`` lists hold one value per timed round, ``data_wait_share`` is the median share of an epoch
        spent outside its iterations, ``cpu_ms_per_image`` the median CPU milliseconds per image of the epoch's
        training process and workers and of the bare step.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}.")
    own_keys = ("preset", "dataset_dir", "bundle_root", "num_epochs")
    check_run_arguments("the epoch benchmark", overrides, own_keys, repeats=repeats)
    work_dir = Path(work_dir).absolute()
    settings = {
        "pretrained": False,
        "check_overrides": False,  # the overrides come from this function, not the command line
        "cache_dir": str(work_dir.parent / f"cache_{fill}"),
        "val_interval": 10**9,  # training only
        "preload_datasets": ["@train#dataset"],
        **overrides,
        "preset": preset,
        "dataset_dir": str(Path(dataset_dir).absolute()),
        "bundle_root": str(work_dir),
        "num_epochs": 1 + int(repeats),
    }
    workflow = ConfigWorkflow(config_file=config_files("train"), workflow_type="train", logging_file=False, **settings)
    with random_weights_expected():
        workflow.initialize()  # seeds (set_determinism): the random backbone, and so the cache, is the same every run
        parser = workflow.parser
        trainer = parser.get_parsed_content("train#trainer")
        dataset = parser.get_parsed_content("train#dataset")
    network, optimizer = parser.get_parsed_content("network"), parser.get_parsed_content("optimizer")
    loss_function, device = parser.get_parsed_content("loss"), parser.get_parsed_content("device")
    batch_size, clip = int(parser.get_parsed_content("batch_size")), float(parser.get_parsed_content("grad_clip_norm"))
    loader = parser.get_parsed_content("train#dataloader")

    logger.info("epoch benchmark: %s, filling the K/V cache (%s) ...", preset, fill)
    preload = _fill_cache(dataset, fill, batch_size)
    entry = dataset.entry_path(dataset.data[0])

    # the bare step: one batch of the epoch's shapes and dtypes, in memory on the training device
    first = dataset[0]
    generator = torch.Generator().manual_seed(0)
    side = torch.randn(batch_size, *first["image"].shape, generator=generator).to(device)
    kv = torch.randn(batch_size, *first["kv"].shape, generator=generator).to(device=device, dtype=first["kv"].dtype)
    labels = torch.randint(0, int(parser.get_parsed_content("num_classes")), (batch_size,), generator=generator)
    labels = labels.to(device)
    trainable = [p for p in network.parameters() if p.requires_grad]

    def bare_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_function(network(side, kv=kv), labels).backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()

    def synchronize() -> None:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    steps = len(loader)
    times: dict[str, list[float]] = {
        "epoch": [], "iteration": [], "bare": [], "epoch_cpu": [], "workers_cpu": [], "bare_cpu": []
    }
    clock = {"epoch": 0.0, "iteration": 0.0, "in_iterations": 0.0, "cpu": 0.0, "workers": 0.0}

    def epoch_started(engine) -> None:
        clock["in_iterations"] = 0.0
        clock["workers"] = _workers_cpu_seconds()
        clock["cpu"] = time.process_time()
        clock["epoch"] = time.perf_counter()

    def iteration_started(engine) -> None:
        clock["iteration"] = time.perf_counter()

    def iteration_completed(engine) -> None:
        synchronize()
        clock["in_iterations"] += time.perf_counter() - clock["iteration"]

    def epoch_completed(engine) -> None:
        synchronize()
        seconds = time.perf_counter() - clock["epoch"]
        cpu = time.process_time() - clock["cpu"]
        workers = _workers_cpu_seconds() - clock["workers"]
        if engine.state.epoch == 1:  # warm-up: first reads, allocations; the bare step warms up here too
            bare_step()
            bare_step()
            return
        times["epoch"].append(seconds)
        times["iteration"].append(clock["in_iterations"])
        times["epoch_cpu"].append(cpu)
        times["workers_cpu"].append(workers)
        network.train()
        synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            bare_step()
        synchronize()
        times["bare"].append(time.perf_counter() - start)
        times["bare_cpu"].append(time.process_time() - start_cpu)
        logger.info("epoch benchmark: %s round %d: epoch %.2f s (%.2f s in iterations), bare steps %.2f s", preset,
                    engine.state.epoch - 1, seconds, clock["in_iterations"], times["bare"][-1])

    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
    trainer.add_event_handler(Events.ITERATION_STARTED, iteration_started)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration_completed)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)
    logger.info("epoch benchmark: %s, %d epochs of %d images ...", preset, 1 + int(repeats), len(dataset))
    workflow.run()
    workflow.finalize()

    images = len(dataset)
    epoch = statistics.median(times["epoch"])
    bare = statistics.median(times["bare"])
    wait = statistics.median(1 - i / e for i, e in zip(times["iteration"], times["epoch"]))
    return {
        "preset": preset,
        "batch_size": batch_size,
        "num_workers": int(loader.num_workers),
        "images": images,
        "img_size": list(network.backbone.shape.img_size),
        "side_img_size": list(first["image"].shape[1:]),
        "kv_shape": list(first["kv"].shape),
        "kv_dtype": str(first["kv"].dtype).removeprefix("torch."),
        "entry_bytes": entry.stat().st_size,
        "preload": preload,
        "epoch_images_per_s": images / epoch,
        "bare_step_images_per_s": steps * batch_size / bare,
        "epoch_to_bare": (images / epoch) / (steps * batch_size / bare),
        "epoch_seconds": times["epoch"],
        "iteration_seconds": times["iteration"],
        "bare_seconds": times["bare"],
        "data_wait_share": wait,
        "cpu_ms_per_image": {
            "epoch_training_process": 1000 * statistics.median(times["epoch_cpu"]) / images,
            "epoch_workers": 1000 * statistics.median(times["workers_cpu"]) / images,
            "bare_step": 1000 * statistics.median(times["bare_cpu"]) / (steps * batch_size),
        },
    }


def run_epoch_benchmark(
    presets: Sequence[str] = EPOCH_PRESETS,
    work_dir: str | os.PathLike = "fpt_epoch",
    num_train: int = 256,
    image_size: int = 512,
    repeats: int = 3,
    fill: str = "random",
    command: str = "",
    **overrides,
) -> dict:
    """:func:`epoch_throughput` of every preset on one sample dataset (``work_dir/data``), with the machine and date.

    ``image_size``: the sample images' size (the networks keep their presets' input size unless overridden, e.g.
    ``network_def#img_size``).
    """
    work_dir = Path(work_dir).absolute()
    data = make_sample_dataset(work_dir / "data" / f"sample_{int(num_train)}_{int(image_size)}", num_train=int(num_train),
                               num_val=3, num_test=3, image_size=int(image_size), progress=False)
    result = {
        "command": command,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "num_train": int(num_train),
        "image_size": int(image_size),
        "fill": fill,
        "repeats": int(repeats),
        "overrides": overrides,
        "presets": {},
    }
    for preset in presets:
        result["presets"][preset] = epoch_throughput(preset, data, work_dir / preset, repeats=repeats, fill=fill,
                                                     **overrides)
    return result


def epoch_markdown(result: dict) -> str:
    """The presets of :func:`run_epoch_benchmark` as a markdown table."""
    lines = [
        f"Bundle training epoch against the bare step, {result['num_train']} sample images of {result['image_size']} "
        f"px; {result['machine']}; {result['date']}; median of {result['repeats']} alternating rounds.\n",
        "| preset | batch | workers | side view | K/V per image | epoch images/s | bare step images/s | epoch / bare "
        "| data wait | CPU ms/image: epoch (workers) / bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for preset, row in result["presets"].items():
        cpu = row["cpu_ms_per_image"]
        side = "x".join(str(s) for s in row["side_img_size"])
        lines.append(
            f"| {preset} | {row['batch_size']} | {row['num_workers']} | {side} | {row['entry_bytes'] / 1e6:.2f} MB | "
            f"{row['epoch_images_per_s']:.1f} | {row['bare_step_images_per_s']:.1f} | {row['epoch_to_bare']:.2f} | "
            f"{100 * row['data_wait_share']:.0f}% | {cpu['epoch_training_process'] + cpu['epoch_workers']:.1f} "
            f"({cpu['epoch_workers']:.1f}) / {cpu['bare_step']:.1f} |"
        )
    return "\n".join(lines) + "\n"
