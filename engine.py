"""Pieces of the training/evaluation loop shared by the three scripts (DeiT's engine.py).

- ``evaluate``: top-1/top-5, per-class accuracy and head/mid/tail on the gathered,
  de-duplicated predictions of every process (RECIPE section 6, bug 2: the reference padded
  with duplicates and averaged per-rank group accuracies).
- ``SeededSampler`` / ``SeededDataset``: every training image's augmentation is drawn from
  an RNG seeded by (run seed, epoch, position in the epoch), so a run resumed in the middle
  of an epoch sees exactly the images and augmentations of an uninterrupted run, whatever
  the number of data-loader workers.
- ``step_seed``: the per-step seed of the main process's RNGs (mixup, drop path), for the
  same reason.
- ``build_accelerator`` / ``cpu_threads``: one place that decides device and precision.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


# ----------------------------------------------------------------------------- shared config

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
}
LOG_SPEC = {
    "progress": (True, "show progress bars"),
    "print_every": (0, "also print a line every N steps (0: only per epoch)"),
}


def validate_run(cfg: dict) -> None:
    """Checks both training scripts need, before any work starts."""
    from utils import check

    t = cfg["train"]
    check(cfg["optim"]["lr"] > 0, "optim.lr", f"must be > 0, got {cfg['optim']['lr']}")
    check(0 < cfg["data"]["imb_factor"] <= 1, "data.imb_factor", "must be in (0, 1]")
    check(t["epochs"] > 0, "train.epochs", "must be > 0")
    check(t["batch_size"] > 0, "train.batch_size", "must be > 0")
    check(t["accum_steps"] >= 1, "train.accum_steps", "must be >= 1")
    check(t["eval_every"] >= 1, "train.eval_every", "must be >= 1")
    check(t["save_every_steps"] >= 0, "train.save_every_steps", "must be >= 0")


# ----------------------------------------------------------------------------- seeding


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed torch, numpy and random for one optimisation step of one process.

    timm's Mixup draws from numpy's global RNG and drop path from torch's; seeding them per
    step makes a resumed run continue exactly (no RNG state to save or restore).
    """
    s = derive_seed(seed, epoch, step, rank, 1)
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


