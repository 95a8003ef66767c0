"""Evaluation that streams: per-class counts accumulated batch by batch, top-1/top-5, groups.

Every process runs its shard; per batch it reduces each head's logits to a few numbers per
image (the top-1 prediction, whether the target is in the top 5), and only these small
tensors are gathered (``gather_for_metrics``, which drops the samples accelerate duplicated to
even out the last batch). The counts then equal a single-process pass over the whole split, so
one or several processes give identical numbers (docs/recipe.md section 7: the reference padded
with duplicates and averaged per-rank group accuracies). Nothing of size N x C is held: host
memory stays at the per-class counts (plus, when asked for, one prediction per image and a
class x block confusion count), whatever the number of test images and classes.

Group accuracies are means of per-class accuracies over the group's classes (docs/recipe.md
section 6); classes without test images are left out of the means (and reported as null).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

TOPK = 5
ECE_BINS = 15


class EvalCounts:
    """Per-class top-1 / top-5 counts of several heads, filled batch by batch.

    ``names``: the heads to count (null: every output of the first batch). ``keep_predictions``:
    also keep each image's top-1 prediction (the agreement analysis). ``confusion``: a head whose
    confusion is counted as ``[true class, column]`` with ``columns[predicted class]`` (e.g. the
    block of the predicted class in count order, ``analysis.confusion_columns``): C x blocks,
    never C x C when C is large. ``calibration``: heads whose confidence (the top softmax
    probability) and NLL are summed in ``ECE_BINS`` equal-width bins (``engine.posthoc.ece_nll``).
    """

    def __init__(self, num_classes: int, names: Sequence[str] | None = None, *, keep_predictions: bool = False,
                 confusion: str | None = None, columns: torch.Tensor | None = None,
                 num_columns: int | None = None, calibration: Sequence[str] = ()) -> None:
        self.num_classes = num_classes
        self.names = list(names) if names is not None else None
        self.support = torch.zeros(num_classes, dtype=torch.long)
        self.correct: dict[str, torch.Tensor] = {}
        self.correct5: dict[str, torch.Tensor] = {}
        self.predictions: dict[str, list] | None = {} if keep_predictions else None
        self.targets: list = []
        self.confusion_head = confusion
        self.columns = columns.long() if columns is not None else torch.arange(num_classes)
        num_columns = num_columns if num_columns is not None else num_classes
        self.confusion = torch.zeros(num_classes, num_columns, dtype=torch.long) if confusion else None
        self.bins = {name: {"count": torch.zeros(ECE_BINS, dtype=torch.long),
                            "confidence": torch.zeros(ECE_BINS, dtype=torch.float64),
                            "correct": torch.zeros(ECE_BINS, dtype=torch.float64),
                            "nll": torch.zeros((), dtype=torch.float64)} for name in calibration}

    def summarise(self, logits: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per image (on the process's device): each head's top-1 prediction and top-5 hit."""
        if self.names is None:
            self.names = list(logits)
        targets = targets.long()
        k = min(TOPK, self.num_classes)
        out = {"target": targets}
        for name in self.names:
            value = logits[name].float()  # bf16/fp16 autocast logits: argmax in fp32, as before
            out[f"pred/{name}"] = value.argmax(dim=1)
            out[f"top5/{name}"] = (value.topk(k, dim=1).indices == targets[:, None]).any(dim=1).to(torch.uint8)
            if name in self.bins:
                log_probs = value.log_softmax(dim=1)
                out[f"conf/{name}"] = log_probs.max(dim=1).values.exp()
                out[f"nll/{name}"] = -log_probs.gather(1, targets[:, None]).squeeze(1)
        return out

    def update(self, summary: dict[str, torch.Tensor]) -> None:
        """Add a gathered, de-duplicated ``summarise`` result."""
        targets = summary["target"].cpu().long()
        ones = torch.ones_like(targets)
        self.support.index_add_(0, targets, ones)
        for name in self.names:
            pred = summary[f"pred/{name}"].cpu().long()
            hit = pred == targets
            self.correct.setdefault(name, torch.zeros_like(self.support)).index_add_(0, targets[hit], ones[hit])
            top5 = summary[f"top5/{name}"].cpu().bool()
            self.correct5.setdefault(name, torch.zeros_like(self.support)).index_add_(0, targets[top5], ones[top5])
            if self.predictions is not None:
                self.predictions.setdefault(name, []).append(pred.to(torch.int32))
            if name in self.bins:
                conf = summary[f"conf/{name}"].cpu().double()
                b = self.bins[name]
                index = (conf * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1  # bins (i/15, (i+1)/15]
                b["count"].index_add_(0, index, ones)
                b["confidence"].index_add_(0, index, conf)
                b["correct"].index_add_(0, index, hit.double())
                b["nll"] += summary[f"nll/{name}"].cpu().double().sum()
            if name == self.confusion_head:
                cells = targets * self.confusion.shape[1] + self.columns[pred]
                self.confusion.view(-1).index_add_(0, cells, ones)
        if self.predictions is not None:
            self.targets.append(targets.to(torch.int32))

    def prediction(self, name: str) -> torch.Tensor:
        """Top-1 predictions of every image, in the split's order (``keep_predictions``)."""
        return torch.cat(self.predictions[name]).long()

    def all_targets(self) -> torch.Tensor:
        return torch.cat(self.targets).long()

    def metrics(self, groups: dict, names: Iterable[str] | None = None) -> dict:
        return {name: count_metrics(self.correct[name], self.correct5[name], self.support, groups)
                for name in (names or self.names)}


def count_metrics(correct: torch.Tensor, correct5: torch.Tensor, support: torch.Tensor, groups: dict) -> dict:
    """Top-1, top-5, per-class accuracy and group means from per-class counts.

    Group accuracies are means of per-class accuracies over the group's classes, as the
    reference; classes without test images are left out of the means (and reported as null).
    """
    per_class = [(100.0 * c / s).item() if s > 0 else None for c, s in zip(correct, support)]
    n = int(support.sum().item())
    return {
        "top1": 100.0 * int(correct.sum().item()) / max(1, n),
        "top5": 100.0 * int(correct5.sum().item()) / max(1, n),
        "head": group_mean(per_class, groups.get("head", [])),
        "mid": group_mean(per_class, groups.get("mid", [])),
        "tail": group_mean(per_class, groups.get("tail", [])),
        "per_class": per_class,
        "num_samples": n,
    }


def group_mean(per_class: list, classes: Iterable[int]) -> float | None:
    """Mean of the per-class accuracies of ``classes`` that have test images (None if none)."""
    vals = [per_class[c] for c in classes if per_class[c] is not None]
    return float(sum(vals) / len(vals)) if vals else None


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, groups: dict,
                           num_classes: int) -> dict:
    """``count_metrics`` of one (N, C) logit tensor (tests, analyses of logits at hand)."""
    counts = EvalCounts(num_classes, ["logits"])
    counts.update(counts.summarise({"logits": logits}, targets))
    return counts.metrics(groups)["logits"]


