"""Input checks of "Reliability, round three" (issue 26, items 5, 7, 9-12, 14): weights cast to
integers, a teacher that predicts one class, absurd integer labels, a one-image dataset, the
resume-state file given to evaluate.py, timm's pretrained teacher offline, and a data-loader
worker's error; each refused with one line naming the file, key or row. Unit-level, in-process.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

TEACHER_ARCH = {"arch": "resnet32", "num_classes": 3, "head": "linear"}
STUDENT_ARCH = dict(name="tiny_test", num_classes=3, img_size=32, patch_size=8, embed_dim=24,
                    depth=1, num_heads=2, mlp_ratio=2.0)
DATASET = SimpleNamespace(class_map=None, train_counts=[3, 2, 1], class_names=["a", "b", "c"])


def _payload(kind: str, state: dict) -> dict:
    from models.checkpoint import make_checkpoint

    arch = STUDENT_ARCH if kind == "student" else TEACHER_ARCH
    return make_checkpoint(kind, arch, state, epoch=0, config={}, metrics={}, dataset=DATASET)


def _as_int64(state: dict) -> dict:
    return {k: v.to(torch.int64) if v.is_floating_point() else v for k, v in state.items()}


# ----------------------------------------------------------------------------- item 5


def test_weights_cast_to_integers_are_refused(tmp_path):
    from errors import CheckpointError
    from models import build_student, build_teacher
    from models.checkpoint import load_any, load_named_teacher, load_student, load_teacher, write_safetensors

    student = tmp_path / "student_int.safetensors"
    write_safetensors(_payload("student", _as_int64(build_student(STUDENT_ARCH).state_dict())), student)
    for load in (load_student, load_any):
        with pytest.raises(CheckpointError) as err:
            load(student)
        message = str(err.value)
        assert "\n" not in message and str(student) in message and "torch.int64" in message
        assert "cls_token" in message or "pos_embed" in message  # names a tensor

    teacher = tmp_path / "teacher_int.safetensors"
    write_safetensors(_payload("teacher", _as_int64(build_teacher(**TEACHER_ARCH).state_dict())), teacher)
    with pytest.raises(CheckpointError, match=r"teacher_int.safetensors.*conv1.weight.*torch.int64"):
        load_teacher(teacher)
    with pytest.raises(CheckpointError, match=r"teacher_int.safetensors.*torch.int64"):
        load_named_teacher("resnet32", 3, teacher)
    # half-precision weights stay fine (converted on load)
    half = tmp_path / "teacher_half.safetensors"
    write_safetensors(_payload("teacher", {k: v.half() if v.is_floating_point() else v
                                           for k, v in build_teacher(**TEACHER_ARCH).state_dict().items()}), half)
    load_teacher(half)
