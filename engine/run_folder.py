"""The run folder (``train.output_dir``): resume decision, state saves, log, checkpoints.

Layout: ``config.yaml`` (the resolved config), ``log.txt`` (one JSON line per epoch, DeiT's
habit), ``checkpoint.pth`` / ``best_checkpoint.pth`` (portable, ``models.checkpoint``), and
``state/`` (accelerate's ``save_state``: model, optimizer, EMA, scaler; plus ``progress.json``,
written last, which marks the state complete). Every write is atomic; a kill at any moment
leaves the previous complete state loadable. ``Preemption`` turns SIGTERM into a save at the
next optimiser step.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from errors import RunFolderError
from utils import append_json_line, atomic_torch_save, atomic_write_text, save_config

STATE_DIR = "state"  # accelerate save_state folder: model, optimizer, scheduler, EMA, scaler
PROGRESS_FILE = "progress.json"  # written last inside the state folder: marks it complete
RESUME_FREE_KEYS = {"train.epochs", "train.resume", "train.output_dir", "data.num_workers",
                    "log.progress", "log.print_every", "train.save_every_steps"}


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


def save_training_state(accelerator, output_dir, progress: dict, model_ema=None) -> None:
    """``accelerator.save_state`` into a fresh folder, then swap it in by renames.

    The progress file is written last, so a folder without it is known to be incomplete; the
    previous complete state stays on disk until the new one is in place.
    """
    out = Path(output_dir)
    new, cur, old = out / (STATE_DIR + ".new"), out / STATE_DIR, out / (STATE_DIR + ".old")
    if accelerator.is_main_process and new.exists():
        shutil.rmtree(new)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(new), safe_serialization=True)
    if model_ema is not None:  # safetensors, one file per process (its shards)
        model_ema.save(new, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
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


def start_or_resume(accelerator, resume_dir, output_dir, cfg: dict, model_ema=None) -> dict:
    """The run's progress: fresh, or restored from ``resume_dir``; writes config.yaml.

    The progress records the number of processes: the peak lr, the sampler's shards and the
    mid-epoch step index depend on it, so a state saved with another count is refused.
    """
    progress = {"epoch": 0, "step": 0, "best": None, "num_processes": accelerator.num_processes}
    if resume_dir is not None:
        progress = load_training_state(accelerator, resume_dir, output_dir, model_ema)
        accelerator.print(f"resumed from {resume_dir} at epoch {progress['epoch']} step {progress['step']}")
    if accelerator.is_main_process:
        save_config(cfg, Path(output_dir) / "config.yaml")
    return progress


def load_training_state(accelerator, state_dir, output_dir, model_ema=None) -> dict:
    """Restore everything ``save_training_state`` saved; drop log lines of redone epochs."""
    progress = json.loads((Path(state_dir) / PROGRESS_FILE).read_text())
    saved_world = progress.get("num_processes", accelerator.num_processes)
    if saved_world != accelerator.num_processes:
        raise RunFolderError(
            f"{output_dir} was trained with {saved_world} process(es), this launch has "
            f"{accelerator.num_processes}: the peak lr, the data shards and the position inside "
            f"the epoch depend on it. Relaunch with --num_processes {saved_world}, or start a new "
            f"train.output_dir")
    accelerator.load_state(str(state_dir))
    if model_ema is not None:
        try:
            model_ema.load(state_dir, accelerator.process_index)
        except (OSError, KeyError) as e:
            raise RunFolderError(f"{state_dir}: no usable EMA state ({e}); it was saved by an older "
                                 f"version or damaged: start a new train.output_dir") from None
    log = Path(output_dir) / "log.txt"
    if accelerator.is_main_process and log.is_file():
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


def epoch_end(accelerator, out, progress: dict, record: dict, metrics, checkpoint_fn,
              key: str) -> bool:
    """Log one JSON line, write checkpoint.pth (and best_checkpoint.pth); True if best.

    ``key`` names the metrics entry whose top-1 picks the best checkpoint ('avg' for
    students). Only the main process writes; every write is atomic.
    """
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
