"""Train a DeiT-LT student: a distilled ViT on long-tailed data (DeiT's main.py + engine.py).

    accelerate launch train_student.py --config configs/imagenet_lt.yaml [section.key=value ...]

The CLS head learns the (mixup/cutmix, label-smoothed) ground truth; the DIST head learns the
CNN teacher's hard predictions on the same mixed, strongly augmented batch (out-of-distribution
distillation). From ``distill.drw_epoch`` on, the distillation CE is weighted by effective-number
class weights of the teacher-predicted class, so DIST becomes the tail expert (RECIPE.md
sections 1-2). Inference reports cls, dist and their mean (avg). ``distill.type=none`` trains the
same ViT without a teacher (both heads on the labels): the baseline of the ablations.

Resume is automatic from ``train.output_dir``; see README "When things go wrong".
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV2
from tqdm.auto import tqdm

import engine
from data import AUG_SPEC, DATA_SPEC
from losses.distillation import DistillationLoss
from losses.drw import class_balanced_weights
from models.student import build_student, student_logits, student_arch
from models.teacher import fold_batchnorm, load_teacher, teacher_input_size
from utils import check, git_sha, load_config, seed_everything, with_defaults

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
                 "teacher, both heads on the labels (baseline)", ("hard", "soft", "none")),
        "teacher_ckpt": (None, "teacher checkpoint: ours, or the reference LDAM/CE/PaCo files", str),
        "teacher_input_size": (None, "resize the student's batch to this for the teacher "
                               "(bicubic, antialias=False); null: the teacher's own size", int),
        "fold_bn": (True, "fold the frozen teacher's BatchNorms into its convolutions (same logits "
                    "up to rounding, a faster teacher)"),
        "alpha": (0.5, "weight of the distillation term: (1-a) base + a distill"),
        "tau": (1.0, "temperature of soft distillation"),
        "drw_epoch": (None, "epoch (0-based) from which the distillation CE is class-weighted "
                      "(DRW); null: never", int),
        "drw_beta": (0.9999, "beta of the effective-number class weights"),
        "no_mixup_drw": (False, "from drw_epoch: no mixup/cutmix and plain CE on hard labels "
                         "(the CIFAR recipe)"),
        "weighted_cls": (False, "in the no-mixup DRW phase also weight the CLS CE by the class "
                         "weights (off in the reference)"),
        "map_targets": ("auto", "teacher label order: 'auto' decides from the checkpoints and says "
                        "so; 'yes': teacher predicts original labels, map them through the class "
                        "map; 'no': teacher already uses the student's order", ("auto", "yes", "no")),
    },
    "train": {
        **with_defaults(engine.RUN_SPEC, epochs=1200, output_dir="output/student"),
        "model_ema": (True, "keep an EMA of the weights (timm ModelEmaV2), saved in checkpoints"),
        "model_ema_decay": (0.99996, "EMA decay"),
        "eval_ema": (False, "also evaluate the EMA weights every epoch"),
    },
    "log": dict(engine.LOG_SPEC),
}


def validate(cfg: dict) -> None:
    engine.validate_run(cfg)
    t, d = cfg["train"], cfg["distill"]
    check(0.0 <= d["alpha"] <= 1.0, "distill.alpha", "must be in [0, 1]")
    check(d["tau"] > 0, "distill.tau", "must be > 0")
    check(cfg["sched"]["warmup_epochs"] >= 0, "sched.warmup_epochs", "must be >= 0")
    if d["type"] != "none":
        check(d["teacher_ckpt"] is not None, "distill.teacher_ckpt",
              f"distill.type={d['type']} needs a teacher checkpoint (or use distill.type=none)")
        check(Path(d["teacher_ckpt"]).is_file(), "distill.teacher_ckpt",
              f"file not found: {d['teacher_ckpt']}")
    check(not (d["type"] == "soft" and d["drw_epoch"] is not None), "distill.drw_epoch",
          "DRW weights apply to hard distillation only (the reference's weighted soft loss is a "
          "known bug); set distill.drw_epoch=null with distill.type=soft")
    if d["drw_epoch"] is not None:
        check(0 <= d["drw_epoch"] <= t["epochs"], "distill.drw_epoch",
              f"must be in [0, train.epochs={t['epochs']}]")


def scaled_lr(cfg: dict, world_size: int) -> float:
    """DeiT's rule: lr x batch per process x processes / 512 (RECIPE section 2)."""
    t = cfg["train"]
    factor = {"reference": t["batch_size"] * world_size / 512,
              "with_accum": t["batch_size"] * world_size * t["accum_steps"] / 512,
              "none": 1.0}[cfg["optim"]["lr_scaling"]]
    return cfg["optim"]["lr"] * factor


