"""PaCo loss (Parametric Contrastive Learning, Cui et al., ICCV 2021, Eq. 9 with logit adjustment).

For each query i of the batch (the anchors; keys and the queue are contrast samples only) the
loss is a weighted supervised-contrastive log-likelihood over one softmax whose "classes" are

* the C learnable class centres: logits ``z_i,c = linear(f_i)_c + log(n_c / N)`` (the
  supervised logits with the log class prior added, PaCo's logit adjustment for long-tailed
  data; they are *not* divided by the temperature), and
* the 2B + K - 1 other samples: logits ``q_i . x_j / T`` (queries, keys, queue; self excluded).

With positives P(i) = {j != i : y_j = y_i} among the samples and ``l_ij`` the log-softmax::

    loss_i = -(T / T_base) * (beta * l_i,y_i + alpha * sum_{j in P(i)} l_ij) / (beta + alpha |P(i)|)

where the softmax denominator is ``sum_c exp(z_i,c) + gamma * sum_{j != i} exp(q_i . x_j / T)``.
The loss is the mean over the B queries. Matches the published ``PaCoLoss`` (supt = 1, no label
smoothing), computed with a log-sum-exp instead of max-subtraction plus ``log(sum + 1e-12)``.

Hyper-parameters (docs/recipe.md section 4 / the published scripts):

* ``alpha``: weight of each same-class sample as a positive. Small, so the class centre keeps
  most of the pull (0.01 CIFAR-LT, 0.05 ImageNet-LT / iNat).
* ``beta``: weight of the sample's own class centre as a positive (1.0).
* ``gamma``: weight of the sample terms in the denominator; 0 turns the softmax into plain
  (logit-adjusted) cross-entropy over the centres, 1 is PaCo (1.0).
* ``temperature`` T: scale of the contrast logits (0.05 CIFAR-LT, 0.2 ImageNet-LT / iNat).
* ``base_temperature``: the loss is multiplied by T / base_temperature (default T, i.e. 1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PaCoLoss"]


class PaCoLoss(nn.Module):
    """PaCo's loss on ``PaCoModel``'s training outputs ``(features, labels, sup_logits)``.

    Args:
        alpha: weight of same-class samples (queries, keys, queue) as positives.
        beta: weight of the class centre of the anchor's label as a positive.
        gamma: weight of the sample terms in the softmax denominator.
        temperature: T for the sample-sample logits ``q . x / T``.
        base_temperature: the loss is scaled by ``T / base_temperature``; default T.
        K: queue length (the features hold 2B + K rows; B is read from ``sup_logits``).
        num_classes: C.
        cls_num_list: training images per class; adds ``log(n_c / N)`` to the supervised
            logits (PaCo always sets it on long-tailed data). ``None``: no prior (balanced data).
    """

    def __init__(self, alpha: float, beta: float = 1.0, gamma: float = 1.0,
                 temperature: float = 0.2, base_temperature: Optional[float] = None,
                 K: int = 8192, num_classes: int = 1000,
                 cls_num_list: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.temperature = float(temperature)
        self.base_temperature = float(temperature if base_temperature is None else base_temperature)
        self.K, self.num_classes = int(K), int(num_classes)
        if cls_num_list is not None:
            counts = torch.as_tensor(list(cls_num_list), dtype=torch.float64)
            if counts.numel() != self.num_classes:
                raise ValueError(f"cls_num_list has {counts.numel()} entries, num_classes is {num_classes}")
            # + 1e-9 as published: a class with no training image gets a large negative
            # prior instead of -inf.
            log_prior = torch.log(counts / counts.sum() + 1e-9).float()
            self.register_buffer("log_prior", log_prior, persistent=False)
        else:
            self.log_prior = None

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                sup_logits: torch.Tensor) -> torch.Tensor:
        """features (2B + K, dim) normalised [q; k; queue]; labels (2B + K,); sup_logits (B, C)."""
        B = sup_logits.shape[0]
        if features.shape[0] != 2 * B + self.K or labels.shape[0] != features.shape[0]:
            raise ValueError(f"expected {2 * B + self.K} features and labels for batch {B} and "
                             f"K={self.K}, got {features.shape[0]} and {labels.shape[0]}")
        # float32 regardless of autocast: 1/T-scaled logits go through exp/log.
        features = features.float()
        sup_logits = sup_logits.float()
        labels = labels.view(-1)
        device = features.device

        contrast = features[:B] @ features.T / self.temperature          # (B, 2B + K)
        if self.log_prior is not None:
            sup_logits = sup_logits + self.log_prior.to(device)
        logits = torch.cat((sup_logits, contrast), dim=1)                 # (B, C + 2B + K)

        # ~eye: no Python scalar written into a device tensor (a host-to-device copy).
        not_self = ~torch.eye(B, contrast.shape[1], dtype=torch.bool, device=device)
        same = (labels[:B, None] == labels[None, :]) & not_self          # sample positives
        one_hot = F.one_hot(labels[:B], self.num_classes).to(logits.dtype)
        pos_weight = torch.cat((self.beta * one_hot, self.alpha * same.to(logits.dtype)), dim=1)

        # Denominator weights: 1 on centres, gamma on samples, 0 on self (log 0 = -inf drops
        # a term from the log-sum-exp exactly).
        den_weight = torch.cat((torch.ones_like(sup_logits), self.gamma * not_self.to(logits.dtype)), dim=1)
        log_den = torch.logsumexp(logits + den_weight.log(), dim=1, keepdim=True)
        log_prob = logits - log_den

        # log_prob is finite everywhere (the self logit is masked from the denominator only),
        # so zero weights contribute exactly 0. An anchor with no positive at all (possible
        # only with beta = 0) contributes 0 instead of the published 0 / 0 = NaN.
        mean_log_prob_pos = (pos_weight * log_prob).sum(1) / pos_weight.sum(1).clamp_min(1e-12)
        loss = -(self.temperature / self.base_temperature) * mean_log_prob_pos
        return loss.mean()

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
                f"temperature={self.temperature}, base_temperature={self.base_temperature}, "
                f"K={self.K}, num_classes={self.num_classes}, prior={self.log_prior is not None}")
