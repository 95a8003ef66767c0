"""Input checks of "Reliability and security, round two": crafted configs, YAML files,
checkpoints and images, each refused with one line naming the key or file (or read right).

Mostly in-process (``utils.parse_config`` with a script's ``validate``, ``evaluate.main``,
``safe_load``, ``open_rgb``); one subprocess run of train_student.py for a corrupt teacher.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import class_names, make_image_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN_COUNTS, TEST_COUNTS = [6, 4, 2], [3, 3, 3]
STUDENT_ARCH = dict(name="tiny_test", num_classes=3, img_size=32, patch_size=8, embed_dim=24,
                    depth=1, num_heads=2, mlp_ratio=2.0)


def student_config(argv: list[str]):
    import train_student
    from utils import parse_config

    return parse_config(train_student.SPEC, ["distill.type=none", *argv], validate=train_student.validate)[0]


def teacher_config(argv: list[str]):
    import train_teacher
    from utils import parse_config

    return parse_config(train_teacher.SPEC, argv, validate=train_teacher.validate)[0]


# ----------------------------------------------------------------------------- YAML (item 13)


def test_duplicate_keys_and_sections_are_refused_with_both_lines(tmp_path):
    from errors import ConfigError
    from utils import read_yaml

    dup_key = tmp_path / "dup_key.yaml"
    dup_key.write_text("train:\n  epochs: 3\n  batch_size: 8\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"dup_key.yaml: duplicate key 'train.epochs' at lines 2 and 4"):
        read_yaml(dup_key)
    dup_section = tmp_path / "dup_section.yaml"
    dup_section.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.1\ntrain:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"duplicate section 'train' at lines 1 and 5"):
        read_yaml(dup_section)
    # one section per name and YAML merge keys stay fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  epochs: 3\noptim:\n  lr: 0.1\n")
    assert read_yaml(ok) == {"train": {"epochs": 3}, "optim": {"lr": 0.1}}


def test_octal_and_base60_tokens_keep_their_text(tmp_path, capsys):
    """YAML 1.1 reads 010 as 8 and 1:30 as 90; for a string key the text is what was meant."""
    import train_student
    from utils import load_config

    config = tmp_path / "octal.yaml"
    config.write_text("train:\n  output_dir: 010\ndata:\n  hub_name: 1:30\n  subset_seed: 0x10\n")
    cfg = load_config(train_student.SPEC, ["--config", str(config), "distill.type=none"],
                      validate=train_student.validate)
    assert cfg["train"]["output_dir"] == "010"
    assert cfg["data"]["hub_name"] == "1:30"
    assert cfg["data"]["subset_seed"] == 16  # hexadecimal is unambiguous and still an int
    assert student_config(["train.output_dir=010"])["train"]["output_dir"] == "010"  # command line too
    assert student_config(["train.output_dir=2024-01-01"])["train"]["output_dir"] == "2024-01-01"


def test_base_cycles_and_non_string_base(tmp_path):
    from errors import ConfigError
    from utils import read_yaml

    (tmp_path / "a.yaml").write_text("_base_: b.yaml\ntrain:\n  epochs: 1\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"_base_ cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="_base_ cycle"):
        read_yaml(tmp_path / "self.yaml")
    (tmp_path / "list.yaml").write_text("_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"list.yaml: _base_ must name a YAML file.*\['a.yaml'\]"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "missing.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml \(the _base_ of .*missing.yaml\)"):
        read_yaml(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- config values (12, 16)


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=.inf", "optim.lr: expected a finite number"),
    ("sched.min_lr=nan", "sched.min_lr: expected a finite number"),
    ("sched.min_lr=.nan", "sched.min_lr: expected a finite number"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch"),
    ("train.max_steps_per_epoch=-2", "train.max_steps_per_epoch"),
    ("aug.hflip=1.5", "aug.hflip: is a probability"),
    ("aug.reprob=-0.1", "aug.reprob: is a probability"),
    ("aug.mixup_prob=2", "aug.mixup_prob: is a probability"),
    ("aug.mixup_switch_prob=-1", "aug.mixup_switch_prob: is a probability"),
    ("aug.smoothing=1.0", "aug.smoothing: must be in [0, 1)"),
    ("model.drop_path=-0.1", "model.drop_path"),
    ("model.drop_path=1.0", "model.drop_path"),
    ("model.drop_path=2", "model.drop_path"),
    ("train.model_ema_decay=1.5", "train.model_ema_decay"),
    ("train.model_ema_decay=-0.5", "train.model_ema_decay"),
    ("sched.warmup_epochs=-1", "sched.warmup_epochs"),
    ("train.output_dir=''", "train.output_dir: must name a folder"),
    ("optim.opt_betas=[0.9]", "optim.opt_betas: must be two numbers in [0, 1)"),
    ("optim.opt_betas=[0.9, 1.0]", "optim.opt_betas"),
    ("train.seed=-1", "train.seed"),
    ("distill.drw_beta=1.0", "distill.drw_beta: must be in [0, 1)"),
    ("optim.opt=foo", "optim.opt: unknown optimizer 'foo'"),
    ("data.path=''", "data.path: must not be empty"),
    ("data.input_size=100000", "data.input_size: must be a whole number of pixels in [1, 4096]"),
    ("aug.eval_crop_ratio=0.000001", "aug.eval_crop_ratio: 1e-06 would resize the evaluation images"),
    ("distill.teacher_input_size=0", "distill.teacher_input_size"),
])
def test_student_values_refused(override, fragment):
    from errors import ConfigError

    with pytest.raises(ConfigError) as info:
        student_config([override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_student_values_accepted():
    cfg = student_config(["optim.opt=sgd", "train.max_steps_per_epoch=null", "aug.hflip=1",
                          "aug.smoothing=0", "model.drop_path=0", "train.model_ema_decay=1.0"])
    assert cfg["optim"]["opt"] == "sgd" and cfg["train"]["max_steps_per_epoch"] is None
    assert student_config(["optim.opt=lookahead_adamw"])["optim"]["opt"] == "lookahead_adamw"


def test_config_error_is_one_line_with_status_2(capsys):
    import train_student
    from utils import load_config

    with pytest.raises(SystemExit) as exit_info:
        load_config(train_student.SPEC, ["distill.type=none", "aug.hflip=2"], validate=train_student.validate)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: aug.hflip") and "\n" not in err


@pytest.mark.parametrize("override, fragment", [
    ("loss.drw_epoch=300", "loss.drw_epoch: must be in [0, train.epochs=200]"),
    ("sched.milestones=[160,250]", "sched.milestones: [250] lie outside [0, train.epochs=200]"),
    ("optim.momentum=-1", "optim.momentum"),
    ("sched.warmup_epochs=-1", "sched.warmup_epochs"),
    ("loss.drw_beta=1.0", "loss.drw_beta"),
    ("aug.hflip=-0.5", "aug.hflip"),
    ("train.output_dir=''", "train.output_dir"),
])
def test_teacher_values_refused(override, fragment):
    from errors import ConfigError

    with pytest.raises(ConfigError) as info:
        teacher_config([override])
    assert fragment in str(info.value)


def test_teacher_milestones_only_checked_for_the_step_schedule():
    cfg = teacher_config(["sched.sched=cosine", "train.epochs=90", "loss.drw_epoch=60"])
    assert cfg["sched"]["milestones"] == [160, 180]  # unused by cosine: not refused
    cfg = teacher_config(["train.epochs=4", "loss.drw_epoch=3", "sched.milestones=[3]"])
    assert cfg["sched"]["milestones"] == [3]


# ----------------------------------------------------------------------------- checkpoint files (16)


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(2000)}}, good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.zeros(2000)}}, legacy, _use_new_zipfile_serialization=False)
    files = {"empty": b"", "truncated": data[: len(data) // 2],
             "random": b"\x13\x37" + np.random.default_rng(0).bytes(4096),
             "legacy_truncated": legacy.read_bytes()[:60]}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pth"
        paths[name].write_bytes(content)
    paths["zip_not_torch"] = tmp_path / "zip_not_torch.pth"
    with zipfile.ZipFile(paths["zip_not_torch"], "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    return paths


@pytest.mark.parametrize("name, fragment", [
    ("empty", "empty file, not a torch checkpoint"),
    ("truncated", "truncated or corrupt torch checkpoint"),
    ("random", "not a torch checkpoint"),
    ("legacy_truncated", "truncated"),
    ("zip_not_torch", "not a torch checkpoint (no data.pkl"),
])
def test_broken_checkpoint_files_are_not_called_unsafe(tmp_path, name, fragment):
    from errors import CheckpointError, UnsafeCheckpointError
    from models.checkpoint import load_teacher
    from models.safe_load import safe_load

    path = _corrupt_files(tmp_path)[name]
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "refusing" not in str(info.value)
    with pytest.raises(CheckpointError, match=name):  # the loaders name the file too
        load_teacher(path)


def test_random_bytes_teacher_stops_train_student_with_one_line(tmp_path):
    teacher = _corrupt_files(tmp_path)["random"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_student.py"), f"distill.teacher_ckpt={teacher}",
         f"train.output_dir={tmp_path / 'run'}", "data.path=/nonexistent"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: distill.teacher_ckpt:") and str(teacher) in err
    assert "not a torch checkpoint" in err
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_teacher_input_size_from_a_file_is_checked(tmp_path):
    from errors import CheckpointError
    from models.teacher import teacher_input_size

    info = {"source": "t.pth", "arch": {"arch": "resnet32"}, "config": {"data": {"input_size": 100000}}}
    with pytest.raises(CheckpointError, match=r"t.pth: stored config.data.input_size is 100000"):
        teacher_input_size(info, 224)
    for bad in (0, -3, 32.5, "32", True):
        with pytest.raises(CheckpointError, match="config.data.input_size"):
            teacher_input_size({**info, "config": {"data": {"input_size": bad}}}, 224)
    assert teacher_input_size({**info, "config": {"data": {"input_size": 64}}}, 224) == 64
    assert teacher_input_size({**info, "config": None}, 224) == 32  # resnet32 default


# ----------------------------------------------------------------------------- images (14)


def _png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_16_bit_and_float_images_are_scaled_not_saturated(tmp_path):
    from data.sources import open_rgb, to_rgb
    from errors import DataError

    values = np.array([[0, 257 * 10, 257 * 128, 65535]], dtype=np.uint16)
    path = _png(values, tmp_path / "gray16.png")
    assert Image.open(path).mode == "I;16"
    rgb = open_rgb(str(path), str(path))
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[..., 0].tolist() == [[0, 10, 128, 255]]
    assert (np.asarray(rgb)[..., 0] == np.asarray(rgb)[..., 2]).all()
    # 32-bit integer (mode I) holding 16-bit data; out of that range: refused
    assert np.asarray(to_rgb(Image.fromarray(values.astype(np.int32)), "x"))[0, :, 1].tolist() == [0, 10, 128, 255]
    with pytest.raises(DataError, match="big.tif: 32-bit integer pixels"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "big.tif")
    # float (mode F) in [0, 1]; out of it: refused, naming the image
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(floats).save(buffer, format="TIFF")
    buffer.seek(0)
    assert np.asarray(open_rgb(buffer, "f.tif"))[0, :, 0].tolist() == [0, 128, 255]
    buffer = io.BytesIO()
    Image.fromarray(floats * 300).save(buffer, format="TIFF")
    buffer.seek(0)
    with pytest.raises(DataError, match="hot.tif: 32-bit float pixels"):
        open_rgb(buffer, "hot.tif")


# ----------------------------------------------------------------------------- evaluate.py (2, 10, 15, 16)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    from models import build_student

    tmp = tmp_path_factory.mktemp("input_checks")
    data = make_image_dataset(tmp / "data", TRAIN_COUNTS, TEST_COUNTS, size=32)
    cfg = {"data": {"dataset": "generic", "path": str(data), "image_column": "img", "imb_factor": 1.0,
                    "num_workers": 0, "input_size": 32},
           "aug": {"eval_crop_ratio": 1.0}}
    torch.manual_seed(0)
    student = build_student(STUDENT_ARCH)
    return {"tmp": tmp, "data": data, "cfg": cfg, "student": student}


def save_student(work, name: str, config: dict | None = None, **changes) -> Path:
    student = work["student"]
    ckpt = {"kind": "student", "arch": dict(student.student_arch), "model": student.state_dict(),
            "model_ema": None, "epoch": 1, "config": config or work["cfg"], "metrics": {},
            "class_map": None, "train_counts": None, "class_names": class_names(3)}
    ckpt.update(changes)
    path = work["tmp"] / name
    torch.save(ckpt, path)
    return path


def save_teacher(work, name: str, config: dict) -> Path:
    from models import build_teacher

    teacher = build_teacher("resnet32", 3)
    path = work["tmp"] / name
    torch.save({"kind": "teacher", "arch": {"arch": "resnet32", "num_classes": 3, "head": "linear"},
                "model": teacher.state_dict(), "model_ema": None, "epoch": 1, "config": config,
                "metrics": {}, "class_map": None, "train_counts": None, "class_names": None}, path)
    return path


def evaluate_main(argv: list, capsys) -> tuple[int, str, str]:
    import evaluate

    rc = evaluate.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_stored_input_size_is_checked_like_a_typed_one(work, capsys):
    """A teacher checkpoint whose stored data.input_size is 100000: refused before any data
    (the eval transform would resize every image to 100000 x 100000)."""
    huge = {**work["cfg"], "data": {**work["cfg"]["data"], "input_size": 100000}}
    path = save_teacher(work, "teacher_huge.pth", huge)
    rc, out, err = evaluate_main(["--ckpt", path], capsys)
    assert rc == 2
    assert "data.input_size: must be a whole number of pixels in [1, 4096]" in err
    assert f"comes from the stored config of {path}" in err
    assert "evaluating" not in out
    bad_prob = {**work["cfg"], "aug": {"eval_crop_ratio": 1.0, "hflip": 3.0}}
    rc, _, err = evaluate_main(["--ckpt", save_teacher(work, "teacher_prob.pth", bad_prob)], capsys)
    assert rc == 2 and "aug.hflip: is a probability" in err
    # as --teacher of a student: the file and key are named before any evaluation
    rc, out, err = evaluate_main(["--ckpt", save_student(work, "student.pth"), "--teacher", path], capsys)
    assert rc == 2 and f"{path}: stored config.data.input_size is 100000" in err
    assert "evaluating" not in out


def test_stored_student_arch_is_checked_against_the_weights_before_building(work, capsys, monkeypatch):
    """A student checkpoint whose stored arch says img_size 100000 (or another depth): refused,
    naming the file and the shape, before a model of that size is built."""
    import models.checkpoint as checkpoint_module

    built = []
    real_build = checkpoint_module.build_student
    monkeypatch.setattr(checkpoint_module, "build_student", lambda arch, **kw: built.append(arch) or real_build(arch, **kw))
    huge = save_student(work, "student_huge_arch.pth", arch={**STUDENT_ARCH, "img_size": 100000})
    rc, out, err = evaluate_main(["--ckpt", huge], capsys)
    assert rc == 2 and f"{huge} [model]: the stored arch (img_size 100000, patch 8" in err
    assert "needs pos_embed of shape (1, 156250002, 24), the weights have (1, 18, 24)" in err
    deep = save_student(work, "student_deep_arch.pth", arch={**STUDENT_ARCH, "depth": 12})
    rc, out, err = evaluate_main(["--ckpt", deep], capsys)
    assert rc == 2 and "the stored arch has depth 12, the weights 1 blocks" in err
    assert built == [] and "evaluating" not in out
    rc, out, err = evaluate_main(["--ckpt", save_student(work, "student.pth"), "eval.max_samples=3"], capsys)
    assert rc == 0 and len(built) == 1  # the intact file still builds and evaluates


def test_eval_values_and_output_paths_refused_before_evaluating(work, capsys):
    student = save_student(work, "student.pth")
    rc, out, err = evaluate_main(["--ckpt", student, "eval.max_samples=0"], capsys)
    assert rc == 2 and "eval.max_samples: must be >= 1" in err
    a_file = work["tmp"] / "a_file.txt"
    a_file.write_text("x")
    rc, out, err = evaluate_main(["--ckpt", student, "--out-dir", a_file], capsys)
    assert rc == 2 and f"--out-dir {a_file} is an existing file" in err
    assert "evaluating" not in out
    rc, out, err = evaluate_main(["--ckpt", student, "--json", work["tmp"]], capsys)
    assert rc == 2 and "is an existing folder" in err and "evaluating" not in out
    garbage = work["tmp"] / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    rc, out, err = evaluate_main(["--ckpt", garbage], capsys)
    assert rc == 2 and f"{garbage}: not a torch checkpoint" in err and "refusing" not in err
    # a stored value of the wrong type names where it was read
    typo = {**work["cfg"], "aug": {"hflip": "often"}}
    rc, out, err = evaluate_main(["--ckpt", save_student(work, "student_typo.pth", typo)], capsys)
    assert rc == 2 and "aug.hflip: expected a number" in err and "read from the checkpoint's stored config" in err


def test_val_holdout_checkpoint_is_scored_on_the_test_split(work, capsys):
    trained = {**work["cfg"], "data": {**work["cfg"]["data"], "val_holdout": 0.5}}
    path = save_student(work, "student_holdout.pth", trained)
    out_json = work["tmp"] / "holdout_default.json"
    rc, out, err = evaluate_main(["--ckpt", path, "--json", out_json], capsys)
    assert rc == 0, err
    result = json.loads(out_json.read_text())
    assert result["split"] == "test" and result["num_samples"] == sum(TEST_COUNTS)
    assert result["config"]["data"]["val_holdout"] == 0.0
    assert "evaluating the test split" in out and "evaluation split: 'test'" in out
    # explicitly asked for: the held-out training images (3 + 2 + 1 of 6 + 4 + 2)
    out_json = work["tmp"] / "holdout_explicit.json"
    rc, out, err = evaluate_main(["--ckpt", path, "--json", out_json, "data.val_holdout=0.5"], capsys)
    assert rc == 0, err
    result = json.loads(out_json.read_text())
    assert result["split"] == "train" and result["num_samples"] == 6
    assert "held-out training images" in out


def test_student_trained_on_other_classes_is_refused(work, capsys):
    names = ["cat", "dog", "class_2"]
    path = save_student(work, "student_other_classes.pth", class_names=names)
    rc, out, err = evaluate_main(["--ckpt", path], capsys)
    assert rc == 2
    assert f"the checkpoint {path} was trained on other classes than the data's" in err
    assert "class 0 is 'cat' there, 'class_0' in the data" in err and "'dog'" in err
    assert "class 2 " not in err  # the names that agree are not listed
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (stderr also has progress bars)
    assert len(errors) == 1 and errors[0].endswith("set eval.allow_class_mismatch=true to evaluate anyway")
    rc, out, err = evaluate_main(["--ckpt", path, "eval.allow_class_mismatch=true",
                                  "--json", work["tmp"] / "mismatch.json"], capsys)
    assert rc == 0, err
    assert "WARNING" in out and "'dog'" in out