def build_scheduler(cfg: dict, optimizer) -> CosineLRScheduler:
    """timm cosine over all epochs, warm-up from warmup_lr not as a prefix (the reference)."""
    s = cfg["sched"]
    return CosineLRScheduler(optimizer, t_initial=cfg["train"]["epochs"], lr_min=s["min_lr"],
                             warmup_t=s["warmup_epochs"], warmup_lr_init=s["warmup_lr"],
                             cycle_limit=1, t_in_epochs=True)


def build_base_criterion(cfg: dict, mixup_active: bool, class_weights=None) -> nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg["aug"]["smoothing"] > 0 and class_weights is None:
        return LabelSmoothingCrossEntropy(cfg["aug"]["smoothing"])
    return nn.CrossEntropyLoss(weight=class_weights)


def teacher_class_map(cfg: dict, info: dict, dataset, accelerator) -> list | None:
    """Mapping teacher label -> student label, or None; decided explicitly, never silently."""
    mode, student_map, teacher_map = cfg["distill"]["map_targets"], dataset.class_map, info.get("class_map")
    if mode == "no" or student_map is None and teacher_map is None:
        return None
    if mode == "yes" or (teacher_map is None and student_map is not None):
        accelerator.print(f"teacher predictions are mapped through the data's class map "
                          f"(teacher trained on original labels; distill.map_targets={mode})")
        return list(student_map)
    if teacher_map == student_map:
        return None
    raise ValueError(
        f"the teacher's label order (class map stored in {cfg['distill']['teacher_ckpt']}) differs "
        f"from the student's data: it was trained on other data or another class order. Use a "
        f"teacher trained on this data, or distill.map_targets=yes/no to say how its labels map")


