"""Run by tests/test_full_scale.py under `accelerate launch --multi_gpu --num_processes 2` (gloo):
the FSDP code paths of train_student.py on a CPU device mesh, with torch's own fully_shard
(accelerate refuses FSDP without a GPU). Writes a JSON report to the path in argv[1]."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from engine import loop  # noqa: E402
from engine.device import build_accelerator  # noqa: E402
from engine.seeding import seed_everything  # noqa: E402
from losses.distillation import DistillationLoss  # noqa: E402
from models.checkpoint import make_checkpoint, student_from_checkpoint  # noqa: E402
from models.ema import ModelEma  # noqa: E402
from models.student import build_student, student_arch, student_outputs, unwrap  # noqa: E402
from train_student import build_base_criterion, train_step  # noqa: E402


class Data:  # what make_checkpoint reads from a dataset
    class_map, train_counts, class_names = None, [1] * 5, [f"c{i}" for i in range(5)]


def main(report_path: str) -> None:
    accelerator = build_accelerator({"mixed_precision": "no", "cpu": True})
    rank, world = accelerator.process_index, accelerator.num_processes
    arch = student_arch("deit_tiny_distilled_patch4_32", 5, depth=2, embed_dim=48, num_heads=3)
    seed_everything(0)
    plain = build_student(arch)  # the unsharded twin, for the expected values
    seed_everything(0)
    model = build_student(arch)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    ema = ModelEma(unwrap(model), decay=0.5)
    plain_ema = {k: v.clone() for k, v in plain.state_dict().items()}
    criterion = DistillationLoss(build_base_criterion(False), None, "none", 0.5, 1.0)

    g = torch.Generator().manual_seed(1)  # the same global batch on both ranks
    for _ in range(2):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
        lo, hi = rank * 4, rank * 4 + 4
        # each rank trains on its half of the batch, in two micro-batches (no_sync for the first)
        window = [(x[lo:lo + 2], y[lo:lo + 2]), (x[lo + 2:hi], y[lo + 2:hi])]
        train_step(model, criterion, window, optimizer, accelerator, model_ema=ema, ema_updates=len(window))
        # the unsharded twin on the whole batch: the same mean loss; its EMA as the reference's
        # (one update per micro-batch: the first towards the weights before the step)
        loss, _ = criterion(x, plain(x), y)
        loss.backward()
        with torch.no_grad():
            for k, v in plain.state_dict().items():
                plain_ema[k].mul_(0.5).add_(v, alpha=0.5)
        plain_opt.step()
        plain_opt.zero_grad()
        with torch.no_grad():
            for k, v in plain.state_dict().items():
                plain_ema[k].mul_(0.5).add_(v, alpha=0.5)

    full = loop.full_state_dict(accelerator, model)  # the gather the scripts use
    ema_full = ema.full_state_dict()
    x = torch.randn(6, 3, 32, 32, generator=g)
    model.eval()
    plain.eval()
    with torch.no_grad():
        out_sharded = student_outputs(model, x)  # evaluation through the sharded model
        out_plain = student_outputs(plain, x)
    # the resume state's EMA: one file per rank (its shards), read back into a fresh EMA
    folder = Path(report_path).parent / "ema_state"
    folder.mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    ema.save(folder, rank)
    accelerator.wait_for_everyone()
    fresh = ModelEma(unwrap(model), decay=0.5)  # the weights, not the EMA, until loaded
    fresh.load(folder, rank)
    restored = [None] * world
    dist.all_gather_object(restored, all(torch.equal(fresh.shadow[k].to_local() if isinstance(v, DTensor) else
                                                     fresh.shadow[k], v.to_local() if isinstance(v, DTensor) else v)
                                         for k, v in ema.shadow.items()))
    checksums = [None] * world
    dist.all_gather_object(checksums, [float(v.double().sum()) for v in ema_full.values()])
    report = {
        "world": world,
        "params_are_dtensors": sharded,
        "ema_is_sharded": all(isinstance(v, DTensor) for k, v in ema.shadow.items() if v.is_floating_point()),
        "eval_max_diff": max((out_sharded[k] - out_plain[k]).abs().max().item() for k in out_plain),
        "ema_same_on_every_rank": all(c == checksums[0] for c in checksums),
        "ema_files": sorted(p.name for p in folder.iterdir()),
        "ema_restored": all(restored),
    }
    if rank == 0:  # the full state dict is gathered onto the main process, which writes checkpoints
        ckpt = make_checkpoint("student", arch, full, ema_state=ema_full, epoch=0, config={}, metrics={},
                               dataset=Data())
        loaded, _ = student_from_checkpoint(ckpt)
        loaded_ema, _ = student_from_checkpoint(ckpt, ema=True)
        with torch.no_grad():
            out_loaded = student_outputs(loaded, x)
        report.update({
            "keys_plain": sorted(full) == sorted(plain.state_dict()),
            "weights_max_diff": max((full[k] - v).abs().max().item() for k, v in plain.state_dict().items()),
            "ema_max_diff": max((ema_full[k] - v).abs().max().item() for k, v in plain_ema.items()),
            "loaded_max_diff": max((out_loaded[k] - out_plain[k]).abs().max().item() for k in out_plain),
            "loaded_ema_equal": all(torch.equal(loaded_ema.state_dict()[k], v) for k, v in ema_full.items()),
        })
    if rank == 0:
        Path(report_path).write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
