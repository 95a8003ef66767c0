"""Evaluation: gathered predictions of every process, top-1/top-5, per-class and groups.

Predictions are gathered and de-duplicated (``gather_for_metrics``) before any metric is
computed, so one or several processes give identical numbers (docs/recipe.md section 7: the
reference padded with duplicates and averaged per-rank group accuracies). Group accuracies are
means of per-class accuracies over the group's classes (docs/recipe.md section 6).
"""
from __future__ import annotations

from typing import Iterable

import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[t, p]`` counts images of true class t predicted as p."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, groups: dict,
                           num_classes: int) -> dict:
    """Top-1, top-5, per-class accuracy and group means.

    Group accuracies are means of per-class accuracies over the group's classes, as the
    reference; classes without test images are left out of the means (and reported as null).
    """
    targets = targets.long()
    top1 = logits.argmax(dim=1)
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
    cm = confusion_matrix(top1, targets, num_classes)
    support = cm.sum(dim=1)
    correct = cm.diag()
    per_class = [(100.0 * c / s).item() if s > 0 else None for c, s in zip(correct, support)]

    def group_mean(classes: Iterable[int]) -> float | None:
        vals = [per_class[c] for c in classes if per_class[c] is not None]
        return float(sum(vals) / len(vals)) if vals else None

    n = max(1, targets.numel())
    return {
        "top1": 100.0 * (top1 == targets).sum().item() / n,
        "top5": 100.0 * top5.sum().item() / n,
        "head": group_mean(groups.get("head", [])),
        "mid": group_mean(groups.get("mid", [])),
        "tail": group_mean(groups.get("tail", [])),
        "per_class": per_class,
        "num_samples": int(targets.numel()),
    }


@torch.no_grad()
def collect_logits(model, data_loader, accelerator, forward, desc: str = "eval",
                   progress: bool = True) -> tuple[dict, torch.Tensor]:
    """Run ``forward(model, images) -> dict of logits`` over a prepared loader on every process.

    ``gather_for_metrics`` drops the samples accelerate duplicated to even out the last
    batch, so the result equals a single-process pass over the whole split, in order.
    """
    from tqdm.auto import tqdm

    model.eval()
    outputs: dict[str, list] = {}
    targets = []
    for images, labels in tqdm(data_loader, desc=desc, leave=False,
                               disable=not (progress and accelerator.is_main_process)):
        with accelerator.autocast():
            out = forward(model, images)
        out = accelerator.gather_for_metrics({k: v.float() for k, v in out.items()})
        for key, value in out.items():
            outputs.setdefault(key, []).append(value.cpu())
        targets.append(accelerator.gather_for_metrics(labels).cpu())
    return {k: torch.cat(v) for k, v in outputs.items()}, torch.cat(targets)


def evaluate(model, data_loader, accelerator, forward, groups: dict, num_classes: int,
             progress: bool = True) -> dict:
    """Metrics for each output of ``forward`` (e.g. cls, dist, avg for a student)."""
    logits, targets = collect_logits(model, data_loader, accelerator, forward, progress=progress)
    return {k: classification_metrics(v, targets, groups, num_classes) for k, v in logits.items()}


def summary_line(metrics: dict) -> str:
    def fmt(v):
        return "  -  " if v is None else f"{v:5.1f}"

    return " | ".join(f"{name}: {fmt(m['top1'])} (h {fmt(m['head'])} m {fmt(m['mid'])} "
                      f"t {fmt(m['tail'])})" for name, m in metrics.items())
