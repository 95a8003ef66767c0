"""The published recipes, number by number (docs/recipe.md): teacher and student schedules
through ``--print-schedule``, the teacher's transform, and optimiser steps per epoch."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
STUDENT_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


def schedule(script: str, config: Path, *overrides: str, env: dict | None = None) -> list[dict]:
    proc = subprocess.run([sys.executable, script, "--config", str(config), "--print-schedule", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if not line.startswith("#")]  # header


def test_paco_cifar_teacher_schedule():
    lines = schedule("train_teacher.py", ROOT / "configs/teachers/cifar10_lt_paco_sam.yaml")
    assert [line["epoch"] for line in lines] == list(range(400))
    lr = [line["lr"] for line in lines]
    for e in range(0, 11):  # PaCo's `epoch <= warmup`: epoch 10 runs at 0.055
        assert lr[e] == pytest.approx(0.005 * (e + 1))
    assert lr[11:321] == pytest.approx([0.05] * 310)
    assert lr[321:361] == pytest.approx([0.005] * 40)
    assert lr[361:400] == pytest.approx([0.0005] * 39)
    assert not any(line["drw"] for line in lines) and {line["rho"] for line in lines} == {0.05}


def test_ldam_cifar_teacher_schedule_and_transform():
    config = ROOT / "configs/teachers/cifar10_lt_ldam_drw_sam.yaml"
    lines = schedule("train_teacher.py", config)
    assert len(lines) == 200
    lr = [line["lr"] for line in lines]
    assert lr[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lr[5:160] == pytest.approx([0.1] * 155)
    assert lr[160:180] == pytest.approx([0.001] * 20)
    assert lr[180:200] == pytest.approx([1e-5] * 20)
    assert [line["drw"] for line in lines] == [e >= 160 for e in range(200)]
    assert {line["rho"] for line in lines} == {0.8}

    # the published CIFAR teacher: crop, flip, normalise; no colour jitter
    from data import build_transform
    from train_teacher import SPEC
    from utils import load_config

    cfg = load_config(SPEC, ["--config", str(config)])
    names = [type(t).__name__ for t in build_transform(True, cfg["data"], cfg["aug"]).transforms]
    assert "ColorJitter" not in names and names[0] == "RandomCrop", names


def test_imagenet_ldam_teacher_has_no_warmup_and_a_per_epoch_cosine():
    lines = schedule("train_teacher.py", ROOT / "configs/teachers/imagenet_lt_ldam_drw_sam.yaml")
    assert len(lines) == 90
    for line in lines:  # Saddle-LongTail: CosineAnnealingLR(T_max=90) stepped per epoch, no warm-up
        assert line["lr"] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * line["epoch"] / 90)), rel=1e-5)
    assert [line["rho"] for line in lines[3:7]] == [0.05, 0.05, 0.1, 0.1]


@pytest.mark.parametrize("name", ["imagenet_lt_paco_sam", "inat18_paco_sam"])
def test_paco_imagenet_and_inat_teacher_cosine_is_pacos(name):
    """PaCo's adjust_lr: 0.02 / 10 x (e + 1) for e < 10, then per epoch
    0.02 x 0.5 x (1 + cos(pi (e - 10 + 1) / (400 - 10 + 1))) (PC paco_lt.py:L619-624)."""
    lines = schedule("train_teacher.py", ROOT / "configs/teachers" / f"{name}.yaml")
    assert len(lines) == 400
    for line in lines:
        e = line["epoch"]
        expected = 0.02 / 10 * (e + 1) if e < 10 else 0.02 * 0.5 * (1 + math.cos(math.pi * (e - 9) / 391))
        assert line["lr"] == pytest.approx(expected, rel=1e-5, abs=1e-15), e  # printed to 6 digits


@pytest.mark.parametrize("name", ["imagenet_lt_ldam_drw_sam", "imagenet_lt_paco_sam", "inat18_ldam_drw_sam",
                                  "inat18_paco_sam"])
def test_imagenet_and_inat_teachers_are_evaluated_as_published(name):
    """Saddle-LongTail and PaCo evaluate their ImageNet-LT / iNat teachers with a bilinear
    Resize(256) + CenterCrop(224); students keep DeiT's bicubic one."""
    from data import build_transform
    from train_student import SPEC as STUDENT_SPEC
    from train_teacher import SPEC
    from utils import load_config

    cfg = load_config(SPEC, ["--config", str(ROOT / "configs/teachers" / f"{name}.yaml")])
    resize, crop = build_transform(False, cfg["data"], cfg["aug"]).transforms[:2]
    assert (resize.size, resize.interpolation.value, crop.size) == (256, "bilinear", (224, 224))
    student = load_config(STUDENT_SPEC, ["--config", str(ROOT / "configs/imagenet_lt.yaml")])
    resize = build_transform(False, student["data"], student["aug"]).transforms[0]
    assert (resize.size, resize.interpolation.value) == (256, "bicubic")


