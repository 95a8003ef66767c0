"""Portable checkpoints as .safetensors: written atomically, read without unpickling, loaded by
every loader (and evaluate.py) to exactly what the .pth file gives."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import make_image_dataset

from errors import CheckpointError
from models import checkpoint as ckpt_mod
from models.checkpoint import (load_any, load_student, load_teacher, make_checkpoint, read_safetensors,
                               write_safetensors)
from utils import atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]
STUDENT_ARCH = dict(name="tiny_test", num_classes=10, img_size=32, patch_size=4, embed_dim=48,
                    depth=1, num_heads=3, mlp_ratio=2.0)
DATASET = SimpleNamespace(class_map=[2, 0, 1, 3, 4, 5, 6, 7, 8, 9],
                          train_counts=[20, 15, 11, 9, 7, 5, 4, 3, 2, 2],
                          class_names=[f"class_{c}" for c in range(10)])
CONFIG = {"data": {"dataset": "generic", "input_size": 32, "imb_factor": 0.1, "group_boundaries": None},
          "optim": {"lr": 5e-4, "opt_betas": [0.9, 0.999]}, "train": {"epochs": 3, "cpu": True}}
METRICS = {"avg": {"top1": 12.5, "top5": 50.0, "head": 33.3, "mid": None, "tail": 0.0,
                   "per_class": [10.0, None, 0.125]}}


def student_payload(ema: bool = True) -> dict:
    from models import build_student

    torch.manual_seed(0)
    model = build_student(STUDENT_ARCH)
    ema_state = None
    if ema:
        torch.manual_seed(1)
        ema_state = build_student(STUDENT_ARCH).state_dict()
    return make_checkpoint("student", dict(model.student_arch), model.state_dict(), ema_state=ema_state,
                           epoch=2, config=CONFIG, metrics=METRICS, dataset=DATASET)


def teacher_payload() -> dict:
    from models import build_teacher

    torch.manual_seed(0)
    teacher = build_teacher("resnet32", 10)
    return make_checkpoint("teacher", {"arch": "resnet32", "num_classes": 10, "head": "linear"},
                           teacher.state_dict(), epoch=4, config=CONFIG, metrics=METRICS, dataset=DATASET)


def write_both(payload: dict, folder: Path, stem: str) -> tuple[Path, Path]:
    pth, st = folder / f"{stem}.pth", folder / f"{stem}.safetensors"
    atomic_torch_save(payload, pth)
    write_safetensors(payload, st)
    return pth, st


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_same_payload(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        if key in ("model", "model_ema") and a[key] is not None:
            assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


def without_source(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "source"}


# ----------------------------------------------------------------------------- the format


def test_payload_round_trips_exactly(tmp_path):
    for payload in (student_payload(ema=True), student_payload(ema=False), teacher_payload()):
        path = tmp_path / f"{payload['kind']}.safetensors"
        write_safetensors(payload, path)
        assert_same_payload(read_safetensors(path), payload)


def test_file_layout_tensors_and_string_metadata(tmp_path):
    from safetensors import safe_open

    payload = student_payload(ema=True)
    path = tmp_path / "checkpoint.safetensors"
    write_safetensors(payload, path)
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == set(payload["model"]) | {f"model_ema.{k}" for k in payload["model_ema"]}
    assert meta["format"] == "deit-lt" and meta["model_ema"] == "true" and meta["kind"] == "student"
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["arch"]) == payload["arch"] and meta["epoch"] == "2"
    for key in ("config", "class_map", "train_counts", "class_names", "metrics"):
        assert json.loads(meta[key]) == payload[key], key
    # the model's weights load into the model directly once the EMA keys are left out
    from models import build_student
    from safetensors.torch import load_file

    weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith("model_ema.")}
    build_student(STUDENT_ARCH).load_state_dict(weights, strict=True)


def test_shared_storage_and_views_are_written(tmp_path):
    payload = student_payload(ema=False)
    payload["model_ema"] = payload["model"]  # the same tensors twice (an EMA not yet updated)
    write_safetensors(payload, tmp_path / "shared.safetensors")
    assert_same_payload(read_safetensors(tmp_path / "shared.safetensors"), payload)
    bad = student_payload(ema=False)
    bad["model"]["model_ema.x"] = torch.zeros(1)
    with pytest.raises(ValueError, match="model_ema"):
        write_safetensors(bad, tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------- loaders


def test_student_both_ways_identical(tmp_path):
    pth, st = write_both(student_payload(ema=True), tmp_path, "checkpoint")
    for load in (load_any, load_student):
        (m1, i1), (m2, i2) = load(pth), load(st)
        assert_same_state(m1.state_dict(), m2.state_dict())
        assert without_source(i1) == without_source(i2)
        assert i2["source"] == str(st) and i2["format"] == "project" and i2["epoch"] == 2
        assert i2["class_names"] == DATASET.class_names and i2["train_counts"] == DATASET.train_counts
    (m1, i1), (m2, i2) = load_student(pth, ema=True), load_student(st, ema=True)
    assert_same_state(m1.state_dict(), m2.state_dict())
    assert i2["weights"] == "model_ema" and without_source(i1) == without_source(i2)
    ema_model, _ = load_any(st, ema=True)
    plain_model, _ = load_any(st)
    assert not torch.equal(ema_model.head.weight, plain_model.head.weight)  # really the EMA weights
    no_ema = tmp_path / "no_ema.safetensors"
    write_safetensors(student_payload(ema=False), no_ema)
    with pytest.raises(CheckpointError, match="model_ema"):
        load_student(no_ema, ema=True)


def test_teacher_both_ways_identical(tmp_path):
    pth, st = write_both(teacher_payload(), tmp_path, "teacher")
    for load in (load_any, load_teacher):
        (m1, i1), (m2, i2) = load(pth), load(st)
        assert_same_state(m1.state_dict(), m2.state_dict())
        assert without_source(i1) == without_source(i2)
        assert i2["kind"] == "teacher" and i2["class_map"] == DATASET.class_map
    with pytest.raises(CheckpointError, match="not a teacher"):
        load_teacher(write_both(student_payload(ema=False), tmp_path, "s")[1])


def test_safetensors_is_never_unpickled(tmp_path, monkeypatch):
    student_st = write_both(student_payload(ema=True), tmp_path, "student")[1]
    teacher_st = write_both(teacher_payload(), tmp_path, "teacher")[1]

    def refuse(*args, **kwargs):
        raise AssertionError("a .safetensors file reached torch.load / pickle")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(ckpt_mod, "safe_load", refuse)
    assert load_any(student_st)[1]["kind"] == "student"
    assert load_student(student_st, ema=True)[1]["weights"] == "model_ema"
    assert load_teacher(teacher_st)[1]["kind"] == "teacher"
    assert load_any(teacher_st)[1]["kind"] == "teacher"


def test_bare_state_dict_files(tmp_path):
    """A .safetensors state dict without the project's metadata (e.g. made by other tools)."""
    from models import build_teacher
    from safetensors.torch import save_file

    teacher = build_teacher("resnet32", 10)
    save_file(teacher.state_dict(), str(tmp_path / "plain.safetensors"))
    model, info = load_teacher(tmp_path / "plain.safetensors")
    assert info["format"] == "plain" and info["arch"]["arch"] == "resnet32"
    assert_same_state(model.state_dict(), teacher.state_dict())
    student = student_payload(ema=False)["model"]
    save_file(student, str(tmp_path / "student.safetensors"))
    model, info = load_student(tmp_path / "student.safetensors", num_heads=3)
    assert info["format"] == "reference"
    assert_same_state(model.state_dict(), student)


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_any(tmp_path / "nope.safetensors")
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="damaged.safetensors"):
        load_any(tmp_path / "damaged.safetensors")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    first = student_payload(ema=False)
    write_safetensors(first, path)
    write_safetensors(first, path)  # overwriting works

    def crash(fd):  # the new bytes are in the temporary file, then the process is killed
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(os, "fsync", crash)
    second = student_payload(ema=True)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(second, path)
    assert_same_payload(read_safetensors(path), first)  # the old complete file is intact
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.safetensors"]  # no temporary left


