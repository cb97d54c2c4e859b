"""Command line of the benchmarks: ``python -m benchmarks COMMAND ...`` from the repository root.

Built with `fire` like ``fpt-monai``: every public method of :class:`Commands` is a command, its arguments are
flags; ``python -m benchmarks COMMAND --help`` documents each. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fpt_monai.cli import run_commands

__all__ = ["Commands", "main"]


def _command_line() -> str:
    return "python -m benchmarks " + " ".join(sys.argv[1:])


class Commands:
    """Benchmarks of FPT and FPT+ against full fine-tuning, linear probing, VPT-deep, LoRA and adapters."""

    def bench(
        self,
        output_dir: str = "benchmarks/results",
        speed: bool = True,
        accuracy: bool = False,
        accuracy_epochs: int = 20,
        accuracy_dir: str = "fpt_accuracy",
        accuracy_img_size: int = 512,
        batch_size: int = 16,
        img_size: int = 512,
        device: str | None = None,
    ) -> None:
        """All benchmarks side by side: parameters, training memory, cache bytes, speed, (accuracy), targets.

        Writes ``results.json``, ``results.md`` and ``memory.png`` to ``output_dir`` and prints the markdown.
        About 12.5 minutes on a 2-core CPU (the speed section runs ViT-B/16 training steps at 512);
        ``--speed False`` leaves it out (about 4 minutes). ``--accuracy True`` also trains and tests every method
        on the bundle's sample task, ``--accuracy_epochs`` epochs each, images and networks at
        ``--accuracy_img_size`` (runs under ``--accuracy_dir``; the ``accuracy`` command runs that section alone).
        The whole table within 30 minutes on 2 CPU cores, at a smaller size for accuracy:
        ``--accuracy True --accuracy_epochs 3 --accuracy_img_size 256``. ``--device`` sets where the speed section
        runs (default: the GPU when there is one, else the CPU).
        """
        from benchmarks.report import run_benchmarks, write_markdown

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        results = run_benchmarks(
            output_dir, batch_size=int(batch_size), img_size=int(img_size), speed=speed, accuracy=accuracy,
            accuracy_epochs=int(accuracy_epochs), accuracy_dir=accuracy_dir, accuracy_img_size=int(accuracy_img_size),
            command=_command_line(), device=device,
        )
        print(write_markdown(results, f"{output_dir}/results.md"))

    def memory(
        self,
        method: str = "fpt",
        batch_size: int = 16,
        img_size: int = 512,
        attention: str = "eager",
        kv_dtype: str = "float16",
        backbone_resident: bool = False,
        setup: str = "preloaded",
        fake: bool = True,
    ) -> None:
        """Peak training memory of one method on images as one JSON object, with ``ratio_to_full`` (under a minute).

        Full fine-tuning is measured in the same run, with the same batch, size and attention. The accounting and
        its categories are documented in :mod:`benchmarks.memory`.

        Args:
            method: full, linear, vpt, lora, adapter, fpt, fpt_plus.
            batch_size: images per step.
            img_size: backbone input size.
            attention: eager or fused.
            kv_dtype: FPT cache dtype (float16 as the bundle stores it, or float32).
            backbone_resident: FPT: keep the frozen backbone's weights in memory too.
            setup: FPT: preloaded (train from the cache) or online (backbone runs every step; minutes on CPU).
            fake: fake tensors (exact bytes, no compute); False runs the step for real (on the GPU if there is one).
        """
        from benchmarks.memory import measure_training_memory

        kwargs = {"batch_size": int(batch_size), "img_size": int(img_size), "attention": attention, "fake": fake}
        device = "cuda" if torch.cuda.is_available() and not fake else "cpu"
        result = measure_training_memory(
            method, kv_dtype=kv_dtype, backbone_resident=backbone_resident, setup=setup, device=device, **kwargs
        )
        full = result if method == "full" else measure_training_memory("full", device=device, **kwargs)
        result["full_total_bytes"] = full["total_bytes"]
        result["ratio_to_full"] = result["total_bytes"] / full["total_bytes"]
        print(json.dumps(result, indent=2))

    def memory3d(self, img_size: int = 128, side_img_size: int = 64, batch_size: int = 4, variant: str = "fpt",
                 attention: str = "fused", kv_dtype: str = "float16", fake: bool = True, table: bool = False,
                 **vit) -> None:
        """Training memory of FPT on volumes vs full fine-tuning of the same MONAI 3D ViT-B/16 (JSON; minutes on a CPU).

        The same accounting as ``memory`` (:mod:`benchmarks.memory`). ``--variant fpt_plus`` extracts blocks 6-11
        unless ``--blocks`` is given; other MONAI ViT settings pass through (``--hidden_size``, ``--num_layers``,
        ``--patch_size``, ...). ``--table`` prints a Markdown table after the JSON.
        """
        from benchmarks.memory import markdown_table_3d, measure_3d_memory

        if variant == "fpt_plus" and "blocks" not in vit:
            vit["blocks"] = list(range(int(vit.get("num_layers", 12)) // 2, int(vit.get("num_layers", 12))))
        result = measure_3d_memory(img_size=int(img_size), side_img_size=int(side_img_size), batch_size=int(batch_size),
                                   variant=variant, attention=attention, kv_dtype=kv_dtype, fake=fake, **vit)
        print(json.dumps(result, indent=2))
        if table:
            print(markdown_table_3d(result))

    def speed(self, sections: str | Sequence[str] = ("training", "preload", "latency"),
              methods: str | Sequence[str] = ("full", "fpt"), batch_size: int = 4, img_size: int = 512, repeats: int = 5,
              device: str | None = None) -> None:
        """The speed section alone, or parts of it, with the ratios its targets bound (JSON; minutes on a CPU).

        ``training``: images/s of a training step of ``methods`` (FPT from the float16 cache) and FPT's multiple of
        full fine-tuning; ``preload``: K/V extraction against the fastest bare-backbone arm; ``latency``: one-image
        inference of the FPT network against the fastest bare backbone. The protocol is in
        :mod:`benchmarks.speed`.

        Args:
            sections: comma-separated or a list, out of training, preload, latency.
            methods: the training section's methods (full, linear, vpt, lora, adapter, fpt, fpt_plus).
            batch_size: images per training step and per preload batch.
            img_size: the backbone's input size.
            repeats: timed samples per arm (the median is reported).
            device: where it runs (default: the GPU when there is one, else the CPU).
        """
        from benchmarks import speed as speed_bench

        sections = [s for s in sections.split(",") if s] if isinstance(sections, str) else list(sections)
        methods = [m for m in methods.split(",") if m] if isinstance(methods, str) else list(methods)
        unknown = set(sections) - {"training", "preload", "latency"}
        if unknown or not sections:
            raise ValueError(f"sections must be a selection of training, preload, latency; got {sections}.")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        result: dict = {"command": _command_line(), "device": device}
        if "training" in sections:
            training = speed_bench.training_throughput(methods, batch_size=int(batch_size), img_size=int(img_size),
                                                       repeats=int(repeats), device=device)
            result["training_images_per_s"] = training
            if "fpt" in training and "full" in training:
                result["fpt_training_speedup"] = training["fpt"] / training["full"]
        if "preload" in sections:
            preload = speed_bench.preload_throughput(batch_size=int(batch_size), img_size=int(img_size),
                                                     repeats=int(repeats), device=device)
            result["preload_images_per_s"] = preload
            fastest = max(v for k, v in preload.items() if k.startswith("bare"))
            result["preload_ratio"] = preload["kv_extraction"] / fastest
        if "latency" in sections:
            latency = speed_bench.inference_latency(img_size=int(img_size), repeats=int(repeats), device=device)
            result["inference_latency_s"] = latency
            fastest = min(v for k, v in latency.items() if k.startswith("bare"))
            result["latency_ratio"] = latency["fpt_network"] / fastest
        print(json.dumps(result, indent=2))

    def step(self, presets: str | Sequence[str] = ("fpt", "fpt_plus"), yardstick: str | None = None,
             repeats: int = 9, batch_size: int = 16, kv_dtype: str = "float16", table: bool = False) -> None:
        """The FPT/FPT+ training step with ``recompute`` on and off, against a yardstick (JSON; minutes on a CPU).

        The protocol is in :mod:`benchmarks.step`.

        Args:
            presets: comma-separated or a list, out of fpt, fpt_plus.
            yardstick: path of a plain FPT implementation (a file defining ``PlainFPT``) timed alongside.
            repeats: timed samples per arm (the median is reported).
            batch_size: images per step.
            kv_dtype: the cache's storage dtype the project's arms read.
            table: print a Markdown table after the JSON.
        """
        from benchmarks.step import step_table, training_step_comparison

        presets = tuple(p for p in presets.split(",") if p) if isinstance(presets, str) else tuple(presets)
        rows = training_step_comparison(presets, batch_size=int(batch_size), kv_dtype=kv_dtype,
                                        repeats=int(repeats), yardstick=yardstick)
        print(json.dumps({"command": _command_line(), "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        if table:
            print(step_table(rows))

    def gpu_step(self, presets: str | Sequence[str] = ("fpt", "fpt_plus"), batch_size: int = 32,
                 device: str | None = None, amp: bool | None = None, repeats: int = 9, table: bool = False) -> None:
        """The training step on a GPU, reference path against the CPU kernels: images/s and peak CUDA memory (JSON).

        At the papers' setting (ViT-B/16 keys/values at 512, batch 32) under MONAI's mixed precision, as the bundle
        trains on CUDA. The protocol is in :mod:`benchmarks.gpu_step`.

        Args:
            presets: comma-separated or a list of presets.
            batch_size: images per step.
            device: where to run (default: the GPU when there is one, else the CPU).
            amp: float16 autocast with a gradient scaler (default: on CUDA).
            repeats: timed samples per arm (the median is reported).
            table: print a Markdown table after the JSON.
        """
        from benchmarks.gpu_step import gpu_step_comparison, gpu_step_table

        presets = tuple(p for p in presets.split(",") if p) if isinstance(presets, str) else tuple(presets)
        rows = gpu_step_comparison(presets, int(batch_size), device, amp, int(repeats))
        print(json.dumps({"command": _command_line(), "rows": rows}, indent=2))
        if table:
            print(gpu_step_table(rows))

    def profile_extraction(self, preset: str = "fpt", img_size: int = 512, calls: int = 3, top: int = 30) -> None:
        """Per-operator CPU time of one image: the K/V extraction against bare ``forward_features`` (a table; a minute).

        From PyTorch's profiler (:func:`benchmarks.speed.extraction_profile`). On glibc, compare with
        ``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736`` in the environment: the page faults
        of freshly mapped memory show up as GELU and copy time.
        """
        from benchmarks.speed import extraction_profile

        rows = extraction_profile(preset, img_size=int(img_size), calls=int(calls), top=int(top))
        print(f"{'operator':<55} {'extraction ms':>13} {'calls':>6} {'bare ms':>9} {'calls':>6}")
        for row in rows:
            calls_a = "" if row["kv_extraction_calls"] is None else row["kv_extraction_calls"]
            calls_b = "" if row["bare_backbone_calls"] is None else row["bare_backbone_calls"]
            print(f"{row['op'][:55]:<55} {row['kv_extraction_ms']:13.1f} {calls_a:>6} "
                  f"{row['bare_backbone_ms']:9.1f} {calls_b:>6}")

    def epoch(
        self,
        presets: str | Sequence[str] = ("fpt", "fpt_plus"),
        work_dir: str = "fpt_epoch",
        num_train: int = 256,
        image_size: int = 512,
        repeats: int = 3,
        fill: str = "random",
        table: bool = False,
        **overrides,
    ) -> None:
        """A bundle training epoch against the bare training step, per preset (JSON; minutes on a CPU).

        Runs the bundle's ``train.json`` (its dataloader, workers, transforms, trainer and handlers) on
        ``num_train`` sample images, alternating with the bare step of the same network on in-memory tensors, and
        prints images/s of both and ``epoch_to_bare``. The K/V cache (ViT-B/16 shapes for ``fpt``/``fpt_plus``,
        random weights) is filled before the timed run, with random values (``--fill random``) or by the
        frozen backbone (``--fill backbone``), and reused by later runs in ``work_dir``. Other options are bundle
        overrides, e.g. ``--num_workers 2`` or ``--batch_size 8``. ``--table`` prints a Markdown table after the
        JSON. The protocol is in :mod:`benchmarks.epoch`.

        Args:
            presets: comma-separated or a list of bundle presets.
            work_dir: sample data, cache and the runs' bundle roots.
            num_train: training images of the sample dataset.
            image_size: size of the sample images.
            repeats: timed epochs (and bare-step rounds) after one warm-up epoch; medians are reported.
            fill: how the cache is filled: random or backbone.
            table: also print a Markdown table.
        """
        from benchmarks.epoch import epoch_markdown, run_epoch_benchmark

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        presets = [p for p in presets.split(",") if p] if isinstance(presets, str) else list(presets)
        result = run_epoch_benchmark(presets, work_dir=work_dir, num_train=int(num_train), image_size=int(image_size),
                                     repeats=int(repeats), fill=fill, command=_command_line(), **overrides)
        print(json.dumps(result, indent=2))
        if table:
            print(epoch_markdown(result))

    def onnx(self, preset: str = "fpt_demo", num_classes: int = 3, batch_sizes: str | Sequence[int] = (1, 16),
             repeats: int = 5, pretrained: bool | str = True, table: bool = False) -> None:
        """Inference images/s of ONNX Runtime against eager PyTorch, same network and inputs, one process (JSON).

        The network is exported as the bundle's ``monai.bundle onnx_export`` command does (dynamic batch); both
        arms run in turn at every batch size (median of ``repeats``), the forward pass only. The default preset is
        the bundle's demo network (its weights build offline on first use); the ViT-B/16 presets need their
        weights (``pretrained``). ``--table`` prints a Markdown table after the JSON. See :mod:`benchmarks.onnx`.

        Args:
            preset: the network preset.
            num_classes: classes of its head.
            batch_sizes: comma-separated or a list of batch sizes.
            repeats: timed rounds per arm; medians are reported.
            pretrained: the backbone's weights (``True``, a file, or ``False``: random weights, the same speed).
            table: also print a Markdown table.
        """
        from benchmarks.onnx import onnx_markdown, run_onnx_benchmark

        sizes = [int(b) for b in batch_sizes.split(",")] if isinstance(batch_sizes, str) else list(batch_sizes)
        result = run_onnx_benchmark(preset, int(num_classes), sizes, int(repeats), pretrained, command=_command_line())
        print(json.dumps(result, indent=2))
        if table:
            print(onnx_markdown(result))

    def accuracy(
        self,
        work_dir: str = "fpt_accuracy",
        output_dir: str = "benchmarks/results",
        num_epochs: int = 20,
        methods: str | Sequence[str] | None = None,
        **overrides,
    ) -> None:
        """Accuracy of every method on the bundle's sample task, same schedule (the accuracy section of ``bench``).

        Full fine-tuning, linear probing, LoRA, an AdaptFormer-style adapter, FPT and FPT+, all on the demo network
        (ImageNet EfficientNet-Lite0), trained and tested through the bundle with the same data, seed and
        schedule (VPT-deep: an n/a row, it needs transformer tokens). Runs go to ``work_dir/<method>``; writes
        ``accuracy.json`` and ``accuracy.md`` to ``output_dir`` and prints the markdown. ``--img_size 256`` renders
        the sample task and runs every network at 256 px (about 4x cheaper per epoch), ``--dataset_dir`` uses other
        data; other options are bundle overrides for every run (``--batch_size 8``). ``--resume True`` continues each
        method from its newest resume checkpoint in ``work_dir/<method>/models`` (after a crash or a stop; the row
        says after which epoch, and its wall time counts only the epochs run then). See
        :mod:`benchmarks.accuracy`.

        Args:
            work_dir: folder of the sample data and of the runs.
            output_dir: where ``accuracy.json`` and ``accuracy.md`` go.
            num_epochs: epochs of every method (20 in the demo schedule).
            methods: comma-separated or a list, out of full, linear, vpt, lora, adapter, fpt, fpt_plus (default: all).
        """
        from benchmarks.accuracy import ACCURACY_METHODS, accuracy_table, write_accuracy

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        methods = ACCURACY_METHODS if methods is None else methods
        methods = [m for m in methods.split(",") if m] if isinstance(methods, str) else list(methods)
        result = accuracy_table(work_dir, methods=methods, num_epochs=int(num_epochs), **overrides)
        print(write_accuracy(result, output_dir, command=_command_line()))

    def accuracy_merge(self, *files: str, output_dir: str = "benchmarks/results") -> None:
        """One accuracy table from the ``accuracy.json`` files of separate ``accuracy`` runs.

        Run the methods one at a time (``--methods linear``, ... with the same ``--work_dir``, epochs and sizes), then
        merge: the runs must share the task and schedule, and each method may appear once. Writes ``accuracy.json``
        and ``accuracy.md`` to ``output_dir`` and prints the markdown.

        Args:
            files: ``accuracy.json`` files of the runs.
            output_dir: where the merged ``accuracy.json`` and ``accuracy.md`` go.
        """
        from benchmarks.accuracy import merge_accuracy, write_accuracy

        if not files:
            raise ValueError("give the accuracy.json files to merge, e.g. accuracy_merge a/accuracy.json b/accuracy.json")
        results = []
        for file in files:
            try:
                results.append(json.loads(Path(file).read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read the accuracy results {file}: {err}") from err
        merged = merge_accuracy(results, sources=list(files))
        print(write_accuracy(merged, output_dir, command=_command_line()))

    def cache_dtype(
        self, train_size: int = 256, test_size: int = 256, epochs: int = 8, seeds: int = 5,
        pretrained_features: bool = True,
    ) -> None:
        """What float16/bfloat16/int8 storage of the K/V cache does to accuracy, and where int8 scales could sit
        (JSON; a few minutes on a CPU).

        See :mod:`benchmarks.cache_dtype` for the protocol. ``--pretrained_features False`` skips the int8 error
        on the pretrained demo backbone's features.
        """
        from benchmarks.cache_dtype import run

        print(json.dumps(run(train_size, test_size, epochs, seeds, pretrained_features), indent=2))


    def file_digest(
        self, num_files: int = 10_000, work_dir: str = "/tmp/fpt_file_digest", image_format: str = "png",
        threads: int = 8,
    ) -> None:
        """What hashing the image files of a data set costs (JSON): ``num_files`` distinct 512x512 RGB images
        (``--image_format png`` or ``jpeg``) written to ``work_dir`` and hashed from the page cache by one thread,
        by ``threads`` threads, and again with their digests known (the per-epoch cost). See
        :mod:`benchmarks.file_digest`."""
        from benchmarks.file_digest import run

        print(json.dumps(run(int(num_files), work_dir, image_format, int(threads)), indent=2))


    def fl_bytes(self, table: bool = False) -> None:
        """Bytes a site sends and receives per federated round for FPT, FPT+, LoRA and full fine-tuning, at
        ViT-B/16 and on the demo network (JSON; seconds, nothing trained or downloaded: meta device). ``--table``
        prints a Markdown table after the JSON. See :mod:`benchmarks.fl_bytes`."""
        from benchmarks.fl_bytes import fl_bytes_markdown, run

        result = run(command=_command_line())
        print(json.dumps(result, indent=2))
        if table:
            print(fl_bytes_markdown(result))


    def fl_accuracy(self, work_dir: str = "fpt_fl_accuracy", output_dir: str = "benchmarks/results",
                    num_epochs: int = 20, img_size: int = 512, num_sites: int = 3, **overrides) -> None:
        """Test AUC of federated FPT (NVIDIA FLARE's simulator), central FPT and FPT on one site alone, after the
        same number of epochs, on the sample task split over ``num_sites`` sites with grades skewed per site.
        Writes ``fl_accuracy.json`` and ``fl_accuracy.md`` to ``output_dir`` and prints the table. ``--img_size
        256`` makes it about 4x cheaper. See :mod:`benchmarks.fl_accuracy`."""
        from benchmarks.fl_accuracy import fl_accuracy, fl_accuracy_markdown
        from fpt_monai.utils import atomic_write

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        result = fl_accuracy(work_dir, int(num_epochs), int(img_size), int(num_sites), **overrides)
        result["command"] = _command_line()
        table = fl_accuracy_markdown(result)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with atomic_write(Path(output_dir) / "fl_accuracy.json", "w", what="results") as f:
            json.dump(result, f, indent=2)
        with atomic_write(Path(output_dir) / "fl_accuracy.md", "w", what="results") as f:
            f.write(f"`{result['command']}`\n\n{table}\n")
        print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks`` entry point."""
    run_commands(Commands, "benchmarks", argv)
