"""Train a flat CNN teacher for DeiT-LT: LDAM-DRW / CE-DRW / PaCo, with SAM.

    accelerate launch train_teacher.py --config configs/teachers/cifar10_lt_ldam_drw_sam.yaml

The reference ships no teacher training code; this script follows the published recipes
(docs/recipe.md section 4). Defaults reproduce the LDAM-DRW + SAM CIFAR-10-LT IF100 teacher:
ResNet-32 with a cosine (NormedLinear) head, LDAM margins (max 0.5, s 30), SGD lr 0.1 with
5 warm-up epochs and x0.01 decays at epochs 160 and 180, DRW from epoch 160, SAM rho 0.8,
batch 128, wd 2e-4, 200 epochs. The checkpoint it writes loads as a teacher in
train_student.py (``distill.teacher_ckpt``) and in evaluate.py.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from data import AUG_SPEC, DATA_SPEC
from data.paco_views import paco_transform
from data.transforms import NORMALIZATION, build_device_feed
from engine import loop, metrics as eval_metrics, run_folder, trackers
from engine.device import build_accelerator
from data.build import finalize_data
from engine.run_config import (LOG_SPEC, RUN_SPEC, SMOKE_HELP, effective_accum, expected_steps_per_epoch,
                               smoke_config, validate_run)
from engine.seeding import seed_everything, step_seed
from errors import ConfigError, run_main
from losses.drw import drw_active, drw_weights
from losses.ldam import LDAMLoss
from losses.paco import PaCoLoss
from losses.sam import SAM, disable_running_stats, enable_running_stats, rho_for_epoch
from models.checkpoint import init_teacher_from, make_checkpoint
from models.hub import is_hub_source, resolve_folder
from models.paco import build_paco
from models.student import unwrap
from models.teacher import build_teacher
from utils import Nullable, check, load_config, with_defaults


SPEC = {
    # Native 32x32 CIFAR: the LDAM recipe's RandomCrop(32, 4) + flip + CIFAR normalisation.
    "data": with_defaults(DATA_SPEC, input_size=32),
    # No colour jitter: the published CIFAR teachers use crop, flip, normalise only (timm's
    # create_transform would add ColorJitter(0.3) whenever RandAugment is off).
    "aug": with_defaults(AUG_SPEC, train_crop="pad_crop", aa=None, reprob=0.0, normalize="cifar",
                          eval_crop_ratio=1.0, repeated_aug=False, mixup=0.0, cutmix=0.0,
                          smoothing=0.0, color_jitter=0.0),
    "model": {
        "arch": ("resnet32", "resnet32 (CIFAR, option-A shortcuts), resnet50, or any timm CNN"),
        "head": ("normed", "'normed': cosine NormedLinear head (LDAM); 'linear': plain linear",
                 ("normed", "linear")),
        "channels_last": (True, "channels-last memory format (faster convolutions)"),
        "init_ckpt": (None, "start from these weights: a teacher checkpoint or a timm/torchvision state "
                      "dict of model.arch, fitted to this model (report: init.json)", str),
        "compile": (False, "torch.compile the model"),
    },
    "loss": {
        "type": ("ldam", "ldam: LDAM margins; ce: cross-entropy; paco: parametric contrastive",
                 ("ldam", "ce", "paco")),
        "max_m": (0.5, "LDAM: largest margin (0.5 CIFAR, 0.3 ImageNet-LT/iNat)"),
        "s": (30.0, "LDAM: logit scale"),
        "drw_epoch": (160, "epoch (0-based) from which the loss is class-weighted (DRW); "
                      "null: never", Nullable(int)),
        "drw_beta": (0.9999, "beta of the effective-number class weights"),
        "paco_alpha": (0.01, "PaCo: weight of the contrastive positives (0.01 CIFAR, 0.05 ImageNet)"),
        "paco_beta": (1.0, "PaCo: weight of the parametric (class-centre) positive"),
        "paco_gamma": (1.0, "PaCo: weight of the contrast logits in the denominator"),
        "paco_temperature": (0.05, "PaCo: temperature (0.05 CIFAR, 0.2 ImageNet)"),
        "paco_dim": (32, "PaCo: projection (moco) dim (32 CIFAR, 128 ImageNet)"),
        "paco_queue": (1024, "PaCo: queue length (1024 CIFAR, 8192 ImageNet)"),
        "paco_momentum": (0.999, "PaCo: key-encoder momentum"),
    },
    "optim": {
        "lr": (0.1, "SGD learning rate for train.batch_size x processes (not rescaled)"),
        "momentum": (0.9, "SGD momentum"),
        "weight_decay": (2e-4, "SGD weight decay"),
        "nesterov": (False, "Nesterov momentum"),
        "sam": (True, "wrap SGD in SAM (sharpness-aware minimisation): the 'flat' teacher"),
        "rho": (0.8, "SAM neighbourhood radius (CIFAR LDAM recipe: 0.8 from the first step)"),
        "rho_schedule": (None, "per-epoch rho as [[start_epoch, rho], ...] (ImageNet recipe: "
                         "[[0, 0.05], [5, 0.1], [60, 0.5]]); overrides rho", list),
        "adaptive": (False, "adaptive SAM (ASAM): perturbation scaled by |w|"),
        "sam_bn": ("both", "SAM's BatchNorm statistics: updated in both passes (the published teachers) "
                   "or in the first only, at the real weights", ("both", "first_pass")),
        "clip_grad": (None, "clip the gradient norm to this value (null: none)", float),
    },
    "sched": {
        "sched": ("step", "'step': warm-up then x gamma at each milestone (LDAM recipe); "
                  "'cosine': warm-up then cosine to min_lr (ImageNet recipe)", ("step", "cosine")),
        "warmup_epochs": (5, "linear warm-up epochs: lr x (epoch+1)/warmup as the LDAM code"),
        "warmup_inclusive": (False, "warm up while epoch <= warmup_epochs (PaCo's CIFAR code: its "
                             "last warm-up epoch runs at (w+1)/w x lr); false: epoch < warmup_epochs"),
        "per_epoch": (False, "cosine: change the lr once per epoch (the published ImageNet-LT / iNat "
                      "teachers) instead of every step"),
        "cosine_offset": (0, "cosine: epochs added to both the elapsed and the total epochs after "
                          "the warm-up, (e - w + k) / (E - w + k); 1 = PaCo's ImageNet-LT / iNat code"),
        "milestones": ([160, 180], "epochs (0-based) where the lr is multiplied by gamma"),
        "gamma": (0.01, "lr factor at each milestone (0.01 then 0.0001 overall)"),
        "min_lr": (0.0, "cosine floor"),
    },
    "train": {
        **with_defaults(RUN_SPEC, epochs=200, output_dir="output/teacher"),
        "accum_steps": (1, "gradient accumulation steps (SAM perturbs the accumulated gradient)"),
    },
    "log": dict(LOG_SPEC),
}


def validate(cfg: dict, files: bool = True) -> None:
    """Every check that needs no data, before any work (ConfigError naming the key; run inside
    ``utils.collect_errors`` all failures are listed at once). ``files=False`` (--print-config,
    --print-schedule) skips the one that looks for model.init_ckpt."""
    validate_run(cfg)
    o, s, lcfg, epochs = cfg["optim"], cfg["sched"], cfg["loss"], cfg["train"]["epochs"]
    if cfg["model"]["init_ckpt"] is not None and files and is_hub_source(cfg["model"]["init_ckpt"]):
        resolve_folder(cfg["model"]["init_ckpt"], "model.init_ckpt")  # fetched (or refused offline) now
    elif cfg["model"]["init_ckpt"] is not None and files:
        check(Path(cfg["model"]["init_ckpt"]).is_file(), "model.init_ckpt",
              f"file not found: {cfg['model']['init_ckpt']}")
    check(o["rho"] >= 0, "optim.rho", "must be >= 0")
    check(all(isinstance(m, int) and not isinstance(m, bool) for m in s["milestones"]),
          "sched.milestones", "must be integers")
    if s["sched"] == "step" and epochs > 0:  # (cosine ignores the milestones)
        late = [m for m in s["milestones"] if not 0 <= m <= epochs]
        check(not late, "sched.milestones",
              f"{late} lie outside [0, train.epochs={epochs}]: the lr would never decay there "
              f"(set the milestones for this number of epochs, e.g. sched.milestones=[...])")
    if lcfg["drw_epoch"] is not None and epochs > 0:
        check(0 <= lcfg["drw_epoch"] <= epochs, "loss.drw_epoch",
              f"must be in [0, train.epochs={epochs}] (null: never), got {lcfg['drw_epoch']}")
    check(s["gamma"] > 0, "sched.gamma", f"must be > 0, got {s['gamma']}")
    check(s["min_lr"] >= 0, "sched.min_lr", f"must be >= 0, got {s['min_lr']}")
    check(s["cosine_offset"] >= 0, "sched.cosine_offset", f"must be >= 0, got {s['cosine_offset']}")
    if s.get("warmup_inclusive"):
        check(s["warmup_epochs"] >= 1, "sched.warmup_inclusive",
              "needs sched.warmup_epochs >= 1 (the warm-up divides by it)")
    check(0.0 <= o["momentum"] < 1.0, "optim.momentum", f"must be in [0, 1), got {o['momentum']}")
    check(not o["nesterov"] or o["momentum"] > 0, "optim.nesterov", "Nesterov needs optim.momentum > 0")
    check(o["weight_decay"] >= 0, "optim.weight_decay", f"must be >= 0, got {o['weight_decay']}")
    check(o["clip_grad"] is None or o["clip_grad"] > 0, "optim.clip_grad",
          f"must be > 0 (null: no clipping), got {o['clip_grad']}")
    check(0.0 <= lcfg["drw_beta"] < 1.0, "loss.drw_beta",
          f"must be in [0, 1) (class weights (1 - beta) / (1 - beta^n)), got {lcfg['drw_beta']}")
    check(lcfg["max_m"] > 0, "loss.max_m", f"must be > 0, got {lcfg['max_m']}")
    check(lcfg["s"] > 0, "loss.s", f"must be > 0, got {lcfg['s']}")
    check(lcfg["paco_temperature"] > 0, "loss.paco_temperature", f"must be > 0, got {lcfg['paco_temperature']}")
    check(lcfg["paco_dim"] >= 1, "loss.paco_dim", f"must be >= 1, got {lcfg['paco_dim']}")
    check(lcfg["paco_queue"] >= 1, "loss.paco_queue", f"must be >= 1, got {lcfg['paco_queue']}")
    check(0.0 <= lcfg["paco_momentum"] <= 1.0, "loss.paco_momentum",
          f"is an EMA decay: must be in [0, 1], got {lcfg['paco_momentum']}")
    if cfg["loss"]["type"] == "paco":
        check(cfg["loss"]["drw_epoch"] is None, "loss.drw_epoch",
              "PaCo re-balances with its log class prior: set loss.drw_epoch=null")
        check(cfg["model"]["head"] == "linear", "model.head", "PaCo's classifier is linear")
    if o["rho_schedule"] is not None:
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
                  and p[0] >= 0 and number(p[1]) and p[1] >= 0 for p in o["rho_schedule"]),
              "optim.rho_schedule", "must be a list of [start_epoch, rho] pairs (start_epoch an "
              "integer >= 0, rho a number >= 0)")
        check(any(isinstance(p, list) and p and p[0] == 0 for p in o["rho_schedule"]),
              "optim.rho_schedule", "must start at epoch 0 (a [0, rho] pair)")


def run_rho(cfg: dict, epoch: int = 0) -> float:
    """SAM's rho at ``epoch``: from optim.rho_schedule when set, else optim.rho."""
    o = cfg["optim"]
    return rho_for_epoch(o["rho_schedule"], epoch) if o["rho_schedule"] else o["rho"]


