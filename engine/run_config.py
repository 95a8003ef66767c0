"""The ``train`` and ``log`` config keys both training scripts share, and their checks.

Each script adds its own keys (``with_defaults`` changes a default, keeping help and type).
"""
from __future__ import annotations

import math

from data.build import expected_train_images, validate_data_config
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
    "eval_max_samples": (None, "evaluate during training on only this many evaluation images, "
                         "evenly spaced over the split as evaluate.py's eval.max_samples (quick "
                         "runs; the numbers are then not the benchmark's); null: all", int),
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
    check(t.get("eval_max_samples") is None or t["eval_max_samples"] >= 1, "train.eval_max_samples",
          f"must be >= 1 (null: the whole evaluation split), got {t.get('eval_max_samples')}")
    known = expected_train_images(cfg["data"])  # the hub's CIFAR-LT: known without the data
    if known is not None:
        check(t["batch_size"] <= known, "train.batch_size",
              f"{t['batch_size']} is more than the {known} training images of {cfg['data']['dataset']} "
              f"(data.imb_factor={cfg['data']['imb_factor']})")
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


def expected_steps_per_epoch(cfg: dict, world: int) -> tuple[int | None, int | None]:
    """``(training images, optimiser steps per epoch on world processes)`` as far as they are
    known without the data (``data.build.expected_train_images``), else ``(None, None)``:
    the same sampler and loader arithmetic as a run (``engine.loop.steps_per_epoch``)."""
    from data.samplers import build_train_sampler
    from engine.loop import steps_per_epoch

    n = expected_train_images(cfg["data"])
    if n is None:
        return None, None
    t = cfg["train"]
    per_process = len(build_train_sampler(range(n), cfg["aug"], world, 0, t["seed"]))
    batches = per_process // t["batch_size"] if t["drop_last"] else math.ceil(per_process / t["batch_size"])
    return n, steps_per_epoch(batches, effective_accum(t, world), t["max_steps_per_epoch"])


# --smoke: a few steps of a few epochs, the schedule's shape kept, a capped evaluation.
SMOKE_EPOCHS, SMOKE_STEPS, SMOKE_EVAL_SAMPLES = 3, 2, 256
SMOKE_HELP = (f"a quick end-to-end check of this config: {SMOKE_EPOCHS} epochs of at most "
              f"{SMOKE_STEPS} optimiser steps, warm-up, milestones and DRW epochs scaled with the "
              f"epochs, evaluation on {SMOKE_EVAL_SAMPLES} images, written to <train.output_dir>_smoke")


def smoke_config(cfg: dict, epoch_keys: list[tuple[str, str]]) -> str:
    """Turn ``cfg`` into a smoke run in place (``--smoke``) and say what changed.

    ``epoch_keys``: the script's ``(section, key)`` entries that name an epoch (an int, null, a
    list of ints such as milestones, or of ``[epoch, value]`` pairs), scaled by
    ``SMOKE_EPOCHS / train.epochs`` (rounded down) so the phases keep their order and the last
    ones still run; a warm-up of >= 1 epoch stays >= 1. The run folder gets a ``_smoke``
    suffix: a smoke run never mixes with the real run's resume state."""
    t = cfg["train"]
    old = t["epochs"]
    new = min(old, SMOKE_EPOCHS) if old >= 1 else old

    def scale(epoch):
        if isinstance(epoch, bool) or not isinstance(epoch, int) or old < 1 or epoch < 0:
            return epoch  # left to validate() to refuse
        return min(new, epoch * new // old)

    for section, key in epoch_keys:
        value = cfg[section][key]
        if isinstance(value, list):  # epochs, or [epoch, value] pairs (optim.rho_schedule)
            cfg[section][key] = [[scale(v[0]), *v[1:]] if isinstance(v, list) and v else scale(v)
                                 for v in value]
        elif key == "warmup_epochs" and isinstance(value, int) and value >= 1:
            cfg[section][key] = max(1, scale(value))
        else:
            cfg[section][key] = scale(value)
    t["epochs"] = new
    t["max_steps_per_epoch"] = min(t["max_steps_per_epoch"] or SMOKE_STEPS, SMOKE_STEPS)
    t["eval_max_samples"] = min(t.get("eval_max_samples") or SMOKE_EVAL_SAMPLES, SMOKE_EVAL_SAMPLES)
    t["output_dir"] = t["output_dir"].rstrip("/\\") + "_smoke"
    scaled = ", ".join(f"{s}.{k}={cfg[s][k]}" for s, k in epoch_keys if cfg[s][k] is not None)
    return (f"smoke run: {new} epochs (of {old}) x at most {t['max_steps_per_epoch']} steps, "
            f"evaluation on {t['eval_max_samples']} images, {scaled}; output in {t['output_dir']}")
