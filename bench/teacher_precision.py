"""How often the teacher's hard targets change with the precision of its logits.

    python bench/teacher_precision.py --config configs/cifar10_lt_cpu.yaml \\
        data.path=../shared/data/cifar10-jpeg distill.teacher_ckpt=PATH [--batches 20] [--json OUT]

Hard distillation trains DIST on ``argmax teacher(x)``. Under bf16 autocast (the reference's
and ``train.mixed_precision=bf16``'s teacher) the logits carry 8 significant bits, so near-equal
logits tie and ``argmax`` takes the lowest index, which in the long-tailed benchmarks is the
most frequent class. ``distill.teacher_fp32=true`` runs the teacher in fp32 instead. This
script measures what that changes, on the batches the teacher really sees: the student's
training batches (its training transform, then mixup/cutmix with ``aug``'s settings; the
no-mixup DRW phase with ``aug.mixup=0 aug.cutmix=0``), built by ``train_student``'s own
builders and passed through ``DistillationLoss.teacher_logits`` (resize, re-normalisation,
folded BatchNorms as in training). Over ``--batches`` batches it counts, per autocast dtype
(bf16, fp16) against fp32: the fraction of hard targets that differ, the fraction of images
whose two largest logits are exactly equal, and of the differing targets the fractions that
were at such a tie and that went to a lower class index (more frequent) than fp32's: the whole
teacher runs in the low precision, so its logits also move, and not every change is a tie.

A benchmark, not a test: nothing is asserted; the figures are printed and saved as JSON
(default ``bench/results/teacher_precision.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import loop  # noqa: E402
from engine.device import build_accelerator  # noqa: E402
from engine.seeding import seed_everything  # noqa: E402
from data.transforms import build_device_feed  # noqa: E402
from losses.distillation import DistillationLoss  # noqa: E402
from models.distill_teacher import load_distillation_teacher, read_teacher_file  # noqa: E402
from train_student import SPEC, build_base_criterion, build_mixup, build_model, validate  # noqa: E402
from utils import atomic_write_text, parse_config  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def count(logits: torch.Tensor, fp32_targets: torch.Tensor) -> dict[str, int]:
    """Differing targets, exact top-2 ties, differing targets at a tie, and differing targets
    that went to a lower index."""
    targets = logits.argmax(1)
    top2 = logits.topk(2, dim=1).values
    differ, tie = targets != fp32_targets, top2[:, 0] == top2[:, 1]
    return {"differ": int(differ.sum()), "ties": int(tie.sum()), "differ_at_ties": int((differ & tie).sum()),
            "to_lower_index": int((differ & (targets < fp32_targets)).sum())}


def main() -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--batches", type=int, default=20, help="training batches to measure")
        parser.add_argument("--json", default=str(ROOT / "bench/results/teacher_precision.json"))

    cfg, args = parse_config(SPEC, description=__doc__, validate=validate, add_arguments=add_arguments)
    seed_everything(cfg["train"]["seed"])
    accelerator = build_accelerator(cfg["train"])
    device = accelerator.device
    dataset_train, _, _, data_loader_train, _ = loop.build_loaders(cfg, accelerator)
    feed = build_device_feed(cfg["aug"], device)
    _, arch = build_model(cfg, dataset_train.num_classes)  # only for the student's input size
    setup = load_distillation_teacher(cfg, dataset_train, arch["img_size"], accelerator, read_teacher_file(cfg))
    mixup_fn = build_mixup(cfg, dataset_train.num_classes)
    losses = {fp32: DistillationLoss(build_base_criterion(mixup_fn is not None), setup["teacher"], "hard",
                                     0.5, 1.0, teacher_input_size=setup["input_size"],
                                     class_map=setup["class_map"], renormalize=setup["renormalize"],
                                     teacher_fp32=fp32).to(device) for fp32 in (False, True)}

    totals = {name: {"differ": 0, "ties": 0, "differ_at_ties": 0, "to_lower_index": 0} for name in DTYPES}
    totals["fp32"] = {"ties": 0}
    images, start = 0, time.time()
    for i, batch in enumerate(data_loader_train):
        if i == args.batches:
            break
        samples, targets = loop.to_device(batch, device, feed)
        if mixup_fn is not None:
            if len(samples) % 2:
                samples, targets = samples[:-1], targets[:-1]
            samples, targets = mixup_fn(samples, targets)
        fp32_logits = losses[True].teacher_logits(samples)
        fp32_targets = fp32_logits.argmax(1)
        top2 = fp32_logits.topk(2, dim=1).values
        totals["fp32"]["ties"] += int((top2[:, 0] == top2[:, 1]).sum())
        for name, dtype in DTYPES.items():
            with torch.autocast(device.type, dtype=dtype):
                logits = losses[False].teacher_logits(samples)
            for key, value in count(logits.float(), fp32_targets).items():
                totals[name][key] += value
        images += len(samples)

    result = {"images": images, "batches": min(args.batches, len(data_loader_train))}
    for name, t in totals.items():
        row = {"ties": t["ties"] / images}
        if "differ" in t:
            row.update(targets_differ=t["differ"] / images, differing=t["differ"],
                       differing_at_ties=t["differ_at_ties"] / max(t["differ"], 1),
                       to_lower_index=t["to_lower_index"] / max(t["differ"], 1))
        result[name] = row
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    result["meta"] = {
        "command": "python bench/teacher_precision.py " + " ".join(sys.argv[1:]),
        "teacher_ckpt": cfg["distill"]["teacher_ckpt"], "mixup": mixup_fn is not None,
        "batch_size": cfg["train"]["batch_size"], "commit": sha, "seconds": round(time.time() - start, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}"}
    text = json.dumps(result, indent=1)
    atomic_write_text(Path(args.json), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
