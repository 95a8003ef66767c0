"""End-to-end tests of train_teacher.py and train_student.py on tiny generated data.

The scripts run as users run them (subprocesses, through ``accelerate launch`` where it
matters): train, save, resume, refuse bad input, survive kills. Sizes are tiny so the file
stays within a few minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import free_port, make_image_dataset

ROOT = Path(__file__).resolve().parents[1]
COUNTS_TRAIN = [40, 28, 20, 14, 10, 8, 6, 5, 4, 3]
COUNTS_TEST = [5, 5, 5, 5, 5, 5, 5, 5, 5, 4]  # 49: odd on purpose

TEACHER_ARGS = [
    "data.dataset=generic", "data.image_column=img", "data.imb_factor=1.0", "data.num_workers=0",
    "train.epochs=2", "train.batch_size=16", "train.max_steps_per_epoch=3", "loss.drw_epoch=1",
    "sched.warmup_epochs=1", "sched.milestones=[1]", "log.progress=false", "train.mixed_precision=no",
]
STUDENT_ARGS = [
    "data.dataset=generic", "data.image_column=img", "data.imb_factor=1.0", "data.num_workers=0",
    "data.input_size=32", "model.name=deit_tiny_distilled_patch4_32", "model.depth=1",
    "model.embed_dim=48", "model.num_heads=3", "aug.train_crop=pad_crop", "train.epochs=3",
    "train.batch_size=16", "train.max_steps_per_epoch=3", "distill.drw_epoch=2",
    "distill.no_mixup_drw=true", "sched.warmup_epochs=1", "log.progress=false",
    "train.mixed_precision=no", "train.eval_batch_size=16",
]


def run(args: list[str], check: bool = True, env: dict | None = None, launch: list[str] | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    if launch and "--main_process_port" not in launch:  # a free port: 29500 may still be held
        launch = [*launch, "--main_process_port", str(free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch] if launch else [sys.executable]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:1])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("data"), COUNTS_TRAIN, COUNTS_TEST, size=32)


@pytest.fixture(scope="module")
def teacher_ckpt(tiny_data, tmp_path_factory) -> Path:
    """A teacher trained by train_teacher.py through accelerate launch (one CPU process)."""
    out = tmp_path_factory.mktemp("teacher")
    run(["train_teacher.py", *TEACHER_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}"],
        launch=["--num_processes", "1", "--cpu"])
    return out / "checkpoint.pth"


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_teacher_end_to_end(teacher_ckpt):
    from models.checkpoint import load_teacher

    out = teacher_ckpt.parent
    ckpt = torch.load(teacher_ckpt, weights_only=True)  # plain types only
    assert ckpt["kind"] == "teacher" and ckpt["epoch"] == 1
    assert ckpt["arch"] == {"arch": "resnet32", "num_classes": 10, "head": "normed"}
    assert ckpt["train_counts"] == COUNTS_TRAIN
    assert (out / "best_checkpoint.pth").is_file() and (out / "config.yaml").is_file()
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1]
    assert [line["drw"] for line in lines] == [False, True]
    assert 0 <= lines[-1]["logits_top1"] <= 100
    model, info = load_teacher(teacher_ckpt)
    assert info["format"] == "project"
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_paco_teacher_end_to_end_and_distils(tiny_data, tmp_path):
    """loss.type=paco through the script (two views, SAM, queue, momentum encoder): saved as a
    plain teacher that evaluate.py scores as in training and that a student distils from."""
    out = tmp_path / "paco"
    args = [a for a in TEACHER_ARGS if not a.startswith("loss.drw_epoch")]
    run(["train_teacher.py", *args, "loss.type=paco", "loss.drw_epoch=null", "model.head=linear",
         "loss.paco_queue=40", "loss.paco_dim=8", "aug.normalize=imagenet", f"data.path={tiny_data}",
         f"train.output_dir={out}"])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["kind"] == "teacher" and ckpt["epoch"] == 1
    assert ckpt["arch"] == {"arch": "resnet32", "num_classes": 10, "head": "linear"}
    assert not any(k.startswith(("encoder_", "queue", "linear_k", "fc.")) for k in ckpt["model"])
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all(line["train_loss"] == line["train_loss"] for line in lines)  # finite, not NaN
    # evaluate.py (linear(pooled query features), the same fp32 eval data) == the in-training eval.
    report = tmp_path / "paco.json"
    run(["evaluate.py", "--ckpt", str(out / "checkpoint.pth"), "--json", str(report)])
    result = json.loads(report.read_text())
    assert result["config"]["aug"]["normalize"] == "imagenet"
    assert result["logits"]["top1"] == pytest.approx(lines[-1]["logits_top1"], abs=1e-6)
    student = tmp_path / "student"
    proc = run(["train_student.py", *STUDENT_ARGS, "train.epochs=1", "distill.drw_epoch=null",
                "distill.fold_bn=true", f"data.path={tiny_data}", f"train.output_dir={student}",
                f"distill.teacher_ckpt={out / 'checkpoint.pth'}"])
    assert "31 BatchNorm layers folded" in proc.stdout
    assert [line["epoch"] for line in log_lines(student)] == [0]


def test_student_trains_evaluates_and_resumes(tiny_data, teacher_ckpt, tmp_path):
    out = tmp_path / "student"
    base = ["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
            f"distill.teacher_ckpt={teacher_ckpt}"]
    first = run(base + ["train.epochs=2"], launch=["--num_processes", "1", "--cpu"])
    assert "processes 1" in first.stdout
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]
    # Same command with more epochs: resumes at epoch 2 (train.epochs may change on resume).
    second = run(base + ["train.epochs=3"])
    assert "resumed from" in second.stdout and "at epoch 2 step 0" in second.stdout
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert lines[2]["drw"] is True
    for head in ("cls", "dist", "avg"):
        assert 0 <= lines[2][f"{head}_top1"] <= 100
    # The cosine schedule continued where it was: lr at the end of epoch 2 of 3.
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4 * 16 / 512)
    sched = CosineLRScheduler(opt, t_initial=3, lr_min=1e-5, warmup_t=1, warmup_lr_init=1e-6)
    sched.step(2 + 2 / 3)
    assert lines[2]["train_lr"] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["kind"] == "student" and ckpt["epoch"] == 2
    assert ckpt["model_ema"] is not None and set(ckpt["model_ema"]) == set(ckpt["model"])
    assert set(ckpt["metrics"]) >= {"cls", "dist", "avg"}


def test_sigkill_mid_epoch_resume_is_bit_exact(tiny_data, teacher_ckpt, tmp_path):
    """Killed (SIGKILL) mid-epoch right after a state save, with live data-loader workers, then
    restarted at once: the folder is free while the orphaned workers still exit, and the
    resumed run ends with the same weights as an uninterrupted one (without workers)."""
    from engine.run_folder import FolderLock

    common = ["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}",
              f"distill.teacher_ckpt={teacher_ckpt}", "train.save_every_steps=1"]
    clean = tmp_path / "clean"
    run(common + [f"train.output_dir={clean}"])
    killed = tmp_path / "killed"
    # The 5th save is epoch 1, step 1 (saves: e0s1, e0s2, e0 end, e1s1, e1s2 ...). Output to a
    # file, not a pipe, so that the workers' end is not waited for.
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, *common, f"train.output_dir={killed}", "data.num_workers=2"],
                                cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "DEIT_LT_FAULT": "kill_after_save:5"})
        try:
            assert proc.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
            workers_alive = True
            try:
                os.killpg(proc.pid, 0)  # the orphaned data workers, still exiting
            except ProcessLookupError:
                workers_alive = False
            FolderLock(type("Main", (), {"is_main_process": True, "num_processes": 1})(), killed).release()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert workers_alive  # (else the lock check above proved nothing)
    progress = json.loads((killed / "state" / "progress.json").read_text())
    assert (progress["epoch"], progress["step"]) == (1, 2)
    resumed = run(common + [f"train.output_dir={killed}", "data.num_workers=2"])
    assert "at epoch 1 step 2" in resumed.stdout
    a, b = weights(clean / "checkpoint.pth"), weights(killed / "checkpoint.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ema_a = torch.load(clean / "checkpoint.pth", weights_only=True)["model_ema"]
    ema_b = torch.load(killed / "checkpoint.pth", weights_only=True)["model_ema"]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert log_lines(clean)[-1]["avg_top1"] == log_lines(killed)[-1]["avg_top1"]


def test_teacher_kill_during_state_write_keeps_previous_state(tiny_data, tmp_path):
    """A kill while a state is written leaves the previous one; the rerun still matches."""
    common = ["train_teacher.py", *TEACHER_ARGS, f"data.path={tiny_data}"]
    clean = tmp_path / "clean"
    run(common + [f"train.output_dir={clean}"])
    broken = tmp_path / "broken"
    proc = run(common + [f"train.output_dir={broken}"], check=False,
               env={"DEIT_LT_FAULT": "kill_before_progress:2"})
    assert proc.returncode == -signal.SIGKILL
    assert (broken / "state.new").is_dir()  # the half-written state
    assert json.loads((broken / "state" / "progress.json").read_text())["epoch"] == 1
    torch.load(broken / "checkpoint.pth", weights_only=True)  # still loadable
    resumed = run(common + [f"train.output_dir={broken}"])
    assert "at epoch 1 step 0" in resumed.stdout
    a, b = weights(clean / "checkpoint.pth"), weights(broken / "checkpoint.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_exits_cleanly(tiny_data, teacher_ckpt, tmp_path):
    out = tmp_path / "term"
    args = ["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
            f"distill.teacher_ckpt={teacher_ckpt}", "train.epochs=50", "train.max_steps_per_epoch=null"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while not (out / "log.txt").is_file():  # wait for a first epoch, then ask it to stop
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM received: state saved" in output
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert progress["epoch"] >= 1


def test_two_process_cpu_run(tiny_data, teacher_ckpt, tmp_path):
    """2 gloo processes (MULTI_GPU launcher, no GPU, Accelerator(cpu=True)): saves once."""
    tout = tmp_path / "teacher_ddp"
    proc = run(["train_teacher.py", *TEACHER_ARGS, f"data.path={tiny_data}", f"train.output_dir={tout}",
                "train.batch_size=8"], launch=["--multi_gpu", "--num_processes", "2"])
    assert "processes 2" in proc.stdout
    assert [line["epoch"] for line in log_lines(tout)] == [0, 1]
    out = tmp_path / "ddp"
    proc = run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
                f"distill.teacher_ckpt={teacher_ckpt}", "train.epochs=2", "train.batch_size=8",
                "train.eval_ema=true"], launch=["--multi_gpu", "--num_processes", "2"])
    assert "processes 2" in proc.stdout  # the world size we asked for, really
    assert proc.stdout.count("done: best avg top-1") == 1
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]  # one writer
    # the EMA is the same on both processes: saved once; each record says what its epoch wrote
    assert sorted(p.name for p in (out / "state").glob("model_ema_*")) == ["model_ema_0.safetensors"]
    assert all(line["saved_mb"] > 0 for line in log_lines(out))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["metrics"]["avg"]["num_samples"] == sum(COUNTS_TEST)
    # The 2-process evaluation inside training equals a 1-process evaluate.py of the weights.
    run(["evaluate.py", "--ckpt", str(out / "checkpoint.pth"), "--json", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["world_size"] == 1
    for head in ("cls", "dist", "avg"):
        assert result[head]["top1"] == ckpt["metrics"][head]["top1"]
        assert result[head]["per_class"] == ckpt["metrics"][head]["per_class"]
    # The EMA is the same on both processes: the in-training EMA evaluation equals a
    # 1-process evaluate.py of the saved EMA weights.
    run(["evaluate.py", "--ckpt", str(out / "checkpoint.pth"), "eval.ema=true", "--json", str(tmp_path / "ema.json")])
    ema = json.loads((tmp_path / "ema.json").read_text())
    for head in ("cls", "dist", "avg"):
        assert ema[head]["per_class"] == ckpt["metrics"][f"ema_{head}"]["per_class"]
    # resuming with another number of processes is refused (peak lr, shards, step index differ)
    proc = run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
                f"distill.teacher_ckpt={teacher_ckpt}", "train.epochs=3", "train.batch_size=8",
                "train.eval_ema=true"], check=False)
    assert proc.returncode == 2 and "trained with 2 process(es), this launch has 1" in proc.stderr
    # resume in 2 processes
    proc = run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
                f"distill.teacher_ckpt={teacher_ckpt}", "train.epochs=3", "train.batch_size=8",
                "train.eval_ema=true"], launch=["--multi_gpu", "--num_processes", "2"])
    assert "at epoch 2 step 0" in proc.stdout
    assert [line["epoch"] for line in log_lines(out)] == [0, 1, 2]


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=0.1"], "unknown key 'optim.lrr'"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["optim.lr=-1e-3"], "optim.lr: must be > 0"),
    (["data.imb_factor=100"], "data.imb_factor: must be in (0, 1]"),
    (["distill.type=hard", "distill.teacher_ckpt=null"], "distill.teacher_ckpt"),
    (["distill.teacher_ckpt=/nonexistent/teacher.pth"], "file not found: /nonexistent/teacher.pth"),
    (["distill.type=medium"], "distill.type: 'medium' is not allowed"),
    (["model.depth=two"], "model.depth: expected an integer"),
])
def test_config_errors_before_any_work(override, message, tmp_path):
    out = tmp_path / "never"
    proc = run(["train_student.py", f"train.output_dir={out}", *override], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not out.exists()  # nothing written


def test_yaml_numbers_and_print_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1e-3\ntrain:\n  epochs: 7\n")
    proc = run(["train_student.py", "--config", str(cfg), "--print-config", "sched.min_lr=2e-6"])
    import yaml
    printed = yaml.safe_load(proc.stdout)
    assert printed["optim"]["lr"] == 1e-3 and isinstance(printed["optim"]["lr"], float)
    assert printed["train"]["epochs"] == 7 and printed["sched"]["min_lr"] == 2e-6


def test_every_shipped_config_resolves():
    """Every YAML in configs/ parses against its script's spec (keys, types, choices)."""
    import train_student
    import train_teacher
    from utils import load_config

    paths = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if "accelerate" not in p.parts]
    assert len(paths) >= 20
    for path in paths:
        script = train_teacher if "teachers" in path.parts else train_student
        cfg = load_config(script.SPEC, ["--config", str(path)])  # validation needing files skipped below
        assert cfg["train"]["output_dir"], path
        if "cpu" in path.name:  # the CPU configs must also pass the full validation
            if script is train_student:
                cfg["distill"]["teacher_ckpt"] = None
                cfg["distill"]["type"] = "none"
            script.validate(cfg)