def smoke(cfg: dict) -> str:
    """``--smoke``: see ``engine.run_config.smoke_config``."""
    return smoke_config(cfg, [("sched", "warmup_epochs"), ("sched", "milestones"), ("loss", "drw_epoch"),
                              ("optim", "rho_schedule")])


def learning_rate(cfg: dict, epoch: float) -> float:
    """The teacher's lr at (fractional) ``epoch`` (docs/recipe.md section 4).

    Warm-up: ``lr x (e + 1) / warmup`` for whole epochs ``e < warmup`` (the LDAM code), or
    ``e <= warmup`` with ``sched.warmup_inclusive`` (PaCo's CIFAR code). Then 'step': x gamma
    at each milestone; 'cosine': from lr to min_lr over the remaining epochs, every step or,
    with ``sched.per_epoch``, once per epoch (``sched.cosine_offset`` shifts both counts, as
    PaCo's ``(e - w + 1) / (E - w + 1)``).
    """
    s, base = cfg["sched"], cfg["optim"]["lr"]
    whole = int(epoch)
    if whole < s["warmup_epochs"] or (s["warmup_inclusive"] and whole <= s["warmup_epochs"]):
        return base * (whole + 1) / s["warmup_epochs"]
    if s["sched"] == "step":
        return base * s["gamma"] ** sum(whole >= m for m in s["milestones"])
    t = whole if s["per_epoch"] else epoch
    k = s["cosine_offset"]
    progress = (t - s["warmup_epochs"] + k) / max(1e-8, cfg["train"]["epochs"] - s["warmup_epochs"] + k)
    return s["min_lr"] + 0.5 * (base - s["min_lr"]) * (1 + math.cos(math.pi * progress))


