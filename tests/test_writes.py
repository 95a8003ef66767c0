"""What a run writes, and what happens when writing goes wrong (README "When things go wrong"):
the folder lock of a killed run is free at once (its forked data workers do not hold it); a
full disk is one line naming the file, leaves nothing half-written and the epoch logged once;
the EMA is saved once unless sharded and a damaged EMA file is named; ``train.checkpoint_formats``
and ``train.save_every_epochs`` choose what an epoch writes, and its log record says how much.

Mostly unit tests with a stand-in accelerator; one end-to-end run for the full disk.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import make_image_dataset
from test_train import COUNTS_TEST, COUNTS_TRAIN, ROOT, STUDENT_ARGS, log_lines, run


class Accelerator:
    """What the run-folder functions use of accelerate's Accelerator, for one process."""

    is_main_process, num_processes, process_index = True, 1, 0

    def __init__(self) -> None:
        self.printed: list[str] = []

    def print(self, *args) -> None:
        self.printed.append(" ".join(str(a) for a in args))

    def wait_for_everyone(self) -> None:
        pass

    def load_state(self, folder: str) -> None:
        pass


# ----------------------------------------------------------------------------- the folder lock


def test_a_killed_runs_forked_workers_do_not_hold_its_lock(tmp_path):
    """The main process takes the lock, forks a worker (as a DataLoader does) and is killed
    with SIGKILL; while the orphaned worker lives, a new run gets the folder."""
    from engine.run_folder import FolderLock

    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from engine.run_folder import FolderLock

        class Accelerator:
            is_main_process, num_processes = True, 1

        lock = FolderLock(Accelerator(), {str(tmp_path)!r})  # held, as the scripts hold it
        child = os.fork()
        if child == 0:  # the worker: lives on after its parent is killed
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    worker = int(proc.stdout.split()[0])
    try:
        os.kill(worker, 0)  # the worker is alive ...
        lock = FolderLock(Accelerator(), tmp_path)  # ... and the folder is free
        lock.release()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_lock_held_by_a_live_run_refuses_the_folder(tmp_path):
    from engine.run_folder import FolderLock
    from errors import RunFolderError

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(tmp_path / '.lock')!r}, "a+")
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(f"{{os.getpid()}}\\n"); f.flush()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by another run \\(process {holder.pid}\\)"):
            FolderLock(Accelerator(), tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import fcntl

    from engine.run_folder import FolderLock

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    accelerator = Accelerator()
    FolderLock(accelerator, tmp_path).release()
    assert any("does not support file locks" in line for line in accelerator.printed)


# ----------------------------------------------------------------------------- a full disk


def _enospc_torch_save(obj, f, *args, **kwargs):
    """torch.save on a full disk: part of the file written, then the RuntimeError torch's writer
    raises while handling the file's OSError."""
    f.write(b"partial")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_the_old_file(tmp_path, monkeypatch):
    from errors import DiskFullError
    from utils import append_json_line, atomic_torch_save, disk_full

    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 0}, path)
    monkeypatch.setattr(torch, "save", _enospc_torch_save)
    with pytest.raises(DiskFullError, match=f"{path}: no space left on the device"):
        atomic_torch_save({"epoch": 1}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 0}  # the previous file, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # no temporary left
    # safetensors' writer reports the OS error in its own message
    assert disk_full(Exception('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))
    assert not disk_full(RuntimeError("unexpected pos 704 vs 598"))

    class FullFile:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setitem(__builtins__ if isinstance(__builtins__, dict) else vars(__builtins__), "open", FullFile)
    with pytest.raises(DiskFullError, match="log.txt: no space left"):
        append_json_line(tmp_path / "log.txt", {"epoch": 0})


def test_a_full_disk_while_saving_the_resume_state_names_it(tmp_path, monkeypatch):
    """accelerate's save_state: torch's writer to a file name raises a RuntimeError without the
    errno; a (nearly) full filesystem at that moment says what happened."""
    import shutil
    from collections import namedtuple

    from engine.run_folder import save_training_state
    from errors import DiskFullError

    class Saving(Accelerator):
        def save_state(self, folder, **kwargs):
            Path(folder).mkdir()
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                               "writing file data/0: file write failed")

    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):  # space left: not a full disk
        save_training_state(Saving(), tmp_path, {"epoch": 1, "step": 0})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(DiskFullError, match="state.new: no space left on the device"):
        save_training_state(Saving(), tmp_path, {"epoch": 1, "step": 0})
    assert not (tmp_path / "state").exists()


def test_a_pending_epochs_log_line_is_dropped_on_resume(tmp_path):
    """An epoch trained and saved whose checkpoints failed after its log line: the rerun
    finishes it and logs it again, so the resume drops the line (logged once)."""
    from engine.run_folder import PROGRESS_FILE, load_training_state

    state = tmp_path / "state"
    state.mkdir()
    (state / PROGRESS_FILE).write_text(json.dumps({"epoch": 2, "step": 0, "pending": {"epoch": 1}}))
    (tmp_path / "log.txt").write_text('{"epoch": 0}\n{"epoch": 1}\n')
    progress = load_training_state(Accelerator(), state, tmp_path)
    assert progress["pending"] == {"epoch": 1}
    assert log_lines(tmp_path) == [{"epoch": 0}]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("data"), COUNTS_TRAIN, COUNTS_TEST, size=32)


