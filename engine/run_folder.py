"""The run folder (``train.output_dir``): resume decision, state saves, log, checkpoints, and
``TrainingRun``: what both training scripts do around their epochs.

Layout: ``config.yaml`` (the resolved config), ``log.txt`` (one JSON line per epoch, DeiT's
habit, with the megabytes the epoch wrote as ``saved_mb``), ``checkpoint`` / ``best_checkpoint``
``.pth`` / ``.safetensors`` (portable, ``models.checkpoint``; ``train.checkpoint_formats``
says which), and ``state/`` (accelerate's ``save_state``: model, optimizer, scaler; the EMA;
plus ``progress.json``, written last, which marks the state complete). Every write is atomic;
a kill at any moment leaves the previous complete state loadable; a full disk ends the run with
one line naming the file. ``Preemption`` turns SIGTERM into a save at the next optimiser step.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import yaml

from engine import trackers
from engine.metrics import summary_line
from errors import CheckpointError, RunFolderError
from models.checkpoint import save_checkpoint
from utils import append_json_line, atomic_write_text, disk_full, disk_full_error, save_config, split_spec

STATE_DIR = "state"  # accelerate save_state folder: model, optimizer, scheduler, EMA, scaler
PROGRESS_FILE = "progress.json"  # written last inside the state folder: marks it complete
RESUME_FREE_KEYS = {"train.epochs", "train.resume", "train.output_dir", "data.num_workers",
                    "log.progress", "log.print_every", "log.trackers", "train.save_every_steps",
                    "train.save_every_epochs", "train.checkpoint_formats"}


_PATH_KEYS = {"data.path", "data.root", "data.train_list", "data.val_list"}  # data.build.finalize_data


def config_differences(old: dict, new: dict, ignore=RESUME_FREE_KEYS, defaults: dict | None = None) -> list[str]:
    """``section.key: old -> new`` for every key that differs. A key the old config does not
    have (a run made before the key existed) counts as equal when the new value is the key's
    default in ``defaults`` (``{section: {key: default}}``): that run behaved as the default."""
    diffs, defaults = [], defaults or {}
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            full = f"{section}.{key}"
            if key not in a and key in b and key in defaults.get(section, {}) \
                    and b[key] == defaults[section][key]:
                continue
            if full in _PATH_KEYS and isinstance(a.get(key), str) and isinstance(b.get(key), str) \
                    and os.path.abspath(os.path.expanduser(a[key])) == b[key]:
                continue  # stored as typed before data paths were stored absolute (same folder)
            if full not in ignore and a.get(key) != b.get(key):
                diffs.append(f"{full}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


RUN_FILES = ("config.yaml", "log.txt", "checkpoint.pth", "best_checkpoint.pth",  # a run's artefacts
             "checkpoint.safetensors", "best_checkpoint.safetensors")
LOCK_FILE = ".lock"


def read_progress(state: Path) -> dict:
    """A state folder's progress.json; a damaged one is a RunFolderError naming it."""
    path = state / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text())
        if not isinstance(progress, dict) or not isinstance(progress.get("epoch"), int) \
                or not isinstance(progress.get("step"), int):
            raise ValueError("expected an object with integer 'epoch' and 'step'")
        return progress
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} is damaged ({e}); the state cannot be resumed: restore it "
                             f"or start a new train.output_dir") from None


def saved_config_yaml(out: Path) -> dict:
    """The folder's config.yaml, as the run that wrote it resolved it."""
    return yaml.safe_load((out / "config.yaml").read_text()) or {}


