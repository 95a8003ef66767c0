"""Exponential moving average of the student's weights, the same on every process.

``ModelEma`` keeps one tensor per entry of the model's ``state_dict``, shaped like the
model's own: full tensors under DDP, the local shards (DTensors) under FSDP2
(``fully_shard``), so the update is elementwise on every process, without communication,
and the EMA stays sharded alongside the weights. It is built from the prepared model, whose
weights every process shares (DDP broadcasts them), so every process holds the same EMA.

Cadence (``train.model_ema_cadence``): the reference calls timm's ``ModelEma.update`` after
every micro-batch, 4 per optimiser step with accumulation 4, while the weights only change at
the step: that is the same as one update per step with decay ``decay ** micro_batches``,
which ``update(model, micro_batches)`` does ('micro_batch', the reference). 'step': one update
with ``decay`` per optimiser step (timm's training script).

Saved with the resume state as safetensors (one file per process: its shards), never
pickled: reading a run folder back runs no code. ``full_state_dict()`` gathers DTensor shards
(a collective) for the portable checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class ModelEma:
    """``ema = decay * ema + (1 - decay) * w`` for floating-point entries (timm's formula);
    integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        with torch.no_grad():
            self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, micro_batches: int = 1) -> None:
        decay = self.decay ** micro_batches
        floats, weights, ints, values = [], [], [], []
        for key, value in model.state_dict().items():
            ema = self.shadow[key]
            if ema.is_floating_point():
                floats.append(ema)
                weights.append(value.detach())
            else:
                ints.append(ema)
                values.append(value)
        # torch._foreach_*: a few kernel launches for the whole model instead of two per
        # tensor (the same arithmetic, bit-identical on a CPU).
        if floats:
            torch._foreach_mul_(floats, decay)
            torch._foreach_add_(floats, weights, alpha=1.0 - decay)
        if ints:
            torch._foreach_copy_(ints, values)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors (DTensor shards gathered: every process must call this)."""
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
                for k, v in self.shadow.items()}

    def model(self, build) -> nn.Module:
        """A plain module with the EMA weights, for evaluation: ``build()`` makes an
        unwrapped, unsharded student of the same architecture."""
        module = build()
        module.load_state_dict(self.full_state_dict(), strict=True)
        return module

    # ------------------------------------------------------------- resume state (safetensors)

    def save(self, folder: Path, rank: int) -> None:
        from safetensors.torch import save_file

        save_file({k: _local(v).contiguous().cpu() for k, v in self.shadow.items()},
                  str(Path(folder) / f"model_ema_{rank}.safetensors"))

    @torch.no_grad()
    def load(self, folder: Path, rank: int) -> None:
        from safetensors.torch import load_file

        path = Path(folder) / f"model_ema_{rank}.safetensors"
        saved = load_file(str(path))
        if set(saved) != set(self.shadow):
            raise KeyError(f"{path}: EMA keys differ from the model's")
        for key, ema in self.shadow.items():
            _local(ema).copy_(saved[key])
