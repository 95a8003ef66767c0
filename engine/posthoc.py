"""What the long-tail literature reports beside top-1: post-hoc rows, calibration, test-prior shift.

- **Post-hoc logit adjustment** (Menon et al., ICLR 2021): ``logits - tau * log(prior)``, the
  prior being the training set's class frequencies. ``tau = 1`` needs no tuning and is always a
  row (``*_la``); a tuned tau (``avg_la_tuned``) only with tuning images.
- **Expert combinations beyond the mean** of a student's CLS (head expert) and DIST (tail expert)
  heads; the reference's mean (``avg``) stays the reported prediction:
  ``weighted`` = ``w cls + (1 - w) dist`` with w tuned; ``temp_avg`` = the student's combination
  (``DistilledStudent.combine``, the mean) of ``cls / T_cls`` and ``dist / T_dist``, each T fitted
  by NLL (temperature scaling, Guo et al. 2017) so that the over-confident head no longer
  outvotes the other; ``avg_cls_la`` = the combination after adjusting only CLS (tau = 1, no
  tuning): CLS learns from the long-tailed labels, so it carries the
  training prior that logit adjustment removes, while DIST learns from the teacher's targets
  (a class-balanced teacher), so adjusting it too over-corrects towards the tail.
- Every tuned parameter is chosen on images that are not the ones it is reported on (the
  tuning split, see evaluate.py), by the class-balanced criterion (mean per-class accuracy,
  per-class-weighted NLL): a tuning split drawn from long-tailed training data would otherwise
  pick the head-favouring value that its own prior rewards.
- **Calibration**: ECE over 15 equal-width confidence bins (in %, as the field reports it) and
  NLL (nats, per image), streamed as per-bin sums.
- **Test-prior shift** (LADE, SADE): accuracy under forward / backward long-tailed test sets of
  imbalance 50 ... 2, uniform, computed exactly from the per-class accuracies: classes in
  training-count order k = 0..C-1 weighted ``rho ** (-k / (C - 1))`` (forward: the training
  prior's direction; backward: reversed).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

PRIOR_RATIOS = (50, 25, 10, 5, 2)
TAU_GRID = [round(0.1 * i, 1) for i in range(21)]  # 0 .. 2
WEIGHT_GRID = [round(0.05 * i, 2) for i in range(21)]  # 0 .. 1
CHUNK = 1024  # rows of tuning logits turned into fp32 at a time


def log_prior(train_counts: list[int]) -> torch.Tensor:
    """log of the training class frequencies; a class with no training image counts as one
    (log 0 would make it win every image after adjustment)."""
    counts = torch.tensor(train_counts, dtype=torch.float64).clamp_min(1)
    return (counts / counts.sum()).log().float()


def row_names(heads: list[str]) -> list[str]:
    """The post-hoc rows of a student (cls, dist, avg) or of a single-head model."""
    if {"cls", "dist", "avg"} <= set(heads):
        return ["cls", "dist", "avg", "cls_la", "dist_la", "avg_la", "avg_cls_la", "avg_la_tuned",
                "weighted", "temp_avg"]
    head = heads[-1]
    return [head, f"{head}_la", f"{head}_la_tuned", f"{head}_temp"]


def is_tuned(name: str) -> bool:
    """Whether a row has parameters chosen on tuning images (the others need none)."""
    return name in ("weighted", "temp_avg") or name.endswith(("_la_tuned", "_temp"))


def mean_of_heads(heads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's combination (``DistilledStudent.combine``), for callers without a model."""
    return (heads["cls"] + heads["dist"]) / 2


def rows(logits: dict[str, torch.Tensor], names: list[str], params: dict, prior: torch.Tensor,
         combine: Callable = mean_of_heads) -> dict:
    """Every row's fp32 logits for a batch of the heads' logits; ``combine``: the student's
    combination of its heads (``DistilledStudent.combine``)."""
    z = {k: v.float() for k, v in logits.items()}
    prior = prior.to(next(iter(z.values())).device)
    out = {}
    for name in names:
        if name in z:
            out[name] = z[name]
        elif name == "avg_cls_la":
            out[name] = combine({"cls": z["cls"] - prior, "dist": z["dist"]})
        elif name.endswith("_la_tuned"):
            out[name] = z[name[:-len("_la_tuned")]] - params["tau"] * prior
        elif name.endswith("_la"):
            out[name] = z[name[:-len("_la")]] - prior
        elif name == "weighted":
            out[name] = params["w"] * z["cls"] + (1 - params["w"]) * z["dist"]
        elif name == "temp_avg":
            out[name] = combine({h: z[h] / params["T"][h] for h in ("cls", "dist")})
        elif name.endswith("_temp"):
            head = name[:-len("_temp")]
            out[name] = z[head] / params["T"][head]
    return out


def param_of(name: str, params: dict) -> dict | None:
    """The parameters a row uses, for the JSON (None: the plain heads)."""
    if name.endswith("_la_tuned"):
        return {"tau": params["tau"]}
    if name.endswith("_la") or name == "avg_cls_la":
        return {"tau": 1.0}
    if name == "weighted":
        return {"w_cls": params["w"]}
    if name == "temp_avg" or name.endswith("_temp"):
        return {f"T_{k}": v for k, v in params["T"].items()}
    return None