def test_refuses_output_dir_of_another_run(tiny_data, teacher_ckpt, tmp_path):
    out = tmp_path / "student"
    base = ["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
            f"distill.teacher_ckpt={teacher_ckpt}", "train.epochs=1", "distill.drw_epoch=1"]
    run(base)
    proc = run(base + ["optim.lr=1e-3"], check=False)
    assert proc.returncode != 0
    assert "different config" in proc.stderr and "optim.lr" in proc.stderr


def test_non_finite_loss_stops_with_a_message(tiny_data, teacher_ckpt, tmp_path):
    out = tmp_path / "nan"
    proc = run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
                f"distill.teacher_ckpt={teacher_ckpt}", "optim.lr=1e30", "optim.lr_scaling=none",
                "sched.warmup_epochs=0", "train.model_ema=false"], check=False)
    assert proc.returncode != 0
    assert "non-finite loss at epoch" in proc.stderr and "step" in proc.stderr


def test_teacher_with_wrong_number_of_classes_is_rejected(tiny_data, tmp_path):
    from models.resnet_cifar import resnet32

    bad = tmp_path / "teacher100.pth"
    torch.save({"model": resnet32(num_classes=100).state_dict()}, bad)
    proc = run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}",
                f"train.output_dir={tmp_path / 's'}", f"distill.teacher_ckpt={bad}"], check=False)
    assert proc.returncode != 0
    assert "100 classes" in proc.stderr and "10" in proc.stderr