def print_schedule(cfg: dict) -> None:
    """``--print-schedule``: a ``#`` header line (peak lr, processes assumed, optimiser steps
    per epoch where known without the data, DRW epoch), then one JSON line per epoch, without
    data or models: the lr at the epoch's first optimiser step (6 significant digits), whether
    DRW is on, and rho when SAM is on."""
    import os

    o, lcfg, t = cfg["optim"], cfg["loss"], cfg["train"]
    world = t["recipe_processes"] or int(os.environ.get("WORLD_SIZE", "1"))
    images, steps = expected_steps_per_epoch(cfg, world)
    print(f"# peak lr {o['lr']:g} (optim.lr, not rescaled: train.batch_size x {world} process(es) "
          f"assumed) | "
          + (f"{steps} optimiser steps/epoch ({images} training images) | " if steps is not None
             else "optimiser steps/epoch: need the data (see the start-up line) | ")
          + f"DRW from epoch {lcfg['drw_epoch'] if lcfg['drw_epoch'] is not None else 'never'} | "
          f"{t['epochs']} epochs")
    for epoch in range(t["epochs"]):
        line = {"epoch": epoch, "lr": float(f"{learning_rate(cfg, epoch):.6g}"),
                "drw": drw_active(epoch, lcfg["drw_epoch"])}
        if o["sam"]:
            line["rho"] = run_rho(cfg, epoch)
        print(json.dumps(line))