class SeededSampler(Sampler):
    """Wrap an index sampler so it yields ``(index, item_seed)`` pairs.

    The item seed depends on (seed, epoch, rank, position), not on which worker loads it.
    """

    def __init__(self, sampler: Sampler, seed: int, rank: int = 0) -> None:
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            yield int(index), derive_seed(self.seed, self.epoch, self.rank, position, 2)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """Index with ``(index, item_seed)``: seeds the RNGs that transforms use, then loads."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            random.seed(seed)
            np.random.seed(seed % (2**32))
            torch.manual_seed(seed)
        else:
            index = key
        return self.dataset[index]


def set_cpu_threads() -> None:
    """Split the CPU cores between the processes launched together on one machine, leaving
    one core to the data-loader workers. ``OMP_NUM_THREADS``, when set, wins.

    Measured on a 2-core machine: a ResNet-32 training step (batch 128, bf16) took 0.6 s with
    1 thread and 15 s with 2 threads while data workers shared the cores; oversubscribed
    OpenMP pools spin and stall, so fewer threads is the safe default.
    """
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = max(1, (os.cpu_count() or 1) // max(1, world) - 1)
    torch.set_num_threads(threads)


def build_accelerator(train_cfg: dict, grad_accum: int = 1):
    """An Accelerator for the run: GPU when present, else CPU (gloo for several processes).

    ``train.mixed_precision`` null leaves the choice to ``accelerate launch`` (flag or config
    file); 'bf16' on CPU uses autocast with bfloat16 (fast on AVX-512 bf16 machines).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    set_cpu_threads()
    kwargs = {}
    if train_cfg.get("mixed_precision") is not None:
        kwargs["mixed_precision"] = train_cfg["mixed_precision"]
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        **kwargs,
    )


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[t, p]`` counts images of true class t predicted as p."""
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, groups: dict,
                           num_classes: int) -> dict:
    """Top-1, top-5, per-class accuracy and group means (RECIPE section 5).

    Group accuracies are means of per-class accuracies over the group's classes, as the
    reference; classes without test images are left out of the means (and reported as null).
    """
    targets = targets.long()
    top1 = logits.argmax(dim=1)
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)
    cm = confusion_matrix(top1, targets, num_classes)
    support = cm.sum(dim=1)
    correct = cm.diag()
    per_class = [(100.0 * c / s).item() if s > 0 else None for c, s in zip(correct, support)]

    def group_mean(classes: Iterable[int]) -> float | None:
        vals = [per_class[c] for c in classes if per_class[c] is not None]
        return float(sum(vals) / len(vals)) if vals else None

    n = max(1, targets.numel())
    return {
        "top1": 100.0 * (top1 == targets).sum().item() / n,
        "top5": 100.0 * top5.sum().item() / n,
        "head": group_mean(groups.get("head", [])),
        "mid": group_mean(groups.get("mid", [])),
        "tail": group_mean(groups.get("tail", [])),
        "per_class": per_class,
        "num_samples": int(targets.numel()),
    }


@torch.no_grad()
def collect_logits(model, data_loader, accelerator, forward, desc: str = "eval",
                   progress: bool = True) -> tuple[dict, torch.Tensor]:
    """Run ``forward(model, images) -> dict of logits`` over a prepared loader on every process.

    ``gather_for_metrics`` drops the samples accelerate duplicated to even out the last
    batch, so the result equals a single-process pass over the whole split, in order.
    """
    from tqdm.auto import tqdm

    model.eval()
    outputs: dict[str, list] = {}
    targets = []
    for images, labels in tqdm(data_loader, desc=desc, leave=False,
                               disable=not (progress and accelerator.is_main_process)):
        with accelerator.autocast():
            out = forward(model, images)
        out = accelerator.gather_for_metrics({k: v.float() for k, v in out.items()})
        for key, value in out.items():
            outputs.setdefault(key, []).append(value.cpu())
        targets.append(accelerator.gather_for_metrics(labels).cpu())
    return {k: torch.cat(v) for k, v in outputs.items()}, torch.cat(targets)


def evaluate(model, data_loader, accelerator, forward, groups: dict, num_classes: int,
             progress: bool = True) -> dict:
    """Metrics for each output of ``forward`` (e.g. cls, dist, avg for a student)."""
    logits, targets = collect_logits(model, data_loader, accelerator, forward, progress=progress)
    return {k: classification_metrics(v, targets, groups, num_classes) for k, v in logits.items()}


def summary_line(metrics: dict) -> str:
    def fmt(v):
        return "  -  " if v is None else f"{v:5.1f}"

    return " | ".join(f"{name}: {fmt(m['top1'])} (h {fmt(m['head'])} m {fmt(m['mid'])} "
                      f"t {fmt(m['tail'])})" for name, m in metrics.items())


def is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all().item())


def steps_per_epoch(num_batches: int, accum: int, max_steps: int | None) -> int:
    """Optimiser updates per epoch: whole accumulation windows, capped by ``max_steps``."""
    steps = max(1, num_batches // accum)
    return min(steps, max_steps) if max_steps else steps


def after_step(cfg: dict, accelerator, preemption, save_fn, epoch: int, step: int,
               num_steps: int, mean_loss: float) -> bool:
    """Bookkeeping after optimiser step ``step`` of both training loops: the optional print
    line, and the resume state on SIGTERM or every ``train.save_every_steps`` steps.
    Returns True when the loop must stop (preempted; the state has been saved)."""
    done = step + 1
    if cfg["log"]["print_every"] and done % cfg["log"]["print_every"] == 0:
        accelerator.print(f"epoch {epoch} step {done}/{num_steps} loss {mean_loss:.4f}")
    if preemption.any(accelerator):
        save_fn(epoch, done)
        return True
    every = cfg["train"]["save_every_steps"]
    if every and done % every == 0 and done < num_steps:
        save_fn(epoch, done)
    return False


# ----------------------------------------------------------------------------- run folder

STATE_DIR = "state"  # accelerate save_state folder: model, optimizer, scheduler, EMA, scaler
PROGRESS_FILE = "progress.json"  # written last inside the state folder: marks it complete
RESUME_FREE_KEYS = {"train.epochs", "train.resume", "train.output_dir", "data.num_workers",
                    "log.progress", "log.print_every", "train.save_every_steps"}


class RunFolderError(RuntimeError):
    """The output folder holds a run that cannot be continued with this config."""


def config_differences(old: dict, new: dict, ignore=RESUME_FREE_KEYS) -> list[str]:
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            full = f"{section}.{key}"
            if full not in ignore and a.get(key) != b.get(key):
                diffs.append(f"{full}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def find_resume_state(output_dir, cfg: dict) -> Path | None:
    """Decide whether to resume (automatic, from the folder's last complete state).

    ``train.resume``: 'auto' resumes when the folder holds a state saved with the same config
    (keys in RESUME_FREE_KEYS, e.g. ``train.epochs``, may differ) and refuses otherwise;
    'never' refuses any folder that holds a state; 'force' resumes despite differences.
    A state folder without its progress file was interrupted while being written: ignored.
    """
    import yaml

    out = Path(output_dir)
    mode = cfg["train"]["resume"]
    state = out / STATE_DIR
    if not (state / PROGRESS_FILE).is_file():
        old = out / (STATE_DIR + ".old")  # a kill between the two renames of save_state
        state = old if (old / PROGRESS_FILE).is_file() else None
    if state is None:
        return None
    if mode == "never":
        raise RunFolderError(f"{out} already holds a run (train.resume=never): choose another "
                             f"train.output_dir, or resume it with train.resume=auto")
    saved_cfg = out / "config.yaml"
    if mode == "auto" and saved_cfg.is_file():
        diffs = config_differences(yaml.safe_load(saved_cfg.read_text()) or {}, cfg)
        if diffs:
            raise RunFolderError(
                f"{out} holds a run with a different config; refusing to mix them:\n  "
                + "\n  ".join(diffs)
                + "\nUse another train.output_dir, or train.resume=force to continue it anyway.")
    return state


def save_training_state(accelerator, output_dir, progress: dict) -> None:
    """``accelerator.save_state`` into a fresh folder, then swap it in by renames.

    The progress file is written last, so a folder without it is known to be incomplete; the
    previous complete state stays on disk until the new one is in place.
    """
    import json
    import shutil

    out = Path(output_dir)
    new, cur, old = out / (STATE_DIR + ".new"), out / STATE_DIR, out / (STATE_DIR + ".old")
    if accelerator.is_main_process and new.exists():
        shutil.rmtree(new)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(new), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from utils import atomic_write_text

        _fault("kill_before_progress")  # test hook: a kill while the state is being written
        atomic_write_text(new / PROGRESS_FILE, json.dumps(progress))
        if old.exists():
            shutil.rmtree(old)
        if cur.exists():
            os.replace(cur, old)
        os.replace(new, cur)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    _fault("kill_after_save")  # test hook: SIGKILL right after a complete save


_SAVES = {"count": 0}


def _fault(point: str) -> None:
    """Fault injection for the crash tests: ``DEIT_LT_FAULT=<point>:<n>`` SIGKILLs this
    process at ``point`` during the n-th state save (1-based). Unset in normal runs."""
    spec = os.environ.get("DEIT_LT_FAULT")
    if not spec or not spec.startswith(point + ":"):
        return
    _SAVES["count"] += 1
    if _SAVES["count"] == int(spec.split(":")[1]):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def start_or_resume(accelerator, resume_dir, output_dir, cfg: dict) -> dict:
    """The run's progress: fresh, or restored from ``resume_dir``; writes config.yaml."""
    from utils import save_config

    progress = {"epoch": 0, "step": 0, "best": None}
    if resume_dir is not None:
        progress = load_training_state(accelerator, resume_dir, output_dir)
        accelerator.print(f"resumed from {resume_dir} at epoch {progress['epoch']} step {progress['step']}")
    if accelerator.is_main_process:
        save_config(cfg, Path(output_dir) / "config.yaml")
    return progress


def load_training_state(accelerator, state_dir, output_dir) -> dict:
    """Restore everything ``save_training_state`` saved; drop log lines of redone epochs."""
    import json

    accelerator.load_state(str(state_dir))
    progress = json.loads((Path(state_dir) / PROGRESS_FILE).read_text())
    log = Path(output_dir) / "log.txt"
    if accelerator.is_main_process and log.is_file():
        from utils import atomic_write_text

        kept = [line for line in log.read_text().splitlines()
                if line.strip() and json.loads(line)["epoch"] < progress["epoch"]]
        atomic_write_text(log, "".join(line + "\n" for line in kept))
    accelerator.wait_for_everyone()
    return progress


class Preemption:
    """SIGTERM sets a flag; the loop saves its state at the next step and exits cleanly."""

    def __init__(self) -> None:
        import signal

        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. some test runners)
            pass

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def any(self, accelerator) -> bool:
        """True on every process as soon as one process was asked to stop."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


class NonFiniteLossError(RuntimeError):
    pass


def run_main(main, cfg: dict) -> None:
    """Run a script's ``main``; expected failures end with one clear line, not a traceback."""
    import sys

    try:
        main(cfg)
    except (RunFolderError, NonFiniteLossError, OSError, ValueError) as e:  # OSError: files, network
        sys.exit(f"error: {e}")


