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

Saved with the resume state as safetensors, never pickled: reading a run folder back runs
no code. One file (``model_ema_0``, written by the main process) when every process holds the
whole EMA (one process, DDP); one per process under FSDP2 (its shards). ``full_state_dict()``
gathers DTensor shards (a collective) for the portable checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from errors import CheckpointError


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

    @property
    def sharded(self) -> bool:
        """Whether each process holds its own shards (FSDP2) rather than the whole EMA."""
        return any(isinstance(v, DTensor) for v in self.shadow.values())

    def file(self, folder: Path, rank: int) -> Path:
        """This process's EMA file in a state folder: its shards' ``model_ema_<rank>`` under
        FSDP2; otherwise the one ``model_ema_0`` that every process reads (the EMA is the same
        on every process, so only the main process writes it)."""
        return Path(folder) / f"model_ema_{rank if self.sharded else 0}.safetensors"

    def save(self, folder: Path, rank: int) -> int:
        """Write this process's EMA file (nothing on ranks > 0 unless sharded); its bytes."""
        from safetensors.torch import save_file

        if rank != 0 and not self.sharded:
            return 0
        path = self.file(folder, rank)
        save_file({k: _local(v).contiguous().cpu() for k, v in self.shadow.items()}, str(path))
        return path.stat().st_size

    @torch.no_grad()
    def load(self, folder: Path, rank: int) -> None:
        """Restore what ``save`` wrote. A file that cannot be read, or whose keys, shapes or
        dtypes differ from the model's (copy_ would broadcast a one-element tensor silently),
        is a CheckpointError naming the file (and the tensor)."""
        from safetensors.torch import load_file

        path = self.file(folder, rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        try:
            saved = load_file(str(path))
        except Exception as e:  # safetensors' own error types: a truncated or foreign file
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        if set(saved) != set(self.shadow):
            raise CheckpointError(f"{path}: EMA keys differ from the model's (e.g. "
                                  f"{sorted(set(saved) ^ set(self.shadow))[:3]})")
        for key, ema in self.shadow.items():
            own = _local(ema)
            if saved[key].shape != own.shape or saved[key].dtype != own.dtype:
                raise CheckpointError(f"{path}: EMA tensor {key} is {saved[key].dtype} "
                                      f"{tuple(saved[key].shape)}, the model's is {own.dtype} "
                                      f"{tuple(own.shape)}")
        for key, ema in self.shadow.items():
            _local(ema).copy_(saved[key])
