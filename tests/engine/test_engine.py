"""Classification metrics and training handlers of fpt_monai.engine."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from ignite.metrics import ConfusionMatrix

from fpt_monai.engine import GradientNormClipping, MacroF1, QuadraticWeightedKappa, classification_output
from reference_metrics import macro_f1, quadratic_weighted_kappa


def test_kappa_of_two_classes_is_cohens_kappa():
    confusion = torch.tensor([[5, 1], [2, 2]])
    p_observed, p_expected = 0.7, (6 * 7 + 4 * 3) / 100
    assert quadratic_weighted_kappa(confusion) == pytest.approx((p_observed - p_expected) / (1 - p_expected))


@pytest.mark.parametrize(
    "confusion, kappa",
    [
        ([[3, 0, 0], [0, 3, 0], [0, 0, 3]], 1.0),  # perfect agreement
        ([[0, 0, 1], [0, 1, 0], [1, 0, 0]], -1.0),  # grades reversed
        ([[1, 1, 1], [1, 1, 1], [1, 1, 1]], 0.0),  # chance
        ([[0, 0, 0], [0, 0, 0], [0, 0, 0]], 0.0),  # nothing seen
    ],
)
def test_quadratic_weighted_kappa_extremes(confusion, kappa):
    assert quadratic_weighted_kappa(torch.tensor(confusion)) == pytest.approx(kappa)


def test_quadratic_weights_punish_far_misses_more():
    near = torch.tensor([[2, 1, 0], [0, 3, 0], [0, 0, 3]])
    far = torch.tensor([[2, 0, 1], [0, 3, 0], [0, 0, 3]])
    assert quadratic_weighted_kappa(far) < quadratic_weighted_kappa(near) < 1


def test_macro_f1():
    confusion = torch.tensor([[5, 1], [2, 2]])
    assert macro_f1(confusion) == pytest.approx((10 / 13 + 4 / 7) / 2)
    assert macro_f1(torch.eye(3) * 4) == pytest.approx(1.0)
    # a class never seen nor predicted counts as 0 in the mean
    assert macro_f1(torch.tensor([[2, 0, 0], [0, 2, 0], [0, 0, 0]])) == pytest.approx(2 / 3)


def test_classification_output_from_decollated_items():
    items = [{"pred": torch.tensor([0.1, 0.9]), "label": torch.tensor(1)},
             {"pred": torch.tensor([0.8, 0.2]), "label": torch.tensor([0])}]
    pred, label = classification_output(items)
    assert pred.shape == (2, 2) and label.tolist() == [1, 0] and label.dtype == torch.long
    _, one_hot = classification_output(items, one_hot=True)
    assert one_hot.tolist() == [[0, 1], [1, 0]]
    one_hot_items = [{"pred": item["pred"], "label": one_hot[i]} for i, item in enumerate(items)]
    assert classification_output(one_hot_items)[1].tolist() == [1, 0]
    batched = {"pred": torch.stack([i["pred"] for i in items]), "label": torch.tensor([1, 0])}
    assert classification_output(batched)[1].tolist() == [1, 0]


def test_metrics_accumulate_over_an_epoch_like_the_confusion_matrix():
    torch.manual_seed(0)
    batches = [(torch.rand(5, 3), torch.randint(0, 3, (5,))) for _ in range(4)]
    engine = Engine(lambda e, batch: [{"pred": p, "label": y} for p, y in zip(*batch)])
    MacroF1(3).attach(engine, "f1")
    QuadraticWeightedKappa(3).attach(engine, "kappa")
    ConfusionMatrix(3, output_transform=classification_output).attach(engine, "confusion")
    state = engine.run(batches)
    confusion = torch.zeros(3, 3, dtype=torch.long)
    for pred, label in batches:
        for p, y in zip(pred.argmax(1), label):
            confusion[y, p] += 1
    assert torch.equal(state.metrics["confusion"], confusion)
    assert state.metrics["f1"] == pytest.approx(macro_f1(confusion))
    assert state.metrics["kappa"] == pytest.approx(quadratic_weighted_kappa(confusion))


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_ignite_metrics_equal_the_confusion_matrix_formulas_on_random_data(num_classes):
    """MacroF1 (ignite Fbeta) and QuadraticWeightedKappa (ignite CohenKappa) on random predictions, skewed so that
    some classes are never predicted or never present, against the formulas on the confusion matrix."""
    generator = torch.Generator().manual_seed(num_classes)
    for trial in range(20):
        engine = Engine(lambda e, batch: {"pred": batch[0], "label": batch[1]})
        MacroF1(num_classes).attach(engine, "f1")
        QuadraticWeightedKappa(num_classes).attach(engine, "kappa")
        present = torch.randint(1, num_classes + 1, (), generator=generator)  # labels use classes 0..present-1
        batches = [
            (torch.rand(n, num_classes, generator=generator) ** (1 + trial % 4),
             torch.randint(0, int(present), (n,), generator=generator))
            for n in torch.randint(1, 9, (3,), generator=generator).tolist()
        ]
        state = engine.run(batches)
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for pred, label in batches:
            for p, y in zip(pred.argmax(1), label):
                confusion[y, p] += 1
        assert state.metrics["f1"] == pytest.approx(macro_f1(confusion), rel=1e-12, abs=1e-12)
        assert state.metrics["kappa"] == pytest.approx(quadratic_weighted_kappa(confusion), rel=1e-12, abs=1e-12)


def test_metrics_check_the_number_of_classes():
    engine = Engine(lambda e, batch: {"pred": batch[0], "label": batch[1]})
    MacroF1(3).attach(engine, "f1")
    with pytest.raises(ValueError, match="3 class scores"):
        engine.run([(torch.rand(2, 4), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="num_classes"):
        QuadraticWeightedKappa(1)


def test_gradient_norm_clipping_bounds_the_global_norm():
    params = [torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(5))]
    params[0].grad, params[1].grad = torch.full((10,), 3.0), torch.full((5,), 4.0)
    before = torch.cat([p.grad for p in params]).norm().item()
    engine = Engine(lambda e, b: None)
    engine.optimizer = torch.optim.SGD(params, lr=0.1)
    GradientNormClipping(max_norm=1.0)(engine)
    assert engine.state.grad_norm == pytest.approx(before)
    assert torch.cat([p.grad for p in params]).norm().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="max_norm"):
        GradientNormClipping(max_norm=0)