def train_one_epoch(model, criterion, data_loader, optimizer, lr_scheduler, accelerator, epoch,
                    cfg, mixup_fn, class_weights, model_ema, start_step, preemption, save_fn):
    """One epoch of optimiser steps; returns mean loss terms, or None when preempted."""
    model.train()
    tcfg = cfg["train"]
    accum, seed, rank = tcfg["accum_steps"], tcfg["seed"], accelerator.process_index
    num_steps = engine.steps_per_epoch(len(data_loader), accum, tcfg["max_steps_per_epoch"])
    if start_step:
        from accelerate import skip_first_batches
        data_loader = skip_first_batches(data_loader, start_step * accum)
    batches = iter(data_loader)
    sums = {"loss": 0.0, "base": 0.0, "distill": 0.0}
    bar = tqdm(range(start_step, num_steps), desc=f"epoch {epoch}", leave=False,
               disable=not (accelerator.is_main_process and cfg["log"]["progress"]))
    for step in bar:
        # lr at fractional epochs, like the reference with accumulation (and without its
        # one-epoch lag when accumulation is 1: RECIPE section 6, bug 8).
        lr_scheduler.step(epoch + step / num_steps)
        engine.step_seed(seed, epoch, step, rank)
        for _ in range(accum):
            samples, targets = next(batches)
            # On the device before mixup (the reference's DRW phase mixed CPU tensors: bug 4).
            samples = samples.to(accelerator.device, non_blocking=True)
            targets = targets.to(accelerator.device, non_blocking=True)
            if mixup_fn is not None:
                samples, targets = mixup_fn(samples, targets)
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(samples)  # (cls_logits, dist_logits) in training mode
                    loss, terms = criterion(samples, outputs, targets, class_weights=class_weights)
                engine.check_finite({"loss": loss, **terms}, epoch, step, accelerator)
                accelerator.backward(loss)  # accelerate divides by accum_steps
                if accelerator.sync_gradients and cfg["optim"]["clip_grad"]:
                    accelerator.clip_grad_norm_(model.parameters(), cfg["optim"]["clip_grad"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums["loss"] += loss.item() / accum
            sums["base"] += terms["base"].item() / accum
            sums["distill"] += terms["distill"].item() / accum
        if model_ema is not None:
            model_ema.update(accelerator.unwrap_model(model))
        mean_loss = sums["loss"] / (step + 1 - start_step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if engine.after_step(cfg, accelerator, preemption, save_fn, epoch, step, num_steps, mean_loss):
            return None
    done = max(1, num_steps - start_step)
    stats = {k: v / done for k, v in sums.items()}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    return stats


def student_outputs(model, images):
    cls_logits, dist_logits = student_logits(model, images)
    return {"cls": cls_logits, "dist": dist_logits, "avg": (cls_logits + dist_logits) / 2}


def main(cfg: dict) -> dict:
    # ------------------------------------------------------------------ set-up
    tcfg, dcfg = cfg["train"], cfg["distill"]
    accelerator = engine.build_accelerator(tcfg, grad_accum=tcfg["accum_steps"])
    out = Path(tcfg["output_dir"])
    resume_dir = engine.find_resume_state(out, cfg)
    seed_everything(tcfg["seed"] + accelerator.process_index)
    world = accelerator.num_processes
    peak_lr = scaled_lr(cfg, world)
    accelerator.print(f"git {git_sha()} | processes {world} | device {accelerator.device} | "
                      f"precision {accelerator.mixed_precision} | effective batch "
                      f"{tcfg['batch_size'] * world * tcfg['accum_steps']} | peak lr {peak_lr:.3e}")

    # ------------------------------------------------------------------ data
    dataset_train, dataset_val, sampler, data_loader_train, data_loader_val = \
        engine.build_loaders(cfg, accelerator)

    # ------------------------------------------------------------------ model
    m = cfg["model"]
    arch = student_arch(m["name"], dataset_train.num_classes, img_size=m["img_size"],
                        patch_size=m["patch_size"], embed_dim=m["embed_dim"], depth=m["depth"],
                        num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"])
    check(arch["img_size"] == cfg["data"]["input_size"], "data.input_size",
          f"must equal the student's img_size {arch['img_size']}")
    model = build_student(arch, drop_path_rate=m["drop_path"], fused_attn=m["fused_attn"])
    model.set_distilled_training(True)  # training forward returns (cls, dist)
    model_ema = ModelEmaV2(model, decay=tcfg["model_ema_decay"]) if tcfg["model_ema"] else None
    o = cfg["optim"]
    optimizer = create_optimizer_v2(model, o["opt"], lr=peak_lr, weight_decay=o["weight_decay"],
                                    eps=o["opt_eps"], betas=tuple(o["opt_betas"]))
    lr_scheduler = build_scheduler(cfg, optimizer)
    if m["compile"]:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is not checkpointed: it is stepped with the (fractional) epoch every
    # step, so it holds no state, and train.epochs may be extended on resume.
    if model_ema is not None:
        model_ema.to(accelerator.device)
        accelerator.register_for_checkpointing(model_ema)
    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    accelerator.print(f"student {arch} ({n_params / 1e6:.2f}M parameters)")

    # ------------------------------------------------------------------ teacher and loss
    teacher, class_map = None, None
    if dcfg["type"] != "none":
        # The teacher is not prepared (no DDP): DistillationLoss freezes it (eval mode, no
        # gradients) and makes it channels-last.
        teacher, tinfo = load_teacher(dcfg["teacher_ckpt"])
        t_classes = tinfo["arch"]["num_classes"]
        if t_classes != dataset_train.num_classes:
            raise ValueError(f"teacher {dcfg['teacher_ckpt']} predicts {t_classes} classes but "
                             f"the data has {dataset_train.num_classes}")
        class_map = teacher_class_map(cfg, tinfo, dataset_train, accelerator)
        if dcfg["fold_bn"]:
            teacher, folded = fold_batchnorm(teacher)
            accelerator.print(f"teacher: {folded} BatchNorm layers folded into the layer before them")
        teacher = teacher.to(accelerator.device)
        t_size = dcfg["teacher_input_size"] or teacher_input_size(tinfo, arch["img_size"])
        accelerator.print(f"teacher {tinfo['arch']} ({tinfo['format']} checkpoint), input {t_size}")
    else:
        t_size = None
    aug = cfg["aug"]
    mixup_active = aug["mixup"] > 0 or aug["cutmix"] > 0
    mixup_fn = Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], prob=aug["mixup_prob"],
                     switch_prob=aug["mixup_switch_prob"], mode=aug["mixup_mode"],
                     label_smoothing=aug["smoothing"], num_classes=dataset_train.num_classes
                     ) if mixup_active else None
    criterion = DistillationLoss(build_base_criterion(cfg, mixup_active), teacher, dcfg["type"],
                                 dcfg["alpha"], dcfg["tau"], teacher_input_size=t_size,
                                 class_map=class_map)
    drw_weights = class_balanced_weights(dataset_train.train_counts, dcfg["drw_beta"]).to(accelerator.device)

    # ------------------------------------------------------------------ resume
    progress = engine.start_or_resume(accelerator, resume_dir, out, cfg)

    def save_state(epoch: int, step: int) -> None:
        engine.save_training_state(accelerator, out, {**progress, "epoch": epoch, "step": step})

    # ------------------------------------------------------------------ train
    preemption = engine.Preemption()
    groups, num_classes = dataset_train.groups, dataset_train.num_classes
    metrics = progress.get("last_metrics")
    for epoch in range(progress["epoch"], tcfg["epochs"]):
        start, metrics = time.time(), None  # log and checkpoint only this epoch's evaluation
        drw = dcfg["drw_epoch"] is not None and epoch >= dcfg["drw_epoch"]
        if drw and dcfg["no_mixup_drw"]:  # CIFAR recipe: plain CE on hard labels from DRW on
            epoch_mixup = None
            criterion.base_criterion = build_base_criterion(
                {"aug": {"smoothing": 0.0}}, False, drw_weights if dcfg["weighted_cls"] else None)
        else:
            epoch_mixup = mixup_fn
            criterion.base_criterion = build_base_criterion(cfg, mixup_active)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, criterion, data_loader_train, optimizer, lr_scheduler,
                                accelerator, epoch, cfg, epoch_mixup, drw_weights if drw else None,
                                model_ema, progress["step"] if epoch == progress["epoch"] else 0,
                                preemption, save_state)
        if stats is None:
            accelerator.print("SIGTERM received: state saved, exiting; rerun the same command to resume")
            return {"preempted": True}
        last = epoch + 1 == tcfg["epochs"]
        if (epoch + 1) % tcfg["eval_every"] == 0 or last:
            metrics = engine.evaluate(accelerator.unwrap_model(model), data_loader_val, accelerator,
                                      student_outputs, groups, num_classes, cfg["log"]["progress"])
            if tcfg["eval_ema"] and model_ema is not None:
                ema_metrics = engine.evaluate(model_ema.module, data_loader_val, accelerator,
                                              student_outputs, groups, num_classes, cfg["log"]["progress"])
                metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
            accelerator.print(f"epoch {epoch}: {engine.summary_line({k: metrics[k] for k in ('cls', 'dist', 'avg')})}")
        record = {"epoch": epoch, "drw": drw, "time_s": round(time.time() - start, 1),
                  **{f"train_{k}": v for k, v in stats.items()}}
        engine.epoch_end(accelerator, out, progress, record, metrics, lambda mets: engine.portable_checkpoint(
            "student", arch, accelerator, model, model_ema, epoch, cfg, mets,
            dataset_train), key="avg")
        save_state(epoch + 1, 0)
    accelerator.print(f"done: best avg top-1 {progress['best']} (chosen on the evaluation split: "
                      f"{'held-out train images' if cfg['data']['val_holdout'] else 'the test split, as the reference'})")
    accelerator.end_training()
    return {"metrics": metrics, "best": progress["best"]}


if __name__ == "__main__":
    engine.run_main(main, load_config(SPEC, description=__doc__, validate=validate))