@torch.no_grad()
def stream_evaluation(model, data_loader, accelerator, forward: Callable,
                      counts: EvalCounts | Sequence[EvalCounts] | None, *, keep: tuple[str, ...] = (),
                      desc: str = "eval", progress: bool = True, fp16: tuple[str, ...] = ()) -> dict:
    """Run ``forward(model, images) -> dict of outputs`` over a prepared loader on every process,
    adding each batch to ``counts`` (one or several, on every process).

    The outputs whose names start with one of ``keep`` (the analyses' features, or logits a
    user asked to save) are gathered whole and returned concatenated, in the split's order,
    with the ``targets`` (those named in ``fp16`` stored in half precision: a tuning split's
    logits); everything else is reduced per batch.
    """
    from tqdm.auto import tqdm

    model.eval()
    counts = [counts] if isinstance(counts, EvalCounts) else list(counts or [])
    kept: dict[str, list] = {}
    for images, labels in tqdm(data_loader, desc=desc, leave=False,
                               disable=not (progress and accelerator.is_main_process)):
        with accelerator.autocast():
            out = forward(model, images)
        for c in counts:
            c.update(accelerator.gather_for_metrics(c.summarise(out, labels.to(images.device))))
        if keep:
            whole = {k: v.float() for k, v in out.items() if k.startswith(keep)}
            whole = accelerator.gather_for_metrics({**whole, "targets": labels})
            for key, value in whole.items():
                kept.setdefault(key, []).append(value.cpu().half() if key in fp16 else value.cpu())
    return {k: torch.cat(v) for k, v in kept.items()}


def evaluate(model, data_loader, accelerator, forward, groups: dict, num_classes: int,
             progress: bool = True) -> dict:
    """Metrics for each output of ``forward`` (e.g. cls, dist, avg for a student)."""
    counts = EvalCounts(num_classes)
    stream_evaluation(model, data_loader, accelerator, forward, counts, progress=progress)
    return counts.metrics(groups)


def summary_line(metrics: dict) -> str:
    def fmt(v):
        return "  -  " if v is None else f"{v:5.1f}"

    return " | ".join(f"{name}: {fmt(m['top1'])} (h {fmt(m['head'])} m {fmt(m['mid'])} "
                      f"t {fmt(m['tail'])})" for name, m in metrics.items())