def compute_loss(model, criterion, images, targets, keys=None):
    """(loss, PaCo keys or None). PaCo batches are [query view, key view] (PaCo's two views);
    SAM's second pass passes the first pass's ``keys`` so both see the same contrast set."""
    if isinstance(criterion, PaCoLoss):
        out = model(images[0], images[1], targets, keys=keys)
        return criterion(out.features, out.labels, out.sup_logits), out.keys
    return criterion(model(images), targets), None


def _skip_overflowed_update(accelerator) -> None:
    """What a GradScaler does on an overflowed fp16 gradient, for SAM's first pass (the
    scaler itself never sees that pass): no update, and a smaller scale next step."""
    scaler = accelerator.scaler
    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


def train_step(model, criterion, window, optimizer, accelerator, *, sam: bool,
               clip_grad: float | None = None, accum_steps: int | None = None,
               sam_bn_first_pass_only: bool = False) -> dict[str, torch.Tensor]:
    """One optimiser update of the teacher over ``window`` (micro-batches of one update).

    Pass 1: the gradient at w, accumulated over the window (all-reduced at its last
    micro-batch). With SAM, pass 2: perturb w along that (global) gradient, recompute the
    gradient there over the same window, restore w; the SGD step then uses pass 2's gradient.
    BatchNorm running statistics are updated in both passes, as the published teachers, or
    only in pass 1 (``sam_bn_first_pass_only``: ``optim.sam_bn=first_pass``), so that they
    describe the real weights. Gradients are clipped once per update.

    fp16 (a GradScaler on the accelerator): SAM's direction does not depend on the loss scale,
    so pass 1's scaled gradient perturbs w as it is; an overflow there skips the update and
    lowers the scale; pass 2 goes through the scaler as any step does (unscale, clip, skip on
    inf, update the scale). PaCo: the key encoder's momentum update before, the queue after,
    once per update whatever SAM does. Losses are divided by ``accum_steps`` (default
    ``len(window)``). Returns the loss terms (detached, no host sync).
    """
    paco = isinstance(criterion, PaCoLoss)
    if paco:  # once per update: the key encoder follows the real weights, never w + e
        unwrap(model).momentum_update()

    def accumulate(name: str, keys: list | None) -> list:
        new_keys = []
        for i, (images, targets) in enumerate(window):
            last = i == len(window) - 1
            with loop.no_sync(accelerator, model, sync=last):
                with accelerator.autocast():
                    loss, k = compute_loss(model, criterion, images, targets,
                                           None if keys is None else keys[i])
                accelerator.backward(loss / (accum_steps or len(window)))
            terms[name] = terms.get(name, 0.0) + loss.detach() / len(window)
            new_keys.append(k)
        return new_keys

    terms: dict[str, torch.Tensor] = {}
    keys = accumulate("loss", None)
    if sam:
        base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the SAM
        if not base.first_step(zero_grad=True, skip_non_finite=accelerator.scaler is not None):
            _skip_overflowed_update(accelerator)
            return {**terms, **loop.skipped_term(accelerator, optimizer, skipped=True)}
        if sam_bn_first_pass_only:
            disable_running_stats(model)
        accumulate("loss_perturbed", keys)
        enable_running_stats(model)
        base.restore()
    if clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()  # SAM: the base SGD step at w with pass 2's gradient
    optimizer.zero_grad(set_to_none=True)
    terms.update(loop.skipped_term(accelerator, optimizer))
    if paco:  # once per update (per micro-batch, so no keys are lost), after the step
        for (_, targets), k in zip(window, keys):
            unwrap(model).dequeue_and_enqueue(k, targets)
    return terms


