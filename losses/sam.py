"""Sharpness-aware minimisation (Foret et al., ICLR 2021) for the "flat" teachers (docs/recipe.md section 4).

DeiT-LT trains its teachers with SAM: a flat teacher gives low-rank, generalisable DIST
features (paper, section 4). Two forward/backward passes per step:

1. ``first_step``: ``e(w) = rho * g / ||g||_2`` with the global gradient norm over all
   parameters; ``w <- w + e(w)``. ASAM (``adaptive=True``, Kwon et al. 2021) scales by |w|:
   ``e(w) = rho * |w|^2 g / || |w| g ||_2``.
2. ``second_step``: restore ``w`` and take the base optimizer's step (SGD with momentum in the
   recipe) with the gradient computed at ``w + e(w)``.

``rho`` and ``adaptive`` live in every param group, so a per-epoch schedule can set
``group['rho']`` (``rho_for_epoch``); ``state_dict``/``load_state_dict`` carry the base
optimizer's state (momentum buffers) so a resume is exact.

Distributed and accumulation notes:

* Under DDP (accelerate), both backward passes all-reduce the gradient, so the perturbation
  is built from the global (all-rank mean) gradient and every rank perturbs identically;
  the replicas stay in sync without extra communication.
* With gradient accumulation, call ``first_step`` only at the synchronisation step, after the
  accumulated gradient of the whole effective batch is complete; the second pass then runs
  on the same micro-batches at the perturbed point before ``second_step``.
* BatchNorm: use ``disable_running_stats`` around the second (perturbed) pass so the running
  statistics are updated only by the first pass, on the real weights.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class SAM(torch.optim.Optimizer):
    """SAM around any base optimizer: ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)``."""

    def __init__(self, params: Iterable, base_optimizer_cls: type[torch.optim.Optimizer],
                 rho: float = 0.05, adaptive: bool = False, **base_kwargs) -> None:
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        defaults = dict(rho=rho, adaptive=adaptive, **base_kwargs)
        super().__init__(params, defaults)
        # One set of param groups, shared with the base optimizer: an lr scheduler that edits
        # SAM's groups edits the base optimizer's, and rho/adaptive sit beside lr.
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._backup: dict[torch.Tensor, torch.Tensor] = {}  # w before the perturbation

    def _with_grads(self, group: dict) -> list[torch.Tensor]:
        return [p for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = []
        for group in self.param_groups:
            params = self._with_grads(group)
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["adaptive"]:
                grads = torch._foreach_mul(grads, torch._foreach_abs(params))
            norms += [n.to(torch.float32) for n in torch._foreach_norm(grads, 2)]
        if not norms:
            raise RuntimeError("SAM.first_step: no parameter has a gradient")
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, skip_non_finite: bool = False) -> bool:
        """Move to the worst point nearby: ``w += rho * g / (||g|| + 1e-12)`` (ASAM-scaled if adaptive).

        The direction ``g / ||g||`` does not depend on a loss scale, so under fp16 loss scaling
        the (still scaled) gradients can be used as they are. ``skip_non_finite=True`` (fp16:
        an overflowed scaled gradient) checks the norm first, one host sync: when it is not
        finite nothing moves and False is returned, and the caller skips the update as a
        GradScaler does. Returns True when the weights were perturbed.
        """
        grad_norm = self._grad_norm()
        if skip_non_finite and not bool(torch.isfinite(grad_norm)):
            if zero_grad:
                self.zero_grad()
            return False
        # torch._foreach_* ops: a few kernel launches for all tensors instead of several per
        # tensor, with the arithmetic of the per-tensor form (bit-identical on a CPU).
        self._backup = {}
        for group in self.param_groups:
            params = self._with_grads(group)
            if not params:
                continue
            backup = [torch.empty_like(p) for p in params]
            torch._foreach_copy_(backup, params)
            self._backup.update(zip(params, backup))
            scale = group["rho"] / (grad_norm + 1e-12)
            grads = [p.grad for p in params]
            for (device, dtype), idx in _by_device_and_dtype(params).items():
                e_w = [grads[i] for i in idx]
                if group["adaptive"]:  # |w|^2 * g * scale, in that order
                    e_w = torch._foreach_mul(torch._foreach_mul([params[i] for i in idx],
                                                                [params[i] for i in idx]), e_w)
                e_w = torch._foreach_mul(e_w, scale.to(device, dtype))
                torch._foreach_add_([params[i] for i in idx], e_w)
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights ``first_step`` perturbed (the gradients stay)."""
        if not self._backup:
            raise RuntimeError("SAM.restore called without a preceding first_step")
        torch._foreach_copy_(list(self._backup), list(self._backup.values()))
        self._backup = {}

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and step the base optimizer with the gradient taken at ``w + e(w)``."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Closure form: ``closure()`` computes the loss and calls ``backward()``; runs it at
        ``w`` and at ``w + e(w)`` (gradients cleared before each), returns the loss at ``w``.

        Without a closure: the base optimizer's step with the current gradients, for a loop
        that ran ``first_step``, the perturbed pass and ``restore`` itself. This is the form a
        GradScaler (``scaler.step(optimizer)``, accelerate's optimizer wrapper) calls: it
        unscales the perturbed pass's gradients, skips the step when they overflowed, and
        updates the scale.
        """
        if closure is None:
            if self._backup:
                raise RuntimeError("SAM.step() without a closure: call restore() after the "
                                   "perturbed pass first")
            self.base_optimizer.step()
            return None
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def state_dict(self) -> dict:
        # The base optimizer holds the momentum buffers; the param groups (shared) hold
        # lr, rho and adaptive. The perturbation backup is transient and never saved.
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # torch replaces the base optimizer's param_groups list on load: share it again.
        self.param_groups = self.base_optimizer.param_groups


def _by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype): the scale is cast once per group."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def rho_for_epoch(schedule: Sequence[Sequence[float]], epoch: int) -> float:
    """Piecewise-constant rho: the last ``[start_epoch, rho]`` pair with start <= epoch.

    ImageNet-LT/iNat recipe (docs/recipe.md section 4, epochs 0-based): ``[[0, 0.05], [5, 0.1], [60, 0.5]]``.
    """
    pairs = sorted((int(start), float(rho)) for start, rho in schedule)
    if not pairs or pairs[0][0] > epoch:
        raise ValueError(f"rho schedule {list(schedule)} does not cover epoch {epoch}")
    return [rho for start, rho in pairs if start <= epoch][-1]


def disable_running_stats(model: nn.Module) -> None:
    """Freeze BatchNorm running statistics for SAM's second (perturbed) forward pass.

    BN statistics are updated only in the first forward pass, on the real weights; in the
    second pass, at ``w + e(w)``, momentum 0 leaves them unchanged, so the running stats
    describe the weights that are actually kept. Batch statistics are still used for the
    forward itself (training mode), as in the first pass.
    """
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not hasattr(module, "_sam_momentum"):
            module._sam_momentum = module.momentum
            module.momentum = 0.0


def enable_running_stats(model: nn.Module) -> None:
    """Undo ``disable_running_stats``: restore each BatchNorm's momentum."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and hasattr(module, "_sam_momentum"):
            module.momentum = module._sam_momentum
            del module._sam_momentum
