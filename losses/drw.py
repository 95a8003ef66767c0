"""Deferred re-weighting (DRW) with effective-number class weights (Cui et al. 2019).

``w_c = (1 - beta) / (1 - beta^n_c)``, normalised to sum to the number of classes, computed
in float64 like the reference (LDAM-DRW and DeiT-LT ``main.py``) and returned as float32.
DeiT-LT applies them to the distillation CE from the DRW epoch on, indexed by the teacher's
predicted class (docs/recipe.md section 2); LDAM-DRW applies them to the teacher's LDAM loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def class_balanced_weights(cls_num_list: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Effective-number weights (float32, sum = number of classes)."""
    counts = np.asarray([int(n) for n in cls_num_list], dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or (counts < 1).any():
        raise ValueError(f"cls_num_list must be positive per-class counts, got {list(cls_num_list)}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
    weights = weights / weights.sum() * len(counts)
    return torch.tensor(weights, dtype=torch.float32)


def drw_active(epoch: int, drw_epoch: int | None) -> bool:
    """The DRW rule of both training scripts (their loops and ``--print-schedule``): on from
    ``drw_epoch`` (0-based, as the reference's ``epoch >= args.drw``); ``None`` never."""
    return drw_epoch is not None and epoch >= drw_epoch


def drw_weights(cls_num_list: Sequence[int], epoch: int, drw_epoch: int | None,
                beta: float = 0.9999) -> torch.Tensor | None:
    """None (no re-weighting) while ``drw_active`` is false, effective-number weights after."""
    if not drw_active(epoch, drw_epoch):
        return None
    return class_balanced_weights(cls_num_list, beta)
