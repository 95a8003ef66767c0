"""DeiT-LT's loss: CLS head on the ground truth, DIST head on the teacher (docs/recipe.md sections 1-2).

``loss = (1 - alpha) * base(cls_logits, targets) + alpha * distill(dist_logits, teacher)``,
the reference's ``DistillationLoss`` (DeiT's, extended by DeiT-LT):

* ``hard``: ``CE(dist_logits, argmax teacher(x))``. From the DRW epoch on, ``class_weights``
  (effective-number weights) are indexed by the teacher-predicted class, with PyTorch's
  weighted mean (divide by the sum of the batch's weights), which makes DIST the tail expert.
* ``soft``: DeiT's ``KL(log_softmax(dist/T) || log_softmax(teacher/T))``, summed, times T^2,
  divided by the number of logits. The reference's weighted variant multiplies
  log-probabilities by the weights and renormalises them (not a distribution: a known bug
  of the reference, docs/recipe.md section 7), so weighted soft distillation is refused here.
* ``none``: no teacher; the DIST head learns the ground truth with the base criterion, or a
  class-weighted CE when ``class_weights`` is given (the reference's ``weighted`` case).

The teacher sees the student's own mixed, augmented, normalised batch ("out-of-distribution
distillation"), resized with ``antialias=False`` to its input size, under ``no_grad`` in eval
mode. Optionally (``renormalize``) that batch is re-normalised from the student's mean/std to
the teacher's after the resize (the reference does not: its CIFAR teachers were trained with
CIFAR statistics and are fed ImageNet-normalised batches). Losses are computed in float32
whatever the autocast dtype of the logits. The teacher runs under the training loop's autocast
(the reference) unless ``teacher_fp32``: then it runs in float32 with autocast off, so the hard
targets are argmaxed from fp32 logits (bf16 rounding makes near-ties fall to the lowest, i.e.
the most frequent, class; bench/teacher_precision.py measures how often the targets change).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.student import DistilledStudent

# The student's heads in token order (its head contract): the first learns the labels (base
# criterion), the second the teacher.
CLS_HEAD, DIST_HEAD = sorted(DistilledStudent.HEADS, key=DistilledStudent.HEADS.get)

DISTILLATION_TYPES = ("hard", "soft", "none")


def check_distillation_settings(distillation_type: str, alpha: float, tau: float,
                                error: type[Exception] = ValueError, prefix: str = "distillation ") -> None:
    """Raise ``error`` naming the setting (``prefix`` + name) unless the settings are valid: the
    one definition of the types and ranges, for this loss and ``train_student.validate`` alike."""
    if distillation_type not in DISTILLATION_TYPES:
        raise error(f"{prefix}type: must be one of {DISTILLATION_TYPES}, got {distillation_type!r}")
    if not 0.0 <= alpha <= 1.0:
        raise error(f"{prefix}alpha: must be in [0, 1] ((1 - alpha) base + alpha distill), got {alpha!r}")
    if not tau > 0:
        raise error(f"{prefix}tau: must be > 0 (the logits are divided by it), got {tau!r}")


def check_class_map(class_map: Sequence[int], num_classes: int | None = None) -> list[int]:
    """``class_map[teacher_label] = student_label`` must be a permutation of 0..C-1."""
    class_map = [int(c) for c in class_map]
    if sorted(class_map) != list(range(len(class_map))):
        raise ValueError("class_map must be a permutation of 0..C-1 (class_map[teacher_label] = student_label)")
    if num_classes is not None and len(class_map) != num_classes:
        raise ValueError(f"class_map has {len(class_map)} entries but the teacher has {num_classes} classes")
    return class_map


def distillation_terms(cls_logits: torch.Tensor, dist_logits: torch.Tensor,
                       teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                       base_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       distillation_type: str, alpha: float, tau: float, *,
                       class_weights: torch.Tensor | None = None,
                       class_map: Sequence[int] | torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, (1-alpha) * base, alpha * distillation) for one batch; a pure function.

    ``targets``: mixup soft targets (base criterion ``SoftTargetCrossEntropy``) or hard labels
    (``CrossEntropyLoss``, the no-mixup DRW phase). ``class_weights`` re-weight the DIST term
    only (never the base term, as in the reference's CIFAR recipe). ``class_map`` maps a
    teacher trained on original labels into the student's frequency-sorted label space.
    The settings are not validated here (this runs every step): ``DistillationLoss`` checks
    them once, and ``check_distillation_settings`` / ``check_class_map`` are there for callers.
    """
    cls_logits, dist_logits = cls_logits.float(), dist_logits.float()
    if targets.is_floating_point():
        targets = targets.float()
    weight = None if class_weights is None else class_weights.to(dist_logits.device, torch.float32)

    base = base_criterion(cls_logits, targets)
    if distillation_type == "none":
        if weight is None:
            distill = base_criterion(dist_logits, targets)
        else:
            distill = F.cross_entropy(dist_logits, targets, weight=weight)
    else:
        if teacher_logits is None:
            raise ValueError(f"{distillation_type} distillation needs the teacher's logits")
        teacher_logits = teacher_logits.float()
        if class_map is not None:
            class_map = torch.as_tensor(class_map, device=teacher_logits.device)
        if distillation_type == "hard":
            teacher_labels = teacher_logits.argmax(dim=1)
            if class_map is not None:
                teacher_labels = class_map[teacher_labels]
            distill = F.cross_entropy(dist_logits, teacher_labels, weight=weight)
        else:
            if weight is not None:
                raise ValueError("class-weighted soft distillation is not supported: the reference's "
                                 "variant is a known bug (docs/recipe.md section 7); use hard "
                                 "distillation with DRW")
            if class_map is not None:  # column j of the teacher is student class class_map[j]
                permuted = torch.empty_like(teacher_logits)
                permuted[:, class_map] = teacher_logits
                teacher_logits = permuted
            T = tau
            # DeiT: log_target=True, sum, x T^2, / numel (legacy 'mean' over all logits).
            distill = F.kl_div(F.log_softmax(dist_logits / T, dim=1),
                               F.log_softmax(teacher_logits / T, dim=1),
                               reduction="sum", log_target=True) * (T * T) / dist_logits.numel()
    base_term, distill_term = base * (1 - alpha), distill * alpha
    return base_term + distill_term, base_term, distill_term