def test_reference_lr_rule_and_schedule():
    """docs/recipe.md section 2: peak 5e-4 x 128 x 2 / 512 = 2.5e-4; cosine over 1200 epochs with 5
    warm-up epochs from 1e-6 (not a prefix), floor 1e-5."""
    import train_student
    from utils import load_config

    cfg = load_config(train_student.SPEC, ["--config", str(ROOT / "configs" / "cifar10_lt.yaml")])
    peak = train_student.scaled_lr(cfg, world_size=2)
    assert peak == pytest.approx(2.5e-4)
    cfg["optim"]["lr_scaling"] = "with_accum"
    assert train_student.scaled_lr(cfg, world_size=2) == pytest.approx(1e-3)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = train_student.build_scheduler(cfg, opt)
    for epoch, expected in ((0, 1e-6), (1, 5.08e-5), (600, 1.30e-4), (1100, 1.409e-5), (1200, 1e-5)):
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=2e-3), epoch


@pytest.mark.parametrize("num_batches", [48, 46, 49])
def test_update_lr_equals_the_references(num_batches):
    """The lr of every optimiser update over two epochs with accumulation 4 == the reference's
    (LT engine.py:L77-80: its scheduler stepped at epoch + i / len at each window's first
    micro-batch and again at the epoch's last one, before that micro-batch's update), for a full
    last window (48), a shorter one (46) and one of a single micro-batch (49 = 12 x 4 + 1)."""
    import train_student
    from engine import loop
    from utils import load_config

    cfg = load_config(train_student.SPEC, ["--config", str(ROOT / "configs" / "cifar10_lt.yaml")])
    cfg["train"]["epochs"], cfg["sched"]["warmup_epochs"], accum = 2, 1, 4

    def scheduler():
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=2.5e-4)
        return opt, train_student.build_scheduler(cfg, opt)

    opt, sched = scheduler()
    reference = []
    for epoch in range(2):
        for i in range(num_batches):
            if i % accum == 0 or i == num_batches - 1:
                sched.step(epoch + i / num_batches)
            if (i + 1) % accum == 0 or i == num_batches - 1:  # the update
                reference.append(opt.param_groups[0]["lr"])
    opt, sched = scheduler()
    ours = []
    num_steps = loop.steps_per_epoch(num_batches, accum, None)
    for epoch in range(2):
        for step in range(num_steps):
            sched.step(epoch + loop.epoch_fraction(step, accum, num_batches, num_steps, last_at_end=True))
            ours.append(opt.param_groups[0]["lr"])
    assert len(ours) == len(reference) == 2 * num_steps
    assert ours == pytest.approx(reference, rel=1e-12)
    assert ours[num_steps - 1] != ours[num_steps - 2]  # the warm-up moves within the last window
    # accumulation 1: every update at its own micro-batch (without the reference's lag, bug 8)
    assert [loop.epoch_fraction(i, 1, 13, 13, last_at_end=True) for i in range(13)] == [i / 13 for i in range(13)]


