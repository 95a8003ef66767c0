"""The ``train`` and ``log`` config keys both training scripts share, and their checks.

Each script adds its own keys (``with_defaults`` changes a default, keeping help and type).
"""
from __future__ import annotations

from utils import check

# The `train` keys both training scripts share (each script adds its own), and `log`.
RUN_SPEC = {
    "epochs": (1, "training epochs"),
    "batch_size": (128, "images per process per step (before accumulation)"),
    "accum_steps": (1, "gradient accumulation steps"),
    "seed": (0, "run seed (model init, augmentation, mixup, drop path)"),
    "output_dir": ("output/run", "folder for log.txt, config.yaml, state/, checkpoints"),
    "resume": ("auto", "'auto': continue the folder's run if the config matches; 'never': "
               "refuse a used folder; 'force': continue despite config changes",
               ("auto", "never", "force")),
    "max_steps_per_epoch": (None, "cap on optimiser steps per epoch (quick runs); null: all", int),
    "save_every_steps": (0, "also save the resume state every N steps inside an epoch (0: only "
                         "at epoch ends)"),
    "mixed_precision": (None, "'bf16', 'fp16' or 'no'; null: as accelerate launch says",
                        ("no", "fp16", "bf16")),
    "eval_every": (1, "evaluate every N epochs (and always after the last)"),
    "eval_batch_size": (None, "eval batch per process (null: 2 x batch_size)", int),
    "cpu": (False, "run on the CPU even when accelerate finds a GPU (CUDA, MPS, XPU)"),
}
LOG_SPEC = {
    "progress": (True, "show progress bars"),
    "print_every": (0, "also print a line every N steps (0: only per epoch)"),
}


def validate_run(cfg: dict) -> None:
    """Checks both training scripts need, before any work starts."""
    t = cfg["train"]
    check(cfg["optim"]["lr"] > 0, "optim.lr", f"must be > 0, got {cfg['optim']['lr']}")
    check(0 < cfg["data"]["imb_factor"] <= 1, "data.imb_factor", "must be in (0, 1]")
    check(t["epochs"] > 0, "train.epochs", "must be > 0")
    check(t["batch_size"] > 0, "train.batch_size", "must be > 0")
    check(t["accum_steps"] >= 1, "train.accum_steps", "must be >= 1")
    check(t["eval_every"] >= 1, "train.eval_every", "must be >= 1")
    check(t["save_every_steps"] >= 0, "train.save_every_steps", "must be >= 0")