RENORM_BUFFERS = ("renorm_from_mean", "renorm_from_std", "renorm_to_mean", "renorm_to_std")


def renormalization_buffers(renormalize: Sequence[Sequence[float]]) -> tuple[torch.Tensor, ...]:
    """``renormalize = (from_mean, from_std, to_mean, to_std)`` as four (1, 3, 1, 1) float32
    tensors, validated: 3 floats each, standard deviations > 0."""
    try:
        parts = [tuple(float(v) for v in part) for part in renormalize]
    except TypeError:
        parts = []
    if len(parts) != 4 or any(len(p) != 3 for p in parts):
        raise ValueError(f"renormalize must be (from_mean, from_std, to_mean, to_std), 3 floats each; "
                         f"got {renormalize!r}")
    if not all(s > 0 for s in parts[1] + parts[3]):
        raise ValueError(f"renormalize: the standard deviations must be > 0, got {renormalize!r}")
    return tuple(torch.tensor(p, dtype=torch.float32).view(1, 3, 1, 1) for p in parts)


class DistillationLoss(nn.Module):
    """The training loss; calls the teacher itself, so the loop knows nothing of distillation.

    ``base_criterion`` is a plain attribute: the script swaps it (SoftTargetCrossEntropy ->
    CrossEntropyLoss) when the no-mixup DRW phase starts. ``class_weights`` are passed per
    call (ones or None before DRW, effective-number weights after).
    """

    def __init__(self, base_criterion: Callable, teacher: nn.Module | None, distillation_type: str,
                 alpha: float, tau: float, *, teacher_input_size: int | Sequence[int] | None = None,
                 class_map: Sequence[int] | None = None,
                 renormalize: Sequence[Sequence[float]] | None = None,
                 teacher_fp32: bool = False) -> None:
        """``teacher_fp32``: run the teacher in float32 with autocast disabled (default: under the
        caller's autocast, the reference). ``renormalize=(from_mean, from_std, to_mean, to_std)`` (3 floats each): the batch the
        teacher sees (after the resize) is ``((x * from_std + from_mean) - to_mean) / to_std``,
        i.e. un-normalised from the student's statistics and normalised with the teacher's.
        None (default): the student's normalised batch as it is (the reference)."""
        super().__init__()
        check_distillation_settings(distillation_type, alpha, tau)
        if distillation_type != "none" and teacher is None:
            raise ValueError(f"{distillation_type} distillation needs a teacher")
        self.base_criterion = base_criterion
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau
        self.teacher_fp32 = teacher_fp32
        if isinstance(teacher_input_size, int):
            teacher_input_size = (teacher_input_size, teacher_input_size)
        self.teacher_input_size = None if teacher_input_size is None else tuple(teacher_input_size)
        # A buffer: moved to the device with the loss, not copied there every step.
        self.register_buffer("class_map", None if class_map is None else
                             torch.tensor(check_class_map(class_map), dtype=torch.long), persistent=False)
        # Constant (1, 3, 1, 1) buffers, moved to the device with the loss once.
        stats = renormalization_buffers(renormalize) if renormalize is not None else (None,) * 4
        for name, value in zip(RENORM_BUFFERS, stats):
            self.register_buffer(name, value, persistent=False)
        self.teacher = teacher
        if teacher is not None:
            # Never trained here: frozen, eval mode (BN running stats, no dropout), and
            # channels-last weights to match the channels-last input below.
            teacher.requires_grad_(False)
            teacher.eval()
            teacher.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # loss.train() must never put the teacher in training mode
        return self

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the student's batch, resized to the teacher's input size."""
        if self.teacher.training:
            self.teacher.eval()
        x = inputs
        if self.teacher_input_size is not None and tuple(x.shape[-2:]) != self.teacher_input_size:
            # docs/recipe.md section 2, 'teacher input': the reference uses F.interpolate, whose
            # antialias=False differs by up to 3.9 (normalised units) from torchvision's
            # Resize default (antialias=True since 0.17) when shrinking 224 -> 32.
            x = F.interpolate(x, size=self.teacher_input_size, mode="bicubic",
                              align_corners=False, antialias=False)
        if self.renorm_from_std is not None:  # one new tensor (x is never modified), then in place
            x = x.mul(self.renorm_from_std).add_(self.renorm_from_mean).sub_(
                self.renorm_to_mean).div_(self.renorm_to_std)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.teacher_fp32:
            # The whole teacher, not only its head: a head in fp32 on bf16 features would still
            # see rounded inputs, and the teacher is a small part of a step's cost.
            with torch.autocast(x.device.type, enabled=False):
                return self.teacher(x.float())
        return self.teacher(x)

    def forward(self, inputs: torch.Tensor, outputs: dict[str, torch.Tensor],
                targets: torch.Tensor, class_weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``outputs``: the student's heads by name (``DistilledStudent.forward``)."""
        teacher_logits = None if self.distillation_type == "none" else self.teacher_logits(inputs)
        loss, base_term, distill_term = distillation_terms(
            outputs[CLS_HEAD], outputs[DIST_HEAD], teacher_logits, targets, self.base_criterion,
            self.distillation_type, self.alpha, self.tau, class_weights=class_weights,
            class_map=self.class_map)
        terms = {"base": base_term, "distill": distill_term}
        if teacher_logits is not None:
            # The largest |teacher logit| of the batch: a diagnostic in log.txt, and the training
            # loop's non-finite check (no extra sync) stops a NaN teacher, whose argmax would
            # otherwise silently make every hard target class 0.
            terms["teacher_logit_max"] = teacher_logits.detach().float().abs().amax()
        return loss, terms
