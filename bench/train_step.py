"""Training-step throughput of the DeiT-LT student: plain fp32 eager against the fast settings.

    python bench/train_step.py --config configs/cifar10_lt.yaml train.batch_size=16 --steps 3 --repeats 3
    python bench/train_step.py --config configs/cifar10_lt_cpu.yaml --steps 10 --repeats 5 \
        [--compile] [--eval-check] [--json OUT]

One step is ``train_student.train_step`` itself, imported (a window of one micro-batch): timm
``Mixup`` on the batch, the student's heads, ``DistillationLoss`` (which resizes the mixed
batch and calls the teacher itself), backward, the AdamW step (gradient clipping when
``optim.clip_grad`` is set) and the EMA update when ``train.model_ema`` is on. The student,
optimiser, mixup and base loss are built by ``train_student``'s own builders; only the modes,
the timing, the memory readings and the report are this file's. The input is synthetic (random 8-bit images, normalised, random
labels): the data pipeline is measured apart by ``bench/data_throughput.py``. The teacher is
randomly initialised by ``build_teacher`` (ResNet-32 with LDAM's normed head for CIFAR,
ResNet-50 otherwise), so no checkpoint is needed; its speed does not depend on its weights.

Modes, built from the same seed (same initial weights) and run in the same process,
alternating per repeat (fp32, fast, fp32, fast, ...) so that load changes on a shared machine
hit every mode alike:

- ``fp32``: plain eager fp32; the explicit softmax(QK^T/sqrt(d))V attention; the teacher in
  fp32 with contiguous (NCHW) weights and input, BatchNorms as separate layers.
- ``fast``: what ``train_student.py`` runs with ``train.mixed_precision=bf16``: bf16 autocast
  (CPU: ``torch.autocast('cpu', torch.bfloat16)``, which is what ``accelerator.autocast()``
  enters; CUDA: bf16 too), fused ``scaled_dot_product_attention``, the teacher channels-last,
  in eval mode under ``no_grad`` (``DistillationLoss``) with its BatchNorms folded into the
  convolutions (``distill.fold_bn``), the loss in fp32.
- ``fast_math``: ``fast`` with the explicit attention formula (``model.fused_attn=false``).
  On this CPU build the fused SDPA *backward* in bf16 (flash attention for CPU) is 2-6x slower
  than the bf16 matmul formula (and slower than its own fp32 version), so ``fast`` loses much
  of the bf16 gain in training; this mode measures what the formula recovers.
- ``fast_math_bn`` (on request): ``fast_math`` with the teacher's BatchNorms left as separate
  layers (``distill.fold_bn=false``), to measure what folding them saves.
- ``compile`` (with ``--compile``): ``fast`` plus ``torch.compile`` of the student
  (``model.compile=true``); ``compile_math`` (on request): ``fast_math`` compiled. The first
  warm-up step, which compiles, is reported apart (``warmup_s``).

Warm-up steps (``--warmup`` per mode, before its first repeat) are not timed. Reported per
mode: steps/s and images/s (median, min, max over repeats), peak memory, the teacher's share
of the step; ``fast_over_fp32`` is the median over repeats of the per-repeat ratio of step
rates (each ratio compares runs made back to back). On CPU the peak memory is the process's
maximum resident set size (``getrusage`` ``ru_maxrss``) during the mode's timed steps: the
high-water mark is reset before each repeat through ``/proc/self/clear_refs``, and it includes
every mode's weights and optimiser state held by the process (``step_mem_mb`` is the growth
during the repeat). On CUDA it is ``torch.cuda.max_memory_allocated``.

``--eval-check`` also trains the student briefly in a bf16 mode on the shared CIFAR-10 copy
(LT subset, eval transform, no teacher) and compares top-1 of the same weights evaluated in
fp32, ``fast`` and ``fast_math`` on the CIFAR-10 test split (meant for native-resolution
configs: at 224 the 10,000 test images take long on a CPU; ``--eval-images`` limits them).

This is a benchmark, not a test: nothing is asserted. Numbers are printed and saved as JSON
(default ``bench/results/train_step_<config stem>.json``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.data import Mixup  # noqa: E402
from models.ema import ModelEma  # noqa: E402

from data.benchmarks import benchmark as benchmark_facts  # noqa: E402
from data.transforms import NORMALIZATION  # noqa: E402
from engine.device import build_accelerator, set_cpu_threads  # noqa: E402
from engine.seeding import step_seed  # noqa: E402
from losses.distillation import DistillationLoss  # noqa: E402
from models.student import set_fused_attn, student_outputs  # noqa: E402
from models.teacher import build_teacher, fold_batchnorm  # noqa: E402
from train_student import (SPEC, build_base_criterion, build_mixup, build_model,  # noqa: E402
                           build_optimizer, scaled_lr, train_step as student_train_step)
from utils import atomic_write_text, load_config, to_plain  # noqa: E402


@dataclass(frozen=True)
class Mode:
    """Precision and kernel settings of one benchmarked mode."""

    name: str
    bf16_autocast: bool
    fused_attn: bool
    teacher_channels_last: bool
    compile: bool = False
    teacher_fold_bn: bool = True  # train_student's distill.fold_bn


MODES = {
    "fp32": Mode("fp32", bf16_autocast=False, fused_attn=False, teacher_channels_last=False,
                 teacher_fold_bn=False),
    "fast": Mode("fast", bf16_autocast=True, fused_attn=True, teacher_channels_last=True),
    # bf16 with the explicit attention formula: on CPU (torch 2.14) the fused SDPA backward
    # in bf16 is several times slower than the bf16 matmul formula, see the module docstring.
    "fast_math": Mode("fast_math", bf16_autocast=True, fused_attn=False, teacher_channels_last=True),
    # fast_math with the teacher's BatchNorms as separate layers (distill.fold_bn=false).
    "fast_math_bn": Mode("fast_math_bn", bf16_autocast=True, fused_attn=False, teacher_channels_last=True,
                         teacher_fold_bn=False),
    "compile": Mode("compile", bf16_autocast=True, fused_attn=True, teacher_channels_last=True,
                    compile=True),
    "compile_math": Mode("compile_math", bf16_autocast=True, fused_attn=False,
                         teacher_channels_last=True, compile=True),
}


def autocast(mode: Mode, device: torch.device) -> contextlib.AbstractContextManager:
    """The mode's autocast region (bf16 on CPU and CUDA alike), or nothing for fp32."""
    if mode.bf16_autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ContiguousInput(nn.Module):
    """The fp32 baseline's teacher: ``DistillationLoss`` hands every teacher a channels-last
    batch; this wrapper turns it back into plain NCHW so the baseline is eager fp32 throughout."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x.contiguous())


def inner_teacher(criterion: DistillationLoss) -> nn.Module | None:
    """The teacher network itself, unwrapped from ``ContiguousInput`` if needed."""
    teacher = criterion.teacher
    return teacher.teacher if isinstance(teacher, ContiguousInput) else teacher


@dataclass
class ModeState:
    """Everything one mode trains with; models are separate per mode (same initial weights)."""

    mode: Mode
    accelerator: object        # fp32 Accelerator; bf16 modes add an autocast region around it
    model: nn.Module           # what the step calls (compiled in the compile mode)
    raw_model: nn.Module       # the uncompiled student (EMA, evaluation)
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    model_ema: ModelEma | None
    mixup_fn: Mixup | None
    clip_grad: float | None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


# ----------------------------------------------------------------------------- set-up


def num_classes_of(cfg: dict) -> int:
    return benchmark_facts(cfg["data"]["dataset"]).num_classes or 10


def teacher_spec(cfg: dict, arch: dict) -> dict | None:
    """Which random teacher stands in for the config's checkpoint, and its input size."""
    if cfg["distill"]["type"] == "none":
        return None
    cifar = benchmark_facts(cfg["data"]["dataset"]).cifar_subset
    size = cfg["distill"]["teacher_input_size"] or (32 if cifar else arch["img_size"])
    return {"arch": "resnet32" if cifar else "resnet50", "num_classes": arch["num_classes"],
            "head": "normed" if cifar else "linear", "input_size": int(size)}


