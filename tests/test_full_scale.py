"""The paths users run at scale, exercised on CPU: FSDP, fp16 loss scaling with SAM, compiled
models (see README "What was tested where").

- FSDP: torch's own ``fully_shard`` on a CPU device mesh, 2 gloo processes
  (``tests/workers/fsdp2_student.py``): the student's training step with accumulation, the
  sharded EMA, evaluation through the sharded model, the full state-dict gather and the
  portable checkpoint it makes. accelerate itself refuses FSDP without a GPU.
- fp16: accelerate runs fp16 on a CPU as fp32, so ``DEIT_LT_CPU_GRAD_SCALER`` (engine/device.py)
  gives the run a real ``torch.amp.GradScaler("cpu")`` with a deliberately huge initial scale:
  the first updates overflow and are skipped, the scale drops, training goes on; SAM and
  gradient clipping included.
- torch.compile: a compiled student's checkpoint loads in evaluate.py (no ``_orig_mod.`` keys).
"""
from __future__ import annotations

import json

import pytest
import torch

from helpers import make_image_dataset
from test_train import COUNTS_TEST, COUNTS_TRAIN, ROOT, STUDENT_ARGS, TEACHER_ARGS, log_lines, run

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_dataset(tmp_path_factory.mktemp("data"), COUNTS_TRAIN, COUNTS_TEST, size=32)


HUGE_SCALE = 2.0 ** 17  # GradScaler starts at 2 ** 16; at that scale SAM overflowed at step 0


def test_fsdp2_student_paths(tmp_path):
    report_path = tmp_path / "fsdp.json"
    run([str(ROOT / "tests" / "workers" / "fsdp2_student.py"), str(report_path)],
        launch=["--multi_gpu", "--num_processes", "2"])
    r = json.loads(report_path.read_text())
    assert r["world"] == 2 and r["params_are_dtensors"] and r["ema_is_sharded"]
    assert r["keys_plain"]  # no FSDP / wrapper prefixes in the gathered state dict
    # two sharded steps (2 micro-batches per rank) == the same steps on the unsharded twin
    assert r["weights_max_diff"] < 1e-5 and r["ema_max_diff"] < 1e-5
    assert r["eval_max_diff"] < 1e-5  # evaluating the sharded model
    assert r["loaded_max_diff"] < 1e-5 and r["loaded_ema_equal"]  # the portable checkpoint
    assert r["ema_same_on_every_rank"]
    # the resume state keeps each rank's EMA shards (DDP's one EMA file is tested in test_train)
    assert r["ema_files"] == ["model_ema_0.safetensors", "model_ema_1.safetensors"] and r["ema_restored"]


def test_fp16_loss_scaling_with_sam_and_clipping(tiny_data, tmp_path):
    env = {"DEIT_LT_CPU_GRAD_SCALER": str(HUGE_SCALE)}
    tout = tmp_path / "teacher"
    proc = run(["train_teacher.py", *TEACHER_ARGS, f"data.path={tiny_data}", f"train.output_dir={tout}",
                "train.mixed_precision=fp16", "optim.sam=true", "optim.clip_grad=1.0",
                "train.max_steps_per_epoch=3", "train.batch_size=8"], env=env)
    assert "precision fp16 autocast with loss scaling" in proc.stdout
    lines = log_lines(tout)
    assert lines[0]["train_skipped"] > 0            # overflowed updates were skipped
    assert lines[-1]["train_loss_scale"] < HUGE_SCALE     # and the scale came down
    assert lines[-1]["train_skipped"] < 1           # then updates went through
    assert all(torch.isfinite(torch.tensor(line["train_loss"])) for line in lines)
    teacher = torch.load(tout / "checkpoint.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in teacher["model"].values() if v.is_floating_point())

    # the student in fp16 with accumulation and clipping, distilling from that teacher
    sout = tmp_path / "student"
    run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={sout}",
         f"distill.teacher_ckpt={tout / 'checkpoint.pth'}", "train.mixed_precision=fp16",
         "optim.clip_grad=1.0", "train.accum_steps=2", "train.batch_size=8", "train.epochs=2",
         "distill.drw_epoch=1"], env=env)
    lines = log_lines(sout)
    assert lines[0]["train_skipped"] > 0 and lines[-1]["train_loss_scale"] < HUGE_SCALE


def test_fp16_without_a_scaler_says_it_runs_fp32(tiny_data, tmp_path):
    proc = run(["train_teacher.py", *TEACHER_ARGS, f"data.path={tiny_data}", f"train.output_dir={tmp_path}",
                "train.mixed_precision=fp16", "train.epochs=1", "train.max_steps_per_epoch=1"])
    assert "precision fp32 (fp16 requested: accelerate runs fp16 on a CPU as fp32" in proc.stdout


def test_compiled_student_checkpoint_loads_in_evaluate(tiny_data, tmp_path):
    out = tmp_path / "compiled"
    run(["train_student.py", *STUDENT_ARGS, f"data.path={tiny_data}", f"train.output_dir={out}",
         "distill.type=none", "distill.drw_epoch=null", "model.compile=true", "train.epochs=1",
         "train.max_steps_per_epoch=2"])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert not [k for k in ckpt["model"] if "_orig_mod" in k or k.startswith("module.")]
    assert not [k for k in ckpt["model_ema"] if "_orig_mod" in k or k.startswith("module.")]
    run(["evaluate.py", "--ckpt", str(out / "checkpoint.pth"), "--json", str(tmp_path / "e.json")])
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["num_samples"] == sum(COUNTS_TEST)
    assert result["avg"]["top1"] == pytest.approx(ckpt["metrics"]["avg"]["top1"])
