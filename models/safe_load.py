"""Safe, strict loading of torch files, for every checkpoint the project reads. Imports no model.

Two reference bugs are fixed here (docs/recipe.md, "Reference bugs we do not repeat"):

* the reference pickles an ``argparse.Namespace`` holding ``PosixPath`` and numpy scalars,
  which torch >= 2.6 refuses unless ``weights_only=False``, i.e. arbitrary code execution
  from a downloaded file. ``safe_load`` keeps ``weights_only=True`` and allow-lists only
  those few plain types; any other global is refused before anything runs.
* the reference resumes and evaluates with ``strict=False``. ``load_state_dict_strict``
  refuses any mismatch and names the missing and unexpected keys and the shape mismatches,
  and integer tensors where the model has float weights (``check_float_dtypes``).

``strip_prefix`` removes wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import re
import zipfile
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError

__all__ = ["safe_load", "check_torch_file", "load_state_dict_strict", "check_float_dtypes", "strip_prefix",
           "strip_wrapper_prefixes", "UnsafeCheckpointError", "CheckpointMismatchError"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


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
    """Exactly what the reference's files need (docs/recipe.md section 8), nothing callable beyond."""
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


def check_torch_file(path: str | os.PathLike) -> None:
    """Cheap look at a file's bytes (its header, a zip's directory; nothing is unpickled):
    CheckpointError naming the file unless it can be a ``torch.save`` file.

    ``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (torch >= 1.6) or, in the
    legacy format, a pickle stream (first byte 0x80, protocol 2-5). An empty file, a zip
    archive cut short (a partial download or copy: the directory sits at the end), a zip
    without ``data.pkl`` and any other bytes are refused as not / no longer a checkpoint, which
    is what they are: random bytes are no pickle attack."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file, not a torch checkpoint")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt torch checkpoint (its zip archive "
                                  f"cannot be read: {e}); copy or download it again") from None
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise CheckpointError(f"{path}: a zip archive but not a torch checkpoint (no data.pkl in it)")
        return
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return  # legacy torch.save format; a cut-short one is reported by safe_load
    raise CheckpointError(f"{path}: not a torch checkpoint (neither torch.save's zip format nor its "
                          f"legacy pickle format; first bytes {head!r})")


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` plus the reference's few plain types.

    Raises FileNotFoundError naming the path; CheckpointError naming the file when it is not a
    torch checkpoint or is truncated or corrupt (``check_torch_file``, then what torch.load
    finds); UnsafeCheckpointError naming the first global outside the allow-list (the pickle is
    scanned first; nothing is executed).
    """
    path = os.fspath(path)
    check_torch_file(path)
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
            if match is None:  # not a global: bytes the unpickler cannot make sense of
                raise CheckpointError(f"{path}: corrupt torch checkpoint (its pickle cannot be read: "
                                      f"{_last_line(e)})") from None
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: the pickle references {match.group(1)}, which is not "
                f"on the allow-list of plain types") from None
        except EOFError:
            raise CheckpointError(f"{path}: truncated torch checkpoint (the data end early); copy "
                                  f"or download it again") from None
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            # torch's zip reader ("PytorchStreamReader failed ...") or a garbled legacy stream
            raise CheckpointError(f"{path}: truncated or corrupt torch checkpoint "
                                  f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _last_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


# ----------------------------------------------------------------------------- strict loading


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` only if keys and shapes match exactly.

    Never ``strict=False`` (docs/recipe.md section 7, bug 5): the error names every problem so a renamed layer
    or a wrong architecture is visible instead of silently evaluating random weights.
    """
    expected = model.state_dict()
    check_float_dtypes(expected, state_dict, source)
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


def check_float_dtypes(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, Any],
                       source: str = "checkpoint") -> None:
    """CheckpointMismatchError (one line naming ``source`` and a tensor) where the model holds
    floating-point weights and the file an integer or bool tensor: ``load_state_dict`` would
    silently cast it back, so weights truncated to integers (mostly zeros) would evaluate or
    teach without a word. Another float dtype (fp16, bf16) is fine: it is converted."""
    bad = [k for k, v in expected.items()
           if v.is_floating_point() and isinstance(state_dict.get(k), torch.Tensor)
           and not state_dict[k].is_floating_point()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointMismatchError(
            f"{source}: tensor {bad[0]}{more} stored as {state_dict[bad[0]].dtype} where the model "
            f"has floating-point weights ({expected[bad[0]].dtype}): weights cast to integers are "
            f"not usable; export the file again from the float weights")


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict:
    """Remove a DataParallel/DDP ``module.`` prefix where every key has it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Remove every wrapper prefix (``module.``, ``_orig_mod.``, in any nesting) that all keys
    share: a compiled DDP model's keys read ``_orig_mod.module.`` or ``module._orig_mod.``."""
    state_dict = dict(state_dict)
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = strip_prefix(state_dict, prefix)
                changed = True
    return state_dict
