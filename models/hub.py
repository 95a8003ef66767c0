"""Checkpoints given by Hugging Face hub id or by folder, in timm's hub layout.

Wherever a checkpoint is read (``evaluate.py --ckpt`` / ``--teacher``, ``distill.teacher_ckpt``,
``model.init_ckpt``), besides a file the project accepts:

* ``hf-hub:user/name`` (optionally ``@revision``): downloaded with ``huggingface_hub`` into its
  cache (``snapshot_download``: only config.json, the weights and the card);
* ``local-dir:/path``, or a plain folder holding ``config.json``: read where it is.

The folder is what ``models/export.py`` writes (and what timm's ``save_for_hf`` /
``push_to_hf_hub`` write): ``config.json`` (``architecture``, ``num_classes``, ``model_args``,
``label_names``, ``pretrained_cfg``) and ``model.safetensors`` (else ``pytorch_model.bin``,
read with the project's safe loader). ``read_folder`` turns it into the project's portable
checkpoint dict (``make_checkpoint``'s layout), so every loader of models/checkpoint.py takes
it unchanged. Our own exports carry that dict's non-tensor entries in ``config.json`` under
``deit_lt`` (run config, class map, class names...); a folder from elsewhere (any timm export
of a distilled DeiT or a CNN) is rebuilt from ``architecture`` and ``model_args``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from errors import CheckpointError

PREFIXES = ("hf-hub:", "local-dir:")
CONFIG_KEY = "deit_lt"  # our entry in config.json (models/export.py writes it)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_source(path: Any) -> bool:
    """True for ``hf-hub:...``, ``local-dir:...`` and a folder holding a ``config.json``."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    return text.startswith(PREFIXES) or (Path(text).is_dir() and (Path(text) / "config.json").is_file())


def hub_offline() -> bool:
    """Whether huggingface_hub is told to stay offline (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_folder(path: str | os.PathLike, key: str = "checkpoint") -> Path:
    """The local folder behind ``path`` (``is_hub_source``); a hub id is downloaded (or taken
    from the cache). CheckpointError, one line naming ``key`` and ``path``, when the folder is
    missing or the hub cannot be reached."""
    text = os.fspath(path)
    if text.startswith("hf-hub:"):
        return _download(text[len("hf-hub:"):], key, text)
    folder = Path(text[len("local-dir:"):] if text.startswith("local-dir:") else text)
    if not folder.is_dir():
        raise CheckpointError(f"{key}: {text}: no such folder")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{key}: {text}: no config.json in the folder (not timm's hub layout)")
    return folder


def _download(repo: str, key: str, text: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:  # offline (HF_HUB_OFFLINE=1) this reads the cache only
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=["config.json", *WEIGHT_FILES, "README.md"]))
    except LocalEntryNotFoundError:
        if hub_offline():
            raise CheckpointError(
                f"{key}: {text}: the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and the model is not "
                f"in its cache; download it elsewhere (huggingface-cli download {repo_id} --local-dir DIR) "
                f"and give local-dir:DIR") from None
        raise CheckpointError(f"{key}: {text}: cannot reach the Hugging Face hub and the model is not "
                              f"in its cache") from None
    except (HfHubHTTPError, OSError, ValueError) as e:  # unknown repo, no access, bad id, network
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{key}: {text}: cannot download it: {first}") from None


def _weights(folder: Path, source: str) -> dict:
    from models.safe_load import safe_load

    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file
            try:
                return load_file(str(file), device="cpu")
            except Exception as e:  # safetensors' own error types (a damaged file)
                raise CheckpointError(f"{source}: {name} is not a readable safetensors file: {e}") from None
        state = safe_load(file)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise CheckpointError(f"{source}: the folder holds no {' or '.join(WEIGHT_FILES)}")


def read_folder(folder: Path, source: str) -> dict:
    """The portable checkpoint dict (``make_checkpoint``'s layout) of a folder in timm's layout."""
    from models.student import student_arch

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source}: config.json is not readable JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{source}: config.json names no 'architecture' (not timm's hub layout)")
    state = _weights(folder, source)
    ours = config.get(CONFIG_KEY)
    if isinstance(ours, dict) and ours.get("kind") in ("student", "teacher"):
        payload = {k: ours.get(k) for k in ("kind", "arch", "epoch", "config", "metrics", "class_map",
                                              "train_counts", "class_names")}
        return {**payload, "epoch": payload["epoch"] or 0, "model": state, "model_ema": None}
    # a timm export from elsewhere: the architecture and its arguments say what to build
    args = config.get("model_args") or {}
    num_classes = config.get("num_classes") or args.get("num_classes")
    names = config.get("label_names")
    common = {"model": state, "model_ema": None, "epoch": 0, "config": None, "metrics": None,
              "class_map": None, "train_counts": None,
              "class_names": list(names) if isinstance(names, (list, tuple)) else None}
    if "dist_token" in state and "head_dist.weight" in state:
        size = args.get("img_size")
        size = size[0] if isinstance(size, (list, tuple)) else size
        try:
            arch = student_arch(config["architecture"], num_classes, img_size=size,
                                patch_size=args.get("patch_size"), embed_dim=args.get("embed_dim"),
                                depth=args.get("depth"), num_heads=args.get("num_heads"),
                                mlp_ratio=args.get("mlp_ratio"))
        except ValueError as e:
            raise CheckpointError(f"{source}: config.json does not describe the student: {e}") from None
        return {"kind": "student", "arch": arch, **common}
    return {"kind": "teacher", "arch": {"arch": config["architecture"], "num_classes": num_classes,
                                        "head": "linear"}, **common}


def read_source(path: str | os.PathLike, key: str = "checkpoint") -> dict:
    """``read_folder(resolve_folder(path))``: what ``models.checkpoint.read_checkpoint`` returns
    for a hub id or folder."""
    return read_folder(resolve_folder(path, key), os.fspath(path))