FULL_DISK_RUN = """
import errno, os, runpy, sys, torch
real_save, calls = torch.save, []

def save(obj, f, *args, **kwargs):  # the disk fills up during epoch 1's first checkpoint file
    if not isinstance(f, (str, os.PathLike)):  # the portable checkpoints (accelerate's: paths)
        calls.append(f)
        if len(calls) == 2:
            f.write(b"partial")
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path("train_student.py", run_name="__main__")
"""


def test_a_full_disk_mid_run_then_rerun_logs_each_epoch_once(tiny_data, tmp_path):
    out = tmp_path / "full"
    args = ["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
            "distill.type=none", "distill.drw_epoch=null", "train.epochs=3", "train.max_steps_per_epoch=1"]
    proc = run(["-c", FULL_DISK_RUN, *args], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "unexpected pos" not in proc.stderr
    assert "checkpoint.pth: no space left on the device" in proc.stderr.strip().splitlines()[-1]
    assert not list(out.glob(".*.tmp"))  # nothing half-written left
    assert [r["epoch"] for r in log_lines(out)] == [0]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0  # the previous one
    run(args)  # space freed: the rerun finishes epoch 1 (trained and saved) and goes on
    records = log_lines(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    # every record says what its epoch wrote: the resume state (+ checkpoint files)
    assert all(r["saved_mb"] > 0 for r in records)
    # 'auto': both formats for the last epoch's checkpoint; the epochs before, .pth only
    assert (out / "checkpoint.safetensors").is_file() and (out / "best_checkpoint.pth").is_file()
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2


# ----------------------------------------------------------------------------- the EMA


def _ema():
    from models.ema import ModelEma

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    return model, ModelEma(model, 0.9)


def test_the_ema_is_saved_once_unless_sharded(tmp_path):
    model, ema = _ema()
    assert ema.save(tmp_path, rank=1) == 0  # DDP's other ranks write nothing
    assert not list(tmp_path.iterdir())
    assert ema.save(tmp_path, rank=0) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["model_ema_0.safetensors"]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _, other = _ema()
    other.shadow["0.weight"].zero_()
    other.load(tmp_path, rank=1)  # every rank reads the one file
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())


def test_a_damaged_ema_state_is_named(tmp_path):
    from safetensors.torch import save_file

    from errors import CheckpointError

    _, ema = _ema()
    path = tmp_path / "model_ema_0.safetensors"
    # one element per tensor: copy_ would broadcast it into the EMA
    save_file({k: v.reshape(-1)[:1].clone() for k, v in ema.shadow.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"model_ema_0.safetensors: EMA tensor 0.weight is .* \(1,\)"):
        ema.load(tmp_path, 0)
    ema.save(tmp_path, 0)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="model_ema_0.safetensors: not a readable safetensors file"):
        ema.load(tmp_path, 0)


# ----------------------------------------------------------------------------- what an epoch writes


def _payload(epoch: int) -> dict:
    return {"kind": "student", "model": {"w": torch.full((250_000,), float(epoch))}, "model_ema": None,
            "epoch": epoch, "config": {}, "metrics": {}}


def _write_epoch(out: Path, progress: dict, epoch: int, top1: float | None) -> dict:
    from engine.run_folder import write_checkpoints_and_log

    record = {"epoch": epoch}
    metrics = None if top1 is None else {"avg": {"top1": top1, "top5": 0, "head": 0, "mid": 0, "tail": 0}}
    write_checkpoints_and_log(Accelerator(), out, progress, record, metrics, lambda m: _payload(epoch),
                              key="avg")
    return record


def _epochs(out: Path, name: str) -> dict[str, int]:
    from models.checkpoint import read_checkpoint

    return {fmt: read_checkpoint(out / f"{name}.{fmt}")["epoch"] for fmt in ("pth", "safetensors")
            if (out / f"{name}.{fmt}").is_file()}


def test_checkpoint_formats_and_saved_mb(tmp_path):
    from engine import run_folder

    progress = {"best": None, "config": {"train": {"epochs": 3, "save_every_epochs": 1,
                                                   "checkpoint_formats": "auto"}}}
    run_folder._WRITTEN["bytes"] = 2_000_000  # a resume state saved during the epoch
    record = _write_epoch(tmp_path, progress, 0, 50.0)  # best: both formats, checkpoint.* linked
    assert _epochs(tmp_path, "best_checkpoint") == _epochs(tmp_path, "checkpoint") == {"pth": 0, "safetensors": 0}
    assert os.path.samefile(tmp_path / "checkpoint.pth", tmp_path / "best_checkpoint.pth")
    best_bytes = sum((tmp_path / f"best_checkpoint.{f}").stat().st_size for f in ("pth", "safetensors"))
    assert record["saved_mb"] == round((2_000_000 + best_bytes) / 1e6, 1)
    record = _write_epoch(tmp_path, progress, 1, 40.0)  # neither best nor last: .pth only
    assert _epochs(tmp_path, "checkpoint") == {"pth": 1}  # no stale .safetensors of epoch 0
    assert _epochs(tmp_path, "best_checkpoint") == {"pth": 0, "safetensors": 0}
    assert record["saved_mb"] == round((tmp_path / "checkpoint.pth").stat().st_size / 1e6, 1)
    assert json.loads((tmp_path / "log.txt").read_text().splitlines()[1])["saved_mb"] == record["saved_mb"]
    _write_epoch(tmp_path, progress, 2, 45.0)  # the last: both
    assert _epochs(tmp_path, "checkpoint") == {"pth": 2, "safetensors": 2}

    out = tmp_path / "every2"
    progress = {"best": None, "config": {"train": {"epochs": 5, "save_every_epochs": 2,
                                                   "checkpoint_formats": "safetensors"}}}
    _write_epoch(out, progress, 0, 50.0)  # best, not due: best_checkpoint only
    assert _epochs(out, "best_checkpoint") == {"safetensors": 0} and not _epochs(out, "checkpoint")
    record = _write_epoch(out, progress, 1, 40.0)  # due
    assert _epochs(out, "checkpoint") == {"safetensors": 1} and record["saved_mb"] > 0
    assert _write_epoch(out, progress, 2, None)["saved_mb"] == 0.0  # neither due nor evaluated


def test_an_earlier_state_keeps_its_pending_epoch(tmp_path):
    """With train.save_every_epochs > 1 an epoch may end without a state: the state of an
    earlier epoch keeps its own progress."""
    from engine.run_folder import PROGRESS_FILE, clear_pending_epoch, state_due

    cfg = {"train": {"epochs": 5, "save_every_epochs": 2}}
    assert [state_due(cfg, e) for e in range(5)] == [False, True, False, True, True]
    state = tmp_path / "state"
    state.mkdir()
    saved = {"epoch": 2, "step": 0, "pending": {"epoch": 1}}
    (state / PROGRESS_FILE).write_text(json.dumps(saved))
    clear_pending_epoch(Accelerator(), tmp_path, {"epoch": 3, "step": 0})  # epoch 2 ended, no state
    assert json.loads((state / PROGRESS_FILE).read_text()) == saved
    clear_pending_epoch(Accelerator(), tmp_path, {"epoch": 2, "step": 0, "pending": {"epoch": 1}})
    assert json.loads((state / PROGRESS_FILE).read_text()) == {"epoch": 2, "step": 0}


def test_training_run_saves_before_evaluating_and_ends_a_pending_epoch_first(tmp_path):
    """``TrainingRun``, both scripts' epoch bookkeeping: evaluation every train.eval_every
    epochs and after the last; the state is saved with the epoch pending before its evaluation,
    so a failed evaluation costs no training, and the resumed run ends that epoch first."""
    from engine.run_folder import PROGRESS_FILE, STATE_DIR, FolderLock, TrainingRun

    class RunAccelerator(Accelerator):
        log_with, trackers = None, []

        def save_state(self, folder, **kwargs) -> None:
            Path(folder).mkdir(parents=True)

        def end_training(self) -> None:
            pass

    def evaluate() -> dict:
        if fail:
            raise RuntimeError("a bad test image")
        avg = {"top1": 50.0, "top5": 90.0, "head": 1, "mid": 2, "tail": 3}
        return {"avg": avg, "ema_avg": {**avg, "top1": 1.0}}

    cfg = {"train": {"output_dir": str(tmp_path), "epochs": 3, "eval_every": 2, "save_every_epochs": 1,
                     "checkpoint_formats": "pth"}}
    progress = tmp_path / STATE_DIR / PROGRESS_FILE
    accelerator, fail = RunAccelerator(), False
    kw = dict(evaluate=evaluate, checkpoint=lambda epoch, metrics: _payload(epoch), best_key="avg")
    run = TrainingRun(accelerator, cfg, FolderLock(accelerator, tmp_path), None, **kw)
    run.end_epoch({"epoch": 0})  # not due for evaluation
    assert run.metrics is None and "avg_top1" not in log_lines(tmp_path)[0]
    assert json.loads(progress.read_text())["epoch"] == 1 and "pending" not in json.loads(progress.read_text())
    fail = True
    with pytest.raises(RuntimeError):
        run.end_epoch({"epoch": 1})
    assert json.loads(progress.read_text())["pending"] == {"epoch": 1} and len(log_lines(tmp_path)) == 1
    run.lock.release()

    fail = False
    run = TrainingRun(accelerator, cfg, FolderLock(accelerator, tmp_path), tmp_path / STATE_DIR, **kw)
    assert run.start_epoch == 2 and run.start_step(2) == 0
    run.evaluate_pending_epoch()
    assert [r["epoch"] for r in log_lines(tmp_path)] == [0, 1] and log_lines(tmp_path)[1]["avg_top1"] == 50.0
    assert "pending" not in json.loads(progress.read_text()) and run.best == 50.0
    assert accelerator.printed[-1].startswith("epoch 1: avg:") and "ema_" not in accelerator.printed[-1]
    run.close(dataset_val=None)