# ----------------------------------------------------------------------------- tuning


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, start + CHUNK)


def balanced_accuracy(make_logits, targets: torch.Tensor, num_classes: int) -> float:
    """Mean per-class top-1 (over classes with images) of ``make_logits(slice)``, chunked."""
    correct = torch.zeros(num_classes, dtype=torch.float64)
    for s in _chunks(len(targets)):
        hit = (make_logits(s).argmax(1) == targets[s]).double()
        correct.index_add_(0, targets[s], hit)
    support = torch.bincount(targets, minlength=num_classes).double()
    present = support > 0
    return float((correct[present] / support[present]).mean())


def balanced_nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float, weights: torch.Tensor) -> float:
    total = 0.0
    for s in _chunks(len(targets)):
        nll = F.cross_entropy(logits[s].float() / temperature, targets[s], reduction="none").double()
        total += float((nll * weights[s]).sum())
    return total


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> float:
    """T minimising the (class-weighted) NLL of ``logits / T``: golden-section search on the
    inverse temperature 1/T in [0.01, 20], where the NLL is convex."""
    lo, hi = 0.01, 20.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = balanced_nll(logits, targets, 1 / a, weights), balanced_nll(logits, targets, 1 / b, weights)
    for _ in range(40):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = balanced_nll(logits, targets, 1 / a, weights)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = balanced_nll(logits, targets, 1 / b, weights)
    return round(1.0 / ((lo + hi) / 2), 4)


def tune(logits: dict[str, torch.Tensor], targets: torch.Tensor, heads: list[str], prior: torch.Tensor,
         num_classes: int, combine: Callable = mean_of_heads) -> dict:
    """The tuned parameters from the tuning images' logits (fp16 or fp32, on the CPU).

    ``tau`` (of ``avg_la_tuned`` / ``<head>_la_tuned``) and ``w`` (of ``weighted``) on their grids
    by mean per-class accuracy (the first best on a tie); each head's ``T`` by per-class-weighted
    NLL. A student's ``avg`` is recomputed from cls and dist with ``combine``.
    """
    targets = targets.long()
    support = torch.bincount(targets, minlength=num_classes).double()
    weights = 1.0 / support[targets]
    student = {"cls", "dist"} <= set(logits)

    def combined(s):
        if student:
            return combine({h: logits[h][s].float() for h in ("cls", "dist")})
        return logits[heads[-1]][s].float()

    def best(grid, make):
        scores = [balanced_accuracy(make(v), targets, num_classes) for v in grid]
        return grid[max(range(len(grid)), key=lambda i: (scores[i], -i))]

    params = {"tau": best(TAU_GRID, lambda tau: lambda s: combined(s) - tau * prior)}
    if student:
        params["w"] = best(WEIGHT_GRID, lambda w: lambda s: (w * logits["cls"][s].float()
                                                               + (1 - w) * logits["dist"][s].float()))
        params["T"] = {h: fit_temperature(logits[h], targets, weights) for h in ("cls", "dist")}
    else:
        params["T"] = {heads[-1]: fit_temperature(logits[heads[-1]], targets, weights)}
    return params


# ----------------------------------------------------------------------------- calibration and priors


def ece_nll(bins: dict) -> dict:
    """ECE (%) and mean NLL from the streamed per-bin sums (``EvalCounts`` calibration)."""
    count, conf, correct = bins["count"], bins["confidence"], bins["correct"]
    n = float(count.sum())
    if n == 0:
        return {"ece": None, "nll": None}
    ece = float((conf - correct).abs().sum()) / n  # sum_b n_b/N |acc_b - conf_b|
    return {"ece": 100.0 * ece, "nll": float(bins["nll"]) / n}


def reliability(bins: dict) -> dict:
    """Per-bin image count, mean confidence and accuracy (%) for the reliability diagram."""
    count = bins["count"].double()
    safe = count.clamp_min(1)
    return {"count": count.long().tolist(), "confidence": (100.0 * bins["confidence"] / safe).tolist(),
            "accuracy": (100.0 * bins["correct"] / safe).tolist()}


def prior_names() -> list[str]:
    return ([f"forward_{r}" for r in PRIOR_RATIOS] + ["uniform"]
            + [f"backward_{r}" for r in reversed(PRIOR_RATIOS)])


def test_prior_accuracies(per_class: list, order: list[int]) -> dict:
    """Accuracy (%) under each long-tailed test prior from the per-class accuracies (classes
    without test images are left out and the prior renormalised over the rest)."""
    num_classes = len(order)
    position = torch.empty(num_classes, dtype=torch.float64)
    position[torch.tensor(order)] = torch.arange(num_classes, dtype=torch.float64)
    frac = position / max(1, num_classes - 1)
    acc = torch.tensor([a if a is not None else 0.0 for a in per_class], dtype=torch.float64)
    present = torch.tensor([a is not None for a in per_class])
    out = {}
    for name in prior_names():
        if name == "uniform":
            weight = torch.ones(num_classes, dtype=torch.float64)
        else:
            direction, ratio = name.split("_")
            weight = float(ratio) ** -(frac if direction == "forward" else 1 - frac)
        weight = weight * present
        out[name] = float((weight * acc).sum() / weight.sum()) if weight.sum() > 0 else None
    return out
