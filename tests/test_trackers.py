"""engine/trackers.py: log.trackers checks, the Accelerator's tracker arguments, and a real
TensorBoard run whose event files, read back with TensorBoard's own reader, hold the records."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from engine import trackers
from engine.run_config import LOG_SPEC
from errors import ConfigError
from utils import load_config

RECORDS = [
    {"epoch": 0, "drw": False, "time_s": 3.5, "train_loss": 2.25, "train_base": 2.0, "train_lr": 1e-4,
     "cls_top1": 10.0, "cls_head": 30.0, "cls_mid": None, "avg_top1": 12.5, "note": "text", "per": [1, 2]},
    {"epoch": 1, "drw": True, "time_s": 2.75, "train_loss": 1.5, "train_base": 1.25, "train_lr": 2.5e-4,
     "cls_top1": 20.0, "cls_head": 40.0, "cls_mid": 5.0, "avg_top1": 22.5, "note": "text", "per": [1, 2]},
]
CFG = {"train": {"output_dir": "OUT", "epochs": 2, "cpu": True, "mixed_precision": None},
       "optim": {"lr": 5e-4, "opt_betas": [0.9, 0.999]}, "distill": {"teacher_ckpt": None},
       "log": {"progress": False, "trackers": ["tensorboard"]}}


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: reset it around the test, and restore the
    torch thread count and environment, which build_accelerator / Accelerator change."""
    from accelerate.state import AcceleratorState

    threads, environ = torch.get_num_threads(), dict(os.environ)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


# ----------------------------------------------------------------------------- checks


def test_spec_merges_into_log_and_parses():
    spec = {"log": {**LOG_SPEC, **trackers.TRACKER_SPEC}}
    assert load_config(spec, [])["log"]["trackers"] == []
    assert load_config(spec, ["log.trackers=[tensorboard]"])["log"]["trackers"] == ["tensorboard"]
    with pytest.raises(SystemExit):  # a bare name is not a list: one line naming the key, status 2
        load_config(spec, ["log.trackers=tensorboard"])


def test_unknown_tracker_named():
    with pytest.raises(ConfigError, match=r"log.trackers: unknown tracker 'tensorbored'.*tensorboard, wandb"):
        trackers.check_trackers(["tensorboard", "tensorbored"])
    with pytest.raises(ConfigError, match="log.trackers"):
        trackers.check_trackers([3])
    trackers.check_trackers([])
    trackers.check_trackers(["tensorboard", "all"])


def test_uninstalled_tracker_named_with_its_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.trackers: tracker 'wandb' is not installed here: pip install wandb"):
        trackers.check_trackers(["wandb"])
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        trackers.check_trackers(["tensorboard"])


def test_accelerator_kwargs():
    assert trackers.accelerator_kwargs({"train": {"output_dir": "out/run"}, "log": {"trackers": []}}) == {}
    assert trackers.accelerator_kwargs({"train": {"output_dir": "out/run"}, "log": {}}) == {}
    assert trackers.accelerator_kwargs({"train": {"output_dir": "out/run"}, "log": {"trackers": ["tensorboard"]}}) \
        == {"log_with": ["tensorboard"], "project_dir": str(Path("out/run") / "trackers")}


def test_flatten_config_and_numeric_values():
    flat = trackers.flatten_config(CFG)
    assert flat["optim.lr"] == 5e-4 and flat["optim.opt_betas"] == "[0.9, 0.999]"
    assert flat["distill.teacher_ckpt"] == "null" and flat["train.cpu"] is True
    assert flat["log.trackers"] == '["tensorboard"]'
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    values = trackers.numeric_values({**RECORDS[1], "t": torch.tensor(0.5), "vec": torch.ones(2)})
    assert values == {"drw": 1, "time_s": 2.75, "train_loss": 1.5, "train_base": 1.25, "train_lr": 2.5e-4,
                      "cls_top1": 20.0, "cls_head": 40.0, "cls_mid": 5.0, "avg_top1": 22.5, "t": 0.5}


def test_no_trackers_changes_nothing(fresh_accelerate_state, tmp_path):
    from engine.device import build_accelerator

    cfg = {**CFG, "train": {**CFG["train"], "output_dir": str(tmp_path)}, "log": {"trackers": []}}
    accelerator = build_accelerator(cfg["train"], **trackers.accelerator_kwargs(cfg))
    trackers.start(accelerator, cfg, "run")
    trackers.log_epoch(accelerator, RECORDS[0], 0)
    trackers.log_step(accelerator, {"loss": torch.tensor(1.0)}, 3)
    trackers.finish(accelerator)
    assert accelerator.trackers == [] and not (tmp_path / "trackers").exists()


# ----------------------------------------------------------------------------- a real TensorBoard run


def test_tensorboard_event_files_hold_the_records(fresh_accelerate_state, tmp_path):
    from accelerate import Accelerator

    project = tmp_path / "trackers"
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(project))
    trackers.start(accelerator, CFG, "my_run")
    for record in RECORDS:
        trackers.log_epoch(accelerator, record, record["epoch"])
    for step, (loss, lr) in enumerate([(3.0, 1e-6), (2.5, 2e-6), (2.0, 3e-6)]):
        trackers.log_step(accelerator, {"loss": torch.tensor(loss), "lr": lr}, step)
    accelerator.end_training()
    trackers.finish(accelerator)  # after end_training: nothing left to close, no error

    scalars = read_scalars(project / trackers.PROJECT_NAME)
    expected = {}
    for record in RECORDS:
        for key, value in trackers.numeric_values(record).items():
            expected.setdefault(key, {})[record["epoch"]] = float(value)
    expected["step/loss"] = {0: 3.0, 1: 2.5, 2: 2.0}
    expected["step/lr"] = {0: 1e-6, 1: 2e-6, 2: 3e-6}
    assert set(scalars) == set(expected)
    for tag, by_step in expected.items():
        assert scalars[tag] == pytest.approx(by_step, rel=1e-6), tag  # float32 in the event files
    assert scalars["cls_mid"] == {1: 5.0}  # None in epoch 0: not logged
    assert scalars["drw"] == {0: 0.0, 1: 1.0}
    hparams = list((project / trackers.PROJECT_NAME).glob("*/hparams.yml"))
    assert len(hparams) == 1 and "optim.lr: 0.0005" in hparams[0].read_text()
    assert "run_name: my_run" in hparams[0].read_text()


def test_build_accelerator_passes_trackers_and_finish_is_idempotent(fresh_accelerate_state, tmp_path):
    from engine.device import build_accelerator

    cfg = {**CFG, "train": {**CFG["train"], "output_dir": str(tmp_path / "run")}}
    trackers.check_trackers(cfg["log"]["trackers"])
    accelerator = build_accelerator(cfg["train"], **trackers.accelerator_kwargs(cfg))
    assert [str(t) for t in accelerator.log_with] == ["tensorboard"]
    assert Path(accelerator.logging_dir) == tmp_path / "run" / "trackers"
    trackers.start(accelerator, cfg, "run")
    trackers.log_epoch(accelerator, RECORDS[0], 0)
    trackers.finish(accelerator)
    trackers.finish(accelerator)
    accelerator.end_training()
    scalars = read_scalars(tmp_path / "run" / "trackers" / trackers.PROJECT_NAME)
    assert scalars["train_loss"] == {0: 2.25}
