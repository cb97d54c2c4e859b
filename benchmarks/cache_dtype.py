"""What the storage dtype of the K/V cache does to accuracy: train and test on float32, float16, bfloat16, int8 caches.

A small synthetic fine-detail task (label 1 = a faint 6x6 square somewhere in a noisy 64x64 image), a small
frozen ViT (random weights, fixed seed) whose keys/values are computed once in float32 and then stored in each
dtype, and identical training runs (same seed, same batches) on each stored copy. The network reads each copy as
a cache of that dtype gives it: float16/bfloat16/float32 as stored, int8 dequantised to float16
(:mod:`fpt_monai.preload.quantize`). Reports test AUC and accuracy per dtype, the largest test-logit difference
to the float32 run and how many test predictions agree with it.

``int8_granularity`` compares where the int8 scales could sit, the stored one (one scale per token of a block's
keys or values, shared by the heads) and three others: the scale bytes each would add to an entry of the ``fpt``
preset (ViT-B/16 at 512) and whether that entry stays within 3.8 MB, the relative error of the keys/values on
this task's features and on the pretrained ``fpt_demo`` backbone's features of sample fundus photographs, and the
networks' test predictions as in ``inference``.
"""

from __future__ import annotations

import math
import time

import torch
from monai.metrics import compute_roc_auc
from timm.models.vision_transformer import VisionTransformer

from fpt_monai.networks import FPTNet, TimmViTBackbone
from fpt_monai.preload import STORAGE_DTYPES, dequantize_int8, quantize_int8
from fpt_monai.preload.quantize import INT8_SCALE_DIMS

__all__ = ["INT8_GRANULARITIES", "make_fine_detail_images", "as_read_from_cache", "run"]

#: Where int8 scales could sit: the dimensions of (..., blocks, 2, heads, tokens, head_dim) one scale spans.
INT8_GRANULARITIES = {
    "per token (stored)": INT8_SCALE_DIMS,  # heads x head_dim values per scale
    "per token and head": (-1,),
    "per channel and head": (-2,),
    "per channel": (-3, -2),  # one scale per head_dim index, over heads and tokens
}
#: One ``fpt`` preset item (ViT-B/16 at 512, 12 blocks, 12 heads, 205 kept tokens of 64) and the entry budget.
FPT_KV_SHAPE = (12, 2, 12, 205, 64)
ENTRY_BUDGET_BYTES = 3_800_000
ENTRY_HEADER_BYTES = 700  # checksum, fingerprint, the item's fields and identity (680 bytes measured, a 34-character path)


