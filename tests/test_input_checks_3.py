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


# ----------------------------------------------------------------------------- item 9


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_integer_label_far_beyond_the_classes_is_refused(tmp_path):
    """One stray label (1e9 in the issue; 1e6 here so that the old code, which built that many
    classes, finishes) is refused with the row, before any per-class list is built."""
    import datasets

    from data.sources import load_source
    from errors import DataError
    from helpers import make_split_files

    png = _png_bytes()
    labels = [0, 1, 2, 1, 10**6, 0]
    parquet = tmp_path / "stray.parquet"
    datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None}] * len(labels), "label": labels},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.Value("int64")})
                               ).to_parquet(str(parquet))
    cfg = {"dataset": "generic", "path": str(parquet), "image_column": None, "label_column": None,
           "train_split": "train", "val_split": "test", "val_holdout": 0.2}
    with pytest.raises(DataError, match=r"row 4 of split 'train' .* has label 1000000, far beyond the 4 "
                                        r"distinct labels"):
        load_source(cfg)
    cfg_ok = dict(cfg, path=str(tmp_path / "ok.parquet"))
    datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None}] * 4, "label": [0, 1, 2, 7]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.Value("int64")})
                               ).to_parquet(cfg_ok["path"])
    assert len(load_source(cfg_ok).class_names) == 8  # a few unused indices stay allowed

    image_root, train_list, _ = make_split_files(tmp_path / "lists", [2, 2], [1, 1])
    lines = train_list.read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0] + " 5000000"
    train_list.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"train.txt: .*\.jpg has label 5000000, far beyond"):
        load_source({"dataset": "generic", "path": None, "root": str(image_root),
                     "train_list": str(train_list), "val_list": None})


# ----------------------------------------------------------------------------- item 14


class _BadImage(torch.utils.data.Dataset):
    """Row 1 is missing (``open_rgb``'s error, chained from the OS error) or unreadable."""

    def __init__(self, missing: bool):
        self.missing = missing

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        from data.sources import open_rgb
        from errors import DataError

        if i == 1 and self.missing:
            open_rgb("/nonexistent/images/cat_0001.png", "/nonexistent/images/cat_0001.png")
        if i == 1:
            raise DataError("cannot read image row 1 of the 'train' split: truncated")
        return torch.zeros(1)


@pytest.mark.parametrize("missing", [True, False])
def test_worker_error_is_one_line(missing, capsys):
    """torch re-raises a worker's error with its whole traceback as the message (~40 lines)."""
    from errors import run_main

    def main():
        for _ in torch.utils.data.DataLoader(_BadImage(missing), batch_size=1, num_workers=1):
            pass

    assert run_main(main) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    expected = ("error: image not found: /nonexistent/images/cat_0001.png" if missing
                else "error: cannot read image row 1 of the 'train' split: truncated")
    assert err.startswith(expected) and "(in data-loader worker 0)" in err, err


# ----------------------------------------------------------------------------- item 11