def find_resume_state(output_dir, cfg: dict, defaults: dict | None = None) -> Path | None:
    """Decide whether to resume (automatic, from the folder's last complete state).

    ``train.resume``: 'auto' resumes when the folder holds a state saved with the same config
    (keys in RESUME_FREE_KEYS, e.g. ``train.epochs``, may differ; keys added to the scripts
    since the run was made may be at their ``defaults``: compared with the config stored
    inside the state, so a deleted or edited config.yaml changes nothing) and refuses
    otherwise; 'never' refuses any folder that holds a state; 'force' resumes despite
    differences. A state folder without its progress file was interrupted while being
    written: ignored (a partial ``state.new/`` is removed). A folder that holds a run's files
    (config.yaml, log.txt, checkpoints) but no state belongs to that run: refused, whatever
    ``train.resume`` says.
    """
    out = Path(output_dir)
    mode = cfg["train"]["resume"]
    state = out / STATE_DIR
    if not (state / PROGRESS_FILE).is_file():
        old = out / (STATE_DIR + ".old")  # a kill between the two renames of save_state
        state = old if (old / PROGRESS_FILE).is_file() else None
    if state is None:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found == ["config.yaml"]:  # a run that stopped before its first save: the same run?
            if not config_differences(saved_config_yaml(out), cfg, defaults=defaults):
                return None
        if found:
            raise RunFolderError(
                f"{out} holds another run's files ({', '.join(found)}) but no resume state: refusing "
                f"to overwrite them. Choose another train.output_dir, or delete those files")
        return None
    if mode == "never":
        raise RunFolderError(f"{out} already holds a run (train.resume=never): choose another "
                             f"train.output_dir, or resume it with train.resume=auto")
    progress = read_progress(state)
    saved = progress.get("config")
    if saved is None and (out / "config.yaml").is_file():  # a state written before configs were stored in it
        saved = saved_config_yaml(out)
    if mode == "auto":
        if saved is None:
            raise RunFolderError(f"{state} does not record the config it was trained with: refusing to "
                                 f"guess. Use train.resume=force to continue it with this config")
        diffs = config_differences(saved, cfg, defaults=defaults)
        if diffs:
            raise RunFolderError(
                f"{out} holds a run with a different config; refusing to mix them:\n  "
                + "\n  ".join(diffs)
                + "\nUse another train.output_dir, or train.resume=force to continue it anyway.")
    return state


class FolderLock:
    """A POSIX record lock (``fcntl.lockf``) on ``<output_dir>/.lock`` held by the main process
    for the run's lifetime: a second run on the same folder is refused, naming the folder and
    the process that holds it.

    A record lock belongs to the process, not to the open file: forked data-loader workers do
    not inherit it, and it goes with the main process when that is killed, so a run killed with
    SIGKILL restarts at once even while its orphaned workers are still exiting (an ``flock``
    would stay held by them). Where the filesystem has no locks (Lustre without ``-o flock``,
    some NFS set-ups), a warning says the folder is unprotected and the run goes on.
    """

    def __init__(self, accelerator, output_dir) -> None:
        import errno
        import fcntl

        from accelerate.utils import broadcast_object_list

        self.handle = None
        message = [None]
        if accelerator.is_main_process:
            out = Path(output_dir)
            out.mkdir(parents=True, exist_ok=True)
            handle = open(out / LOCK_FILE, "a+")
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EAGAIN):  # held by another process
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    handle.close()
                    message[0] = (f"{out} is in use by another run (process {holder}); wait for "
                                  f"it to finish or choose another train.output_dir")
                else:
                    accelerator.print(f"warning: {out / LOCK_FILE}: this filesystem does not support "
                                      f"file locks ({e.strerror}); a second run on the same "
                                      f"train.output_dir would not be stopped")
            if message[0] is None:
                # never closed before release(): closing any descriptor of the file would
                # drop this process's record lock
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                self.handle = handle
        if accelerator.num_processes > 1:
            broadcast_object_list(message)
        if message[0]:
            raise RunFolderError(message[0])

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def clean_partial_state(accelerator, output_dir) -> None:
    """Remove a ``state.new/`` left by a save that was killed or ran out of disk."""
    new = Path(output_dir) / (STATE_DIR + ".new")
    if accelerator.is_main_process and new.exists():
        shutil.rmtree(new, ignore_errors=True)
        accelerator.print(f"removed the incomplete {new} of an interrupted save")
    accelerator.wait_for_everyone()


def open_run_folder(accelerator, output_dir, cfg: dict, spec: dict | None = None
                    ) -> tuple[FolderLock, Path | None]:
    """Lock the folder, clean a partial save, decide on resuming: ``(lock, state or None)``
    (an empty ``train.output_dir`` is refused earlier, by ``validate_run``). ``spec``: the
    script's config spec, whose defaults stand for keys a stored config predates."""
    lock = FolderLock(accelerator, output_dir)
    clean_partial_state(accelerator, output_dir)
    defaults = split_spec(spec)[0] if spec else None
    return lock, find_resume_state(output_dir, cfg, defaults=defaults)


_WRITTEN = {"bytes": 0}  # bytes the main process saw written since the last log record