def check_finite(terms: dict, epoch: int, step: int, accelerator) -> None:
    """Stop with a message naming the epoch, step and the loss term that went non-finite.

    The last saved state is left untouched, so the run can be resumed (e.g. in bf16 or with a
    lower lr); DeiT-B's fp16 NaN is a known upstream problem (RECIPE section 6, bug 9).
    """
    bad = [name for name, value in terms.items() if not is_finite(value.detach())]
    flag = torch.tensor([float(len(bad))], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() > 0:
        where = ", ".join(bad) if bad else "on another process"
        raise NonFiniteLossError(
            f"non-finite loss at epoch {epoch}, step {step}: term(s) {where}. The last saved "
            f"state is intact; resume from it (e.g. with train.mixed_precision=bf16 or a lower lr).")


def portable_checkpoint(kind: str, arch: dict, accelerator, model, model_ema, epoch: int,
                        cfg: dict, metrics: dict, dataset) -> dict:
    """The plain-types checkpoint (loadable with ``weights_only=True``) of STYLE.md.

    ``accelerator.get_state_dict`` gathers the full weights under FSDP (a collective: every
    process must call this), and strips DDP/compile wrappers.
    """
    from utils import to_plain

    return {
        "kind": kind,
        "arch": to_plain(arch),
        "model": {k: v.detach().cpu() for k, v in accelerator.get_state_dict(model).items()},
        "model_ema": ({k: v.detach().cpu() for k, v in model_ema.module.state_dict().items()}
                      if model_ema is not None else None),
        "epoch": int(epoch),
        "config": to_plain(cfg),
        "metrics": to_plain(metrics),
        "class_map": to_plain(dataset.class_map),
        "train_counts": to_plain(dataset.train_counts),
        "class_names": to_plain(dataset.class_names),
    }


def build_loaders(cfg: dict, accelerator, train_transform=None):
    """Datasets and loaders of a training script (the same for teacher and student).

    The train loader is not prepared: its sampler is already rank-aware (repeated
    augmentation), and accelerate must not re-shard it (STYLE.md). The eval loader is
    prepared so ``gather_for_metrics`` can drop the padding duplicates.
    """
    from torch.utils.data import DataLoader

    from data import build_datasets, build_train_sampler, build_transform

    tcfg = cfg["train"]
    dataset_train, dataset_val = build_datasets(
        cfg["data"], train_transform or build_transform(True, cfg["data"], cfg["aug"]),
        build_transform(False, cfg["data"], cfg["aug"]), verbose=accelerator.is_main_process)
    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = SeededSampler(build_train_sampler(dataset_train, cfg["aug"], world, rank, tcfg["seed"]),
                            tcfg["seed"], rank)
    workers = cfg["data"]["num_workers"]
    kw = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
              persistent_workers=workers > 0)
    data_loader_train = DataLoader(SeededDataset(dataset_train), sampler=sampler,
                                   batch_size=tcfg["batch_size"], drop_last=True, **kw)
    data_loader_val = DataLoader(dataset_val, shuffle=False, **kw,
                                 batch_size=tcfg.get("eval_batch_size") or 2 * tcfg["batch_size"])
    if len(data_loader_train) < tcfg["accum_steps"]:
        raise ValueError(f"train.batch_size={tcfg['batch_size']} x train.accum_steps="
                         f"{tcfg['accum_steps']} is more than the {len(sampler)} training images "
                         f"each process gets per epoch")
    accelerator.print(f"train: {len(dataset_train)} images, {dataset_train.num_classes} classes, "
                      f"{len(data_loader_train)} batches/epoch/process | eval: {len(dataset_val)} images")
    return dataset_train, dataset_val, sampler, data_loader_train, accelerator.prepare(data_loader_val)


def epoch_end(accelerator, out, progress: dict, record: dict, metrics, checkpoint_fn,
              key: str) -> bool:
    """Log one JSON line, write checkpoint.pth (and best_checkpoint.pth); True if best.

    ``key`` names the metrics entry whose top-1 picks the best checkpoint ('avg' for
    students). Only the main process writes; every write is atomic.
    """
    from utils import append_json_line, atomic_torch_save

    is_best = metrics is not None and (progress["best"] is None or metrics[key]["top1"] > progress["best"])
    if is_best:
        progress["best"] = metrics[key]["top1"]
    progress["last_metrics"] = {k: {m: v for m, v in d.items() if m != "per_class"}
                                for k, d in metrics.items()} if metrics else None
    payload = checkpoint_fn(metrics or {})  # on every process: gathering may be collective
    if accelerator.is_main_process:
        if metrics is not None:
            record.update({f"{h}_{k}": metrics[h][k] for h in metrics
                           for k in ("top1", "top5", "head", "mid", "tail")})
        append_json_line(Path(out) / "log.txt", record)
        atomic_torch_save(payload, Path(out) / "checkpoint.pth")
        if is_best:
            atomic_torch_save(payload, Path(out) / "best_checkpoint.pth")
    return is_best