def train_one_epoch(model, criterion, data_loader, optimizer, accelerator, *, epoch: int,
                    cfg: dict, start_step: int, preemption, save_fn, feed=None) -> dict | None:
    """One epoch of ``train_step``; returns the mean loss and lr, or None when preempted."""
    model.train()
    tcfg, o = cfg["train"], cfg["optim"]
    accum = effective_accum(tcfg, accelerator.num_processes)
    num_steps = loop.steps_per_epoch(len(data_loader), accum, tcfg["max_steps_per_epoch"])
    monitor = loop.StepMonitor(cfg, accelerator, preemption, save_fn, epoch, num_steps)
    bar = tqdm(loop.windows(data_loader, accum, num_steps, start_step), total=num_steps - start_step,
               desc=f"epoch {epoch}", leave=False,
               disable=not (accelerator.is_main_process and cfg["log"]["progress"]))
    lr = learning_rate(cfg, epoch)
    for step, window in bar:
        lr = learning_rate(cfg, epoch + loop.epoch_fraction(step, accum, len(data_loader), num_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["rho"] = run_rho(cfg, epoch)
        step_seed(tcfg["seed"], epoch, step, accelerator.process_index)
        window = [loop.to_device(batch, accelerator.device, feed) for batch in window]
        terms = train_step(model, criterion, window, optimizer, accelerator, sam=o["sam"],
                           clip_grad=o["clip_grad"], accum_steps=accum,
                           sam_bn_first_pass_only=o["sam_bn"] == "first_pass")
        if monitor.after_step(step, terms, lr=lr):
            return None
        bar.set_postfix(loss=f"{monitor.mean_loss:.4f}", lr=f"{lr:.2e}")
    return {**monitor.epoch_means(), "lr": lr, **loop.loss_scale_record(accelerator)}


def teacher_outputs(model, images):
    return {"logits": model(images)}


def build_model_and_loss(cfg: dict, counts, num_classes: int, device, init=None):
    """(arch, model, criterion, optimizer) with the model and the criterion on ``device``:
    the criterion's buffers (LDAM's margins, PaCo's log prior) then sit beside the logits, with
    no host-to-device copy per micro-batch. ``init(model)`` runs before the move (model.init_ckpt)."""
    m, lcfg, o = cfg["model"], cfg["loss"], cfg["optim"]
    arch = {"arch": m["arch"], "num_classes": num_classes, "head": m["head"]}
    if lcfg["type"] == "paco":
        # PaCo trains a MoCo-style model; the saved teacher is its query backbone + `linear`.
        model = build_paco(m["arch"], arch["num_classes"], dim=lcfg["paco_dim"], K=lcfg["paco_queue"],
                           m=lcfg["paco_momentum"])
        criterion = PaCoLoss(lcfg["paco_alpha"], lcfg["paco_beta"], lcfg["paco_gamma"],
                             temperature=lcfg["paco_temperature"], K=lcfg["paco_queue"],
                             num_classes=arch["num_classes"], cls_num_list=counts)
    else:
        model = build_teacher(**arch)
    if init is not None:
        init(model)
    if m["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if lcfg["type"] == "ldam":
        criterion = LDAMLoss(counts, max_m=lcfg["max_m"], s=lcfg["s"])
    elif lcfg["type"] == "ce":
        criterion = nn.CrossEntropyLoss()
    model, criterion = model.to(device), criterion.to(device)
    sgd = dict(lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"])
    if o["sam"]:
        optimizer = SAM(model.parameters(), torch.optim.SGD, rho=o["rho"], adaptive=o["adaptive"], **sgd)
    else:
        optimizer = torch.optim.SGD(model.parameters(), **sgd)
    return arch, model, criterion, optimizer


def main(cfg: dict) -> dict:
    # ------------------------------------------------------------------ set-up
    tcfg = cfg["train"]
    accelerator = build_accelerator(tcfg, **trackers.accelerator_kwargs(cfg))
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("train_teacher.py: teachers are small CNNs trained with DDP; launch it "
                          "without an FSDP accelerate config (FSDP is for the student)")
    out = Path(tcfg["output_dir"])
    lock, resume_dir = run_folder.open_run_folder(accelerator, out, cfg, SPEC)
    seed_everything(tcfg["seed"])  # the same initial weights on every process
    world = accelerator.num_processes
    accum = effective_accum(tcfg, world)

    # ------------------------------------------------------------------ data
    paco_views = (paco_transform(cfg["data"], cfg["data"]["dataset"], NORMALIZATION[cfg["aug"]["normalize"]])
                  if cfg["loss"]["type"] == "paco" else None)  # PaCo's two augmented views
    dataset_train, dataset_val, sampler, data_loader_train, data_loader_val = \
        loop.build_loaders(cfg, accelerator, train_transform=paco_views)
    # Plain batches: uint8 images normalised on the device with aug.gpu_feed (PaCo's views stay float).
    feed = build_device_feed(cfg["aug"], accelerator.device) if paco_views is None else None
    counts = dataset_train.train_counts
    accelerator.print(loop.run_banner(accelerator, tcfg, accum, len(data_loader_train), f"lr {cfg['optim']['lr']}"))

    # ------------------------------------------------------------------ model, loss, optimiser
    def init(model):  # a resumed run restores its own weights
        if cfg["model"]["init_ckpt"] and resume_dir is None:
            run_folder.write_init_report(accelerator, out, init_teacher_from(model, cfg["model"]["init_ckpt"]))

    arch, model, criterion, optimizer = build_model_and_loss(cfg, counts, dataset_train.num_classes,
                                                             accelerator.device, init)
    m, lcfg, o = cfg["model"], cfg["loss"], cfg["optim"]
    model, optimizer = accelerator.prepare(model, optimizer)
    if m["compile"]:  # after prepare: accelerate wraps the plain module
        model = torch.compile(model)
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    sam = "off"
    if o["sam"]:
        sam = (f"rho {run_rho(cfg)}" if not o["rho_schedule"] else
               f"rho from optim.rho_schedule {o['rho_schedule']} ({run_rho(cfg)} at epoch 0)")
    accelerator.print(f"teacher {arch} ({n_params / 1e6:.2f}M parameters), loss {lcfg['type']}, SAM {sam}")

    # ------------------------------------------------------------------ resume, evaluation, checkpoints
    def evaluate() -> dict:
        return eval_metrics.evaluate(model, data_loader_val, accelerator, teacher_outputs,
                                     dataset_train.groups, dataset_train.num_classes, cfg["log"]["progress"])

    def checkpoint(epoch: int, metrics: dict) -> dict:  # a collective: every process calls it
        state = loop.full_state_dict(accelerator, model)
        return make_checkpoint("teacher", arch, state, epoch=epoch, config=cfg, metrics=metrics,
                               dataset=dataset_train)  # a PaCo model is stored as its plain teacher

    run = run_folder.TrainingRun(accelerator, cfg, lock, resume_dir, evaluate=evaluate,
                                 checkpoint=checkpoint, best_key="logits")

    # ------------------------------------------------------------------ train
    run.evaluate_pending_epoch()
    for epoch in range(run.start_epoch, tcfg["epochs"]):
        start = time.time()
        weight = drw_weights(counts, epoch, lcfg["drw_epoch"], lcfg["drw_beta"])  # None before DRW
        drw = weight is not None
        if drw:
            weight = weight.to(accelerator.device)
        if isinstance(criterion, LDAMLoss):
            criterion.weight = weight
        elif not isinstance(criterion, PaCoLoss):  # PaCo re-balances with its log prior
            criterion = nn.CrossEntropyLoss(weight=weight)
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, criterion, data_loader_train, optimizer, accelerator,
                                epoch=epoch, cfg=cfg, start_step=run.start_step(epoch),
                                preemption=run.preemption, save_fn=run.save_state, feed=feed)
        if stats is None:
            return run.stop_preempted()
        run.end_epoch({"epoch": epoch, "drw": drw, "time_s": round(time.time() - start, 1),
                       **{f"train_{k}": v for k, v in stats.items()}})
    accelerator.print(f"done: best top-1 {run.best}")
    run.close(dataset_val)
    return {"metrics": run.metrics, "best": run.best}


def config_from_args(argv: list[str] | None = None) -> dict:
    """The resolved, checked config of a command line (``--print-config``, ``--print-schedule``
    and config errors exit here), as ``__main__`` runs it."""
    return load_config(SPEC, argv, description=__doc__, validate=validate, actions={
        "--print-schedule": ("print a header (peak lr, processes, steps/epoch, DRW epoch) and one "
                             "JSON line per epoch (epoch, lr, drw, rho) and exit, without data or "
                             "models", print_schedule)}, finalize=finalize_data, smoke=(SMOKE_HELP, smoke))


if __name__ == "__main__":
    sys.exit(run_main(main, config_from_args()))