def test_resume_state_file_names_the_checkpoints_to_use(tmp_path, capsys):
    from safetensors.torch import save_file

    import evaluate
    from models import build_student

    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "state" / "progress.json").write_text('{"epoch": 1, "step": 0}')
    state_file = run / "state" / "model.safetensors"  # as accelerate's save_state writes it
    save_file(build_student(STUDENT_ARCH).state_dict(), str(state_file), metadata={"format": "pt"})
    (run / "checkpoint.pth").write_bytes(b"")
    assert evaluate.main(["--ckpt", str(state_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "num_heads" not in err, err
    assert "resume state" in err and str(run / "checkpoint.pth") in err, err


# ----------------------------------------------------------------------------- items 7, 12 (models/distill_teacher.py)


def _distill_cfg(**distill) -> dict:
    return {"distill": {"type": "hard", "teacher_ckpt": None, "teacher_model": None,
                        "teacher_pretrained": False, "teacher_normalize": "student", "fold_bn": True,
                        "teacher_input_size": None, "map_targets": "auto", **distill},
            "aug": {"normalize": "cifar"}}


def test_constant_teacher_is_refused_at_its_first_batch(tmp_path):
    """All-zero weights predict one class for every image: refused at the first batch the loss
    gives the teacher, then never checked again; a random (untrained) teacher passes."""
    from errors import CheckpointError
    from losses.distillation import DistillationLoss
    from models import build_teacher
    from models.checkpoint import write_safetensors
    from models.distill_teacher import load_distillation_teacher, read_teacher_file

    accelerator = SimpleNamespace(print=lambda *args: None, device=torch.device("cpu"))
    data = SimpleNamespace(num_classes=3, class_map=None)
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    state = build_teacher(**TEACHER_ARCH).state_dict()
    for name, weights in (("zero", {k: torch.zeros_like(v) for k, v in state.items()}), ("random", state)):
        path = tmp_path / f"{name}.safetensors"
        write_safetensors(_payload("teacher", weights), path)
        cfg = _distill_cfg(teacher_ckpt=str(path))
        teacher = load_distillation_teacher(cfg, data, 32, accelerator, read_teacher_file(cfg))
        loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher["teacher"], "hard", 0.5, 1.0,
                                teacher_input_size=teacher["input_size"])
        if name == "zero":
            with pytest.raises(CheckpointError, match=rf"teacher {path} gives identical logits for all 4 "
                                                      rf"images of the first batch"):
                loss.teacher_logits(images)
            loss.teacher_logits(images)  # the first batch only: no check (no sync) afterwards
        else:
            assert loss.teacher_logits(images).shape == (4, 3)
            assert not loss.teacher._forward_hooks  # the check removed itself


def test_pretrained_teacher_offline_is_refused_before_the_data():
    """HF_HUB_OFFLINE=1 (conftest) and an empty cache: one line naming the key and the model,
    from what train_student.py calls before building the data."""
    from errors import ConfigError
    from models.distill_teacher import read_teacher_file

    cfg = _distill_cfg(teacher_model="resnet10t", teacher_pretrained=True)
    with pytest.raises(ConfigError) as err:
        read_teacher_file(cfg)
    message = str(err.value)
    assert "\n" not in message and "distill.teacher_pretrained" in message and "'resnet10t'" in message


# ----------------------------------------------------------------------------- item 10


def test_mixup_batch_of_one_image_is_refused_before_training():
    """A one-image training set (or any epoch whose last batch holds one image) ended in
    'non-finite loss ... try bf16 or a lower lr': mixup drops an odd batch's last image, and
    the empty batch's loss is NaN. Now one line naming the cause, before training."""
    import train_student
    from errors import ConfigError
    from utils import parse_config

    def cfg(*argv):
        return parse_config(train_student.SPEC, ["distill.type=none", "train.batch_size=16", *argv],
                            validate=train_student.validate)[0]

    check = train_student.check_mixup_batches
    with pytest.raises(ConfigError, match=r"gives each process 1 image per epoch; mixup/cutmix .*aug.mixup=0"):
        check(cfg(), images=1, num_batches=1, accum=1)
    with pytest.raises(ConfigError, match=r"last batch holds one image \(17 training images per process, "
                                          r"train.batch_size=16\).*train.drop_last=true"):
        check(cfg(), images=17, num_batches=2, accum=1)
    with pytest.raises(ConfigError, match=r"train.batch_size=1: every batch holds one image"):
        check(cfg("train.batch_size=1"), images=40, num_batches=40, accum=1)
    check(cfg("aug.mixup=0", "aug.cutmix=0"), images=1, num_batches=1, accum=1)  # nothing to mix: fine
    check(cfg(), images=18, num_batches=2, accum=1)  # a last batch of 2
    check(cfg("train.drop_last=true"), images=17, num_batches=1, accum=1)
    check(cfg("train.max_steps_per_epoch=1"), images=17, num_batches=2, accum=1)  # never reached


def test_constant_check_leaves_infinite_logits_to_the_loop():
    """Overflowing logits (all inf) are 'identical' too; the loop's teacher_logit_max check
    names them, so the first-batch check lets them through."""
    from models.distill_teacher import refuse_constant_teacher

    teacher = torch.nn.Linear(4, 3)
    with torch.no_grad():
        teacher.weight.fill_(3e38)
    refuse_constant_teacher(teacher, "inf.pth")
    assert torch.isinf(teacher(torch.rand(5, 4) + 1)).all()
