"""Cost of SAM against plain SGD for a teacher training step, measured in one run.

    python bench/sam_cost.py [--arch resnet32] [--batch-size 128] [--steps 5] [--repeats 3]

Alternates SGD, SAM (two forward/backward passes) and PaCo + SAM steps (the two passes on
the query view, one key-encoder forward on the key view, momentum and queue updates: what
``train_teacher.py loss.type=paco`` does per step) on the same synthetic batch, in bf16
autocast on CPU, and prints the median ratios of step times with min/max over repeats;
saves JSON (default bench/results/sam_cost.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.device import build_accelerator, set_cpu_threads  # noqa: E402
from losses.ldam import LDAMLoss  # noqa: E402
from losses.paco import PaCoLoss  # noqa: E402
from losses.sam import SAM  # noqa: E402
from models.paco import build_paco  # noqa: E402
from models.teacher import build_teacher  # noqa: E402
from train_teacher import train_step as teacher_train_step  # noqa: E402


def time_steps(model, optimizer, criterion, window, steps: int, sam: bool, accelerator) -> float:
    """Seconds per ``train_teacher.train_step`` (the script's own step, SAM or plain SGD,
    PaCo's momentum update and queue included) in bf16 autocast."""
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16):
            terms = teacher_train_step(model, criterion, window, optimizer, accelerator, sam=sam)
        terms["loss"].item()  # the loop's once-per-step host sync
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet32", help="teacher architecture")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat and mode")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "sam_cost.json"), help="output JSON")
    args = parser.parse_args()
    set_cpu_threads()
    accelerator = build_accelerator({"mixed_precision": "no"})  # bf16: the autocast in time_steps
    torch.manual_seed(0)
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    model = build_teacher(args.arch, 10, "normed").to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    criterion = LDAMLoss(counts)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.01, momentum=0.9)
    window = [(x, y)]
    time_steps(model, sgd, criterion, window, 2, False, accelerator)  # warm-up
    time_steps(model, sam, criterion, window, 2, True, accelerator)
    # PaCo + SAM with the published CIFAR sizes (moco dim 32, queue 1024), same batch.
    paco = build_paco(args.arch, 10, dim=32, K=1024).to(memory_format=torch.channels_last).train()
    paco_loss = PaCoLoss(alpha=0.01, temperature=0.05, K=1024, num_classes=10, cls_num_list=counts)
    paco_sam = SAM([p for p in paco.parameters() if p.requires_grad], torch.optim.SGD, rho=0.1,
                   lr=0.01, momentum=0.9)
    paco_window = [([x, torch.randn_like(x)], y)]  # PaCo's two views
    time_steps(paco, paco_sam, paco_loss, paco_window, 2, True, accelerator)
    rows = []
    for _ in range(args.repeats):
        t_sgd = time_steps(model, sgd, criterion, window, args.steps, False, accelerator)
        t_sam = time_steps(model, sam, criterion, window, args.steps, True, accelerator)
        t_paco = time_steps(paco, paco_sam, paco_loss, paco_window, args.steps, True, accelerator)
        rows.append({"sgd_s": t_sgd, "sam_s": t_sam, "paco_sam_s": t_paco, "ratio": t_sam / t_sgd,
                     "paco_sam_over_sam": t_paco / t_sam})
    ratios = [r["ratio"] for r in rows]
    paco_ratios = [r["paco_sam_over_sam"] for r in rows]
    result = {"arch": args.arch, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "precision": "bf16 autocast", "repeats": rows, "sam_over_sgd_median": statistics.median(ratios),
              "sam_over_sgd_min": min(ratios), "sam_over_sgd_max": max(ratios),
              "paco_sam_over_ldam_sam_median": statistics.median(paco_ratios),
              "paco_sam_over_ldam_sam_min": min(paco_ratios), "paco_sam_over_ldam_sam_max": max(paco_ratios),
              "sgd_img_per_s_median": statistics.median(args.batch_size / r["sgd_s"] for r in rows),
              "sam_img_per_s_median": statistics.median(args.batch_size / r["sam_s"] for r in rows),
              "paco_sam_img_per_s_median": statistics.median(args.batch_size / r["paco_sam_s"] for r in rows)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'repeat':>6} {'SGD s/step':>11} {'SAM s/step':>11} {'PaCo+SAM':>9} {'SAM/SGD':>8} {'PaCo/SAM':>9}")
    for i, r in enumerate(rows):
        print(f"{i:>6} {r['sgd_s']:>11.3f} {r['sam_s']:>11.3f} {r['paco_sam_s']:>9.3f} {r['ratio']:>8.2f} "
              f"{r['paco_sam_over_sam']:>9.2f}")
    print(f"SAM/SGD step time: median {result['sam_over_sgd_median']:.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}); PaCo+SAM / LDAM+SAM: median "
          f"{result['paco_sam_over_ldam_sam_median']:.2f} (min {min(paco_ratios):.2f}, "
          f"max {max(paco_ratios):.2f}); saved {args.json}")


if __name__ == "__main__":
    main()