def test_odd_batch_with_mixup_trains_on_the_even_part():
    """timm's Mixup asserts an even batch; an odd last batch (CIFAR-100-LT IF100 on one process
    ends on 95 images without repeated augmentation) drops its last image for that step."""
    from accelerate import Accelerator

    import train_student
    from losses import DistillationLoss
    from models import build_student
    from utils import load_config

    cfg = load_config(train_student.SPEC, ["--config", str(ROOT / "configs" / "cifar10_lt_cpu.yaml")])
    torch.manual_seed(0)
    model = build_student(dict(name="tiny", num_classes=10, img_size=32, patch_size=8, embed_dim=24,
                               depth=1, num_heads=2, mlp_ratio=2.0))
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mixup = train_student.build_mixup(cfg, 10)
    criterion = DistillationLoss(train_student.build_base_criterion(True), None, "none", 0.5, 1.0)
    window = [(torch.randn(7, 3, 32, 32), torch.randint(0, 10, (7,)))]
    before = [p.detach().clone() for p in model.parameters()]
    terms = train_student.train_step(model, criterion, window, optimizer, Accelerator(cpu=True), mixup_fn=mixup)
    assert seen == [6] and torch.isfinite(terms["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ema_updates_equal_the_references_per_micro_batch():
    """With accumulation 4 the reference updates timm's ModelEma after every micro-batch (LT
    engine.py:L254-255): three times towards the weights before the optimiser step, once towards
    the new ones. train_step's EMA (ema_updates=4) equals that, over two steps."""
    import copy

    from timm.utils import ModelEma

    import train_student
    from accelerate import Accelerator
    from losses import DistillationLoss
    from models import build_student
    from models.ema import ModelEma as OurEma

    torch.manual_seed(0)
    model = build_student(dict(name="tiny", num_classes=10, img_size=32, patch_size=8, embed_dim=24,
                               depth=1, num_heads=2, mlp_ratio=2.0))
    twin = copy.deepcopy(model)
    ours, reference = OurEma(model, decay=0.9), ModelEma(copy.deepcopy(twin), decay=0.9)
    criterion = DistillationLoss(train_student.build_base_criterion(False), None, "none", 0.5, 1.0)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin))
    windows = [[(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(4)] for _ in range(2)]
    accelerator = Accelerator(cpu=True)
    for window in windows:
        train_student.train_step(model, criterion, window, opt_a, accelerator, model_ema=ours, ema_updates=4)
        for i, (x, y) in enumerate(window):  # the reference's loop
            loss, _ = criterion(x, twin(x), y)
            (loss / 4).backward()
            if i == 3:
                opt_b.step()
                opt_b.zero_grad()
            reference.update(twin)
    expected = reference.ema.state_dict()
    for key, value in ours.full_state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    moved = max((model.state_dict()[k] - v).abs().max().item() for k, v in expected.items())
    assert moved > 1e-3  # the EMA lags the weights: the comparison is not trivially equal


def test_teacher_with_other_label_order_is_rejected(tiny_data, teacher_ckpt, tmp_path):
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["class_map"] = list(reversed(range(10)))
    other = tmp_path / "teacher_other_order.pth"
    torch.save(ckpt, other)
    proc = run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}",
                f"train.output_dir={tmp_path / 's'}", f"distill.teacher_ckpt={other}"], check=False)
    assert proc.returncode != 0
    assert "label order" in proc.stderr
    assert not (tmp_path / "s" / "checkpoint.pth").exists()


