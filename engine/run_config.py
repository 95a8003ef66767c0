"""The ``train`` and ``log`` config keys both training scripts share, and their checks.

Each script adds its own keys (``with_defaults`` changes a default, keeping help and type).
"""
from __future__ import annotations

from data.build import validate_data_config
from data.transforms import validate_aug_config
from engine.trackers import TRACKER_SPEC, check_trackers
from errors import ConfigError
from utils import check

# The `train` keys both training scripts share (each script adds its own), and `log`.
RUN_SPEC = {
    "epochs": (1, "training epochs"),
    "batch_size": (128, "images per process per step (before accumulation)"),
    "accum_steps": (1, "gradient accumulation steps (micro-batches per optimiser step; the last "
                    "window of an epoch may be shorter, as the reference)"),
    "recipe_processes": (None, "processes the recipe was written for: on W, accum_steps x "
                         "recipe_processes / W and the recipe's peak lr; null: as written", int),
    "drop_last": (False, "drop each epoch's last, smaller batch (false: kept, as the reference)"),
    "seed": (0, "run seed (model init, augmentation, mixup, drop path)"),
    "output_dir": ("output/run", "folder for log.txt, config.yaml, state/, checkpoints"),
    "resume": ("auto", "'auto': continue the folder's run if the config matches; 'never': "
               "refuse a used folder; 'force': continue despite config changes",
               ("auto", "never", "force")),
    "max_steps_per_epoch": (None, "cap on optimiser steps per epoch (quick runs); null: all", int),
    "save_every_steps": (0, "also save the resume state every N steps inside an epoch (0: only "
                         "at epoch ends)"),
    "save_every_epochs": (1, "save the resume state and checkpoint.* every N epochs (and after "
                          "the last; best_checkpoint.* whenever the top-1 improves): fewer writes, "
                          "more epochs redone after a crash"),
    "checkpoint_formats": ("auto", "portable checkpoint files: 'auto': .pth and .safetensors for the "
                           "best and last epochs, .pth alone for the others (the resume state holds "
                           "the same weights); 'pth', 'safetensors' or 'both' for every one",
                           ("auto", "pth", "safetensors", "both")),
    "mixed_precision": (None, "'bf16', 'fp16' or 'no'; null: as accelerate launch says",
                        ("no", "fp16", "bf16")),
    "eval_every": (1, "evaluate every N epochs (and always after the last)"),
    "eval_batch_size": (None, "eval batch per process (null: 2 x batch_size)", int),
    "cpu": (False, "run on the CPU even when accelerate finds a GPU (CUDA, MPS, XPU)"),
    "dist_timeout_min": (30, "minutes a process waits in a collective before the run aborts "
                         "(NCCL's own default, 10, is shorter than a dataset build on the main "
                         "process, a slow checkpoint write or uneven compile times)"),
    "tf32": (True, "on CUDA: TF32 matmuls and cudnn.benchmark (fp32 runs use the tensor cores); "
             "no effect on a CPU"),
}
LOG_SPEC = {
    "progress": (True, "show progress bars"),
    "print_every": (0, "also print a line (and log loss and lr to the trackers) every N steps "
                    "(0: only per epoch)"),
    **TRACKER_SPEC,
}


def known_optimizer(name) -> bool:
    """Whether timm's ``create_optimizer_v2`` knows ``name`` (case-insensitive, optionally
    ``lookahead_<name>``), checked against ``timm.optim.list_optimizers()``."""
    if not isinstance(name, str) or not name:
        return False
    from timm.optim import list_optimizers

    parts = name.lower().split("_")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "lookahead"):
        return False
    return parts[-1] in set(list_optimizers())


def validate_run(cfg: dict) -> None:
    """Checks both training scripts need, before any work starts."""
    check_trackers(cfg["log"]["trackers"])
    t = cfg["train"]
    check(cfg["optim"]["lr"] > 0, "optim.lr", f"must be > 0, got {cfg['optim']['lr']}")
    check(0 < cfg["data"]["imb_factor"] <= 1, "data.imb_factor", "must be in (0, 1]")
    check(t["epochs"] > 0, "train.epochs", "must be > 0")
    check(t["batch_size"] > 0, "train.batch_size", "must be > 0")
    check(t["accum_steps"] >= 1, "train.accum_steps", "must be >= 1")
    check(t["eval_every"] >= 1, "train.eval_every", "must be >= 1")
    check(t["dist_timeout_min"] > 0, "train.dist_timeout_min", f"must be > 0, got {t['dist_timeout_min']}")
    check(t["save_every_steps"] >= 0, "train.save_every_steps", "must be >= 0")
    check(t["save_every_epochs"] >= 1, "train.save_every_epochs", "must be >= 1")
    check(t["max_steps_per_epoch"] is None or t["max_steps_per_epoch"] >= 1, "train.max_steps_per_epoch",
          f"must be >= 1 (null: every step of the epoch), got {t['max_steps_per_epoch']}")
    check(t["eval_batch_size"] is None or t["eval_batch_size"] >= 1, "train.eval_batch_size",
          f"must be >= 1 (null: 2 x batch_size), got {t['eval_batch_size']}")
    check(0 <= t["seed"] < 2**63, "train.seed", f"must be an integer in [0, 2**63), got {t['seed']}")
    check(t["output_dir"].strip() != "", "train.output_dir",
          "must name a folder (an empty string would write the run into the current folder)")
    check(cfg["log"]["print_every"] >= 0, "log.print_every", "must be >= 0 (0: only per epoch)")
    check(cfg["sched"]["warmup_epochs"] >= 0, "sched.warmup_epochs",
          f"must be >= 0, got {cfg['sched']['warmup_epochs']}")
    validate_data_config(cfg["data"])
    validate_aug_config(cfg["aug"], cfg["data"]["input_size"])


def effective_accum(train_cfg: dict, world: int) -> int:
    """Micro-batches per optimiser step on ``world`` processes: ``train.accum_steps``, scaled by
    ``recipe_processes / world`` when ``train.recipe_processes`` is set (the effective batch
    ``batch_size x world x accum`` is then the recipe's on any number of processes)."""
    accum, recipe = train_cfg["accum_steps"], train_cfg.get("recipe_processes")
    if not recipe or recipe == world:
        return accum
    if (accum * recipe) % world:
        raise ConfigError(
            f"train.recipe_processes={recipe}: {world} processes cannot keep the recipe's effective "
            f"batch (train.accum_steps={accum} x {recipe} is not a multiple of {world}); use a "
            f"process count dividing {accum * recipe}, or train.recipe_processes=null")
    return accum * recipe // world
