"""LDAM loss (Cao et al., NeurIPS 2019), the CIFAR/ImageNet-LT teacher loss (docs/recipe.md section 4).

Label-distribution-aware margin: the true-class logit is lowered by ``m_c ~ n_c^(-1/4)``
(scaled so the largest margin is ``max_m``), logits are multiplied by ``s``, then cross-entropy
with an optional per-class ``weight`` that DRW sets from its epoch on (``losses/drw.py``).
Same arithmetic as LDAM-DRW's ``LDAMLoss``; the loss is computed in float32.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def ldam_margins(cls_num_list: Sequence[int], max_m: float = 0.5) -> torch.Tensor:
    """Per-class margins n_c^(-1/4), scaled so that the largest equals ``max_m``."""
    m = 1.0 / np.sqrt(np.sqrt(np.asarray(cls_num_list, dtype=np.float64)))
    return torch.tensor(m * (max_m / m.max()), dtype=torch.float32)


class LDAMLoss(nn.Module):
    """``CE(s * (logits - m_y * onehot(y)), y, weight)``; ``weight`` may be reassigned (DRW)."""

    def __init__(self, cls_num_list: Sequence[int], max_m: float = 0.5, s: float = 30.0,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if s <= 0 or max_m < 0:
            raise ValueError(f"LDAM needs s > 0 and max_m >= 0, got s={s}, max_m={max_m}")
        self.register_buffer("m_list", ldam_margins(cls_num_list, max_m), persistent=False)
        self.s = s
        self.weight = weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        margins = self.m_list.to(logits.device)[target]  # m_y for every sample
        # Subtract the margin from the true-class logit only.
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        adjusted = logits - margins[:, None] * onehot
        weight = None if self.weight is None else self.weight.to(logits.device, torch.float32)
        return F.cross_entropy(self.s * adjusted, target, weight=weight)
