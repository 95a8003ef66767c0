"""The fast training mode's precision settings reach the models and keep the numbers.

``bench/train_step.py`` defines the modes the project compares: ``fp32`` (plain eager fp32,
explicit attention formula, NCHW teacher) and ``fast`` (bf16 autocast, fused attention,
channels-last teacher; what ``train_student.py`` runs with ``train.mixed_precision=bf16``).
These tests check, on tiny models and synthetic data (CPU, a few seconds):

- the mode switch: attention flags and teacher memory layout per mode, the same initial
  weights, and the same fp32 outputs whichever attention path is on;
- the settings reach the models: bf16 logits from the student's heads under the fast
  autocast, an fp32 loss from ``DistillationLoss``, a teacher that gets a channels-last input
  inside the autocast region; ``engine.device.build_accelerator`` with bf16 autocasts matmuls on CPU;
- numerics: 50 real training steps (mixup, student, teacher inside the loss, AdamW) in
  fp32, ``fast`` and ``fast_math`` (bf16 with the explicit attention formula, faster on CPU)
  end at losses within 2%, and the same weights classify held-out images alike (top-1 within
  0.2 points) in fp32 and in bf16.

(``tests/test_models.py`` already checks ``set_fused_attn`` against the plain formula on
one model; here the check goes through the bench's two modes.)
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from engine.device import build_accelerator
from models.student import set_fused_attn, student_outputs
from train_student import SPEC
from utils import load_config

BENCH_PATH = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"
CPU = torch.device("cpu")
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def bench():
    """bench/train_step.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(bench):
    """A patch-4, 32x32, depth-2, width-64 student config, and the bench's ResNet-32 teacher.

    lr 1e-3 without the batch/512 rule, so 50 steps of batch 32 learn something.
    """
    config = BENCH_PATH.parents[1] / "configs" / "cifar10_lt.yaml"
    cfg = load_config(SPEC, ["--config", str(config), "data.input_size=32",
                             "model.name=deit_tiny_distilled_patch4_32", "model.depth=2",
                             "model.embed_dim=64", "model.num_heads=2", "train.batch_size=32",
                             "optim.lr=1e-3", "optim.lr_scaling=none", "train.model_ema=false"])
    _, arch = bench.build_model(cfg, bench.num_classes_of(cfg))
    # The bench's stand-in teacher: a randomly initialised ResNet-32 with LDAM's normed head.
    return cfg, arch, bench.make_teacher(bench.teacher_spec(cfg, arch))


