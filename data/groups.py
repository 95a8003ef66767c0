"""Head / mid / tail class groups for the per-group accuracies (docs/recipe.md sections 5 and 6).

The reference defines the groups as class-index ranges on frequency-sorted classes (head =
[0, c0), mid = [c0, c1), tail = [c1, C)); the literature's count rule (many-shot > 100,
few-shot < 20 training images) gives other splits. Both are offered; ``reference`` is the
default so the reported numbers compare with the paper's.
"""
from __future__ import annotations

from typing import Sequence
from errors import DataError

# (c0, c1) per benchmark, read from the reference (docs/recipe.md section 5).
REFERENCE_RANGES = {
    "cifar10_lt": (3, 7),
    "cifar100_lt": (36, 71),
    "imagenet_lt": (390, 835),
    "inat18": (842, 4543),
}
MANY_SHOT, FEW_SHOT = 100, 20


def class_groups(dataset_name: str, train_counts: Sequence[int],
                 rule: str = "reference") -> dict[str, list[int]]:
    """``{'head', 'mid', 'tail'} -> sorted class indices`` (project order).

    ``reference``: the benchmark's index ranges. They assume the benchmark's class count; on a
    smaller dataset (tests) the ranges are clipped to the classes there are. ``generic`` has no
    reference ranges and falls back to the count rule.
    ``count``: head = more than 100 training images, tail = fewer than 20, mid = the rest.
    """
    num_classes = len(train_counts)
    if rule == "reference" and dataset_name in REFERENCE_RANGES:
        c0, c1 = (min(c, num_classes) for c in REFERENCE_RANGES[dataset_name])
        return {"head": list(range(0, c0)), "mid": list(range(c0, c1)), "tail": list(range(c1, num_classes))}
    if rule not in ("reference", "count"):
        raise DataError(f"groups rule must be 'reference' or 'count', got {rule!r}")
    groups = {"head": [], "mid": [], "tail": []}
    for c, n in enumerate(train_counts):
        groups["head" if n > MANY_SHOT else "tail" if n < FEW_SHOT else "mid"].append(c)
    return groups