def build_mode(mode: Mode, cfg: dict, teacher: nn.Module | None, accelerator,
               seed: int = 0) -> ModeState:
    """Student, EMA, optimiser, mixup and loss as ``train_student.main`` builds them, under ``mode``.

    ``teacher`` is copied, so every mode gets the same teacher weights in its own layout.
    The seed is reset first, so every mode starts from the same student weights.
    """
    torch.manual_seed(seed)
    t, d = cfg["train"], cfg["distill"]
    cfg = {**cfg, "model": {**cfg["model"], "fused_attn": mode.fused_attn}}
    model, _ = build_model(cfg, num_classes_of(cfg))
    model = model.to(accelerator.device).train()
    model_ema = ModelEma(model, t["model_ema_decay"]) if t["model_ema"] else None
    optimizer = build_optimizer(cfg, model, scaled_lr(cfg, 1))
    mixup_fn = build_mixup(cfg, num_classes_of(cfg))
    size = None
    if teacher is not None:
        size = getattr(teacher, "bench_input_size", None)
        teacher = copy.deepcopy(teacher).to(accelerator.device)
        if mode.teacher_fold_bn:
            teacher, _ = fold_batchnorm(teacher)
        if not mode.teacher_channels_last:
            teacher = ContiguousInput(teacher)
    criterion = DistillationLoss(build_base_criterion(mixup_fn is not None),
                                 teacher, d["type"], d["alpha"], d["tau"], teacher_input_size=size)
    if teacher is not None and not mode.teacher_channels_last:
        # DistillationLoss made the weights channels-last; the baseline keeps them NCHW.
        criterion.teacher.to(memory_format=torch.contiguous_format)
    step_model = torch.compile(model) if mode.compile else model
    return ModeState(mode, accelerator, step_model, model, criterion, optimizer, model_ema, mixup_fn,
                     cfg["optim"]["clip_grad"])


