"""Command line interface: ``fpt-monai COMMAND ...`` (or ``python -m fpt_monai COMMAND ...``).

Built with `fire`: every public method of :class:`Commands` is a command, its arguments are flags
(``fpt-monai params --preset fpt_plus --num_classes 5``). ``fpt-monai COMMAND --help`` documents each.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

import fire
import torch

from fpt_monai.networks import PRESETS, create_backbone, create_fpt
from fpt_monai.weights import random_weights_expected

__all__ = ["Commands", "main"]


class Commands:
    """Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical image classification."""

    def presets(self) -> None:
        """List the network presets as JSON: name -> backbone weights, sizes, variant, blocks."""
        table = {
            name: {
                "model_name": p.model_name,
                "img_size": p.img_size,
                "side_img_size": p.side_img_size,
                "variant": p.variant,
                "blocks": list(p.blocks) if p.blocks is not None else "all",
                "token_ratio": p.token_ratio,
                "description": p.description,
            }
            for name, p in PRESETS.items()
        }
        print(json.dumps(table, indent=2))

    def params(self, preset: str = "fpt", num_classes: int = 5) -> None:
        """Print the learnable and frozen parameter counts of a preset as one JSON object.

        Nothing is downloaded and no weight is allocated: the network is built on PyTorch's meta device.

        Args:
            preset: network preset (``fpt``, ``fpt_plus``, ``fpt_tiny``, ``fpt_plus_tiny``, ``fpt_3d``, ...).
            num_classes: number of classes of the task.
        """
        if preset not in PRESETS:
            raise fire.core.FireError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        # Counting needs the architecture only; the random-weights warning would be noise here.
        with random_weights_expected(), torch.device("meta"):
            net = create_fpt(preset, num_classes=int(num_classes), pretrained=False)
        counts = net.parameter_counts()
        total = counts["learnable"] + counts["frozen"]
        result = {
            "preset": preset,
            "backbone": PRESETS[preset].model_name,
            "num_classes": int(num_classes),
            "learnable": counts["learnable"],
            "frozen": counts["frozen"],
            "total": total,
            "learnable_ratio": round(counts["learnable"] / total, 6),
            "side": counts["side"],
            "fusion": counts["fusion"],
            "kv_shape_per_image": list(net.shape.kv_shape),
        }
        print(json.dumps(result, indent=2))

    def preload(
        self,
        dataset_dir: str,
        cache_dir: str,
        preset: str = "fpt",
        pretrained: bool | str = True,
        splits: str | Sequence[str] = ("train", "val", "test"),
        dtype: str = "float16",
        batch_size: int = 8,
        num_workers: int = 0,
        device: str = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """Fill the K/V cache of a dataset before training (resumable; what is cached stays cached).

        Prints one JSON object: per split the images computed and already cached, seconds, images/s, and
        the cache folder; plus the bytes of one entry.

        Under ``torchrun --nproc_per_node=N`` (or any launcher setting ``RANK``/``WORLD_SIZE``) every process
        fills its own shard of each split and prints its own report; ``--device cuda`` then means the process's
        GPU, ``cuda:LOCAL_RANK``. The processes never talk to each other: run it once more, in one process, to
        check that nothing is missing (it computes only what is).

        Args:
            dataset_dir: folder with ``train/ val/ test/`` of class sub-folders, or a JSON datalist file.
            cache_dir: root of the cache (entries go to a sub-folder named by the cache fingerprint).
            preset: network preset whose frozen backbone fills the cache.
            pretrained: ``True`` for the preset's hub weights, a local weights file, or ``False`` (random).
            splits: the splits to preload (comma-separated or a list).
            dtype: storage dtype: ``float16``, ``bfloat16`` or ``float32``.
            batch_size: images per backbone forward pass.
            num_workers: data-loading worker processes.
            device: device the backbone runs on.
            mean: per-channel normalisation mean (default: the backbone's pre-training mean).
            std: per-channel normalisation std (default: the backbone's pre-training std).
        """
        import os

        from fpt_monai.data import make_datalist, make_fpt_dataset
        from fpt_monai.engine.distributed import rank_and_world_size

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        splits = [s for s in splits.split(",") if s] if isinstance(splits, str) else list(splits)
        rank, world_size = rank_and_world_size()
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process of a node
        backbone = create_backbone(preset, pretrained=pretrained).to(device)
        mean = tuple(mean) if mean is not None else backbone.mean
        std = tuple(std) if std is not None else backbone.std
        result: dict = {"preset": preset, "dtype": dtype, "mean": mean, "std": std, "splits": {}}
        if world_size > 1:
            result.update(rank=rank, world_size=world_size)
        for split in splits:
            dataset = make_fpt_dataset(
                make_datalist(dataset_dir, split), backbone.shape.img_size, PRESETS[preset].side_img_size,
                mean, std, train=False, backbone=backbone, cache_dir=cache_dir, kv_dtype=dtype,
            )
            report = dataset.preload(batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size)
            entries = sorted(dataset.cache_dir.glob("*.safetensors"))
            result["splits"][split] = {**report, "cache_dir": str(dataset.cache_dir)}
            if entries:
                result["entry_bytes"] = entries[0].stat().st_size
        result["kv_bytes"] = math.prod(backbone.shape.kv_shape) * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        print(json.dumps(result, indent=2))

    def bench_cache_dtype(self, train_size: int = 256, test_size: int = 256, epochs: int = 8, seeds: int = 5) -> None:
        """Measure what float16/bfloat16 storage of the K/V cache does to accuracy (JSON; about a minute on CPU).

        See :mod:`fpt_monai.bench.cache_dtype` for the protocol.
        """
        from fpt_monai.bench.cache_dtype import run

        print(json.dumps(run(train_size, test_size, epochs, seeds), indent=2))

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
        """Peak training memory of one method as one JSON object, with ``ratio_to_full`` (under a minute on CPU).

        Full fine-tuning is measured in the same run, with the same batch, size and attention. The protocol and
        the categories are documented in :mod:`fpt_monai.bench.memory`.

        Args:
            method: full, linear, vpt, lora, adapter, fpt, fpt_plus.
            batch_size: images per step.
            img_size: backbone input size.
            attention: eager or fused.
            kv_dtype: FPT cache dtype (float16 as the bundle stores it, or float32).
            backbone_resident: FPT: keep the frozen backbone's weights in memory too.
            setup: FPT: preloaded (train from the cache) or online (backbone runs every step; minutes on CPU).
            fake: fake tensors (exact bytes, no compute); False runs the step for real.
        """
        from fpt_monai.bench.memory import measure_training_memory

        kwargs = {"batch_size": int(batch_size), "img_size": int(img_size), "attention": attention, "fake": fake}
        device = "cuda" if torch.cuda.is_available() and not fake else "cpu"
        result = measure_training_memory(
            method, kv_dtype=kv_dtype, backbone_resident=backbone_resident, setup=setup, device=device, **kwargs
        )
        full = result if method == "full" else measure_training_memory("full", device=device, **kwargs)
        result["full_total_bytes"] = full["total_bytes"]
        result["ratio_to_full"] = result["total_bytes"] / full["total_bytes"]
        print(json.dumps(result, indent=2))

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
        ``--accuracy_img_size`` (runs under ``--accuracy_dir``; see ``fpt-monai accuracy``, which runs that
        section alone). The whole table within 30 minutes on 2 CPU cores, at a smaller size for accuracy:
        ``fpt-monai bench --accuracy True --accuracy_epochs 3 --accuracy_img_size 256``. ``--device`` sets where the
        speed section runs (default: the GPU when there is one, else the CPU).
        """
        import sys

        from fpt_monai.bench.report import run_benchmarks, write_markdown

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        results = run_benchmarks(
            output_dir, batch_size=int(batch_size), img_size=int(img_size), speed=speed, accuracy=accuracy,
            accuracy_epochs=int(accuracy_epochs), accuracy_dir=accuracy_dir, accuracy_img_size=int(accuracy_img_size),
            command="fpt-monai " + " ".join(sys.argv[1:]), device=device,
        )
        print(write_markdown(results, f"{output_dir}/results.md"))

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
        :mod:`fpt_monai.bench.accuracy`.

        Args:
            work_dir: folder of the sample data and of the runs.
            output_dir: where ``accuracy.json`` and ``accuracy.md`` go.
            num_epochs: epochs of every method (20 in the demo schedule).
            methods: comma-separated or a list, out of full, linear, vpt, lora, adapter, fpt, fpt_plus (default: all).
        """
        import sys

        from fpt_monai.bench.accuracy import ACCURACY_METHODS, accuracy_table, write_accuracy

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        methods = ACCURACY_METHODS if methods is None else methods
        methods = [m for m in methods.split(",") if m] if isinstance(methods, str) else list(methods)
        result = accuracy_table(work_dir, methods=methods, num_epochs=int(num_epochs), **overrides)
        print(write_accuracy(result, output_dir, command="fpt-monai " + " ".join(sys.argv[1:])))

    def accuracy_merge(self, *files: str, output_dir: str = "benchmarks/results") -> None:
        """One accuracy table from the ``accuracy.json`` files of separate ``fpt-monai accuracy`` runs.

        Run the methods one at a time (``--methods linear``, ... with the same ``--work_dir``, epochs and sizes), then
        merge: the runs must share the task and schedule, and each method may appear once. Writes ``accuracy.json``
        and ``accuracy.md`` to ``output_dir`` and prints the markdown.

        Args:
            files: ``accuracy.json`` files of the runs.
            output_dir: where the merged ``accuracy.json`` and ``accuracy.md`` go.
        """
        import sys
        from pathlib import Path

        from fpt_monai.bench.accuracy import merge_accuracy, write_accuracy

        if not files:
            raise ValueError("give the accuracy.json files to merge, e.g. fpt-monai accuracy_merge a/accuracy.json b/accuracy.json")
        results = []
        for file in files:
            try:
                results.append(json.loads(Path(file).read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read the accuracy results {file}: {err}") from err
        merged = merge_accuracy(results, sources=list(files))
        print(write_accuracy(merged, output_dir, command="fpt-monai " + " ".join(sys.argv[1:])))

    def sample_data(self, output_dir: str = "fpt_sample", num_train: int = 240, num_val: int = 90, num_test: int = 90,
                    image_size: int = 512, seed: int = 0) -> None:
        """Create the offline sample dataset (fundus photographs graded by counting tiny lesions).

        Reuses an existing folder made with the same settings. See :mod:`fpt_monai.data.sample`.
        """
        from fpt_monai.data import make_sample_dataset

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        path = make_sample_dataset(output_dir, num_train=num_train, num_val=num_val, num_test=num_test,
                                   image_size=image_size, seed=seed)
        print(path)

    def sample_data_3d(self, output_dir: str = "fpt_sample_3d", num_train: int = 60, num_val: int = 30,
                       num_test: int = 30, volume_size: int = 64, seed: int = 0) -> None:
        """Create the offline 3D sample dataset (CT-like NIfTI volumes graded by counting tiny bright spots).

        Reuses an existing folder made with the same settings. See :mod:`fpt_monai.data.sample3d`.
        """
        from fpt_monai.data import make_sample_dataset_3d

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        path = make_sample_dataset_3d(output_dir, num_train=num_train, num_val=num_val, num_test=num_test,
                                      volume_size=volume_size, seed=seed)
        print(path)

    def memory3d(self, img_size: int = 128, side_img_size: int = 64, batch_size: int = 4, variant: str = "fpt",
                 attention: str = "fused", kv_dtype: str = "float16", fake: bool = True, table: bool = False,
                 **vit) -> None:
        """Training memory of FPT on volumes vs full fine-tuning of the same MONAI 3D ViT-B/16 (JSON, seconds).

        See :mod:`fpt_monai.bench.memory3d` for the protocol. ``--variant fpt_plus`` extracts blocks 6-11 unless
        ``--blocks`` is given; other MONAI ViT settings pass through (``--hidden_size``, ``--num_layers``,
        ``--patch_size``, ...). ``--table`` prints a Markdown table after the JSON.
        """
        from fpt_monai.bench.memory3d import markdown_table, run

        if variant == "fpt_plus" and "blocks" not in vit:
            vit["blocks"] = list(range(int(vit.get("num_layers", 12)) // 2, int(vit.get("num_layers", 12))))
        result = run(img_size=int(img_size), side_img_size=int(side_img_size), batch_size=int(batch_size),
                     variant=variant, attention=attention, kv_dtype=kv_dtype, fake=fake, **vit)
        print(json.dumps(result, indent=2))
        if table:
            print(markdown_table(result))

    def demo(self, work_dir: str = "fpt_demo", method: str = "fpt", **overrides) -> None:
        """Train FPT on the offline sample dataset with the MONAI bundle, evaluate it, print the test metrics.

        Everything (sample data, K/V cache, checkpoints, reports, TensorBoard logs) goes to ``work_dir``; see
        ``tensorboard --logdir <work_dir>/eval/tensorboard``. Any bundle config value can be overridden, e.g.
        ``fpt-monai demo --num_epochs 2``. ``--method full|linear|lora|adapter`` trains that baseline on the same
        demo network instead (overlays ``baseline.json`` and ``demo_baseline.json``).
        """
        from fpt_monai.bundle import run_demo

        results = run_demo(work_dir, method=method, **overrides)
        print(json.dumps({"work_dir": str(work_dir), "test_metrics": results}, indent=2))

    def export_bundle(self, output_dir: str, overwrite: bool = False) -> None:
        """Write a self-contained copy of the MONAI bundle (custom code under ``scripts/``) to ``output_dir``."""
        from fpt_monai.bundle import export_bundle

        print(export_bundle(output_dir, overwrite=overwrite))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    # fire hands a plain ``--help`` to commands with ``**overrides`` (demo, accuracy) as an override, which would
    # start a run; give fire's help flag form (after ``--``) instead, for every command alike
    if "--" not in args and any(a in ("--help", "-h") for a in args):
        args = [a for a in args if a not in ("--help", "-h")] + ["--", "--help"]
    fire.Fire(Commands, command=args, name="fpt-monai")


if __name__ == "__main__":
    main()