def state_due(cfg: dict, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with a resume state and ``checkpoint.*``:
    every ``train.save_every_epochs`` epochs, and always after the last one."""
    t = cfg["train"]
    return (epoch + 1) % t.get("save_every_epochs", 1) == 0 or epoch + 1 >= t["epochs"]


def _nearly_full(path: Path) -> bool:
    """Whether the filesystem of ``path`` has (almost) no space left: torch's writer to a file
    name reports a full disk as a RuntimeError that carries no errno."""
    try:
        usage = shutil.disk_usage(path if path.exists() else path.parent)
    except OSError:
        return False
    return usage.free < min(100e6, 0.01 * usage.total)


def save_training_state(accelerator, output_dir, progress: dict, model_ema=None) -> None:
    """``accelerator.save_state`` into a fresh folder, then swap it in by renames.

    The progress file is written last, so a folder without it is known to be incomplete; the
    previous complete state stays on disk until the new one is in place. A full disk is one
    line naming the folder (the partial ``state.new/`` is removed at the next start).
    """
    out = Path(output_dir)
    new, cur, old = out / (STATE_DIR + ".new"), out / STATE_DIR, out / (STATE_DIR + ".old")
    if accelerator.is_main_process and new.exists():
        shutil.rmtree(new)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(new), safe_serialization=True)
        if model_ema is not None:  # safetensors: one file, or one per process under FSDP2
            model_ema.save(new, accelerator.process_index)
    except (OSError, RuntimeError) as e:
        if disk_full(e) or _nearly_full(new):
            raise disk_full_error(new) from None
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fault("kill_before_progress")  # test hook: a kill while the state is being written
        atomic_write_text(new / PROGRESS_FILE, json.dumps(progress))
        _WRITTEN["bytes"] += sum(f.stat().st_size for f in new.rglob("*") if f.is_file())
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
    progress["config"] = cfg  # the state records what it was trained with
    if accelerator.is_main_process:
        save_config(cfg, Path(output_dir) / "config.yaml")
    return progress


def load_training_state(accelerator, state_dir, output_dir, model_ema=None) -> dict:
    """Restore everything ``save_training_state`` saved; drop log lines of redone epochs."""
    progress = read_progress(Path(state_dir))
    saved_world = progress.get("num_processes", accelerator.num_processes)
    if saved_world != accelerator.num_processes:
        raise RunFolderError(
            f"{output_dir} was trained with {saved_world} process(es), this launch has "
            f"{accelerator.num_processes}: the peak lr, the data shards and the position inside "
            f"the epoch depend on it. Relaunch with --num_processes {saved_world}, or start a new "
            f"train.output_dir")
    try:
        accelerator.load_state(str(state_dir))
    except (pickle.UnpicklingError, RuntimeError, OSError, KeyError, ValueError) as e:
        # accelerate reads its files with weights_only=True: a crafted pickle is refused here
        raise RunFolderError(f"{state_dir}: cannot restore the state ({type(e).__name__}: "
                             f"{str(e)[:300]}); nothing in it was executed. Restore the folder or "
                             f"start a new train.output_dir") from None
    if model_ema is not None:
        try:
            model_ema.load(state_dir, accelerator.process_index)
        except (OSError, KeyError, CheckpointError) as e:
            raise RunFolderError(f"no usable EMA state: {e}; restore the folder or start a new "
                                 f"train.output_dir") from None
    # An epoch trained but not finished (its evaluation, checkpoints or log line were cut
    # short, e.g. by a full disk) is logged again when it is finished: drop its line.
    done = progress["pending"]["epoch"] if isinstance(progress.get("pending"), dict) else progress["epoch"]
    log = Path(output_dir) / "log.txt"
    if accelerator.is_main_process and log.is_file():
        kept = []
        for number, line in enumerate(log.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                epoch = record["epoch"]
            except (ValueError, KeyError, TypeError):  # a line cut by a kill, or edited
                accelerator.print(f"warning: {log}:{number} is not a log record; dropped")
                continue
            if epoch < done:
                kept.append(line)
        atomic_write_text(log, "".join(line + "\n" for line in kept))
    accelerator.wait_for_everyone()
    return progress


def clear_pending_epoch(accelerator, output_dir, progress: dict) -> None:
    """After an epoch's evaluation, log line and checkpoints: rewrite the state's progress
    file without the ``pending`` record (the state itself was saved before the evaluation,
    so an evaluation that fails never costs the epoch's training). A state of an earlier
    epoch (``train.save_every_epochs``) is left as it is."""
    progress.pop("pending", None)
    if accelerator.is_main_process:
        path = Path(output_dir) / STATE_DIR / PROGRESS_FILE
        pending = json.loads(path.read_text()).get("pending") if path.is_file() else None
        if isinstance(pending, dict) and pending.get("epoch") == progress["epoch"] - 1:
            atomic_write_text(path, json.dumps(progress))
    accelerator.wait_for_everyone()


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


def checkpoint_formats(choice: str, important: bool) -> tuple[str, ...]:
    """The formats ``train.checkpoint_formats`` gives a checkpoint: 'auto' writes both for a
    best or final epoch's and only .pth for the others (the resume state holds the same
    weights every epoch; a second copy would double the epoch's writes)."""
    if choice == "auto":
        return ("pth", "safetensors") if important else ("pth",)
    return ("pth", "safetensors") if choice == "both" else (choice,)


def write_checkpoints_and_log(accelerator, out, progress: dict, record: dict, metrics, checkpoint_fn,
                              key: str) -> bool:
    """Write ``checkpoint.*`` (when ``state_due``) and ``best_checkpoint.*``, then log one JSON
    line, with the megabytes the epoch wrote as ``saved_mb``; True if best.

    ``key`` names the metrics entry whose top-1 picks the best checkpoint ('avg' for
    students). Only the main process writes; every write is atomic; the log line comes last,
    so an epoch is logged once its files are complete. ``progress['config']`` is the run's.
    """
    is_best = metrics is not None and (progress["best"] is None or metrics[key]["top1"] > progress["best"])
    if is_best:
        progress["best"] = metrics[key]["top1"]
    progress["last_metrics"] = {k: {m: v for m, v in d.items() if m != "per_class"}
                                for k, d in metrics.items()} if metrics else None
    payload = checkpoint_fn(metrics or {})  # on every process: gathering may be collective
    if accelerator.is_main_process:
        cfg, epoch, best = progress["config"], record["epoch"], Path(out) / "best_checkpoint"
        choice = cfg["train"].get("checkpoint_formats", "auto")
        final = epoch + 1 >= cfg["train"]["epochs"]
        written = save_checkpoint(payload, best, checkpoint_formats(choice, True)) if is_best else 0
        if state_due(cfg, epoch):  # a best epoch's: hard links to the best's files, no bytes
            written += save_checkpoint(payload, Path(out) / "checkpoint",
                                       checkpoint_formats(choice, final or is_best),
                                       same_as=best if is_best else None)
        if metrics is not None:
            record.update({f"{h}_{k}": metrics[h][k] for h in metrics
                           for k in ("top1", "top5", "head", "mid", "tail")})
        record["saved_mb"] = round((_WRITTEN["bytes"] + written) / 1e6, 1)
        _WRITTEN["bytes"] = 0
        append_json_line(Path(out) / "log.txt", record)
    return is_best


def plot_best_per_class(accelerator, output_dir, dataset) -> None:
    """``per_class_accuracy.png`` of the best checkpoint's metrics (the plot evaluate.py
    draws): a run's folder shows its heads' experts at a glance. Main process only."""
    found = [p for p in (Path(output_dir) / f"best_checkpoint.{f}" for f in ("pth", "safetensors"))
             if p.is_file()]
    if not accelerator.is_main_process or not found:
        return
    import analysis
    from models.checkpoint import read_checkpoint

    metrics = read_checkpoint(found[0]).get("metrics") or {}
    per_class = {k: v["per_class"] for k, v in metrics.items()
                 if isinstance(v, dict) and "per_class" in v and not k.startswith("ema_")}
    if per_class:
        print(f"plotting the best checkpoint's per-class accuracy: {Path(output_dir) / 'per_class_accuracy.png'}",
              flush=True)
        analysis.plot_per_class(Path(output_dir) / "per_class_accuracy.png", per_class,
                                dataset.train_counts, dataset.groups,
                                f"{Path(output_dir).name}: best checkpoint on {dataset.split}")


class TrainingRun:
    """What both training scripts do around their epochs, in one place: start or resume the run
    in its folder, save its state, and end every epoch the same way (``end_epoch``).

    What differs per script comes in as callables: ``evaluate()`` returns ``{name: metrics}`` on
    the evaluation split (``ema_*`` entries are logged, not printed); ``checkpoint(epoch,
    metrics)`` the portable checkpoint's payload (a collective: every process calls it).
    ``best_key`` names the metrics entry whose top-1 picks the best checkpoint. Starting writes
    config.yaml, starts the trackers and installs the SIGTERM handler (``Preemption``).
    """

    def __init__(self, accelerator, cfg: dict, lock: FolderLock, resume_dir: Path | None, *,
                 evaluate, checkpoint, best_key: str, model_ema=None) -> None:
        self.accelerator, self.cfg, self.lock, self.model_ema = accelerator, cfg, lock, model_ema
        self.evaluate, self.checkpoint, self.best_key = evaluate, checkpoint, best_key
        self.out = Path(cfg["train"]["output_dir"])
        self.progress = start_or_resume(accelerator, resume_dir, self.out, cfg, model_ema)
        trackers.start(accelerator, cfg, run_name=self.out.name)
        self.preemption = Preemption()
        self.metrics = self.progress.get("last_metrics")  # the last evaluation's (None: not evaluated)

    @property
    def start_epoch(self) -> int:
        return self.progress["epoch"]

    @property
    def best(self) -> float | None:
        """The best checkpoint's top-1 (of ``best_key``) so far."""
        return self.progress["best"]

    def start_step(self, epoch: int) -> int:
        """The optimiser step ``epoch`` starts at: where a resumed epoch was saved, else 0."""
        return self.progress["step"] if epoch == self.progress["epoch"] else 0

    def save_state(self, epoch: int, step: int, pending: dict | None = None) -> None:
        """The resume state at ``step`` of ``epoch`` (``pending``: an epoch trained but not yet
        evaluated, logged and checkpointed)."""
        extra = {"pending": pending} if pending else {}
        save_training_state(self.accelerator, self.out,
                            {**self.progress, "epoch": epoch, "step": step, **extra}, self.model_ema)

    def evaluate_pending_epoch(self) -> None:
        """A resumed run's epoch trained and saved but not evaluated yet (its evaluation,
        checkpoints or log line were cut short, e.g. by a bad test image): end it now."""
        if self.progress.get("pending"):
            self._evaluate_and_record(self.progress.pop("pending"))

    def end_epoch(self, record: dict) -> None:
        """After an epoch's training (``record``: its log.txt line so far): save the resume
        state (when ``state_due``; before the evaluation, so an evaluation that fails never
        costs the training), then evaluate, write the checkpoints and the log line."""
        epoch = record["epoch"]
        if state_due(self.cfg, epoch):  # train.save_every_epochs
            self.save_state(epoch + 1, 0, pending=record)
        self._evaluate_and_record(record)

    def _evaluate_and_record(self, record: dict) -> None:
        """Evaluate (every ``train.eval_every`` epochs and after the last), write the
        checkpoints and the log line, clear the pending record, log to the trackers."""
        epoch, metrics, t = record["epoch"], None, self.cfg["train"]
        if (epoch + 1) % t["eval_every"] == 0 or epoch + 1 == t["epochs"]:
            metrics = self.evaluate()
            shown = {k: v for k, v in metrics.items() if not k.startswith("ema_")}
            self.accelerator.print(f"epoch {epoch}: {summary_line(shown)}")
        write_checkpoints_and_log(self.accelerator, self.out, self.progress, record, metrics,
                                  lambda mets: self.checkpoint(epoch, mets), key=self.best_key)
        clear_pending_epoch(self.accelerator, self.out, {**self.progress, "epoch": epoch + 1, "step": 0})
        trackers.log_epoch(self.accelerator, record, epoch)  # the log.txt record, metrics included
        self.metrics = metrics

    def stop_preempted(self) -> dict:
        """After a SIGTERM: the state is saved (by ``train_one_epoch``); say so and stop."""
        self.accelerator.print("SIGTERM received: state saved, exiting; rerun the same command to resume")
        trackers.finish(self.accelerator)
        return {"preempted": True}

    def close(self, dataset_val) -> None:
        """The end of a finished run: the best checkpoint's per-class plot, trackers, lock."""
        plot_best_per_class(self.accelerator, self.out, dataset_val)
        trackers.finish(self.accelerator)
        self.accelerator.end_training()
        self.lock.release()


def write_init_report(accelerator, output_dir, report: dict) -> None:
    """Print what ``model.init_ckpt`` loaded, resized and reset, and keep it as init.json."""
    accelerator.print(f"initialised from {report['source']} ({report.get('format')}): "
                      + "; ".join(f"{k} {len(report[k])}: {', '.join(report[k][:6])}"
                                  + (" ..." if len(report[k]) > 6 else "")
                                  for k in ("resized", "reset", "missing", "unexpected") if report.get(k)))
    if accelerator.is_main_process:
        atomic_write_text(Path(output_dir) / "init.json", json.dumps(report, indent=1))

