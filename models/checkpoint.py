"""Safe, strict checkpoint loading for students (reference and project formats) and teachers.

Two reference bugs are fixed here (RECIPE section 6):

* bug 7: the reference pickles an ``argparse.Namespace`` holding ``PosixPath`` and numpy
  scalars, which torch >= 2.6 refuses unless ``weights_only=False``, i.e. arbitrary code
  execution from a downloaded file. ``safe_load`` keeps ``weights_only=True`` and allow-lists
  only those few plain types; any other global is refused before anything runs.
* bug 5: the reference resumes and evaluates with ``strict=False``. ``load_state_dict_strict``
  refuses any mismatch and names the missing and unexpected keys and the shape mismatches.

Formats (RECIPE section 7): the reference student ``{"model", "model_ema", "optimizer",
"lr_scheduler", "scaler", "epoch", "args": Namespace, <metrics as numpy floats>}``, and the
project's portable ``{"kind": "student"|"teacher", "arch": {...}, "model", "model_ema",
"class_map", "config", "metrics", "epoch"}`` of plain types only. Teacher formats are handled
in ``models/teacher.py``; ``load_any`` dispatches on content.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import pickle
import re
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from models.student import build_student, parse_student_name, student_arch
from utils import to_plain


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file's pickle references a global outside the allow-list; nothing was executed."""


class CheckpointMismatchError(RuntimeError):
    """A state_dict does not fit the model exactly (missing/unexpected keys, other shapes)."""


# ----------------------------------------------------------------------------- safe loading


def _numpy_dtype_classes() -> list[type]:
    # numpy 2 rebuilds a pickled dtype as an instance of its per-type class (Int64DType...);
    # torch's weights_only unpickler must be told each class it may build. Plain numbers only.
    names = ["BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
             "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType",
             "Float64DType", "LongDoubleDType", "Complex64DType", "Complex128DType",
             "CLongDoubleDType", "LongLongDType", "ULongLongDType"]
    return [getattr(np.dtypes, n) for n in names if hasattr(np.dtypes, n)]


def _allowed_globals() -> list:
    """Exactly what the reference's files need (RECIPE section 7), nothing callable beyond."""
    scalar = np._core.multiarray.scalar  # numpy 2's name
    return [
        argparse.Namespace,
        # Paths by explicit pickle name: Python <= 3.12 pickles them as pathlib.PosixPath,
        # 3.13 as pathlib._local.PosixPath. A Windows-made file names WindowsPath, which
        # cannot be instantiated here: it is read as a PureWindowsPath.
        *[(cls, f"{module}.{name}") for module in ("pathlib", "pathlib._local")
          for cls, name in ((pathlib.PosixPath, "PosixPath"), (pathlib.PurePosixPath, "PurePosixPath"),
                            (pathlib.PureWindowsPath, "PureWindowsPath"),
                            (pathlib.PureWindowsPath, "WindowsPath"))],
        scalar,
        # Released files were pickled with numpy 1.x, whose scalar constructor lived at
        # numpy.core.multiarray.scalar; numpy 2 only has numpy._core.multiarray.scalar.
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
        *_numpy_dtype_classes(),
    ]


