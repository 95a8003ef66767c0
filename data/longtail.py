"""Long-tailed subsetting, CIFAR source-order restoration and the frequency-sorted class map.

Everything here works on label vectors (numpy arrays of ints), never on images, so it is
cheap to test against the reference's outputs (``../shared/parity/longtail_subsets.json``).

- ``get_img_num_per_cls`` / ``longtail_indices``: the reference's ``IMBALANCECIFAR10``
  subset, number for number (docs/recipe.md section 5).
- ``resolve_source_order``: the CIFAR-10 hub copy stores the train rows in another order than
  the original pickles, and the subset depends on the row order within each class; this finds
  (and where possible undoes) that permutation (docs/recipe.md section 5).
- ``frequency_class_map``: ImageNet-LT / iNaturalist classes sorted by training count with an
  explicit stable tie-break (the reference's unstable argsort is docs/recipe.md section 5's warning).
- ``holdout_split``: an optional per-class validation split carved out of the LT training set
  (docs/recipe.md section 6: the reference selects its best checkpoint on the test set).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from errors import DataError

# First ten labels of the original training pickles (CIFAR-10 data_batch_1, CIFAR-100 train).
CIFAR10_FIRST_TEN = (6, 9, 9, 4, 1, 1, 2, 7, 8, 3)
CIFAR100_FIRST_TEN = (19, 29, 0, 11, 1, 86, 90, 28, 23, 31)
# Hub copy uoft-cs/cifar10: its 10,000-row block k probably holds original data_batch_{b}
# for b = HUB_CIFAR10_BATCHES[k] (docs/recipe.md section 5). Only the position of batch 1 can be
# verified from labels (its first ten labels are known); the others follow the same guess.
HUB_CIFAR10_BATCHES = (4, 3, 2, 5, 1)


def get_img_num_per_cls(n_max: float, num_classes: int, imb_type: str, imb_factor: float) -> list[int]:
    """Images kept per class, as the reference's ``IMBALANCECIFAR10.get_img_num_per_cls``.

    ``exp``: ``int(n_max * imb_factor ** (i / (C - 1)))`` for class i; ``step``: the first
    ``C // 2`` classes keep ``n_max``, the rest ``int(n_max * imb_factor)``.
    """
    if not 0.0 < imb_factor <= 1.0:
        raise DataError(f"imb_factor must be in (0, 1] (n_min / n_max), got {imb_factor}")
    if imb_type == "exp":
        if num_classes == 1:
            return [int(n_max)]
        return [int(n_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if imb_type == "step":
        half = num_classes // 2
        return [int(n_max)] * half + [int(n_max * imb_factor)] * (num_classes - half)
    raise DataError(f"imb_type must be 'exp' or 'step', got {imb_type!r}")


def longtail_indices(labels: Sequence[int], num_classes: int, imb_type: str, imb_factor: float,
                     seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Rows of ``labels`` that the reference keeps, stacked class by class; and the counts.

    The reference calls ``np.random.seed(seed)`` once, then for each class in order takes
    ``np.where(labels == c)[0]``, ``np.random.shuffle``s it and keeps the first n_c. A private
    ``RandomState(seed)`` draws the same numbers (the global functions are a RandomState)
    without touching the caller's global numpy state. ``n_max`` is ``len(labels) / C`` as in
    the reference (the class size for a balanced source). A class with fewer images than n_c
    keeps all it has; the returned counts are the numbers actually kept.
    """
    labels = np.asarray(labels)
    n_max = len(labels) / num_classes
    wanted = get_img_num_per_cls(n_max, num_classes, imb_type, imb_factor)
    rng = np.random.RandomState(seed)
    picked, counts = [], []
    for c, n_c in enumerate(wanted):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        picked.append(idx[:n_c])
        counts.append(int(min(n_c, len(idx))))
    return np.concatenate(picked).astype(np.int64), counts


