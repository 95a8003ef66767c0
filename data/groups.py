"""Head / mid / tail class groups for the per-group accuracies (docs/recipe.md sections 5 and 6).

The reference defines the groups as class-index ranges on frequency-sorted classes (head =
[0, c0), mid = [c0, c1), tail = [c1, C)); the literature's count rule (many-shot > 100,
few-shot < 20 training images) gives other splits. Both are offered; ``reference`` is the
default so the reported numbers compare with the paper's.

For a user's own data the numbers of each rule are config keys: ``data.group_boundaries``
``[c0, c1]`` replaces the benchmark's reference ranges (``data.groups=reference``; a ``generic``
dataset has none, so without it the count rule is used), ``data.group_thresholds``
``[many, few]`` replaces 100 / 20 (the count rule, i.e. ``data.groups=count`` or ``generic``
without boundaries). A key that the chosen rule would not use is an error, never ignored.
``group_rule`` describes in words the rule actually used.
"""
from __future__ import annotations

from typing import Sequence

from errors import ConfigError
from .benchmarks import benchmark

MANY_SHOT, FEW_SHOT = 100, 20


def is_int(value) -> bool:
    """A whole number as a config value: an int, and not a bool (True is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _int_pair(value, key: str, meaning: str) -> tuple[int, int]:
    """``value`` as two integers, or a ConfigError naming ``key`` and what it must be."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(is_int(v) for v in value)):
        raise ConfigError(f"{key}: must be {meaning}, got {value!r}")
    return value[0], value[1]


def check_group_config(rule: str, thresholds=None, boundaries=None, dataset_name: str | None = None,
                       num_classes: int | None = None) -> None:
    """Raise ConfigError naming the key for bad ``data.groups`` / ``data.group_thresholds`` /
    ``data.group_boundaries`` values, or for a key the rule would not use. ``num_classes``
    (known once the data are loaded) also bounds the boundaries by C."""
    if rule not in ("reference", "count"):
        raise ConfigError(f"data.groups: must be 'reference' or 'count', got {rule!r}")
    if thresholds is not None:
        many, few = _int_pair(thresholds, "data.group_thresholds", "two integer counts [many, few] "
                              "(head: more than many training images, tail: fewer than few)")
        if not 0 <= few <= many:
            raise ConfigError(f"data.group_thresholds: [many, few] needs 0 <= few <= many, got "
                              f"[{many}, {few}]")
    if boundaries is not None:
        c0, c1 = _int_pair(boundaries, "data.group_boundaries", "two class indices [c0, c1] on the "
                           "frequency-sorted classes (head [0, c0), mid [c0, c1), tail [c1, C))")
        upper = "C" if num_classes is None else str(num_classes)
        if not (0 <= c0 <= c1 and (num_classes is None or c1 <= num_classes)):
            raise ConfigError(f"data.group_boundaries: [c0, c1] needs 0 <= c0 <= c1 <= {upper} "
                              f"(the number of classes), got [{c0}, {c1}]")
    if rule == "count" and boundaries is not None:
        raise ConfigError("data.group_boundaries: class-index ranges are the reference rule; set "
                          "data.groups=reference to use them, or remove the key")
    if thresholds is not None and rule == "reference" and (boundaries is not None
                                                           or benchmark(dataset_name).group_ranges):
        ranges = "data.group_boundaries" if boundaries is not None else f"the {dataset_name} reference ranges"
        raise ConfigError(f"data.group_thresholds: numbers of the count rule, but data.groups=reference "
                          f"uses class-index ranges here ({ranges}); set data.groups=count to use "
                          f"them, or remove the key")


def _resolve(dataset_name: str, num_classes: int, rule: str, thresholds, boundaries) -> tuple:
    """('ranges', c0, c1, description) or ('count', many, few, description)."""
    check_group_config(rule, thresholds, boundaries, dataset_name, num_classes)
    if rule == "reference" and boundaries is not None:
        c0, c1 = boundaries
        return "ranges", c0, c1, f"ranges [{c0}, {c1}) from data.group_boundaries"
    ref = benchmark(dataset_name).group_ranges  # (c0, c1) of a named benchmark, read from the reference
    if rule == "reference" and ref is not None:
        c0, c1 = (min(c, num_classes) for c in ref)
        clipped = f", clipped from [{ref[0]}, {ref[1]}) to {num_classes} classes" if (c0, c1) != ref else ""
        return "ranges", c0, c1, f"reference ranges [{c0}, {c1}){clipped}"
    many, few = thresholds if thresholds is not None else (MANY_SHOT, FEW_SHOT)
    notes = []
    if thresholds is not None:
        notes.append("data.group_thresholds")
    if rule == "reference":
        notes.append(f"{dataset_name} has no reference ranges")
    return "count", many, few, f"count (many > {many}, few < {few}{''.join('; ' + n for n in notes)})"


def group_rule(dataset_name: str, num_classes: int, rule: str = "reference", thresholds=None,
               boundaries=None) -> str:
    """The rule ``class_groups`` applies, in words: ``'reference ranges [3, 7)'``, ``'ranges
    [2, 5) from data.group_boundaries'``, ``'count (many > 100, few < 20)'``..."""
    return _resolve(dataset_name, num_classes, rule, thresholds, boundaries)[3]


def class_groups(dataset_name: str, train_counts: Sequence[int], rule: str = "reference",
                 thresholds: Sequence[int] | None = None,
                 boundaries: Sequence[int] | None = None) -> dict[str, list[int]]:
    """``{'head', 'mid', 'tail'} -> sorted class indices`` (project order).

    ``reference``: the benchmark's index ranges, or ``boundaries`` ``[c0, c1]`` (head [0, c0),
    mid [c0, c1), tail [c1, C)). The benchmark's ranges assume its class count; on a smaller
    dataset (tests) they are clipped to the classes there are; given boundaries are not
    clipped (beyond C is an error). ``generic`` has no reference ranges: without boundaries
    it falls back to the count rule.
    ``count``: head = more than ``many`` training images, tail = fewer than ``few``, mid = the
    rest; ``thresholds`` ``[many, few]``, default 100 / 20.
    Raises ConfigError naming the key for bad or unused values (``check_group_config``).
    """
    num_classes = len(train_counts)
    kind, a, b, _ = _resolve(dataset_name, num_classes, rule, thresholds, boundaries)
    if kind == "ranges":
        return {"head": list(range(0, a)), "mid": list(range(a, b)), "tail": list(range(b, num_classes))}
    groups = {"head": [], "mid": [], "tail": []}
    for c, n in enumerate(train_counts):
        groups["head" if n > a else "tail" if n < b else "mid"].append(c)
    return groups


def count_rule_groups(train_counts: Sequence[int], thresholds: Sequence[int] | None = None) -> dict[str, list[int]]:
    """The field's many / medium / few-shot classes (more than ``many``, ``few`` to ``many``,
    fewer than ``few`` training images; default 100 / 20), reported beside the reference's
    index ranges so results compare with both (ImageNet-LT, iNat: the literature's table)."""
    groups = class_groups("generic", train_counts, "count", thresholds)
    return {"many": groups["head"], "medium": groups["mid"], "few": groups["tail"]}