def _global_name(entry) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` plus the reference's few plain types.

    Raises FileNotFoundError naming the path, or UnsafeCheckpointError naming the first
    global outside the allow-list (the pickle is scanned first; nothing is executed).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    allowed = _allowed_globals()
    allowed_names = {_global_name(g) for g in allowed}
    try:  # zip-format files can be scanned without unpickling anything
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy format: the weights_only unpickler below still refuses
        found = []
    refused = [g for g in found if g not in allowed_names]
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: the pickle references {', '.join(refused)}, which is not "
            f"on the allow-list of plain types (argparse.Namespace, pathlib paths, numpy scalars); "
            f"only load it with weights_only=False if you trust its source")
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            match = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = match.group(1) if match else "an object outside the allow-list"
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: the pickle references {what}, which is not on the "
                f"allow-list of plain types") from None


# ----------------------------------------------------------------------------- strict loading


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` only if keys and shapes match exactly.

    Never ``strict=False`` (RECIPE bug 5): the error names every problem so a renamed layer
    or a wrong architecture is visible instead of silently evaluating random weights.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        message = f"{source} does not match the model"
        if missing:
            message += _listing("missing keys (in the model, not in the file)", missing)
        if unexpected:
            message += _listing("unexpected keys (in the file, not in the model)", unexpected)
        if shapes:
            message += _listing("shape mismatches", shapes)
        raise CheckpointMismatchError(message)
    model.load_state_dict(state_dict, strict=True)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict:
    """Remove a DataParallel/DDP ``module.`` prefix where every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


# ----------------------------------------------------------------------------- students


_REFERENCE_TRAINING_STATE = ("model", "model_ema", "optimizer", "lr_scheduler", "scaler",
                             "epoch", "args")


def infer_student_arch(state_dict: Mapping[str, torch.Tensor], name: str,
                       num_heads: int | None = None) -> dict:
    """Architecture of a distilled ViT from its weights (the reference stores none).

    Shapes give embed_dim, depth, patch size, image size (square grid), num_classes and the
    MLP ratio; the number of heads is not in any shape, so it comes from ``num_heads`` or
    from the timm-style model name.
    """
    embed_dim = state_dict["cls_token"].shape[-1]
    patch = state_dict["patch_embed.proj.weight"].shape[-2:]
    if patch[0] != patch[1]:
        raise ValueError(f"non-square patches {tuple(patch)} are not supported")
    num_patches = state_dict["pos_embed"].shape[1] - 2
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, not a square grid")
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    if num_heads is None:
        defaults = parse_student_name(name)
        if defaults is None:
            raise ValueError(f"cannot tell the number of attention heads of {name!r} from the "
                             f"weights; pass num_heads")
        num_heads = defaults["num_heads"]
    return student_arch(name, num_classes=state_dict["head.weight"].shape[0],
                        img_size=grid * int(patch[0]), patch_size=int(patch[0]),
                        embed_dim=int(embed_dim), depth=depth, num_heads=num_heads,
                        mlp_ratio=hidden / embed_dim)


def is_student_state(state_dict: Any) -> bool:
    return isinstance(state_dict, Mapping) and "dist_token" in state_dict and "head_dist.weight" in state_dict


def student_from_checkpoint(ckpt: Any, num_classes: int | None = None, num_heads: int | None = None,
                            ema: bool = False, source: str = "checkpoint") -> tuple[nn.Module, dict]:
    """Build and strictly load a student from an already loaded checkpoint object."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    key = "model_ema" if ema else "model"
    if ckpt.get("kind") == "student":
        fmt = "project"
        arch = student_arch(**ckpt["arch"])
        class_map = ckpt.get("class_map")
        args = to_plain(ckpt.get("config"))
        metrics = to_plain(ckpt.get("metrics"))
    elif "kind" not in ckpt and is_student_state(ckpt.get("model")):
        fmt = "reference"
        args = to_plain(ckpt.get("args")) or {}
        arch = infer_student_arch(ckpt["model"], args.get("model", "deit_distilled"), num_heads)
        if args.get("input_size") not in (None, arch["img_size"]):
            raise ValueError(f"{source}: args.input_size {args['input_size']} disagrees with the "
                             f"weights' image size {arch['img_size']}")
        class_map = args.get("class_map")
        metrics = {k: to_plain(v) for k, v in ckpt.items() if k not in _REFERENCE_TRAINING_STATE}
    else:
        raise ValueError(f"{source}: not a student checkpoint (no 'kind': 'student' and no "
                         f"distilled ViT weights under 'model')")
    if ckpt.get(key) is None:
        raise ValueError(f"{source}: has no {key!r} weights")
    if num_classes is not None and num_classes != arch["num_classes"]:
        raise ValueError(f"{source}: has {arch['num_classes']} classes, expected {num_classes}")
    model = build_student(arch)
    load_state_dict_strict(model, strip_prefix(ckpt[key]), f"{source} [{key}]")
    model.eval()
    info = {"kind": "student", "format": fmt, "arch": arch, "class_map": to_plain(class_map),
            "args": args, "epoch": to_plain(ckpt.get("epoch")), "metrics": metrics,
            "weights": key, "source": source}
    return model, info


def load_student(path: str | os.PathLike, num_classes: int | None = None,
                 num_heads: int | None = None, ema: bool = False) -> tuple[nn.Module, dict]:
    """Student from a reference or project checkpoint file, strictly loaded, in eval mode.

    ``ema=True`` loads the ``model_ema`` weights instead of ``model``. ``num_heads`` is only
    needed for a reference file whose ``args.model`` is not a timm DeiT name.
    """
    return student_from_checkpoint(safe_load(path), num_classes=num_classes, num_heads=num_heads,
                                   ema=ema, source=os.fspath(path))


def load_any(path: str | os.PathLike, **kwargs) -> tuple[nn.Module, dict]:
    """Student or teacher, whichever the file holds; ``info['kind']`` says which.

    ``kwargs`` go to the matching loader (``num_classes``, ``ema``... for students; ``arch``,
    ``num_classes``, ``head`` for teachers).
    """
    from models.teacher import teacher_from_checkpoint  # teacher.py imports this module

    ckpt = safe_load(path)
    kind = ckpt.get("kind") if isinstance(ckpt, Mapping) else None
    if kind == "student" or (kind is None and isinstance(ckpt, Mapping) and is_student_state(ckpt.get("model"))):
        return student_from_checkpoint(ckpt, source=os.fspath(path), **kwargs)
    return teacher_from_checkpoint(ckpt, source=os.fspath(path), **kwargs)