def test_main_job_pipeline_on_tiny_data(tmp_path):
    """`make main` end to end (teacher -> student -> evaluate) on generated CIFAR-like data."""
    data = make_image_dataset(tmp_path / "data", [30] * 10, [5] * 10, size=32)
    out = tmp_path / "main"
    quick = "data.imb_factor=0.1 data.num_workers=0 train.batch_size=16 log.progress=false"
    proc = subprocess.run(
        ["make", "-o", str(Path(sys.executable).parents[1] / ".installed"), "main", f"DATA={data}", f"OUT={out}", f"PY={sys.executable}",
         f"MAIN_TEACHER_ARGS=train.epochs=2 train.max_steps_per_epoch=2 loss.drw_epoch=1 "
         f"sched.milestones=[1] sched.warmup_epochs=1 {quick}",
         f"MAIN_STUDENT_ARGS=train.epochs=2 train.max_steps_per_epoch=2 distill.drw_epoch=1 "
         f"sched.warmup_epochs=1 model.depth=1 model.embed_dim=48 {quick}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "VENV": str(Path(sys.executable).parents[1])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for head in ("cls", "dist", "avg"):
        assert head in proc.stdout
    assert "tail" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    from analysis import experts_sentence

    assert experts_sentence(result) in proc.stdout  # the sentence saying what the table shows
    assert "reaches 87.5 overall" in proc.stdout and "configs/cifar10_lt.yaml" in proc.stdout
    assert result["kind"] == "student" and result["overall"] == result["avg"]["top1"]
    assert result["num_samples"] == 50
    assert (out / "eval" / "per_class_accuracy.png").stat().st_size > 0
    assert (out / "eval" / "confusion_matrix.png").stat().st_size > 0
    assert (out / "teacher" / "checkpoint.pth").is_file() and (out / "student" / "checkpoint.pth").is_file()