def make_teacher(spec: dict | None, seed: int = 0) -> nn.Module | None:
    if spec is None:
        return None
    torch.manual_seed(seed + 1)
    teacher = build_teacher(spec["arch"], spec["num_classes"], spec["head"])
    teacher.bench_input_size = spec["input_size"]
    return teacher.eval()


def synthetic_batches(count: int, batch: int, size: int, num_classes: int, normalize: str,
                      device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random 8-bit images normalised like the data pipeline's output, and random labels."""
    g = torch.Generator().manual_seed(seed)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[normalize])
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
        x = ((pixels.float() / 255.0) - mean) / std
        y = torch.randint(0, num_classes, (batch,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


# ----------------------------------------------------------------------------- the step


def train_step(state: ModeState, samples: torch.Tensor, targets: torch.Tensor
               ) -> tuple[float, torch.Tensor]:
    """``train_student.train_step`` on a window of one micro-batch, in the mode's autocast;
    (loss, the mixed batch the teacher saw, for the teacher timings).

    ``samples`` is mixed in place by timm's Mixup: pass a copy.
    """
    with autocast(state.mode, state.device):
        terms = student_train_step(state.model, state.criterion, [(samples, targets)], state.optimizer,
                                   state.accelerator, mixup_fn=state.mixup_fn, clip_grad=state.clip_grad,
                                   model_ema=state.model_ema)
    return terms["loss"].item(), samples  # .item(): the loop's once-per-step host sync


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(state: ModeState, batches: list, first: int, count: int
              ) -> tuple[list[float], list[float], torch.Tensor]:
    """``count`` timed steps; (seconds per step, losses, last mixed batch).

    Step ``i`` seeds the RNGs as the training loop does (``step_seed``), so every mode
    sees the same mixup/cutmix draws and drop-path masks at the same step index.
    """
    times, losses, mixed = [], [], None
    for i in range(first, first + count):
        x, y = batches[i % len(batches)]
        x = x.clone()  # Mixup works in place; the copy stays outside the timing
        step_seed(0, 0, i, 0)
        synchronize(state.device)
        start = time.perf_counter()
        loss, mixed = train_step(state, x, y)
        synchronize(state.device)
        times.append(time.perf_counter() - start)
        losses.append(loss)
    return times, losses, mixed


@torch.no_grad()
def time_teacher(state: ModeState, mixed: torch.Tensor, calls: int) -> list[float]:
    """Seconds per teacher forward (resize included) on a mixed batch, in the mode's autocast."""
    times = []
    with autocast(state.mode, state.device):
        state.criterion.teacher_logits(mixed)  # warm-up
        for _ in range(calls):
            synchronize(state.device)
            start = time.perf_counter()
            state.criterion.teacher_logits(mixed)
            synchronize(state.device)
            times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def teacher_variants(teacher: nn.Module, mixed: torch.Tensor, input_size: int, calls: int,
                     accelerator) -> dict:
    """Median ms per teacher forward (resize included) in layouts and precisions the loss could use.

    ``fp32_nchw``: the fp32 mode's teacher; ``bf16_autocast_channels_last``: the fast mode's
    (BatchNorms folded); ``bf16_weights_channels_last``: that folded teacher converted to bf16
    (weights and input), which skips autocast's per-call weight casts. Not used by the modes:
    reported to show what the teacher could still gain.
    """
    def loss_with(net: nn.Module) -> DistillationLoss:
        return DistillationLoss(nn.Identity(), net, "hard", 0.5, 1.0, teacher_input_size=input_size)

    device = accelerator.device
    fp32 = loss_with(ContiguousInput(copy.deepcopy(teacher).to(device)))
    fp32.teacher.to(memory_format=torch.contiguous_format)
    folded, _ = fold_batchnorm(copy.deepcopy(teacher).to(device))
    fast = loss_with(folded)
    bf16 = loss_with(copy.deepcopy(folded).to(torch.bfloat16))
    variants = {"fp32_nchw": (fp32, MODES["fp32"], mixed),
                "bf16_autocast_channels_last": (fast, MODES["fast"], mixed),
                "bf16_weights_channels_last": (bf16, MODES["fp32"], mixed.to(torch.bfloat16))}
    out = {}
    for name, (criterion, mode, x) in variants.items():
        state = ModeState(mode, accelerator, None, None, criterion, None, None, None, None)
        out[name] = 1000 * statistics.median(time_teacher(state, x, calls))
    return out


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> float | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return float(match.group(1)) if match else None


def reset_peak_memory(device: torch.device) -> tuple[float | None, bool]:
    """Start a new peak-memory window; (current memory in MB, whether the peak was reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20, True
    try:  # Linux >= 4.0: '5' resets the RSS high-water mark (VmHWM, and so ru_maxrss)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    rss = _status_kb("VmRSS")
    return (None if rss is None else rss / 1024), reset


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ----------------------------------------------------------------------------- benchmark


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark(cfg: dict, modes: list[Mode], steps: int, repeats: int, warmup: int,
              teacher_calls: int, accelerator) -> tuple[dict, dict]:
    """Alternate the modes per repeat; return (per-mode results, per-mode trained states)."""
    device = accelerator.device
    _, arch = build_model(cfg, num_classes_of(cfg))
    spec = teacher_spec(cfg, arch)
    teacher = make_teacher(spec)
    batch, size = cfg["train"]["batch_size"], arch["img_size"]
    batches = synthetic_batches(2, batch, size, arch["num_classes"], cfg["aug"]["normalize"], device)
    states = {mode.name: build_mode(mode, cfg, teacher, accelerator) for mode in modes}
    raw = {mode.name: {"step_s": [], "losses": [], "teacher_s": [], "peak_mb": [], "step_mem_mb": [],
                       "warmup_s": []} for mode in modes}

    for mode in modes:  # untimed warm-up: allocator, oneDNN primitives, compilation
        times, _, _ = run_steps(states[mode.name], batches, 0, warmup)
        raw[mode.name]["warmup_s"] = times
        print(f"[{mode.name}] warm-up steps (s): {', '.join(f'{t:.2f}' for t in times)}", flush=True)

    peak_reset_ok = True
    for r in range(repeats):
        for mode in modes:
            state, rec = states[mode.name], raw[mode.name]
            before, reset = reset_peak_memory(device)
            peak_reset_ok &= reset
            times, losses, mixed = run_steps(state, batches, warmup + r * steps, steps)
            peak = peak_memory_mb(device)
            rec["step_s"].append(times)
            rec["losses"].extend(losses)
            rec["peak_mb"].append(peak)
            rec["step_mem_mb"].append(None if before is None else peak - before)
            if state.criterion.teacher is not None and teacher_calls > 0:
                rec["teacher_s"].extend(time_teacher(state, mixed, teacher_calls))
            print(f"[{mode.name}] repeat {r + 1}/{repeats}: {steps / sum(times):.3f} steps/s, "
                  f"{batch * steps / sum(times):.1f} img/s, loss {losses[-1]:.4f}", flush=True)

    results = {}
    for mode in modes:
        rec = raw[mode.name]
        rates = [steps / sum(t) for t in rec["step_s"]]
        step_median = statistics.median([s for t in rec["step_s"] for s in t])
        res = {
            "settings": {"bf16_autocast": mode.bf16_autocast, "fused_attn": mode.fused_attn,
                         "teacher_channels_last": mode.teacher_channels_last, "compile": mode.compile},
            "steps_per_s": spread(rates),
            "img_per_s": spread([batch * r for r in rates]),
            "steps_per_s_per_repeat": rates,
            "step_ms_median": 1000 * step_median,
            "warmup_s": rec["warmup_s"],
            "peak_mem_mb": max(rec["peak_mb"]),
            "step_mem_mb": (max(rec["step_mem_mb"]) if all(v is not None for v in rec["step_mem_mb"])
                            else None),
            "last_loss": rec["losses"][-1],
        }
        if rec["teacher_s"]:
            teacher_median = statistics.median(rec["teacher_s"])
            res["teacher_ms_median"] = 1000 * teacher_median
            res["teacher_share"] = teacher_median / step_median
        results[mode.name] = res
    memory_kind = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                   "process max RSS (getrusage ru_maxrss), high-water mark reset per repeat via "
                   "/proc/self/clear_refs" if peak_reset_ok else
                   "process max RSS (getrusage ru_maxrss) since process start: could not reset")
    out = {"arch": arch, "teacher": spec, "modes": results, "peak_mem_kind": memory_kind}
    if teacher is not None and teacher_calls > 0:
        # The last mixed batch of the last mode: any mixed batch of this shape will do.
        out["teacher_variants_ms"] = teacher_variants(teacher, mixed, spec["input_size"],
                                                      teacher_calls, accelerator)
    return out, states


# ----------------------------------------------------------------------------- eval check


def load_split(dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a (transformed) dataset into two tensors, single process."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False, num_workers=0)
    xs, ys, seen = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


@torch.no_grad()
def accuracy(state: ModeState, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch: int) -> tuple[dict, torch.Tensor]:
    """Top-1 of cls, dist and avg in the mode's precision; also the avg predictions."""
    model.eval()
    correct: dict[str, int] = {}
    preds = []
    for i in range(0, len(labels), batch):
        x, y = images[i:i + batch].to(state.device), labels[i:i + batch].to(state.device)
        with autocast(state.mode, state.device):
            out = student_outputs(model, x)
        for name, logits in out.items():
            correct[name] = correct.get(name, 0) + (logits.float().argmax(1) == y).sum().item()
        preds.append(out[model.PREDICTION].float().argmax(1).cpu())
    return {k: 100.0 * v / len(labels) for k, v in correct.items()}, torch.cat(preds)


def eval_check(cfg: dict, accelerator, data_path: str, train_steps: int,
               eval_images: int | None) -> dict:
    """Top-1 of the same weights evaluated in fp32 and in the bf16 modes on the CIFAR test split.

    The weights: the student trained ``train_steps`` steps in a bf16 mode (``fast_math`` on
    CPU, the faster one there; ``fast`` on CUDA) on the config's training subset, with the
    eval transform and mixup as configured, and ``distill.type=none``: no teacher checkpoint
    exists here, and the check is about the student's arithmetic.
    """
    from data import build_datasets, build_transform

    data_cfg = {**cfg["data"], "path": data_path}
    transform = build_transform(False, data_cfg, cfg["aug"])
    dataset_train, dataset_val = build_datasets(data_cfg, transform, transform, verbose=False)
    start = time.perf_counter()
    x_train, y_train = load_split(dataset_train)
    x_test, y_test = load_split(dataset_val, eval_images)
    print(f"[eval-check] decoded {len(y_train)} train / {len(y_test)} test images in "
          f"{time.perf_counter() - start:.0f} s", flush=True)

    device = accelerator.device
    train_cfg = {**cfg, "distill": {**cfg["distill"], "type": "none"}}
    train_mode = MODES["fast" if device.type == "cuda" else "fast_math"]
    state = build_mode(train_mode, train_cfg, None, accelerator)
    arch = state.raw_model.student_arch
    batch = cfg["train"]["batch_size"]
    g = torch.Generator().manual_seed(0)
    start, losses = time.perf_counter(), []
    for step in range(train_steps):
        idx = torch.randint(0, len(y_train), (batch,), generator=g)
        step_seed(0, 1, step, 0)
        loss, _ = train_step(state, x_train[idx].to(device), y_train[idx].to(device))
        losses.append(loss)
    print(f"[eval-check] trained {train_steps} {train_mode.name} steps in "
          f"{time.perf_counter() - start:.0f} s, last loss {losses[-1]:.3f}", flush=True)

    top1, preds = {}, {}
    for name in ("fp32", "fast", "fast_math"):
        mode_state = copy.copy(state)
        mode_state.mode = MODES[name]
        set_fused_attn(state.raw_model, MODES[name].fused_attn)
        top1[name], preds[name] = accuracy(mode_state, state.raw_model, x_test, y_test, 2 * batch)
    return {
        "data": f"{data_path} test split ({len(y_test)} images), input {arch['img_size']} "
                f"via the eval transform",
        "weights": f"random init + {train_steps} {train_mode.name} steps (batch {batch}) on the "
                   f"{len(y_train)}-image training subset, distill.type=none",
        "train_loss_first_last": [losses[0], losses[-1]],
        "top1": top1,
        "top1_diff_points_vs_fp32": {name: {k: top1[name][k] - top1["fp32"][k] for k in top1[name]}
                                     for name in ("fast", "fast_math")},
        "avg_prediction_agreement_vs_fp32": {
            name: 100.0 * (preds[name] == preds["fp32"]).float().mean().item()
            for name in ("fast", "fast_math")},
    }


# ----------------------------------------------------------------------------- report


def print_table(report: dict) -> None:
    modes = report["modes"]
    print(f"\n{report['config']} {' '.join(report['overrides'])}")
    print(f"student {report['arch']['name']} (img {report['arch']['img_size']}, patch "
          f"{report['arch']['patch_size']}, dim {report['arch']['embed_dim']}, depth "
          f"{report['arch']['depth']}) | teacher {report['teacher']} | batch {report['batch_size']} | "
          f"{report['device']} | torch {report['torch']} | {report['threads']} threads")
    header = (f"{'mode':12} {'img/s med':>10} {'min':>8} {'max':>8} {'steps/s':>8} {'step ms':>8} "
              f"{'peak MB':>8} {'step MB':>8} {'teacher ms':>10} {'t.share':>7}")
    print(header)
    print("-" * len(header))
    for name, r in modes.items():
        share = r.get("teacher_share")
        teacher_ms = r.get("teacher_ms_median")
        step_mem = r["step_mem_mb"]
        print(f"{name:12} {r['img_per_s']['median']:10.1f} {r['img_per_s']['min']:8.1f} "
              f"{r['img_per_s']['max']:8.1f} {r['steps_per_s']['median']:8.3f} "
              f"{r['step_ms_median']:8.1f} {r['peak_mem_mb']:8.0f} "
              f"{'-' if step_mem is None else f'{max(step_mem, 0.0):.0f}':>8} "
              f"{'-' if teacher_ms is None else f'{teacher_ms:.1f}':>10} "
              f"{'-' if share is None else f'{100 * share:.1f}%':>7}")
    if "fast_over_fp32" in report:
        print(f"fast / fp32: {report['fast_over_fp32']:.2f}x (median of per-repeat ratios "
              f"{', '.join(f'{v:.2f}' for v in report['fast_over_fp32_per_repeat'])})")
    for name, value in report.get("speedup_over_fp32", {}).items():
        if name != "fast":
            print(f"{name} / fp32: {value:.2f}x (median of per-repeat ratios)")
    for name, base in (("compile", "fast"), ("compile_math", "fast_math")):
        if f"{name}_over_{base}" in report:
            print(f"{name} / {base}: {report[f'{name}_over_{base}']:.2f}x; first (compiling) step "
                  f"{report['modes'][name]['warmup_s'][0]:.0f} s")
    if "teacher_variants_ms" in report:
        step = report["modes"].get("fast_math", report["modes"].get("fast", {})).get("step_ms_median")
        print("teacher forward (ms, median): " + ", ".join(
            f"{k} {v:.1f}" + (f" ({100 * v / step:.1f}% of a {'fast_math' if 'fast_math' in report['modes'] else 'fast'} step)" if step else "")
            for k, v in report["teacher_variants_ms"].items()))
    print(f"peak memory: {report['peak_mem_kind']}")
    if "eval_check" in report:
        e = report["eval_check"]
        print(f"eval check: {e['data']}; weights: {e['weights']}")
        for name, acc in e["top1"].items():
            line = "  ".join(f"{head} {value:6.2f}" for head, value in acc.items())
            if name != "fp32":
                diff = e["top1_diff_points_vs_fp32"][name]
                line += ("  | diff vs fp32 (points): " + " ".join(f"{h} {diff[h]:+.2f}" for h in diff)
                         + f" | identical avg predictions {e['avg_prediction_agreement_vs_fp32'][name]:.2f}%")
            print(f"  {name:10} top-1 {line}")


def ratios(modes: dict, num: str, den: str) -> list[float]:
    return [a / b for a, b in zip(modes[num]["steps_per_s_per_repeat"], modes[den]["steps_per_s_per_repeat"])]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str], dict]:
    """The bench's own options; everything else goes to train_student's config loader."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], allow_abbrev=False,
        epilog="Other arguments (--config FILE, section.key=value overrides, --print-config) "
               "are train_student.py's; see `python train_student.py --help`.")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per mode (alternating)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode, before its first repeat")
    parser.add_argument("--batch-size", type=int, default=None, help="overrides train.batch_size")
    parser.add_argument("--modes", default="fp32,fast,fast_math", help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("--compile", action="store_true", help="add the compile mode (fast + torch.compile)")
    parser.add_argument("--teacher-calls", type=int, default=None,
                        help="timed teacher forwards after each repeat (default: --steps)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: engine.device.set_cpu_threads, as the training scripts)")
    parser.add_argument("--eval-check", action="store_true",
                        help="also compare fp32 vs fast top-1 of briefly trained weights on the CIFAR test split")
    parser.add_argument("--eval-train-steps", type=int, default=200,
                        help="training steps that produce the weights of --eval-check")
    parser.add_argument("--eval-images", type=int, default=None, help="test images (default: all)")
    parser.add_argument("--data-path", default=None,
                        help="data for --eval-check (default: data.path, else ../shared/data/cifar10-jpeg)")
    parser.add_argument("--json", default=None, help="output (default bench/results/train_step_<config stem>.json)")
    args, rest = parser.parse_known_args(argv)
    if args.batch_size is not None:
        rest = rest + [f"train.batch_size={args.batch_size}"]
    cfg = load_config(SPEC, rest, description=__doc__)
    return args, rest, cfg


def main(argv: list[str] | None = None) -> dict:
    args, rest, cfg = parse_args(argv)
    names = [n.strip() for n in args.modes.split(",") if n.strip()]
    if args.compile and "compile" not in names:
        names.append("compile")
    unknown = [n for n in names if n not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        set_cpu_threads()
    # One fp32 Accelerator (accelerate's device choice): the bf16 modes enter the autocast
    # region that accelerate's bf16 mode would enter, around the same step.
    accelerator = build_accelerator({"mixed_precision": "no"})
    device = accelerator.device
    config_stem = Path(rest[rest.index("--config") + 1]).stem if "--config" in rest else "defaults"
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]

    load_before = os.getloadavg()
    result, _ = benchmark(cfg, [MODES[n] for n in names], args.steps, args.repeats, args.warmup,
                          args.steps if args.teacher_calls is None else args.teacher_calls, accelerator)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, "
                        f"{torch.backends.cpu.get_cpu_capability()})")
    report = {
        "config": str(rest[rest.index("--config") + 1]) if "--config" in rest else None,
        "overrides": overrides,
        **result,
        "batch_size": cfg["train"]["batch_size"],
        "device": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
        "step_includes": ["mixup", "student forward", "teacher forward in DistillationLoss", "backward",
                          f"{cfg['optim']['opt']} step"] + (["EMA update"] if cfg["train"]["model_ema"] else [])
                         + (["grad clipping"] if cfg["optim"]["clip_grad"] else []),
        "load_average_before_after": [load_before, os.getloadavg()],
    }
    modes = report["modes"]
    if "fp32" in modes and "fast" in modes:
        per_repeat = ratios(modes, "fast", "fp32")
        report.update(fast_over_fp32=statistics.median(per_repeat), fast_over_fp32_per_repeat=per_repeat,
                      fp32_img_per_s=modes["fp32"]["img_per_s"]["median"],
                      fast_img_per_s=modes["fast"]["img_per_s"]["median"])
    if "fp32" in modes:
        report["speedup_over_fp32"] = {n: statistics.median(ratios(modes, n, "fp32"))
                                       for n in modes if n != "fp32"}
    if "fast" in modes:
        report["teacher_share"] = modes["fast"].get("teacher_share")
    if "compile" in modes and "fast" in modes:
        report["compile_over_fast"] = statistics.median(ratios(modes, "compile", "fast"))
    if "compile_math" in modes and "fast_math" in modes:
        report["compile_math_over_fast_math"] = statistics.median(ratios(modes, "compile_math", "fast_math"))
    if args.eval_check:
        data_path = args.data_path or cfg["data"]["path"] or str(ROOT.parent / "shared" / "data" / "cifar10-jpeg")
        report["eval_check"] = eval_check(cfg, accelerator, data_path, args.eval_train_steps, args.eval_images)
    print_table(report)
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / f"train_step_{config_stem}.json"
    atomic_write_text(out, json.dumps(to_plain(report), indent=2) + "\n")
    print(f"saved {out}")
    return report


if __name__ == "__main__":
    main()
