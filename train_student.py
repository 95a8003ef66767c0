"""Train a DeiT-LT student: a distilled ViT on long-tailed data (DeiT's main.py + engine.py).

    accelerate launch train_student.py --config configs/imagenet_lt.yaml [section.key=value ...]

The CLS head learns the (mixup/cutmix, label-smoothed) ground truth; the DIST head learns the
CNN teacher's hard predictions on the same mixed, strongly augmented batch (out-of-distribution
distillation). From ``distill.drw_epoch`` on, the distillation CE is weighted by effective-number
class weights of the teacher-predicted class, so DIST becomes the tail expert (docs/recipe.md
sections 1-2). Inference reports the heads and their combination
(``DistilledStudent.combine``: the mean of the logits, 'avg'). ``distill.type=none`` trains the
same ViT without a teacher (both heads on the labels): the baseline of the ablations.

Resume is automatic from ``train.output_dir``; see README "When things go wrong".
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm.auto import tqdm

from data import AUG_SPEC, DATA_SPEC
from data.transforms import build_device_feed
from engine import loop, metrics as eval_metrics, run_folder, trackers
from engine.device import build_accelerator
from data.build import finalize_data
from engine.run_config import (LOG_SPEC, RUN_SPEC, SMOKE_HELP, effective_accum, expected_steps_per_epoch,
                               smoke_config, validate_run)
from engine.seeding import seed_everything, step_seed
from errors import CheckpointError, ConfigError, run_main
from losses.distillation import DISTILLATION_TYPES, DistillationLoss, check_distillation_settings
from losses.drw import drw_active, drw_weights
from models.checkpoint import init_student_from, make_checkpoint
from models.distill_teacher import load_distillation_teacher, read_teacher_file
from models.hub import is_hub_source, resolve_folder
from models.ema import ModelEma
from models.student import build_student, output_names, student_arch, student_outputs, unwrap
from utils import check, load_config, report, with_defaults

SPEC = {
    "data": dict(DATA_SPEC),
    "aug": dict(AUG_SPEC),
    "model": {
        "name": ("deit_base_distilled_patch16_224", "timm-style student name "
                 "deit_{tiny,small,base}_distilled_patch{P}_{R}; sets the defaults below"),
        "img_size": (None, "input resolution (null: from the name, e.g. 224)", int),
        "patch_size": (None, "patch size (null: from the name); 4 suits 32x32 CIFAR natively", int),
        "embed_dim": (None, "token width (null: from the name: tiny 192, small 384, base 768)", int),
        "depth": (None, "number of transformer blocks (null: from the name, 12)", int),
        "num_heads": (None, "attention heads (null: from the name: 3/6/12)", int),
        "mlp_ratio": (None, "MLP hidden width / embed_dim (null: 4)", float),
        "drop_path": (0.1, "stochastic depth rate, linear from 0 over the blocks (DeiT)"),
        "fused_attn": (True, "use fused scaled-dot-product attention (same numbers, faster)"),
        "compile": (False, "torch.compile the student (see bench/train_step.py for when it helps)"),
        "init_ckpt": (None, "start from these weights (DeiT's --finetune): a student or timm/DeiT ViT "
                      "file or hf-hub:user/name / local-dir:DIR, fitted to this model (report: init.json)", str),
        "init_heads": ("auto", "model.init_ckpt heads: 'auto': reset when the class count differs; "
                       "'reset': always (same count, other classes); 'keep': refuse a mismatch",
                       ("auto", "reset", "keep")),
    },
    "optim": {
        "opt": ("adamw", "optimizer (timm create_optimizer_v2 name)"),
        "lr": (5e-4, "base lr; the peak lr is lr x global batch / 512 (see lr_scaling)"),
        "lr_scaling": ("reference", "'reference': lr x batch_size x processes / 512 (ignores "
                       "accumulation, as the reference); 'with_accum': also x accum_steps; 'none'",
                       ("reference", "with_accum", "none")),
        "weight_decay": (0.05, "AdamW weight decay; none on biases, norms, tokens, pos_embed"),
        "opt_eps": (1e-8, "AdamW epsilon"),
        "opt_betas": ([0.9, 0.999], "AdamW betas"),
        "clip_grad": (None, "clip the gradient norm to this value (null: no clipping)", float),
    },
    "sched": {
        "warmup_epochs": (5, "linear warm-up epochs from warmup_lr (not a prefix: timm semantics)"),
        "warmup_lr": (1e-6, "lr at the start of warm-up"),
        "min_lr": (1e-5, "cosine floor"),
    },
    "distill": {
        "type": ("hard", "hard: CE on the teacher's argmax; soft: DeiT's KL with tau; none: no "
                 "teacher, both heads on the labels (baseline)", DISTILLATION_TYPES),
        "teacher_ckpt": (None, "teacher checkpoint: ours, the reference LDAM/CE/PaCo files, or with "
                         "distill.teacher_model timm's/torchvision's state dict; or hf-hub:user/name, local-dir:DIR", str),
        "teacher_model": (None, "teacher by name (resnet32, resnet50, any timm CNN) for timm/torchvision "
                          "weights or teacher_pretrained; null: the checkpoint says", str),
        "teacher_pretrained": (False, "distill.teacher_model with timm's pretrained weights (needs "
                               "the network or timm's cache; its head must predict these classes)"),
        "teacher_normalize": ("student", "the teacher's input: the student's batch as is (the reference), "
                              "or re-normalised to the teacher's own or the named mean/std",
                              ("student", "teacher", "imagenet", "cifar")),
        "teacher_input_size": (None, "resize the student's batch to this for the teacher "
                               "(bicubic, antialias=False); null: the teacher's own size", int),
        "fold_bn": (True, "fold the frozen teacher's BatchNorms into its convolutions (same logits "
                    "up to rounding, a faster teacher)"),
        "teacher_fp32": (False, "run the teacher in fp32 without autocast, so hard targets are argmaxed "
                         "from fp32 logits (off: under the run's autocast, the reference)"),
        "alpha": (0.5, "weight of the distillation term: (1-a) base + a distill"),
        "tau": (1.0, "temperature of soft distillation"),
        "drw_epoch": (None, "epoch (0-based) from which the distillation CE is class-weighted "
                      "(DRW); null: never", int),
        "drw_beta": (0.9999, "beta of the effective-number class weights"),
        "no_mixup_drw": (False, "from drw_epoch: no mixup/cutmix and plain CE on hard labels "
                         "(the CIFAR recipe)"),
        "weighted_cls": (False, "in the no-mixup DRW phase also weight the CLS CE by the class "
                         "weights (off in the reference)"),
        "map_targets": ("auto", "map the teacher's labels through the data's class map: 'auto' decides "
                        "from the checkpoints and says so", ("auto", "yes", "no")),
    },
    "train": {
        **with_defaults(RUN_SPEC, epochs=1200, output_dir="output/student"),
        "model_ema": (True, "keep an EMA of the weights (models/ema.py), saved in checkpoints"),
        "model_ema_decay": (0.99996, "EMA decay"),
        "model_ema_cadence": ("micro_batch", "EMA updates: one per micro-batch of the recipe's layout "
                              "(the reference) or one per optimiser step",
                              ("micro_batch", "step")),
        "eval_ema": (False, "also evaluate the EMA weights every epoch"),
    },
    "log": dict(LOG_SPEC),
}


def validate(cfg: dict, files: bool = True) -> None:
    """Every check that needs no data, before any work (ConfigError naming the key; run inside
    ``utils.collect_errors`` all failures are listed at once). ``files=False`` (--print-config,
    --print-schedule) skips those about the teacher / init files."""
    from data.build import check_input_size
    from engine.run_config import known_optimizer
    from models.safe_load import check_torch_file

    validate_run(cfg)
    t, d, m, o, s = cfg["train"], cfg["distill"], cfg["model"], cfg["optim"], cfg["sched"]
    try:
        check_distillation_settings(d["type"], d["alpha"], d["tau"], ConfigError, prefix="distill.")
    except ConfigError as e:  # listed with the other problems (utils.collect_errors)
        report(e)
    check(0.0 <= d["drw_beta"] < 1.0, "distill.drw_beta",
          f"must be in [0, 1) (class weights (1 - beta) / (1 - beta^n)), got {d['drw_beta']}")
    if d["teacher_input_size"] is not None:
        check_input_size(d["teacher_input_size"], "distill.teacher_input_size")
    check(0.0 <= m["drop_path"] < 1.0, "model.drop_path",
          f"is a drop probability: must be in [0, 1), got {m['drop_path']}")
    if m["img_size"] is not None:
        check_input_size(m["img_size"], "model.img_size")
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        check(m[key] is None or m[key] >= 1, f"model.{key}", f"must be >= 1 (null: from the name), got {m[key]}")
    check(m["mlp_ratio"] is None or m["mlp_ratio"] > 0, "model.mlp_ratio", f"must be > 0, got {m['mlp_ratio']}")
    check_student_arch(cfg)
    check(0.0 <= t["model_ema_decay"] <= 1.0, "train.model_ema_decay",
          f"must be in [0, 1] (the EMA keeps decay x old + (1 - decay) x new), got {t['model_ema_decay']}")
    check(known_optimizer(o["opt"]), "optim.opt",
          f"unknown optimizer {o['opt']!r}: use a timm name (timm.optim.list_optimizers(), e.g. "
          f"adamw, sgd, lamb), optionally as lookahead_<name>")
    check(len(o["opt_betas"]) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and 0.0 <= b < 1.0 for b in o["opt_betas"]),
          "optim.opt_betas", f"must be two numbers in [0, 1), like [0.9, 0.999], got {o['opt_betas']}")
    check(o["opt_eps"] > 0, "optim.opt_eps", f"must be > 0, got {o['opt_eps']}")
    check(o["weight_decay"] >= 0, "optim.weight_decay", f"must be >= 0, got {o['weight_decay']}")
    check(o["clip_grad"] is None or o["clip_grad"] > 0, "optim.clip_grad",
          f"must be > 0 (null: no clipping), got {o['clip_grad']}")
    check(s["warmup_lr"] >= 0, "sched.warmup_lr", f"must be >= 0, got {s['warmup_lr']}")
    check(s["min_lr"] >= 0, "sched.min_lr", f"must be >= 0, got {s['min_lr']}")
    check(not d["teacher_pretrained"] or d["teacher_model"] is not None, "distill.teacher_pretrained",
          "needs distill.teacher_model (the timm name whose pretrained weights to load)")
    check(not (d["teacher_pretrained"] and d["teacher_ckpt"] is not None), "distill.teacher_pretrained",
          "give either distill.teacher_ckpt or distill.teacher_pretrained=true, not both")
    if d["type"] != "none" and not d["teacher_pretrained"] and files:  # (printing needs no teacher)
        check(d["teacher_ckpt"] is not None, "distill.teacher_ckpt",
              f"distill.type={d['type']} needs a teacher checkpoint (or use distill.type=none)")
    for key, path in (("distill.teacher_ckpt", d["teacher_ckpt"] if d["type"] != "none" else None),
                      ("model.init_ckpt", m["init_ckpt"])):
        if path is None or not files:
            continue
        if is_hub_source(path):  # hf-hub:/local-dir:/a timm hub folder: fetched (or refused offline) now
            resolve_folder(path, key)
            continue
        check(Path(path).is_file(), key, f"file not found: {path}")
        if not str(path).lower().endswith(".safetensors"):  # (read by safetensors)
            try:  # its header only (not loaded): an empty, cut-short or foreign file stops here
                check_torch_file(path)
            except CheckpointError as e:
                raise CheckpointError(f"{key}: {e}") from None
    check(not (d["type"] == "soft" and d["drw_epoch"] is not None), "distill.drw_epoch",
          "DRW weights apply to hard distillation only (the reference's weighted soft loss is a "
          "known bug); set distill.drw_epoch=null with distill.type=soft")
    if d["drw_epoch"] is not None and t["epochs"] > 0:
        check(0 <= d["drw_epoch"] <= t["epochs"], "distill.drw_epoch",
              f"must be in [0, train.epochs={t['epochs']}]")


def check_student_arch(cfg: dict) -> None:
    """The student the ``model`` section names resolves (``student_arch``'s checks: a known
    name or every number given, embed_dim divisible by num_heads, ...) and takes
    data.input_size images: ConfigError naming the key, before the data are built."""
    m = cfg["model"]
    if any(isinstance(m[k], (int, float)) and m[k] < 1 for k in ("patch_size", "embed_dim", "depth", "num_heads")):
        return  # named by validate's own range checks
    try:
        arch = student_arch(m["name"], 2, img_size=m["img_size"], patch_size=m["patch_size"],
                            embed_dim=m["embed_dim"], depth=m["depth"], num_heads=m["num_heads"],
                            mlp_ratio=m["mlp_ratio"])
    except ValueError as e:
        text = str(e)
        key = ("model.name" if "is not a timm name" in text else "model.num_heads" if "num_heads" in text
               else "model.patch_size" if "patch_size" in text else "model.mlp_ratio" if "mlp_ratio" in text
               else "model")
        check(False, key, text)
        return
    check(arch["img_size"] == cfg["data"]["input_size"], "data.input_size",
          f"must equal the student's img_size {arch['img_size']} (model.name / model.img_size), "
          f"got {cfg['data']['input_size']}")


def smoke(cfg: dict) -> str:
    """``--smoke``: see ``engine.run_config.smoke_config``."""
    return smoke_config(cfg, [("sched", "warmup_epochs"), ("distill", "drw_epoch")])


def print_schedule(cfg: dict) -> None:
    """``--print-schedule``: a ``#`` header line (peak lr, processes assumed, optimiser steps
    per epoch where known without the data, DRW epoch), then one JSON line per epoch, without
    data or models: the lr at the epoch's first optimiser step (6 significant digits; the
    peak lr for ``train.recipe_processes``, else for the ``WORLD_SIZE`` of the environment, 1
    by default), whether DRW and mixup/cutmix are on."""
    import json
    import os

    t = cfg["train"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    peak = scaled_lr(cfg, world)
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=peak)
    scheduler = build_scheduler(cfg, optimizer)
    d, aug = cfg["distill"], cfg["aug"]
    mixup = aug["mixup"] > 0 or aug["cutmix"] > 0
    images, steps = expected_steps_per_epoch(cfg, world)
    print(f"# peak lr {peak:.6g} ({cfg['optim']['lr']:g} x lr rule '{cfg['optim']['lr_scaling']}', "
          f"{t['recipe_processes'] or world} process(es) assumed: "
          f"{'train.recipe_processes' if t['recipe_processes'] else 'WORLD_SIZE'}) | "
          + (f"{steps} optimiser steps/epoch ({images} training images) | " if steps is not None
             else "optimiser steps/epoch: need the data (see the start-up line) | ")
          + f"DRW from epoch {d['drw_epoch'] if d['drw_epoch'] is not None else 'never'} | "
          f"{t['epochs']} epochs")
    for epoch in range(t["epochs"]):
        scheduler.step(epoch)  # what train_one_epoch does at the epoch's first step
        drw = drw_active(epoch, d["drw_epoch"])
        print(json.dumps({"epoch": epoch, "lr": float(f"{optimizer.param_groups[0]['lr']:.6g}"), "drw": drw,
                          "mixup": mixup and not (drw and d["no_mixup_drw"])}))


def build_base_criterion(mixup_active: bool, class_weights: torch.Tensor | None = None) -> nn.Module:
    """The CLS head's loss: soft-target CE on the mixed (label-smoothed) targets; without mixup
    and cutmix plain, optionally class-weighted, CE, as the reference (docs/recipe.md section 2:
    label smoothing only enters through the mixed targets)."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(weight=class_weights)