def make_fine_detail_images(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images; label 1 adds a faint 6x6 square at a random place."""
    images = 0.5 + 0.1 * torch.randn(count, 3, size, size, generator=generator)
    labels = torch.arange(count) % 2
    for index in torch.nonzero(labels).flatten().tolist():
        y, x = torch.randint(0, size - 6, (2,), generator=generator).tolist()
        images[index, :, y : y + 6, x : x + 6] += 0.25
    return (images - 0.5) / 0.5, labels


def as_read_from_cache(kv: torch.Tensor, dtype: str, int8_dims: tuple[int, ...] = INT8_SCALE_DIMS) -> torch.Tensor:
    """float32 keys/values -> what a cache of storage dtype ``dtype`` gives the network (int8: as float16)."""
    if dtype == "int8":
        return dequantize_int8(*quantize_int8(kv, int8_dims))
    return kv.to(STORAGE_DTYPES[dtype])


def _relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    return float((approximation.float() - reference).norm() / reference.norm())


def _pretrained_kv(count: int = 12) -> torch.Tensor:
    """float32 keys/values of the pretrained ``fpt_demo`` backbone on ``count`` sample fundus photographs."""
    import tempfile

    from monai.transforms import Compose

    from fpt_monai.data import inference_transforms, make_datalist, make_sample_dataset
    from fpt_monai.presets import create_backbone

    backbone = create_backbone("fpt_demo", pretrained=True).eval()
    with tempfile.TemporaryDirectory() as folder:
        root = make_sample_dataset(folder, num_train=count, num_val=3, num_test=3, progress=False)
        load = Compose(inference_transforms(backbone.shape.img_size, backbone.mean, backbone.std))
        images = torch.stack([torch.as_tensor(load(dict(item))["image"]) for item in make_datalist(str(root), "train")])
    with torch.no_grad():
        return backbone(images.float()).float().as_subclass(torch.Tensor)


def _scale_bytes(dims: tuple[int, ...]) -> int:
    """float16 scale bytes an ``fpt`` preset entry would hold with one scale per slice over ``dims``."""
    spanned = {d % len(FPT_KV_SHAPE) for d in dims}
    return 2 * math.prod(size for d, size in enumerate(FPT_KV_SHAPE) if d not in spanned)


def _train(kv_train, side_train, y_train, shape, epochs, seed) -> FPTNet:
    torch.manual_seed(seed)
    net = FPTNet(shape, num_classes=2, side_img_size=side_train.shape[-1], num_prompts=8, reduction=4)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.1)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(y_train), generator=order).split(16):
            optimizer.zero_grad()
            logits = net.forward_side(side_train[batch], kv_train[batch])
            torch.nn.functional.cross_entropy(logits, y_train[batch]).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
    return net.eval()


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "auc": float(compute_roc_auc(logits.softmax(dim=1)[:, 1], labels)),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
    }


def _mean_std(values: list[float]) -> str:
    # the median too: one run of several that stays near chance moves the mean of this unstable task
    values_t = torch.tensor(values)
    return f"{values_t.mean():.4f} +- {values_t.std():.4f} (median {values_t.median():.4f})"


def run(
    train_size: int = 256, test_size: int = 256, epochs: int = 8, seeds: int = 5, pretrained_features: bool = True
) -> dict:
    """Run the comparisons.

    - ``inference``: networks trained on the float32 cache, tested on each dtype's copy of the test keys/values
      (isolates what storage precision does to predictions).
    - ``training``: networks trained and tested on each dtype's copy (mean +- std and median over seeds;
      training runs diverge chaotically from tiny differences, so compare over seeds, not single seeds).
    - ``int8_granularity``: where the int8 scales sit (see the module doc); ``pretrained_features=False`` skips
      the pretrained backbone's features (it builds the demo backbone's weights on first use).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    backbone = TimmViTBackbone(
        VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0), token_ratio=0.2
    )
    x_train, y_train = make_fine_detail_images(train_size, 64, generator)
    x_test, y_test = make_fine_detail_images(test_size, 64, generator)
    with torch.no_grad():
        kv_train, kv_test = backbone(x_train), backbone(x_test)
    side_train = torch.nn.functional.interpolate(x_train, size=32, mode="bilinear", antialias=True)
    side_test = torch.nn.functional.interpolate(x_test, size=32, mode="bilinear", antialias=True)
    dtypes = ("float32", "float16", "bfloat16", "int8")
    test_copies = {name: as_read_from_cache(kv_test, name) for name in dtypes}
    test_copies.update({f"int8 {g}": as_read_from_cache(kv_test, "int8", d) for g, d in INT8_GRANULARITIES.items()})
    inference = {name: {"max_abs_logit_diff": 0.0, "predictions_equal": [], "auc_diff": []} for name in test_copies}
    training = {name: {"auc": [], "accuracy": []} for name in dtypes}
    for seed in range(seeds):
        reference_net = _train(kv_train, side_train, y_train, backbone.shape, epochs, seed)
        with torch.no_grad():
            reference = reference_net.forward_side(side_test, kv_test)
            for name, kv in test_copies.items():
                logits = reference_net.forward_side(side_test, kv)
                row = inference[name]
                row["max_abs_logit_diff"] = max(row["max_abs_logit_diff"], float((logits - reference).abs().max()))
                row["predictions_equal"].append(float((logits.argmax(1) == reference.argmax(1)).float().mean()))
                row["auc_diff"].append(abs(_scores(logits, y_test)["auc"] - _scores(reference, y_test)["auc"]))
        for name in dtypes:
            net = reference_net if name == "float32" else _train(
                as_read_from_cache(kv_train, name), side_train, y_train, backbone.shape, epochs, seed)
            with torch.no_grad():
                scores = _scores(net.forward_side(side_test, test_copies[name]), y_test)
            training[name]["auc"].append(scores["auc"])
            training[name]["accuracy"].append(scores["accuracy"])
    inference_rows = {
        name: {
            "max_abs_logit_diff": round(row["max_abs_logit_diff"], 6),
            "predictions_equal_to_float32": min(row["predictions_equal"]),
            "max_auc_diff": round(max(row["auc_diff"]), 6),
        }
        for name, row in inference.items()
    }
    pretrained = _pretrained_kv() if pretrained_features else None
    values_bytes = math.prod(FPT_KV_SHAPE)
    granularity = {}
    for name, dims in INT8_GRANULARITIES.items():
        entry_bytes = values_bytes + _scale_bytes(dims) + ENTRY_HEADER_BYTES
        row = {
            "fpt_scale_bytes": _scale_bytes(dims),
            "fpt_entry_bytes_about": entry_bytes,
            "fits_3_8_MB": entry_bytes <= ENTRY_BUDGET_BYTES,
            "kv_relative_error": round(_relative_error(test_copies[f"int8 {name}"], kv_test), 6),
        }
        if pretrained is not None:
            row["pretrained_kv_relative_error"] = round(
                _relative_error(as_read_from_cache(pretrained, "int8", dims), pretrained), 6
            )
        granularity[name] = {**row, **inference_rows.pop(f"int8 {name}")}
    for name in ("float16", "bfloat16"):
        granularity_reference = {"kv_relative_error": round(_relative_error(test_copies[name], kv_test), 6)}
        if pretrained is not None:
            granularity_reference["pretrained_kv_relative_error"] = round(
                _relative_error(pretrained.to(STORAGE_DTYPES[name]), pretrained), 6
            )
        granularity[f"{name} (for reference)"] = granularity_reference
    return {
        "task": f"{train_size} train / {test_size} test synthetic fine-detail images, {epochs} epochs, {seeds} seeds",
        "inference": inference_rows,
        "training": {name: {k: _mean_std(v) for k, v in row.items()} for name, row in training.items()},
        "int8_granularity": granularity,
        "seconds": round(time.perf_counter() - start, 1),
    }
