"""Streaming evaluation (engine/metrics.py) and the figures that scale (analysis.py).

The counts streamed batch by batch must give exactly the numbers of the former whole-logits
computation (kept here as the reference), the confusion figure's pooled cells must equal the
pooling of a dense confusion matrix, and the per-class figure must not draw one bar per class.
"""
from __future__ import annotations

import torch

import analysis
from engine.metrics import EvalCounts, classification_metrics


def whole_logits_metrics(logits: torch.Tensor, targets: torch.Tensor, groups: dict, num_classes: int) -> dict:
    """The former ``classification_metrics``: a dense confusion matrix of every logit at once."""
    targets = targets.long()
    top1 = logits.argmax(dim=1)
    top5 = (logits.topk(min(5, num_classes), dim=1).indices == targets[:, None]).any(dim=1)
    cm = torch.bincount(targets * num_classes + top1, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    support, correct = cm.sum(dim=1), cm.diag()
    per_class = [(100.0 * c / s).item() if s > 0 else None for c, s in zip(correct, support)]

    def mean(classes):
        vals = [per_class[c] for c in classes if per_class[c] is not None]
        return float(sum(vals) / len(vals)) if vals else None

    n = max(1, targets.numel())
    return {"top1": 100.0 * (top1 == targets).sum().item() / n, "top5": 100.0 * top5.sum().item() / n,
            "head": mean(groups["head"]), "mid": mean(groups["mid"]), "tail": mean(groups["tail"]),
            "per_class": per_class, "num_samples": int(targets.numel())}


def test_streamed_counts_equal_the_whole_logits_numbers():
    g = torch.Generator().manual_seed(0)
    num_classes, n = 37, 301
    groups = {"head": list(range(10)), "mid": list(range(10, 30)), "tail": list(range(30, 37))}
    targets = torch.randint(0, num_classes - 2, (n,), generator=g)  # classes 35, 36: no test image
    logits = {"cls": torch.randn(n, num_classes, generator=g), "dist": torch.randn(n, num_classes, generator=g)}
    logits["avg"] = (logits["cls"] + logits["dist"]) / 2
    counts = EvalCounts(num_classes, keep_predictions=True)
    for start in range(0, n, 64):  # uneven batches, as a loader gives them
        batch = slice(start, start + 64)
        counts.update(counts.summarise({k: v[batch] for k, v in logits.items()}, targets[batch]))
    streamed = counts.metrics(groups)
    for name, value in logits.items():
        assert streamed[name] == whole_logits_metrics(value, targets, groups, num_classes)  # exactly
        assert torch.equal(counts.prediction(name), value.argmax(1))
    assert streamed["avg"]["per_class"][35] is None
    assert torch.equal(counts.all_targets(), targets)
    assert classification_metrics(logits["cls"], targets, groups, num_classes) == streamed["cls"]


def test_bf16_logits_counted_in_fp32():
    """Autocast logits are cast to fp32 before the argmax, as the whole-logits pass did."""
    logits = torch.randn(50, 12, generator=torch.Generator().manual_seed(1)).bfloat16()
    targets = torch.arange(50) % 12
    counts = EvalCounts(12, ["x"])
    counts.update(counts.summarise({"x": logits}, targets))
    groups = {"head": [0, 1], "mid": [2, 3], "tail": [4]}
    assert counts.metrics(groups)["x"] == whole_logits_metrics(logits.float(), targets, groups, 12)


def test_pooled_confusion_from_streamed_blocks_equals_the_dense_pooling():
    """C x blocks counts (never C x C) give exactly the cells of the dense matrix's pooling."""
    g = torch.Generator().manual_seed(2)
    num_classes, n = 230, 4000
    train_counts = torch.randint(1, 500, (num_classes,), generator=g).tolist()
    targets = torch.randint(0, num_classes, (n,), generator=g)
    preds = torch.where(torch.rand(n, generator=g) < 0.5, targets, torch.randint(0, num_classes, (n,), generator=g))
    columns, num_columns, block = analysis.confusion_columns(train_counts)
    assert block == 3 and num_columns == 77
    counts = EvalCounts(num_classes, ["avg"], confusion="avg", columns=columns, num_columns=num_columns)
    logits = torch.nn.functional.one_hot(preds, num_classes).float()
    for start in range(0, n, 512):
        counts.update(counts.summarise({"avg": logits[start:start + 512]}, targets[start:start + 512]))
    assert counts.confusion.shape == (num_classes, num_columns) and counts.confusion.sum() == n
    dense = torch.bincount(targets * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    order = torch.tensor(analysis.count_order(train_counts))
    dense = dense.double()[order][:, order]
    expected, _ = analysis.pool_confusion(100.0 * dense / dense.sum(1, keepdim=True).clamp_min(1))
    torch.testing.assert_close(analysis.confusion_rows(counts.confusion, train_counts, block), expected)
    # Few classes: one column per class, the plain row-normalised matrix in count order.
    columns, num_columns, block = analysis.confusion_columns(train_counts[:20])
    assert block == 1 and num_columns == 20 and sorted(columns.tolist()) == list(range(20))


def test_per_class_figure_draws_no_bar_per_class(tmp_path, monkeypatch):
    """The training counts are one stairs artist: Axes.bar (one patch per class) is not called."""
    import matplotlib.axes

    def no_bars(*args, **kwargs):
        raise AssertionError("Axes.bar called: one patch per class")

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", no_bars)
    num_classes = 300
    train_counts = list(range(num_classes, 0, -1))
    per_class = {"avg": [float(c % 100) for c in range(num_classes)]}
    groups = {"head": list(range(100)), "mid": list(range(100, 200)), "tail": list(range(200, 300))}
    analysis.plot_per_class(tmp_path / "pc.png", per_class, train_counts, groups, "t")
    assert (tmp_path / "pc.png").stat().st_size > 1000
