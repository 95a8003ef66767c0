"""The run folder's guarantees (README "When things go wrong"): resume never runs code from the
folder, preemption of the whole process group saves, an evaluation failure never costs the
epoch's training, a folder holding a run is never overwritten or mixed, one run at a time,
damaged files are named; and the trackers record what log.txt records."""
from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_image_dataset, make_split_files
from test_train import COUNTS_TEST, COUNTS_TRAIN, ROOT, STUDENT_ARGS, log_lines, run


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("data"), COUNTS_TRAIN, COUNTS_TEST, size=32)


def student(data: Path, out: Path, *extra: str) -> list[str]:
    """A no-teacher tiny student (fast): 1 epoch of 3 steps unless ``extra`` says otherwise."""
    return ["train_student.py", *STUDENT_ARGS, f"data.path={data}", f"train.output_dir={out}",
            "distill.type=none", "distill.drw_epoch=null", "train.epochs=1", *extra]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code_from_the_folder(tiny_data, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    run(student(tiny_data, out))  # EMA on (the default): saved as safetensors, not pickled
    state = out / "state"
    assert (state / "model_ema_0.safetensors").is_file() and not list(state.glob("custom_checkpoint_*"))
    # a planted pickle where accelerate keeps custom objects (loaded with weights_only=False):
    # refused before anything is read, since the project registers no custom objects
    with open(state / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_Exploit(marker), f)
    proc = run(student(tiny_data, out, "train.epochs=2"), check=False)
    assert proc.returncode == 2 and "nothing in it was executed" in proc.stderr
    assert not marker.exists()
    (state / "custom_checkpoint_0.pkl").unlink()
    run(student(tiny_data, out, "train.epochs=2"))  # the genuine state still resumes
    assert [r["epoch"] for r in log_lines(out)] == [0, 1]
    # a crafted pickle in a file accelerate does read: weights_only=True refuses its global
    # (accelerate then skips the RNG states, which this project never needs: draws are seeded)
    torch.save({"payload": _Exploit(marker)}, state / "random_states_0.pkl")
    run(student(tiny_data, out, "train.epochs=3"))
    assert not marker.exists() and [r["epoch"] for r in log_lines(out)] == [0, 1, 2]


def test_a_run_made_before_a_key_existed_resumes_at_its_default(tiny_data, tmp_path):
    """A state whose stored config lacks keys added since (here aug.eval_interpolation and
    optim.clip_grad, as in a run of an older version) resumes when they are at their defaults,
    and is still refused when one is set to something else."""
    out = tmp_path / "old"
    run(student(tiny_data, out))
    progress_file = out / "state" / "progress.json"
    progress = json.loads(progress_file.read_text())
    del progress["config"]["aug"]["eval_interpolation"], progress["config"]["optim"]["clip_grad"]
    progress_file.write_text(json.dumps(progress))
    proc = run(student(tiny_data, out, "train.epochs=2", "aug.eval_interpolation=bilinear"), check=False)
    assert proc.returncode == 2 and "aug.eval_interpolation: None -> 'bilinear'" in proc.stderr
    assert "clip_grad" not in proc.stderr
    run(student(tiny_data, out, "train.epochs=2"))
    assert [r["epoch"] for r in log_lines(out)] == [0, 1]


def test_sigterm_to_the_process_group_saves(tiny_data, tmp_path):
    """Slurm / docker stop signal every process of the group, the data workers included."""
    out = tmp_path / "group"
    args = student(tiny_data, out, "train.epochs=50", "train.max_steps_per_epoch=null", "data.num_workers=1",
                   "log.print_every=1")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:  # wait for a training step, then signal the whole group
            lines.append(line)
            if " step 2/" in line:
                os.killpg(proc.pid, signal.SIGTERM)
                break
        output = "".join(lines) + proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output
    assert "SIGTERM received: state saved" in output and "killed by signal" not in output
    assert json.loads((out / "state" / "progress.json").read_text())["step"] >= 2


def test_runs_with_data_workers_exit(tiny_data, tmp_path):
    """Workers ignore SIGTERM; a run that leaves a persistent loader mid-epoch (a step cap)
    must still exit, and so must a run that stops on an error."""
    out = tmp_path / "workers"
    # (a hang would end in the subprocess timeout, a failure of this test)
    proc = run(student(tiny_data, out, "data.num_workers=2", "train.max_steps_per_epoch=1"), timeout=300)
    # the workers killed at exit are not reported as failures (torch's SIGCHLD handler)
    assert "killed by signal" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    proc = run(student(tiny_data, tmp_path / "bad", "data.num_workers=2", "train.max_steps_per_epoch=1",
                       "distill.type=hard", f"distill.teacher_ckpt={out / 'checkpoint.pth'}"),
               check=False, timeout=300)  # a student checkpoint given as teacher: refused
    assert proc.returncode == 2 and "not a teacher" in proc.stderr


def test_a_bad_test_image_never_costs_the_epochs_training(tmp_path):
    image_root, train_list, val_list = make_split_files(tmp_path / "lt", COUNTS_TRAIN, COUNTS_TEST)
    bad = image_root / val_list.read_text().splitlines()[3].split()[0]
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    out = tmp_path / "run"
    data = ["data.dataset=generic", f"data.root={image_root}", f"data.train_list={train_list}",
            f"data.val_list={val_list}", "data.imb_factor=1.0", "data.num_workers=0"]
    args = ["train_student.py", *[a for a in STUDENT_ARGS if not a.startswith(("data.dataset", "data.image_column",
            "data.imb_factor", "data.num_workers"))], *data, f"train.output_dir={out}", "distill.type=none",
            "distill.drw_epoch=null", "train.epochs=1"]
    proc = run(args, check=False)
    assert proc.returncode == 2 and bad.name in proc.stderr  # one line naming the file
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert progress["epoch"] == 1 and progress["pending"]["epoch"] == 0  # trained and saved
    bad.write_bytes(good)
    proc = run(args)
    assert "resumed" in proc.stdout and "at epoch 1 step 0" in proc.stdout  # no training redone
    [record] = log_lines(out)
    assert record["epoch"] == 0 and record["avg_top1"] is not None
    assert record["train_loss"] == progress["pending"]["train_loss"]
    assert "pending" not in json.loads((out / "state" / "progress.json").read_text())


def test_a_folder_holding_a_run_is_never_overwritten_or_mixed(tiny_data, tmp_path):
    out = tmp_path / "run"
    run(student(tiny_data, out))
    before = (out / "checkpoint.pth").read_bytes()
    # config.yaml deleted, other settings: compared with the config stored in the state
    (out / "config.yaml").unlink()
    proc = run(student(tiny_data, out, "train.epochs=2", "optim.lr=1e-3", "train.seed=3"), check=False)
    assert proc.returncode == 2 and "different config" in proc.stderr and "optim.lr" in proc.stderr
    # state/ removed: the remaining files still belong to that run, even with resume=never
    import shutil

    shutil.rmtree(out / "state")
    for mode in ("auto", "never", "force"):
        proc = run(student(tiny_data, out, f"train.resume={mode}"), check=False)
        assert proc.returncode == 2 and "holds another run's files" in proc.stderr, proc.stderr
    assert (out / "checkpoint.pth").read_bytes() == before and len(log_lines(out)) == 1


def test_one_run_per_folder_at_a_time(tiny_data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as handle:  # another run holds the folder
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("4242\n")
        handle.flush()
        proc = run(student(tiny_data, out), check=False)
    assert proc.returncode == 2 and "in use by another run (process 4242)" in proc.stderr
    assert not (out / "config.yaml").exists()
    # free again once released, and free at once after a kill: tests/test_writes.py


def test_damaged_log_line_and_partial_state_are_handled(tiny_data, tmp_path):
    out = tmp_path / "run"
    run(student(tiny_data, out))
    with open(out / "log.txt", "a") as f:
        f.write('{"epoch": 1, "trai')  # a line cut by a kill
    (out / "state.new").mkdir()  # a save interrupted by a full disk
    (out / "state.new" / "junk.bin").write_bytes(b"0" * 1000)
    proc = run(student(tiny_data, out, "train.epochs=2"))
    assert "log.txt:2 is not a log record; dropped" in proc.stdout
    assert "removed the incomplete" in proc.stdout and not (out / "state.new").exists()
    assert [r["epoch"] for r in log_lines(out)] == [0, 1]
    (out / "state" / "progress.json").write_text("{not json")
    proc = run(student(tiny_data, out, "train.epochs=3"), check=False)
    assert proc.returncode == 2 and "progress.json is damaged" in proc.stderr


def test_tensorboard_records_what_log_txt_records(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run(student(tiny_data, out, "train.epochs=2", "log.trackers=[tensorboard]", "log.print_every=1"))
    folders = {p.parent for p in (out / "trackers").rglob("events.out.tfevents.*")}
    assert folders
    scalars = {}
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    for record in log_lines(out):
        for key in ("train_loss", "lr" if "lr" in record else "train_lr", "avg_top1", "cls_tail"):
            if record.get(key) is not None:
                assert scalars[key][record["epoch"]] == pytest.approx(record[key], rel=1e-6), key
    assert len(scalars["step/loss"]) == 6  # 2 epochs x 3 steps, logged every step


def test_student_from_weights_with_another_grid_and_class_count(tiny_data, tmp_path):
    """model.init_ckpt (DeiT's --finetune): a 5-class student at 8x8 patches initialises the
    10-class 32x32 / patch-4 student (8x8 -> 8x8 here is the same grid, so save it at img 16)."""
    from models import build_student, student_arch

    src = build_student(student_arch("deit_tiny_distilled_patch4_16", 5, depth=1, embed_dim=48, num_heads=3))
    torch.save({"model": src.state_dict()}, tmp_path / "deit_style.pth")  # DeiT's release layout
    out = tmp_path / "finetune"
    proc = run(student(tiny_data, out, f"model.init_ckpt={tmp_path / 'deit_style.pth'}"))
    report = json.loads((out / "init.json").read_text())
    assert report["resized"] == ["pos_embed"]
    assert set(report["reset"]) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert "initialised from" in proc.stdout and log_lines(out)[0]["train_loss"] > 0
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["model"]["init_ckpt"] == str(tmp_path / "deit_style.pth")


def test_a_timm_teacher_by_name_distils(tiny_data, tmp_path):
    import timm

    teacher = timm.create_model("resnet10t", num_classes=10, pretrained=False)
    torch.save(teacher.state_dict(), tmp_path / "resnet10t.pth")  # timm's own format
    out = tmp_path / "timm_teacher"
    proc = run(student(tiny_data, out, "distill.type=hard", "distill.drw_epoch=1", "train.epochs=2",
                       "distill.teacher_model=resnet10t", f"distill.teacher_ckpt={tmp_path / 'resnet10t.pth'}",
                       "distill.teacher_normalize=cifar"))
    assert "'arch': 'resnet10t'" in proc.stdout and "re-normalised" in proc.stdout
    assert [r["epoch"] for r in log_lines(out)] == [0, 1] and log_lines(out)[1]["train_distill"] > 0


def test_a_teacher_with_nan_weights_or_logits_is_refused(tiny_data, tmp_path):
    from models import build_teacher

    teacher = build_teacher("resnet32", 10, "linear")
    state = teacher.state_dict()
    state["linear.bias"][3] = float("nan")
    arch = {"arch": "resnet32", "num_classes": 10, "head": "linear"}
    torch.save({"kind": "teacher", "arch": arch, "model": state, "model_ema": None, "epoch": 0, "config": {},
                "metrics": {}, "class_map": None, "train_counts": None, "class_names": None}, tmp_path / "nan.pth")
    proc = run(student(tiny_data, tmp_path / "a", "distill.type=hard", f"distill.teacher_ckpt={tmp_path / 'nan.pth'}"),
               check=False)
    assert proc.returncode == 2 and "non-finite weights" in proc.stderr and "linear.bias" in proc.stderr
    assert "train:" not in proc.stdout  # refused before any data was built (the data banner)

    # finite weights whose logits overflow (a huge classifier): stopped at the first step
    state = build_teacher("resnet32", 10, "linear").state_dict()
    state["linear.weight"].fill_(3e38)
    torch.save({"kind": "teacher", "arch": arch, "model": state, "model_ema": None, "epoch": 0, "config": {},
                "metrics": {}, "class_map": None, "train_counts": None, "class_names": None}, tmp_path / "inf.pth")
    out = tmp_path / "b"
    proc = run(student(tiny_data, out, "distill.type=hard", f"distill.teacher_ckpt={tmp_path / 'inf.pth'}",
                       "distill.fold_bn=false"), check=False)
    assert proc.returncode == 2 and "teacher_logit_max" in proc.stderr and "epoch 0, step 0" in proc.stderr
    assert not (out / "checkpoint.pth").exists()