# ----------------------------------------------------------------------------- evaluate.py


def run_eval(args: list, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp / "hf_cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"evaluate.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_evaluate_reads_safetensors_like_pth(tmp_path):
    import yaml

    from models import build_student

    data = make_image_dataset(tmp_path / "data", [20] * 10, [4, 4, 4, 4, 4, 4, 4, 3, 3, 3])
    cfg = {"data": {"dataset": "cifar10_lt", "path": str(data), "imb_factor": 0.1, "num_workers": 0,
                    "input_size": 32},
           "aug": {"normalize": "imagenet", "eval_crop_ratio": 1.0}}
    torch.manual_seed(0)
    student = build_student(STUDENT_ARCH)
    dataset = SimpleNamespace(class_map=None, train_counts=[20, 15, 11, 9, 7, 5, 4, 3, 2, 2],
                              class_names=[f"class_{c}" for c in range(10)])
    payload = make_checkpoint("student", dict(student.student_arch), student.state_dict(), epoch=7,
                              config=cfg, metrics={}, dataset=dataset)
    pth, st = write_both(payload, tmp_path, "best_checkpoint")

    printed = yaml.safe_load(run_eval(["--ckpt", st, "--print-config"], tmp_path).stdout)
    assert printed["data"]["path"] == str(data) and printed["data"]["input_size"] == 32

    results = {}
    for path in (pth, st):
        out = tmp_path / f"{path.suffix[1:]}.json"
        run_eval(["--ckpt", path, "--json", out, "eval.batch_size=8"], tmp_path)
        results[path.suffix] = json.loads(out.read_text())
    a, b = results[".pth"], results[".safetensors"]
    assert a.pop("checkpoint") == str(pth) and b.pop("checkpoint") == str(st)
    assert a == b  # every number, group, class and config entry
    assert b["format"] == "project" and b["epoch"] == 7 and b["num_samples"] == 37
