"""A newcomer's first hour (issue 26 items 2, 4, 8, 15-18; issue 23's lazy imports): own data
kept whole, impossible batch sizes and student shapes refused before any work, every config
error at once, --print-config / --print-schedule checked, --smoke, and clearer messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import make_image_dataset

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts
                 and "slurm" not in p.parts)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> Path:
    """A small long-tailed data set of the user's own (generic, parquet)."""
    return make_image_dataset(tmp_path_factory.mktemp("own"), [40, 20, 10, 6, 4], [4] * 5, size=8)


def config(script, argv: list[str]) -> dict:
    return script.config_from_args(argv)


def exits(script, argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of a command line that ends in the config stage."""
    with pytest.raises(SystemExit) as info:
        script.config_from_args(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


# ----------------------------------------------------------------------------- item 2: own data


def test_generic_data_is_kept_whole_unless_imb_factor_is_set(own_data, capsys):
    from data.summary import main as summary_main

    common = ["data.dataset=generic", f"data.path={own_data}", "data.image_column=img"]
    summary = summary_main(common)
    out = capsys.readouterr().out
    assert summary["num_train"] == 80 and summary["train_counts"] == [40, 20, 10, 6, 4]
    assert "every training image used" in out and "total: 80 training images" in out
    summary = summary_main(common + ["data.imb_factor=0.1"])  # set explicitly: a subset is drawn
    out = capsys.readouterr().out
    assert summary["num_train"] < 80 and "long-tailed subset (data.imb_factor=0.1" in out
    # the resolved (and stored) config of a training run says what ran
    import train_student

    cfg = config(train_student, common + ["distill.type=none"])
    assert cfg["data"]["imb_factor"] == 1.0
    assert config(train_student, common + ["distill.type=none", "data.imb_factor=0.01"])["data"]["imb_factor"] == 0.01
    assert config(train_student, ["distill.type=none"])["data"]["imb_factor"] == 0.01  # CIFAR: the reference's


# ----------------------------------------------------------------------------- item 4: batch size


def test_batch_size_beyond_the_training_set_is_refused(own_data, capsys):
    import train_student

    code, _, err = exits(train_student, ["distill.type=none", "train.batch_size=1000000000000"], capsys)
    assert code == 2 and "train.batch_size: 1000000000000 is more than the 12406 training images" in err

    # own data: known once the data are built, before any training
    import contextlib
    from types import SimpleNamespace

    import torch

    from engine.loop import build_loaders
    from errors import ConfigError

    accelerator = SimpleNamespace(main_process_first=contextlib.nullcontext, is_main_process=True,
                                  process_index=0, num_processes=1, print=print, prepare=lambda x: x,
                                  device=torch.device("cpu"))

    cfg = config(train_student, ["data.dataset=generic", f"data.path={own_data}", "data.image_column=img",
                                 "distill.type=none", "data.num_workers=0", "data.input_size=8",
                                 "model.img_size=8", "model.patch_size=4", "train.batch_size=81"])
    with pytest.raises(ConfigError, match=r"train.batch_size=81 is more than the 80 training images"):
        build_loaders(cfg, accelerator)


# ----------------------------------------------------------------------------- item 8: student shape


@pytest.mark.parametrize("override, key", [("model.num_heads=5", "model.num_heads"),
                                           ("model.name=foo", "model.name"),
                                           ("data.input_size=32", "data.input_size")])
def test_student_shape_is_checked_before_any_work(override, key, capsys):
    import train_student

    code, _, err = exits(train_student, ["distill.type=none", override], capsys)
    assert code == 2 and err.startswith(f"config error: {key}:") and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- items 16, 17: checks


def test_print_schedule_is_checked_first_and_exits_with_one_line():
    """The issue's command, as a user types it."""
    proc = subprocess.run([sys.executable, "train_student.py", "--config", "configs/cifar10_lt.yaml",
                           "train.epochs=-1", "--print-schedule"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["config error: train.epochs: must be > 0"]


def test_print_config_runs_the_range_checks(capsys):
    import train_teacher

    code, out, err = exits(train_teacher, ["train.epochs=-1", "--print-config"], capsys)
    assert code == 2 and out == "" and "train.epochs: must be > 0" in err


def test_every_config_error_is_reported_at_once(tmp_path, capsys):
    import train_student

    code, _, err = exits(train_student, ["distill.type=none", "train.batch_size=0", "optim.lr=-1",
                                         "distill.alpha=2", "model.drop_path=1.5"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    for key in ("train.batch_size", "optim.lr", "distill.alpha", "model.drop_path"):
        assert key in err, key
    bad = tmp_path / "bad.yaml"  # keys and types from a file and the command line, all named
    bad.write_text("train:\n  epochs: many\n  epoch: 3\n")
    code, _, err = exits(train_student, ["--config", str(bad), "optim.lr=fast"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    for part in ("train.epochs: expected an integer", "unknown key 'train.epoch'", "optim.lr: expected a number"):
        assert part in err, part


def test_schedule_header_and_rounded_lrs(capsys):
    import train_student
    import train_teacher

    train_student.print_schedule(config(train_student, ["--config", str(ROOT / "configs/cifar10_lt.yaml"),
                                                       "distill.type=none"]))  # (no teacher file here)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# peak lr 0.00025 ") and "2 process(es) assumed" in lines[0]
    assert "12 optimiser steps/epoch (12406 training images)" in lines[0] and "DRW from epoch 1100" in lines[0]
    lrs = [json.loads(line)["lr"] for line in lines[1:]]
    assert len(lrs) == 1200 and lrs[1] == 5.08e-05  # not 5.0799999999999995e-05
    assert all(len(f"{lr:e}".split("e")[0].rstrip("0").replace(".", "").lstrip("-")) <= 6 for lr in lrs)
    train_teacher.print_schedule(config(train_teacher, ["--config", str(ROOT / "configs/teachers/inat18_paco_sam.yaml")]))
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("# peak lr 0.02 ") and "need the data" in header and "DRW from epoch never" in header


def test_every_shipped_config_validates_with_smoke(capsys):
    import train_student
    import train_teacher

    assert len(SHIPPED) >= 20
    for path in SHIPPED:
        script = train_teacher if "teachers" in path.parts else train_student
        code, out, err = exits(script, ["--config", str(path), "--smoke", "--print-config"], capsys)
        assert code == 0, (path, err)
        t = yaml.safe_load(out)["train"]
        assert 1 <= t["epochs"] <= 3 and t["max_steps_per_epoch"] == 2, path
        assert t["eval_max_samples"] == 256 and t["output_dir"].endswith("_smoke"), path
        assert "smoke run:" in err, path


# ----------------------------------------------------------------------------- item 18: messages


def test_first_hour_messages(tmp_path, monkeypatch, capsys):
    import train_student
    from data import build_datasets
    from data.build import DATA_SPEC
    from data.summary import main as summary_main

    # forgetting data.dataset=generic: the error says the default is CIFAR
    own = make_image_dataset(tmp_path / "own", [3, 2], [1, 1], size=8, image_column="image")
    capsys.readouterr()
    cfg = {key: leaf[0] for key, leaf in DATA_SPEC.items()} | {"path": str(own)}
    with pytest.raises(ValueError, match=r"data.dataset=cifar10_lt, the default, expects CIFAR's columns; "
                                         r"for your own data set data.dataset=generic"):
        build_datasets(cfg, verbose=False)
    # a relative data.path is stored absolute: evaluate.py finds it from another folder
    monkeypatch.chdir(tmp_path)
    cfg = config(train_student, ["distill.type=none", "data.dataset=generic", "data.path=own"])
    assert cfg["data"]["path"] == str(tmp_path / "own")
    # data.summary fails as the scripts do: "error: ...", status 2
    with pytest.raises(SystemExit) as info:
        summary_main([f"data.path={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err.splitlines()  # (after the datasets library's progress bars)
    assert info.value.code == 2 and err[-1].startswith("error: data.path does not exist")
    # a DeiT-style flag points to the config key
    code, _, err = exits(train_student, ["--epochs", "3"], capsys)
    assert code == 2 and "train.epochs=3" in err
    # evaluate.py's help shows an override evaluate.py accepts
    import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    help_text = capsys.readouterr().out
    assert "optim.lr" not in help_text and "eval.batch_size=128" in help_text


def test_data_summary_imports_no_training_libraries(own_data):
    """issue 23: `python -m data.summary` parses files; torch, torchvision and timm cost seconds."""
    code = ("import sys; from data.summary import main; "
            f"main(['data.dataset=generic', 'data.path={own_data}', 'data.image_column=img']); "
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- --smoke end to end


def test_smoke_runs_of_the_cpu_configs_train_and_evaluate(tmp_path):
    """One short run per script: the CPU configs with --smoke on tiny own data; the teacher's
    start-up line says the rho that runs (item 15); evaluation capped by train.eval_max_samples."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    own_data = make_image_dataset(tmp_path / "own", [40, 20, 10, 6, 4], [4] * 5, size=32)
    data = ["data.dataset=generic", f"data.path={own_data}", "data.image_column=img", "data.num_workers=0",
            "data.imb_factor=1.0",  # the CPU configs set CIFAR's 0.01 explicitly
            "data.input_size=32", "train.batch_size=16", "log.progress=false"]

    def run(script: str, config: str, *overrides: str) -> str:
        proc = subprocess.run([sys.executable, script, "--config", config, "--smoke", *data, *overrides],
                              cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    out = run("train_teacher.py", "configs/teachers/cifar10_lt_cpu.yaml", f"train.output_dir={tmp_path / 'teacher'}",
              "optim.rho_schedule=[[0, 0.05], [5, 0.1]]")
    assert "smoke run: 3 epochs (of 10)" in out and "every training image used" in out
    assert "SAM rho from optim.rho_schedule [[0, 0.05], [1, 0.1]] (0.05 at epoch 0)" in out
    teacher = tmp_path / "teacher_smoke"
    log = [json.loads(line) for line in (teacher / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and [r["drw"] for r in log] == [False, False, True]
    out = run("train_student.py", "configs/cifar10_lt_cpu.yaml", f"train.output_dir={tmp_path / 'student'}",
              f"distill.teacher_ckpt={teacher / 'checkpoint.pth'}", "train.eval_max_samples=10")
    assert "smoke run: 3 epochs (of 12)" in out and "evaluation during training on 10 of the 20" in out
    log = [json.loads(line) for line in (tmp_path / "student_smoke" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2] and log[-1]["drw"]
    assert all("top1" in json.dumps(r) for r in log[1:]) and (tmp_path / "student_smoke" / "checkpoint.pth").is_file()


def test_a_run_stored_with_a_relative_data_path_still_resumes(tmp_path, monkeypatch):
    """Runs made before data paths were stored absolute compare equal (same working folder)."""
    from engine.run_folder import config_differences

    monkeypatch.chdir(tmp_path)
    old = {"data": {"path": "own", "root": None}, "train": {"epochs": 3}}
    assert config_differences(old, {"data": {"path": str(tmp_path / "own"), "root": None}, "train": {"epochs": 3}}) == []
    assert config_differences(old, {"data": {"path": str(tmp_path / "other"), "root": None}, "train": {"epochs": 3}})