def informative_teacher() -> torch.nn.Module:
    """A tiny CNN teacher that recognises the synthetic classes: one convolution whose filters
    are the class templates (a matched filter), then a linear layer.

    A randomly initialised ResNet-32 predicts one class for every image (its pooled features
    share one dominant direction), which would make the distillation term trivial; a random
    ResNet-32 with a fitted head predicts near chance with tiny margins, so bf16 rounding
    flips its labels on mixed images and the comparison measures the teacher's ties rather
    than the student's arithmetic. This teacher is right on clean images, with margins like a
    trained teacher's; it still has the teacher interface the loss relies on (conv weights that
    take channels-last, eval mode, autocast inside the loss).
    """
    templates = class_templates()
    teacher = torch.nn.Sequential(
        torch.nn.Conv2d(3, NUM_CLASSES, kernel_size=32, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(NUM_CLASSES, NUM_CLASSES),
    )
    with torch.no_grad():
        teacher[0].weight.copy_(templates / templates[0].numel())
        teacher[2].weight.copy_(torch.eye(NUM_CLASSES))
        teacher[2].bias.zero_()
    teacher.bench_input_size = 32  # what bench.make_teacher records for build_mode
    return teacher.eval()


def class_templates() -> torch.Tensor:
    return torch.randn(NUM_CLASSES, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def learnable_batches(count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images = a fixed random template per class + noise: learnable in a few dozen steps."""
    templates = class_templates()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        out.append((templates[y] + 0.8 * torch.randn(batch, 3, 32, 32, generator=g), y))
    return out


@pytest.fixture()
def accelerator():
    """The bench's fp32 Accelerator (its bf16 modes add the autocast region themselves)."""
    with _fresh_accelerate_state():
        yield build_accelerator({"mixed_precision": "no", "cpu": True})


# ----------------------------------------------------------------------------- (a) mode switch


def test_modes_switch_attention_and_teacher_layout(bench, tiny, accelerator):
    cfg, arch, teacher = tiny
    fp32 = bench.build_mode(bench.MODES["fp32"], cfg, teacher, accelerator)
    fast = bench.build_mode(bench.MODES["fast"], cfg, teacher, accelerator)
    assert not any(block.attn.fused_attn for block in fp32.raw_model.blocks)
    assert all(block.attn.fused_attn for block in fast.raw_model.blocks)

    # Same initial weights in both modes: the comparison is of arithmetic only.
    for (key, a), b in zip(fp32.raw_model.state_dict().items(), fast.raw_model.state_dict().values()):
        assert torch.equal(a, b), key

    # The baseline's teacher is NCHW, the fast mode's channels-last (a 16->16 3x3 conv, whose
    # two layouts are distinguishable).
    w_fp32 = bench.inner_teacher(fp32.criterion).get_submodule("layer1.0.conv1").weight
    w_fast = bench.inner_teacher(fast.criterion).get_submodule("layer1.0.conv1").weight
    assert w_fp32.is_contiguous() and not w_fp32.is_contiguous(memory_format=torch.channels_last)
    assert w_fast.is_contiguous(memory_format=torch.channels_last) and not w_fast.is_contiguous()
    assert not bench.inner_teacher(fast.criterion).training
    # train_student's distill.fold_bn: the fast mode's teacher has its BatchNorms folded.
    def n_bn(criterion):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in bench.inner_teacher(criterion).modules())
    assert n_bn(fp32.criterion) == 31 and n_bn(fast.criterion) == 0

    # fp32 eval: the explicit formula (fp32 mode) and fused SDPA (fast mode's model, run
    # without autocast) give the same logits.
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = fp32.raw_model.eval()(x)
        fused = fast.raw_model.eval()(x)
        set_fused_attn(fast.raw_model, False)  # and the switch back to the formula
        assert not any(block.attn.fused_attn for block in fast.raw_model.blocks)
        switched = fast.raw_model(x)
    for a, b, c in zip(plain.values(), fused.values(), switched.values()):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- (b) settings reach the models


def _record_teacher(teacher: torch.nn.Module) -> tuple[dict, list]:
    seen: dict = {}

    def pre_hook(module, args):
        x = args[0]
        seen.update(input_dtype=x.dtype, autocast=torch.is_autocast_enabled("cpu"),
                    channels_last=x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    def hook(module, args, output):
        seen["output_dtype"] = output.dtype

    return seen, [teacher.register_forward_pre_hook(pre_hook), teacher.register_forward_hook(hook)]


@pytest.mark.parametrize("mode", ["fp32", "fast"])
def test_precision_reaches_student_teacher_and_loss(bench, tiny, mode, accelerator):
    cfg, arch, teacher = tiny
    state = bench.build_mode(bench.MODES[mode], cfg, teacher, accelerator)
    x, y = learnable_batches(1, 8, seed=0)[0]
    x, targets = state.mixup_fn(x.clone(), y)
    heads = {}
    handles = [state.raw_model.head.register_forward_hook(lambda m, a, o: heads.update(cls=o.dtype)),
               state.raw_model.head_dist.register_forward_hook(lambda m, a, o: heads.update(dist=o.dtype))]
    seen, teacher_handles = _record_teacher(bench.inner_teacher(state.criterion))
    try:
        with bench.autocast(state.mode, CPU):
            outputs = state.model(x)
            cls_logits, dist_logits = outputs["cls"], outputs["dist"]
            loss, terms = state.criterion(x, outputs, targets)
    finally:
        for handle in handles + teacher_handles:
            handle.remove()

    low = torch.bfloat16 if mode == "fast" else torch.float32
    assert cls_logits.dtype == dist_logits.dtype == low
    assert heads == {"cls": low, "dist": low}  # the linear heads themselves ran in that dtype
    # DistillationLoss computes in fp32 whatever the logits' dtype.
    assert loss.dtype == terms["base"].dtype == terms["distill"].dtype == torch.float32
    assert torch.isfinite(loss)
    # The teacher gets the fp32 mixed batch; in the fast mode channels-last and inside the
    # autocast region (its convolutions then run in bf16), in fp32 plain NCHW without it.
    assert seen["input_dtype"] == torch.float32
    assert seen["autocast"] is (mode == "fast")
    assert seen["channels_last"] is (mode == "fast")
    assert seen["output_dtype"] == low
    loss.backward()
    # Parameters and their gradients stay fp32 (autocast casts copies), as AdamW expects.
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in state.raw_model.parameters())
    assert all(p.dtype == torch.float32 for p in state.raw_model.parameters())


@contextlib.contextmanager
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state; isolate this test from any other (and
    restore the torch thread count, which build_accelerator sets for the whole process)."""
    from accelerate.state import AcceleratorState

    threads, environ = torch.get_num_threads(), dict(os.environ)
    AcceleratorState._reset_state(True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def test_build_accelerator_bf16_autocasts_matmuls_on_cpu():
    with _fresh_accelerate_state():
        accelerator = build_accelerator({"mixed_precision": "bf16"})
        assert accelerator.mixed_precision == "bf16"
        assert accelerator.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        a = torch.randn(8, 16, device=accelerator.device)
        w = torch.randn(4, 16, device=accelerator.device)
        with accelerator.autocast():
            assert (a @ w.t()).dtype == torch.bfloat16
            assert torch.nn.functional.linear(a, w).dtype == torch.bfloat16
        assert (a @ w.t()).dtype == torch.float32  # nothing leaks out of the region


# ----------------------------------------------------------------------------- (c) numerics


def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fast: bool) -> dict:
    """Top-1 (%) of each head in fp32 (explicit attention) or the fast mode (bf16, fused)."""
    model.eval()
    set_fused_attn(model, fast)
    region = torch.autocast("cpu", torch.bfloat16) if fast else contextlib.nullcontext()
    with torch.no_grad(), region:
        logits = {k: v.float() for k, v in student_outputs(model, x).items()}
    return {k: 100.0 * (v.argmax(1) == y).float().mean().item() for k, v in logits.items()}


def test_fp32_and_fast_training_agree(bench, tiny, accelerator):
    cfg, arch, _ = tiny
    teacher = informative_teacher()
    batches = learnable_batches(8, cfg["train"]["batch_size"], seed=0)  # a fixed dataset, cycled
    losses, states = {}, {}
    for mode in ("fp32", "fast", "fast_math"):  # fast_math: bf16 with the explicit attention
        states[mode] = bench.build_mode(bench.MODES[mode], cfg, teacher, accelerator)
        # run_steps seeds mixup and drop path per step: both modes see the same draws.
        _, losses[mode], _ = bench.run_steps(states[mode], batches, 0, 50)
    last = {mode: sum(v[-10:]) / 10 for mode, v in losses.items()}
    first = sum(losses["fp32"][:10]) / 10
    assert last["fp32"] < 0.85 * first, f"the tiny student did not learn: {first:.3f} -> {last['fp32']:.3f}"
    for mode in ("fast", "fast_math"):
        assert abs(last[mode] - last["fp32"]) <= 0.02 * last["fp32"], last

    # The same (fp32-trained) weights, evaluated both ways on held-out images.
    x, y = (torch.cat(t) for t in zip(*learnable_batches(16, 128, seed=1)))  # 2048 images
    model = states["fp32"].raw_model
    acc_fp32, acc_fast = _top1(model, x, y, fast=False), _top1(model, x, y, fast=True)
    assert acc_fp32["cls"] > 50.0, acc_fp32  # far above chance (10%): a meaningful check
    for head in ("cls", "dist", "avg"):
        assert abs(acc_fast[head] - acc_fp32[head]) <= 0.2, (head, acc_fp32, acc_fast)
