"""Run by tests/test_gpu_paths.py under `accelerate launch --multi_gpu --num_processes 2` (gloo):
FSDP2 (torch's fully_shard) with the mixed-precision policy engine/device.py gives accelerate
(bf16 parameters, fp32 gradient reduction), 4 accumulated micro-batches, against a DDP twin that
computes in bf16 too but accumulates and all-reduces in fp32; and the same FSDP2 model with a
bf16 reduction (accelerate's own policy), which differs. Writes a JSON report to argv[1]."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from engine import loop  # noqa: E402
from engine.device import build_accelerator, fsdp_plugin  # noqa: E402

MICRO_BATCHES = 4


class Bf16Linear(nn.Linear):
    """fp32 parameters, bf16 compute: what FSDP2's param_dtype=bf16 does to a Linear."""

    def forward(self, x):
        return F.linear(x.bfloat16(), self.weight.bfloat16(), self.bias.bfloat16())


class Mlp(nn.Module):
    def __init__(self, linear=nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = linear(32, 64), linear(64, 8)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [(torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g))
            for _ in range(MICRO_BATCHES)]


def train(model, optimizer, accelerator, data) -> None:
    """One optimiser step over MICRO_BATCHES micro-batches, gradients synced at the last."""
    for i, (x, y) in enumerate(data):
        with loop.no_sync(accelerator, model, sync=i == len(data) - 1):
            loss = F.cross_entropy(model(x).float(), y) / len(data)
            loss.backward()
    optimizer.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float()


def sharded(policy: MixedPrecisionPolicy, mesh) -> nn.Module:
    torch.manual_seed(0)
    model = Mlp()
    fully_shard(model.fc1, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def main(report_path: str) -> None:
    accelerator = build_accelerator({"mixed_precision": "no", "cpu": True})  # the gloo group
    rank, world = accelerator.process_index, accelerator.num_processes
    mesh = init_device_mesh("cpu", (world,))
    # The policy engine/device.py hands accelerate for `fsdp_version: 2` + bf16.
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    policy = fsdp_plugin("bf16").mixed_precision_policy
    bf16_reduce = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16,
                                       output_dtype=torch.bfloat16)  # accelerate's own
    data = batches(rank)

    torch.manual_seed(0)
    twin = DistributedDataParallel(Mlp(Bf16Linear))  # fp32 grads and all-reduce
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    train(twin, twin_opt, accelerator, data)
    twin_grads = {n: p.grad.detach().clone() for n, p in twin.module.named_parameters()}
    twin_weights = {n: p.detach().clone() for n, p in twin.module.named_parameters()}

    report = {"world": world, "policy": {k: str(getattr(policy, k)) for k in
                                         ("param_dtype", "reduce_dtype", "output_dtype")}}
    for name, pol in (("fp32_reduce", policy), ("bf16_reduce", bf16_reduce)):
        model = sharded(pol, mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        train(model, optimizer, accelerator, data)
        grads = {n: full(p.grad) for n, p in model.named_parameters()}
        weights = {n: full(p) for n, p in model.named_parameters()}
        report[name] = {
            "grad_max_rel_diff": max(((grads[n] - g).abs().max() / g.abs().max()).item()
                                     for n, g in twin_grads.items()),
            "weight_max_diff": max((weights[n] - w).abs().max().item() for n, w in twin_weights.items()),
            "grad_dtype": str(next(model.parameters()).grad.dtype),
        }
    if rank == 0:
        Path(report_path).write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
