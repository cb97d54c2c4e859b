"""What the storage dtype of the K/V cache does to accuracy: train and test on float32, float16, bfloat16 caches.

A small synthetic fine-detail task (label 1 = a faint 6x6 square somewhere in a noisy 64x64 image), a small
frozen ViT (random weights, fixed seed) whose keys/values are computed once in float32 and then stored in each
dtype, and identical training runs (same seed, same batches) on each stored copy. Reports test AUC and accuracy
per dtype, the largest test-logit difference to the float32 run and how many test predictions agree with it.
"""

from __future__ import annotations

import time

import torch
from monai.metrics import compute_roc_auc
from timm.models.vision_transformer import VisionTransformer

from fpt_monai.networks import FPTNet, TimmViTBackbone

__all__ = ["make_fine_detail_images", "run"]


def make_fine_detail_images(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images; label 1 adds a faint 6x6 square at a random place."""
    images = 0.5 + 0.1 * torch.randn(count, 3, size, size, generator=generator)
    labels = torch.arange(count) % 2
    for index in torch.nonzero(labels).flatten().tolist():
        y, x = torch.randint(0, size - 6, (2,), generator=generator).tolist()
        images[index, :, y : y + 6, x : x + 6] += 0.25
    return (images - 0.5) / 0.5, labels


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
    values_t = torch.tensor(values)
    return f"{values_t.mean():.4f} +- {values_t.std():.4f}"


def run(train_size: int = 256, test_size: int = 256, epochs: int = 8, seeds: int = 5) -> dict:
    """Run both comparisons.

    - ``inference``: networks trained on the float32 cache, tested on each dtype's copy of the test keys/values
      (isolates what storage precision does to predictions).
    - ``training``: networks trained and tested on each dtype's copy (mean +- std over seeds; training runs
      diverge chaotically from tiny differences, so compare means, not single seeds).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    backbone = TimmViTBackbone(
        VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0), token_ratio=0.2
    )
    x_train, y_train = make_fine_detail_images(train_size, 64, generator)
    x_test, y_test = make_fine_detail_images(test_size, 64, generator)
    kv_train, kv_test = backbone(x_train), backbone(x_test)
    side_train = torch.nn.functional.interpolate(x_train, size=32, mode="bilinear", antialias=True)
    side_test = torch.nn.functional.interpolate(x_test, size=32, mode="bilinear", antialias=True)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    inference = {name: {"max_abs_logit_diff": 0.0, "predictions_equal": [], "auc_diff": []} for name in dtypes}
    training = {name: {"auc": [], "accuracy": []} for name in dtypes}
    for seed in range(seeds):
        reference_net = _train(kv_train, side_train, y_train, backbone.shape, epochs, seed)
        with torch.no_grad():
            reference = reference_net.forward_side(side_test, kv_test)
            for name, dtype in dtypes.items():
                logits = reference_net.forward_side(side_test, kv_test.to(dtype))
                row = inference[name]
                row["max_abs_logit_diff"] = max(row["max_abs_logit_diff"], float((logits - reference).abs().max()))
                row["predictions_equal"].append(float((logits.argmax(1) == reference.argmax(1)).float().mean()))
                row["auc_diff"].append(abs(_scores(logits, y_test)["auc"] - _scores(reference, y_test)["auc"]))
        for name, dtype in dtypes.items():
            net = reference_net if dtype == torch.float32 else _train(
                kv_train.to(dtype), side_train, y_train, backbone.shape, epochs, seed)
            with torch.no_grad():
                scores = _scores(net.forward_side(side_test, kv_test.to(dtype)), y_test)
            training[name]["auc"].append(scores["auc"])
            training[name]["accuracy"].append(scores["accuracy"])
    return {
        "task": f"{train_size} train / {test_size} test synthetic fine-detail images, {epochs} epochs, {seeds} seeds",
        "inference": {
            name: {
                "max_abs_logit_diff": round(row["max_abs_logit_diff"], 6),
                "predictions_equal_to_float32": min(row["predictions_equal"]),
                "max_auc_diff": round(max(row["auc_diff"]), 6),
            }
            for name, row in inference.items()
        },
        "training": {name: {k: _mean_std(v) for k, v in row.items()} for name, row in training.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