@pytest.mark.parametrize("config", STUDENT_CONFIGS, ids=lambda p: p.stem)
def test_student_schedules_follow_the_reference_lr_rule(config):
    from train_student import SPEC
    from utils import load_config

    cfg = load_config(SPEC, ["--config", str(config)])
    t, s, o, d = cfg["train"], cfg["sched"], cfg["optim"], cfg["distill"]
    lines = schedule("train_student.py", config)
    assert len(lines) == t["epochs"]
    processes = t["recipe_processes"] or 1
    peak = o["lr"] * (t["batch_size"] * processes / 512 if o["lr_scaling"] == "reference" else 1.0)
    if config.stem in ("cifar10_lt", "cifar10_lt_if50", "cifar100_lt", "cifar100_lt_if50"):
        assert peak == pytest.approx(2.5e-4)  # the reference's CIFAR peak
    if config.stem in ("imagenet_lt", "inat18"):
        assert peak == pytest.approx(5e-4)

    def expected(e: int) -> float:  # timm cosine, warm-up from warmup_lr, not a prefix
        if e < s["warmup_epochs"]:
            return s["warmup_lr"] + e * (peak - s["warmup_lr"]) / s["warmup_epochs"]
        return s["min_lr"] + 0.5 * (peak - s["min_lr"]) * (1 + math.cos(math.pi * e / t["epochs"]))

    checks = [0, s["warmup_epochs"], t["epochs"] - 1] + ([d["drw_epoch"]] if d["drw_epoch"] is not None else [])
    for e in checks:
        assert lines[e]["lr"] == pytest.approx(expected(e), rel=1e-5), (config.stem, e)
    drw = d["drw_epoch"]
    assert [line["drw"] for line in lines] == [drw is not None and e >= drw for e in range(t["epochs"])]
    if d["no_mixup_drw"] and drw is not None:
        assert lines[drw - 1]["mixup"] and not lines[drw]["mixup"]


class Sized(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return i


# Training images of each benchmark (docs/recipe.md section 5) and its student config.
BENCHMARKS = {"cifar10_lt": 12406, "cifar10_lt_if50": 13996, "cifar100_lt": 10847,
              "cifar100_lt_if50": 12608, "imagenet_lt": 115846, "inat18": 437513}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_steps_per_epoch_equal_the_reference_on_any_gpu_count(name, gpus):
    """The reference: RASampler epoch = floor(N / 256) * 256 images over its processes, batch
    128 per process, the last batch kept, an optimiser step on every window of 4 batches
    including a shorter last one (DeiT-LT engine.py)."""
    from data.samplers import RASampler
    from engine.loop import steps_per_epoch
    from engine.run_config import effective_accum
    from train_student import SPEC
    from utils import load_config

    cfg = load_config(SPEC, ["--config", str(ROOT / "configs" / f"{name}.yaml")])
    t, n = cfg["train"], BENCHMARKS[name]
    ref_processes = 2 if name.startswith("cifar") else 4
    ref_batches = math.ceil(n // 256 * 256 // ref_processes / 128)
    reference_steps = math.ceil(ref_batches / 4)
    if gpus > ref_processes * 4:  # no whole accumulation left
        return
    accum = effective_accum(t, gpus)
    assert t["batch_size"] * gpus * accum == 128 * ref_processes * 4  # the reference's effective batch
    loader = DataLoader(Sized(n), batch_size=t["batch_size"], drop_last=t["drop_last"],
                        sampler=RASampler(Sized(n), num_replicas=gpus, rank=0))
    steps = steps_per_epoch(len(loader), accum, t["max_steps_per_epoch"])
    if gpus == ref_processes:
        assert steps == reference_steps, (name, steps, reference_steps)
    else:  # other GPU counts: the same images per step; at most one step more or less
        assert abs(steps - reference_steps) <= 1, (name, gpus, steps, reference_steps)
