"""Experiment trackers (TensorBoard, Weights & Biases, MLflow...) through accelerate's tracking.

``log.trackers`` (``TRACKER_SPEC``, merged into the scripts' ``log`` section) names the trackers,
any of accelerate's (``TRACKERS``) or ``all`` (every one installed); the default ``[]`` tracks
nothing and changes nothing. A training script:

* ``check_trackers(cfg["log"]["trackers"])`` in its validate: an unknown or uninstalled tracker
  stops the run before any work, naming it and its ``pip install`` command (accelerate itself
  would silently drop an uninstalled one);
* ``build_accelerator(tcfg, **accelerator_kwargs(cfg))``: ``log_with`` and ``project_dir``
  (``<train.output_dir>/trackers``: TensorBoard's event files go to
  ``<output_dir>/trackers/<project>``, MLflow's and Aim's local stores there too);
* ``start(accelerator, cfg, run_name)`` once, after the resume decision: the run's resolved
  config, flattened to ``section.key`` -> str/int/float/bool, is logged as hyperparameters;
* ``log_epoch(accelerator, record, epoch)`` with the epoch's log.txt record (same key names:
  ``train_loss``, ``lr``, ``avg_top1``, ``avg_head``, ``time_s``...; x-axis = epoch);
  ``log_step(accelerator, values, global_step)`` for per-step values (``step/<name>``, x-axis
  = optimiser steps since the start of training);
* ``finish(accelerator)`` at the end (or when preempted): closes the trackers; idempotent.

accelerate logs on the main process only; every function may be called on every process.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping

from errors import ConfigError

# accelerate's tracker names -> the package that must be importable, and how to install it.
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
    "aim": ("aim", "pip install aim"),
    "comet_ml": ("comet_ml", "pip install comet_ml"),
    "clearml": ("clearml", "pip install clearml"),
    "dvclive": ("dvclive", "pip install dvclive"),
    "swanlab": ("swanlab", "pip install swanlab"),
    "trackio": ("trackio", "pip install trackio"),
}
ALL = "all"
TRACKER_DIR = "trackers"  # under train.output_dir
PROJECT_NAME = "deit-lt"  # default project (a wandb / MLflow project; TensorBoard's sub-folder)
STEP_PREFIX = "step/"

TRACKER_SPEC = {
    "trackers": ([], "experiment trackers logging the config, epoch records and per-step loss/lr: any of "
                 + ", ".join(TRACKERS) + ", or [all] installed; [] = none", list),
}


def _installed(name: str) -> bool:
    package = TRACKERS[name][0]
    if name == "tensorboard":  # accelerate also accepts tensorboardX
        return any(importlib.util.find_spec(p) is not None for p in ("tensorboard", "tensorboardX"))
    return importlib.util.find_spec(package) is not None


def check_trackers(names) -> None:
    """Raise ConfigError naming ``log.trackers`` and the tracker when a name is unknown, not
    installed (with its pip command), or ``all`` finds none installed."""
    if names is None:
        return
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)):
        raise ConfigError(f"log.trackers: expected a list of tracker names, got {names!r}")
    for name in names:
        if not isinstance(name, str) or (name != ALL and name not in TRACKERS):
            raise ConfigError(f"log.trackers: unknown tracker {name!r}; choose from "
                              f"{', '.join(TRACKERS)}, or {ALL}")
        if name != ALL and not _installed(name):
            raise ConfigError(f"log.trackers: tracker {name!r} is not installed here: "
                              f"{TRACKERS[name][1]}")
    if ALL in names and not any(_installed(n) for n in TRACKERS):
        raise ConfigError(f"log.trackers: 'all' found no tracker installed; e.g. "
                          f"{TRACKERS['tensorboard'][1]}")


def tracker_names(cfg: dict) -> list[str]:
    names = (cfg.get("log") or {}).get("trackers") or []
    return [names] if isinstance(names, str) else list(names)


def accelerator_kwargs(cfg: dict) -> dict:
    """``{'log_with': [...], 'project_dir': '<train.output_dir>/trackers'}`` for the Accelerator,
    or ``{}`` without trackers (the Accelerator is then made exactly as before)."""
    names = tracker_names(cfg)
    if not names:
        return {}
    return {"log_with": names, "project_dir": str(Path(cfg["train"]["output_dir"]) / TRACKER_DIR)}


def _scalar(value: Any) -> Any:
    """A Python number for numbers, 0-dim tensors and numpy scalars (bool -> int); else None."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def flatten_config(cfg: Mapping, prefix: str = "") -> dict[str, str | int | float | bool]:
    """``{'optim': {'lr': 5e-4}}`` -> ``{'optim.lr': 5e-4}``; values kept when str/int/float/
    bool, lists as JSON strings, null as 'null' (what trackers' hyperparameter tables take)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, full + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[full] = value
        elif value is None:
            flat[full] = "null"
        elif isinstance(value, (list, tuple)):
            flat[full] = json.dumps(list(value), default=str)
        else:
            flat[full] = str(value)
    return flat


def start(accelerator, cfg: dict, run_name: str, project_name: str = PROJECT_NAME) -> None:
    """Start the trackers of ``accelerator`` (none: nothing happens) with the flattened config.

    ``project_name``: the wandb / MLflow / Comet project (TensorBoard's sub-folder of
    ``<output_dir>/trackers``); ``run_name`` names the run where the tracker takes a name
    (wandb ``name``, MLflow ``run_name``) and is logged as ``run_name``.
    """
    if not accelerator.log_with:
        return
    init_kwargs = {"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}}
    used = {str(t) for t in accelerator.log_with}
    accelerator.init_trackers(project_name, config={"run_name": run_name, **flatten_config(cfg)},
                              init_kwargs={k: v for k, v in init_kwargs.items() if k in used})


def numeric_values(record: Mapping[str, Any], skip=("epoch",)) -> dict[str, int | float]:
    """The entries of a log record that are numbers (bools as 0/1), without None, strings,
    lists or dicts, and without the keys in ``skip``."""
    out = {}
    for key, value in record.items():
        if key in skip:
            continue
        number = _scalar(value)
        if number is not None:
            out[key] = number
    return out


def log_epoch(accelerator, record: Mapping[str, Any], step: int) -> None:
    """Log the numeric entries of one epoch's log.txt record at ``step`` (the epoch)."""
    if not accelerator.trackers:
        return
    values = numeric_values(record)
    if values:
        accelerator.log(values, step=int(step))


def log_step(accelerator, values: Mapping[str, Any], step: int) -> None:
    """Log per-step values (e.g. ``{'loss': ..., 'lr': ...}``; tensors are read with .item(),
    one host sync, only when a tracker is active) as ``step/<name>`` at the global ``step``."""
    if not accelerator.trackers:
        return
    out = {f"{STEP_PREFIX}{k}": v for k, v in numeric_values(values, skip=()).items()}
    if out:
        accelerator.log(out, step=int(step))


def finish(accelerator) -> None:
    """Close every tracker (flushes TensorBoard's files, ends wandb / MLflow runs). Safe to call
    more than once and before ``accelerator.end_training()``, which then finds none left."""
    trackers = list(getattr(accelerator, "trackers", []) or [])
    accelerator.trackers = []
    for tracker in trackers:
        tracker.finish()