def hub_to_original_order(num_rows: int = 50000) -> np.ndarray:
    """``perm`` with ``original_row[j] = hub_row[perm[j]]`` for the hub copy's batch order."""
    block = num_rows // len(HUB_CIFAR10_BATCHES)
    return np.concatenate([np.arange(block) + HUB_CIFAR10_BATCHES.index(b) * block
                           for b in range(1, len(HUB_CIFAR10_BATCHES) + 1)]).astype(np.int64)


def resolve_source_order(labels: Sequence[int], dataset: str, mode: str) -> tuple[np.ndarray | None, str]:
    """Decide in which row order the CIFAR subset is drawn; return ``(perm or None, note)``.

    ``perm`` maps positions in the original pickle order to source rows (None: use the rows
    as they are). ``mode``: ``as_is`` never reorders; ``auto`` keeps a source whose first ten
    labels match the original pickles, restores the hub's CIFAR-10 block order (4, 3, 2, 5, 1),
    accepts a class-grouped copy (only the within-class order matters, docs/recipe.md section 5) and
    otherwise warns that the subset will differ from the reference; ``original`` does the
    same but raises instead of warning. The note says which case applied.
    """
    if mode not in ("auto", "original", "as_is"):
        raise DataError(f"source_order must be 'auto', 'original' or 'as_is', got {mode!r}")
    if mode == "as_is":
        return None, "source order: rows used as they are (data.source_order=as_is)"
    labels = np.asarray(labels)
    signature = {"cifar10_lt": CIFAR10_FIRST_TEN, "cifar100_lt": CIFAR100_FIRST_TEN}.get(dataset)
    if signature is None:
        return None, f"source order: rows used as they are ({dataset} has no reference order)"
    if tuple(labels[:10].tolist()) == signature:
        return None, "source order: original pickle order (first ten train labels match)"
    if dataset == "cifar10_lt" and len(labels) == 50000:
        perm = hub_to_original_order(len(labels))
        if tuple(labels[perm[:10]].tolist()) == signature:
            return perm, ("source order: hub block order (original batches 4, 3, 2, 5, 1) "
                          "restored to the original pickle order before subsetting")
    if len(labels) > 0 and bool(np.all(np.diff(labels) >= 0)):
        return None, ("source order: rows grouped by class; the within-class order is taken as "
                      "the original's (the reference's subset is then the same images; not verifiable)")
    problem = (f"the train rows are neither in the original order (first ten labels "
               f"{list(signature)}) nor in a known permutation of it (found "
               f"{labels[:10].tolist()})")
    if mode == "original":
        raise DataError(f"data.source_order=original: {problem}; use source_order=as_is to "
                         f"subset these rows anyway")
    return None, f"WARNING: {problem}: rows used as they are, the subset will differ from the reference's"


def frequency_class_map(counts: Sequence[int]) -> list[int]:
    """``class_map[original] = project index``, classes sorted by count, most frequent first.

    Ties are broken by the original label, ascending (a stable sort), so the map is the same
    on every numpy version and CPU; the reference used numpy's default unstable argsort.
    """
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")  # order[i] = original label of project class i
    class_map = np.empty(len(counts), dtype=np.int64)
    class_map[order] = np.arange(len(counts))
    return class_map.tolist()


def holdout_split(targets: Sequence[int], num_classes: int, fraction: float,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into ``targets``) kept for training and held out, per class.

    Each class holds out ``round(fraction * n_c)`` images, but always keeps at least one for
    training. A separate generator from the subset's, so the LT subset itself is unchanged.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"val_holdout must be in [0, 1), got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in range(num_classes):
        idx = np.where(targets == c)[0]
        rng.shuffle(idx)
        n_hold = min(int(round(fraction * len(idx))), max(len(idx) - 1, 0))
        held.append(idx[:n_hold])
        keep.append(idx[n_hold:])
    return np.sort(np.concatenate(keep)).astype(np.int64), np.sort(np.concatenate(held)).astype(np.int64)