def train_step(model, criterion, window, optimizer, accelerator, *, mixup_fn=None,
               class_weights=None, clip_grad=None, model_ema=None, ema_updates: int = 1,
               accum_steps: int | None = None, feed=None) -> dict[str, torch.Tensor]:
    """One optimiser update of the student over ``window``, a list of ``(images, labels)``
    micro-batches (gradient accumulation; uint8 images that ``feed`` normalises and erases on
    the device with ``aug.gpu_feed``), and ``ema_updates`` EMA updates (the reference's
    once-per-micro-batch cadence: ``ema_updates - 1`` towards the weights before the optimiser
    step, as its EMA sees them at the window's earlier micro-batches, one towards the new ones).

    Per micro-batch: mixup/cutmix on the device, the student's heads, ``criterion`` (the
    base loss on CLS, distillation on DIST: it calls the teacher on the mixed batch itself),
    backward of loss / ``accum_steps`` (default ``len(window)``; the reference divides by the
    configured accumulation also in an epoch's shorter last window); gradients are all-reduced
    only at the last micro-batch.
    Returns the mean loss terms over the window as detached device tensors (no host sync).
    """
    sums: dict[str, torch.Tensor] = {}
    for i, (samples, targets) in enumerate(window):
        # On the device before mixup (the reference's DRW phase mixed CPU tensors: docs/recipe.md
        # section 7, bug 4).
        samples, targets = loop.to_device((samples, targets), accelerator.device, feed)
        if mixup_fn is not None:
            if len(samples) % 2:  # timm's Mixup needs an even batch: an odd last batch drops one image
                samples, targets = samples[:-1], targets[:-1]
            samples, targets = mixup_fn(samples, targets)
        last = i == len(window) - 1
        with loop.no_sync(accelerator, model, sync=last):
            with accelerator.autocast():
                outputs = model(samples)  # the heads' logits by name
                loss, terms = criterion(samples, outputs, targets, class_weights=class_weights)
            accelerator.backward(loss / (accum_steps or len(window)))
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + value.detach() / len(window)
    if clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    if model_ema is not None and ema_updates > 1:
        # The reference updates its EMA after every micro-batch: the first n - 1 of a window
        # still see the weights before the update (docs/recipe.md section 11, item 4).
        model_ema.update(unwrap(model), micro_batches=ema_updates - 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums.update(loop.skipped_term(accelerator, optimizer))
    if model_ema is not None:
        model_ema.update(unwrap(model), micro_batches=1)
    return sums


def train_one_epoch(model, criterion, data_loader, optimizer, accelerator, *, epoch: int, cfg: dict,
                    lr_scheduler, mixup_fn, class_weights, model_ema, start_step: int,
                    preemption, save_fn, feed=None) -> dict | None:
    """One epoch of ``train_step``; returns the mean loss terms and lr, or None when preempted."""
    model.train()
    tcfg = cfg["train"]
    accum = effective_accum(tcfg, accelerator.num_processes)
    num_steps = loop.steps_per_epoch(len(data_loader), accum, tcfg["max_steps_per_epoch"])
    monitor = loop.StepMonitor(cfg, accelerator, preemption, save_fn, epoch, num_steps)

    def ema_updates(micro_batches: int) -> int:
        """EMA updates this step: one per micro-batch of the recipe's layout (the reference's
        cadence; with train.recipe_processes a window holds recipe_processes / world of the
        reference's micro-batches per process), or one ('step')."""
        if tcfg["model_ema_cadence"] == "step":
            return 1
        return max(1, round(micro_batches * tcfg["accum_steps"] / accum))

    bar = tqdm(loop.windows(data_loader, accum, num_steps, start_step), total=num_steps - start_step,
               desc=f"epoch {epoch}", leave=False,
               disable=not (accelerator.is_main_process and cfg["log"]["progress"]))
    for step, window in bar:
        # lr at fractional epochs, like the reference with accumulation, the epoch's last window
        # at its last micro-batch (and without its one-epoch lag when accumulation is 1:
        # docs/recipe.md section 7, bug 8).
        lr_scheduler.step(epoch + loop.epoch_fraction(step, accum, len(data_loader), num_steps,
                                                      last_at_end=True))
        # Seeded after loading the window: mixup and drop path draw from the step's seed.
        step_seed(tcfg["seed"], epoch, step, accelerator.process_index)
        terms = train_step(model, criterion, window, optimizer, accelerator, mixup_fn=mixup_fn,
                           class_weights=class_weights, clip_grad=cfg["optim"]["clip_grad"],
                           model_ema=model_ema, ema_updates=ema_updates(len(window)),
                           accum_steps=accum, feed=feed)
        if monitor.after_step(step, terms, lr=optimizer.param_groups[0]["lr"]):
            return None
        bar.set_postfix(loss=f"{monitor.mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return {**monitor.epoch_means(), "lr": optimizer.param_groups[0]["lr"], **loop.loss_scale_record(accelerator)}


def scaled_lr(cfg: dict, world_size: int) -> float:
    """DeiT's rule: lr x batch per process x processes / 512 (docs/recipe.md section 2), with
    the recipe's number of processes when ``train.recipe_processes`` is set."""
    t = cfg["train"]
    processes = t["recipe_processes"] or world_size
    factor = {"reference": t["batch_size"] * processes / 512,
              "with_accum": t["batch_size"] * processes * t["accum_steps"] / 512,
              "none": 1.0}[cfg["optim"]["lr_scaling"]]
    return cfg["optim"]["lr"] * factor


def build_model(cfg: dict, num_classes: int) -> tuple[nn.Module, dict]:
    """The student of ``cfg['model']`` for ``num_classes`` classes, and its arch dict."""
    m = cfg["model"]
    arch = student_arch(m["name"], num_classes, img_size=m["img_size"], patch_size=m["patch_size"],
                        embed_dim=m["embed_dim"], depth=m["depth"], num_heads=m["num_heads"],
                        mlp_ratio=m["mlp_ratio"])
    check(arch["img_size"] == cfg["data"]["input_size"], "data.input_size",
          f"must equal the student's img_size {arch['img_size']}")
    return build_student(arch, drop_path_rate=m["drop_path"], fused_attn=m["fused_attn"]), arch


def build_optimizer(cfg: dict, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on biases, norms, tokens and pos_embed."""
    o = cfg["optim"]
    return create_optimizer_v2(model, o["opt"], lr=lr, weight_decay=o["weight_decay"],
                               eps=o["opt_eps"], betas=tuple(o["opt_betas"]))


def build_scheduler(cfg: dict, optimizer) -> CosineLRScheduler:
    """timm cosine over all epochs, warm-up from warmup_lr not as a prefix (the reference)."""
    s = cfg["sched"]
    return CosineLRScheduler(optimizer, t_initial=cfg["train"]["epochs"], lr_min=s["min_lr"],
                             warmup_t=s["warmup_epochs"], warmup_lr_init=s["warmup_lr"],
                             cycle_limit=1, t_in_epochs=True)


def build_mixup(cfg: dict, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (with label smoothing of the mixed targets), or None when both are off."""
    aug = cfg["aug"]
    if not (aug["mixup"] > 0 or aug["cutmix"] > 0):
        return None
    return Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], prob=aug["mixup_prob"],
                 switch_prob=aug["mixup_switch_prob"], mode=aug["mixup_mode"],
                 label_smoothing=aug["smoothing"], num_classes=num_classes)


def check_mixup_batches(cfg: dict, images: int, num_batches: int, accum: int) -> None:
    """ConfigError, before training, where mixup/cutmix would get a batch of one image: timm's
    Mixup needs an even batch, so ``train_step`` drops an odd batch's last image, and a batch
    of one is left empty, whose loss is NaN (a 'non-finite loss' that blames the precision or
    the lr). ``images``: training images per process per epoch; ``num_batches``: its batches."""
    aug, t, d = cfg["aug"], cfg["train"], cfg["distill"]
    if not (aug["mixup"] > 0 or aug["cutmix"] > 0) or (d["no_mixup_drw"] and d["drw_epoch"] == 0):
        return
    why = ("mixup/cutmix (aug.mixup, aug.cutmix) mix pairs of images and drop an odd batch's "
           "last image, which leaves this batch empty")
    if images < 2:
        raise ConfigError(f"the training set gives each process {images} image per epoch; {why}: "
                          f"use at least 2 training images per process, or aug.mixup=0 aug.cutmix=0")
    if t["batch_size"] == 1:
        raise ConfigError(f"train.batch_size=1: every batch holds one image; {why}: use "
                          f"train.batch_size >= 2, or aug.mixup=0 aug.cutmix=0")
    last = images - (num_batches - 1) * t["batch_size"]
    used = min(num_batches, loop.steps_per_epoch(num_batches, accum, t["max_steps_per_epoch"]) * accum)
    if last == 1 and used == num_batches:
        raise ConfigError(f"each epoch's last batch holds one image ({images} training images per "
                          f"process, train.batch_size={t['batch_size']}); {why}: set "
                          f"train.drop_last=true or another train.batch_size")


def check_sharding(accelerator, tcfg: dict) -> None:
    """FSDP1's flat parameters leave no per-parameter shards to keep an EMA beside: refuse
    that combination before any work (FSDP2, ``fsdp_version: 2``, works)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2 \
            and tcfg["model_ema"]:
        raise ConfigError("train.model_ema: the EMA needs FSDP2 (fsdp_version: 2 in the accelerate "
                          "config, as configs/accelerate/fsdp_4gpu_bf16.yaml) or "
                          "train.model_ema=false with FSDP1")


def main(cfg: dict) -> dict:
    # ------------------------------------------------------------------ set-up
    tcfg, dcfg = cfg["train"], cfg["distill"]
    accelerator = build_accelerator(tcfg, **trackers.accelerator_kwargs(cfg))
    out = Path(tcfg["output_dir"])
    lock, resume_dir = run_folder.open_run_folder(accelerator, out, cfg, SPEC)
    teacher_file = read_teacher_file(cfg)  # before the data: a bad file stops the run at once
    seed_everything(tcfg["seed"])  # the same initial weights on every process
    world = accelerator.num_processes
    accum, peak_lr = effective_accum(tcfg, world), scaled_lr(cfg, world)

    # ------------------------------------------------------------------ data
    dataset_train, dataset_val, sampler, data_loader_train, data_loader_val = \
        loop.build_loaders(cfg, accelerator)
    feed = build_device_feed(cfg["aug"], accelerator.device)  # uint8 batches -> normalised, erased
    num_classes = dataset_train.num_classes
    check_mixup_batches(cfg, len(sampler), len(data_loader_train), accum)
    accelerator.print(loop.run_banner(accelerator, tcfg, accum, len(data_loader_train), f"peak lr {peak_lr:.3e}"))

    # ------------------------------------------------------------------ model
    model, arch = build_model(cfg, num_classes)
    if cfg["model"]["init_ckpt"] and resume_dir is None:  # a resumed run restores its own weights
        report = init_student_from(model, cfg["model"]["init_ckpt"],
                                   reset_heads={"auto": None, "reset": True, "keep": False}[cfg["model"]["init_heads"]])
        run_folder.write_init_report(accelerator, out, report)
    optimizer = build_optimizer(cfg, model, peak_lr)
    lr_scheduler = build_scheduler(cfg, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg["model"]["compile"]:  # after prepare: accelerate wraps the plain module (DDP/FSDP)
        model = torch.compile(model)
    check_sharding(accelerator, tcfg)
    # The EMA starts from the prepared model, whose weights every process shares (shards of
    # them under FSDP2). The scheduler is not checkpointed: it is stepped with the
    # (fractional) epoch every step, so it holds no state, and train.epochs may grow on resume.
    model_ema = ModelEma(unwrap(model), tcfg["model_ema_decay"]) if tcfg["model_ema"] else None
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    accelerator.print(f"student {arch} ({n_params / 1e6:.2f}M parameters)")

    # ------------------------------------------------------------------ teacher and loss
    teacher_setup = load_distillation_teacher(cfg, dataset_train, arch["img_size"], accelerator, teacher_file)
    mixup_fn = build_mixup(cfg, num_classes)
    criterion = DistillationLoss(build_base_criterion(mixup_fn is not None),
                                 teacher_setup["teacher"], dcfg["type"], dcfg["alpha"], dcfg["tau"],
                                 teacher_input_size=teacher_setup["input_size"],
                                 class_map=teacher_setup["class_map"],
                                 renormalize=teacher_setup["renormalize"],
                                 teacher_fp32=dcfg["teacher_fp32"]).to(accelerator.device)

    # ------------------------------------------------------------------ resume, evaluation, checkpoints
    heads = output_names(model)

    def evaluate() -> dict:
        metrics = eval_metrics.evaluate(model, data_loader_val, accelerator, student_outputs,
                                        dataset_train.groups, num_classes, cfg["log"]["progress"])
        if tcfg["eval_ema"] and model_ema is not None:  # the same EMA on every process
            ema_model = model_ema.model(lambda: build_model(cfg, num_classes)[0]).to(accelerator.device)
            ema_metrics = eval_metrics.evaluate(ema_model, data_loader_val, accelerator, student_outputs,
                                                dataset_train.groups, num_classes, cfg["log"]["progress"])
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        return metrics

    def checkpoint(epoch: int, metrics: dict) -> dict:  # a collective: every process calls it
        state = loop.full_state_dict(accelerator, model)
        ema_state = model_ema.full_state_dict() if model_ema is not None else None
        return make_checkpoint("student", arch, state, ema_state=ema_state, epoch=epoch,
                               config=cfg, metrics=metrics, dataset=dataset_train)

    run = run_folder.TrainingRun(accelerator, cfg, lock, resume_dir, evaluate=evaluate,
                                 checkpoint=checkpoint, best_key=heads[-1], model_ema=model_ema)

    # ------------------------------------------------------------------ train
    run.evaluate_pending_epoch()
    for epoch in range(run.start_epoch, tcfg["epochs"]):
        start = time.time()
        class_weights = drw_weights(dataset_train.train_counts, epoch, dcfg["drw_epoch"], dcfg["drw_beta"])
        drw = class_weights is not None
        if drw:
            class_weights = class_weights.to(accelerator.device)
        epoch_mixup = mixup_fn
        criterion.base_criterion = build_base_criterion(mixup_fn is not None)
        if drw and dcfg["no_mixup_drw"]:  # CIFAR recipe: plain CE on hard labels from DRW on
            epoch_mixup = None
            criterion.base_criterion = build_base_criterion(
                False, class_weights if dcfg["weighted_cls"] else None)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(
            model, criterion, data_loader_train, optimizer, accelerator, epoch=epoch, cfg=cfg,
            lr_scheduler=lr_scheduler, mixup_fn=epoch_mixup, class_weights=class_weights,
            model_ema=model_ema, start_step=run.start_step(epoch),
            preemption=run.preemption, save_fn=run.save_state, feed=feed)
        if stats is None:
            return run.stop_preempted()
        run.end_epoch({"epoch": epoch, "drw": drw, "time_s": round(time.time() - start, 1),
                       **{f"train_{k}": v for k, v in stats.items()}})
    accelerator.print(f"done: best {heads[-1]} top-1 {run.best} (chosen on the evaluation split: "
                      f"{'held-out train images' if cfg['data']['val_holdout'] else 'the test split, as the reference'})")
    run.close(dataset_val)
    return {"metrics": run.metrics, "best": run.best}


def config_from_args(argv: list[str] | None = None) -> dict:
    """The resolved, checked config of a command line (``--print-config``, ``--print-schedule``
    and config errors exit here), as ``__main__`` runs it."""
    return load_config(SPEC, argv, description=__doc__, validate=validate, actions={
        "--print-schedule": ("print a header (peak lr, processes, steps/epoch, DRW epoch) and one "
                             "JSON line per epoch (epoch, lr, drw, mixup) and exit, without data or "
                             "models", print_schedule)}, finalize=finalize_data, smoke=(SMOKE_HELP, smoke))


if __name__ == "__main__":
    sys.exit(run_main(main, config_from_args()))
