"""The project's checkpoint format: one writer, and the readers of every format we load.

Portable checkpoint (``make_checkpoint``; ``checkpoint.pth`` / ``best_checkpoint.pth`` of the
training scripts): plain types only, loadable with ``weights_only=True``::

    {"kind": "student" | "teacher", "arch": {...}, "model": state_dict, "model_ema": state_dict
     or None, "epoch", "config": resolved config, "metrics", "class_map", "train_counts",
     "class_names"}

``arch`` is what ``build_student(arch)`` / ``build_teacher(**arch)`` rebuild the model from.
State dicts never carry wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``), and a
PaCo teacher is stored as its plain teacher (query backbone + classifier, head ``linear``).

Readers (all through ``models.safe_load``, or ``safetensors`` for .safetensors files: no code
runs, loading is strict):

* students: the project format, and the reference's training state ``{"model", "model_ema",
  "optimizer", "lr_scheduler", "scaler", "epoch", "args": Namespace, <metrics>}`` whose
  ``model`` keys equal timm's ``VisionTransformerDistilled`` (architecture inferred from the
  shapes);
* teachers: ``project``; ``plain`` ``{"model": state_dict}`` (the reference CE ResNet-32) or
  a bare state_dict; ``ldam`` ``{"state_dict", "arch", "epoch", "best_acc1", ...}`` with or
  without ``module.``; ``paco``: the whole MoCo module under ``state_dict``, of which the
  query backbone and ``linear`` are kept (``models.paco.split_paco_state_dict``).

``load_any`` dispatches on content; docs/recipe.md section 8 describes the published formats.

Starting from weights (not strict; a report names what was resized, reset, missing or
unexpected): ``init_student_from`` (any student or timm / DeiT ViT checkpoint, pos_embed
resampled to the model's grid) and ``init_teacher_from``. ``load_named_teacher`` loads a
teacher by timm name from timm's / torchvision's own state dict (strictly) or timm's
pretrained weights.

safetensors (``write_safetensors``; ``checkpoint.safetensors`` / ``best_checkpoint.safetensors``
beside the .pth files): the same portable checkpoint in one file that holds only tensors and
strings, so reading it can never run code. Tensors: the ``model`` state dict under its own keys
and, when there is one, the EMA state dict under ``model_ema.<key>`` (one file per checkpoint,
so the write is atomic). Metadata (string -> string): ``format`` = ``deit-lt``,
``format_version``, ``model_ema`` (``true`` / ``false``), ``model_ema_prefix``, ``kind``
(``student`` / ``teacher``), and every other entry of the payload as JSON (``arch``, ``epoch``,
``config``, ``metrics``, ``class_map``, ``train_counts``, ``class_names``). Every loader
accepts a ``.safetensors`` path (``read_checkpoint``): the file is read with ``safetensors``
only, never unpickled, and the payload rebuilt from it goes through the same student /
teacher readers as a .pth file. A ``.safetensors`` file without the project's metadata is
read as a bare state dict (a student's is wrapped as ``{"model": ...}``, anything else is a
plain teacher). To load only the weights elsewhere::

    {k: v for k, v in safetensors.torch.load_file(path).items() if not k.startswith("model_ema.")}
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError
from models.paco import paco_to_teacher_state_dict, split_paco_state_dict
from errors import ConfigError
from models.safe_load import check_float_dtypes, load_state_dict_strict, safe_load, strip_wrapper_prefixes
from models.student import DistilledStudent, build_student, parse_student_name, student_arch
from models.teacher import build_teacher, classifier_name_of
from utils import atomic_write_bytes, to_plain

__all__ = ["make_checkpoint", "load_student", "load_teacher", "load_any", "student_from_checkpoint",
           "teacher_from_checkpoint", "write_safetensors", "read_safetensors", "read_checkpoint",
           "init_student_from", "init_teacher_from", "load_named_teacher", "adapt_pos_embed",
           "CheckpointError", "CheckpointMismatchError", "UnsafeCheckpointError"]


# ----------------------------------------------------------------------------- writer


def is_paco_state(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder_q.", "module.encoder_q.")) for k in state_dict)


def make_checkpoint(kind: str, arch: dict, model_state: Mapping[str, torch.Tensor], *,
                    ema_state: Mapping[str, torch.Tensor] | None = None, epoch: int,
                    config: dict, metrics: dict, dataset) -> dict:
    """The portable checkpoint of a training run (see the module docstring).

    ``model_state`` / ``ema_state``: full (gathered) state dicts, wrapped or not. ``dataset``
    gives the class map, training counts and class names the evaluation needs.
    """
    if kind not in ("student", "teacher"):
        raise ValueError(f"kind must be 'student' or 'teacher', got {kind!r}")
    state = strip_wrapper_prefixes(model_state)
    if kind == "teacher" and is_paco_state(state):  # the student distils from the plain teacher
        state = paco_to_teacher_state_dict(state, arch["arch"])
        arch = {**arch, "head": "linear"}

    def plain(sd):
        return None if sd is None else {k: v.detach().cpu() for k, v in strip_wrapper_prefixes(sd).items()}

    return {
        "kind": kind,
        "arch": to_plain(arch),
        "model": plain(state),
        "model_ema": plain(ema_state),
        "epoch": int(epoch),
        "config": to_plain(config),
        "metrics": to_plain(metrics),
        "class_map": to_plain(dataset.class_map),
        "train_counts": to_plain(dataset.train_counts),
        "class_names": to_plain(dataset.class_names),
    }


CHECKPOINT_FORMATS = ("pth", "safetensors")


def save_checkpoint(payload: Mapping[str, Any], stem: str | os.PathLike, formats: Sequence[str],
                    same_as: str | os.PathLike | None = None) -> int:
    """Write ``<stem>.pth`` (``torch.save``) and / or ``<stem>.safetensors`` (``write_safetensors``),
    the ``formats``, atomically; the other format's file, if any, is removed (it would hold
    an older epoch). ``same_as``: the stem of files just written from the same payload, hard-
    linked instead of written again where the filesystem allows. Returns the bytes written.
    """
    from utils import atomic_link, atomic_torch_save

    stem, written = os.fspath(stem), 0
    for fmt in CHECKPOINT_FORMATS:
        path = f"{stem}.{fmt}"
        if fmt not in formats:
            if os.path.lexists(path):
                os.unlink(path)
        elif not (same_as is not None and atomic_link(f"{os.fspath(same_as)}.{fmt}", path)):
            written += atomic_torch_save(payload, path) if fmt == "pth" else write_safetensors(payload, path)
    return written


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
        raise CheckpointError(f"non-square patches {tuple(patch)} are not supported")
    num_patches = state_dict["pos_embed"].shape[1] - len(DistilledStudent.HEADS)  # one prefix token per head
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointError(f"pos_embed has {num_patches} patch positions, not a square grid")
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    if num_heads is None:
        defaults = parse_student_name(name)
        if defaults is None:
            raise CheckpointError(f"cannot tell the number of attention heads of {name!r} from the "
                                  f"weights (a bare state dict, or a reference file whose args.model "
                                  f"is no timm DeiT name); the project's checkpoint.pth / .safetensors "
                                  f"store the arch (load_student(num_heads=...) in Python)")
        num_heads = defaults["num_heads"]
    return student_arch(name, num_classes=state_dict["head.weight"].shape[0],
                        img_size=grid * int(patch[0]), patch_size=int(patch[0]),
                        embed_dim=int(embed_dim), depth=depth, num_heads=num_heads,
                        mlp_ratio=hidden / embed_dim)


def is_student_state(state_dict: Any) -> bool:
    return isinstance(state_dict, Mapping) and "dist_token" in state_dict and "head_dist.weight" in state_dict


def check_arch_fits_weights(arch: dict, state: Mapping[str, Any], source: str) -> None:
    """CheckpointError unless the stored ``arch`` has the weights' shapes (position embedding,
    depth, head), checked before the model is built: a damaged or hand-edited arch (say an
    img_size of 100000) would otherwise allocate a huge model before the strict load fails."""
    grid = arch["img_size"] // arch["patch_size"]
    expected = {"pos_embed": (1, grid * grid + len(DistilledStudent.HEADS), arch["embed_dim"]),
                "head.weight": (arch["num_classes"], arch["embed_dim"])}
    for name, shape in expected.items():
        found = tuple(state[name].shape) if isinstance(state.get(name), torch.Tensor) else None
        if found != shape:
            raise CheckpointError(f"{source}: the stored arch (img_size {arch['img_size']}, patch "
                                  f"{arch['patch_size']}, width {arch['embed_dim']}, {arch['num_classes']} "
                                  f"classes) needs {name} of shape {shape}, the weights have {found}")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if depth != arch["depth"]:
        raise CheckpointError(f"{source}: the stored arch has depth {arch['depth']}, the weights {depth} blocks")


def student_from_checkpoint(ckpt: Any, num_classes: int | None = None, num_heads: int | None = None,
                            ema: bool = False, source: str = "checkpoint") -> tuple[nn.Module, dict]:
    """Build and strictly load a student from an already loaded checkpoint object."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
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
            raise CheckpointError(f"{source}: args.input_size {args['input_size']} disagrees with the "
                             f"weights' image size {arch['img_size']}")
        class_map = args.get("class_map")
        metrics = {k: to_plain(v) for k, v in ckpt.items() if k not in _REFERENCE_TRAINING_STATE}
    else:
        raise CheckpointError(f"{source}: not a student checkpoint (no 'kind': 'student' and no "
                         f"distilled ViT weights under 'model')")
    if ckpt.get(key) is None:
        raise CheckpointError(f"{source}: has no {key!r} weights")
    if num_classes is not None and num_classes != arch["num_classes"]:
        raise CheckpointError(f"{source}: has {arch['num_classes']} classes, expected {num_classes}")
    state = strip_wrapper_prefixes(ckpt[key])
    check_arch_fits_weights(arch, state, f"{source} [{key}]")
    model = build_student(arch)
    load_state_dict_strict(model, state, f"{source} [{key}]")
    model.eval()
    info = {"kind": "student", "format": fmt, "arch": arch, "class_map": to_plain(class_map),
            "args": args, "epoch": to_plain(ckpt.get("epoch")), "metrics": metrics,
            "weights": key, "source": source}
    if fmt == "project":  # the data it was trained on (reference files store neither)
        info.update(class_names=to_plain(ckpt.get("class_names")),
                    train_counts=to_plain(ckpt.get("train_counts")))
    return model, info


def _reading(path, build):
    """Run ``build()`` on a file's content; a content that does not make a model (a bad stored
    arch, a missing key) becomes a CheckpointError naming the file."""
    try:
        return build()
    except CheckpointError:
        raise
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{os.fspath(path)}: cannot build a model from it: "
                              f"{type(e).__name__}: {e}") from e


def load_student(path: str | os.PathLike, num_classes: int | None = None,
                 num_heads: int | None = None, ema: bool = False) -> tuple[nn.Module, dict]:
    """Student from a reference or project checkpoint file, strictly loaded, in eval mode.

    ``ema=True`` loads the ``model_ema`` weights instead of ``model``. ``num_heads`` is only
    needed for a reference file whose ``args.model`` is not a timm DeiT name.
    """
    ckpt = read_checkpoint(path)
    return _reading(path, lambda: student_from_checkpoint(
        ckpt, num_classes=num_classes, num_heads=num_heads, ema=ema, source=os.fspath(path)))


def load_any(path: str | os.PathLike, **kwargs) -> tuple[nn.Module, dict]:
    """Student or teacher, whichever the file holds; ``info['kind']`` says which.

    ``kwargs`` go to the matching loader (``num_classes``, ``ema``... for students; ``arch``,
    ``num_classes``, ``head`` for teachers).
    """
    ckpt = read_checkpoint(path)
    kind = ckpt.get("kind") if isinstance(ckpt, Mapping) else None
    if kind == "student" or (kind is None and isinstance(ckpt, Mapping) and is_student_state(ckpt.get("model"))):
        return _reading(path, lambda: student_from_checkpoint(ckpt, source=os.fspath(path), **kwargs))
    return _reading(path, lambda: teacher_from_checkpoint(ckpt, source=os.fspath(path), **kwargs))


# ----------------------------------------------------------------------------- teachers


def infer_teacher_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """'resnet32' or 'resnet50' from the keys and stem shape; None for anything else."""
    stem = state_dict.get("conv1.weight")
    if stem is None:
        return None
    if tuple(stem.shape) == (16, 3, 3, 3) and "layer3.4.conv2.weight" in state_dict \
            and "layer3.5.conv1.weight" not in state_dict and "layer4.0.conv1.weight" not in state_dict:
        return "resnet32"
    if tuple(stem.shape) == (64, 3, 7, 7) and "layer4.2.conv3.weight" in state_dict \
            and "layer3.5.conv3.weight" in state_dict and "layer3.6.conv1.weight" not in state_dict:
        return "resnet50"
    return None


def infer_head(state_dict: Mapping[str, torch.Tensor], classifier: str) -> tuple[str, int]:
    """(head, num_classes) from the classifier weights: nn.Linear is (C, D) with a bias,
    LDAM's NormedLinear is (D, C) without one."""
    weight = state_dict.get(f"{classifier}.weight")
    if weight is None:
        raise CheckpointError(f"no classifier weights {classifier}.weight in the checkpoint")
    if f"{classifier}.bias" in state_dict:
        return "linear", int(weight.shape[0])
    return "normed", int(weight.shape[1])


def teacher_from_checkpoint(ckpt: Any, arch: str | None = None, num_classes: int | None = None,
                            head: str | None = None, source: str = "checkpoint"
                            ) -> tuple[nn.Module, dict]:
    """Build and strictly load a teacher from an already loaded checkpoint object.

    Given ``arch``/``num_classes``/``head`` take precedence over what the file says or implies;
    a contradiction then shows up as a strict-loading error naming the keys and shapes.
    """
    fmt, state, stored, class_map, paco_classifier, dropped, extra = teacher_state_from_checkpoint(ckpt, source)
    arch = arch or stored.get("arch") or infer_teacher_arch(state)
    if arch is None:
        raise CheckpointError(f"{source}: cannot infer the teacher architecture from its keys; pass arch=")
    classifier = classifier_name_of(arch)
    if fmt == "paco":  # PaCo's classifier is `linear`; ResNet-50's is `fc`
        state.update({f"{classifier}.{k}": v for k, v in paco_classifier.items()})
    inferred_head, inferred_classes = infer_head(state, classifier)
    resolved = {"arch": arch,
                "num_classes": num_classes or stored.get("num_classes") or inferred_classes,
                "head": head or stored.get("head") or inferred_head}
    model = build_teacher(**resolved)
    load_state_dict_strict(model, state, f"{source} ({fmt} teacher format)")
    model.eval()
    info = {"kind": "teacher", "format": fmt, "arch": resolved, "class_map": to_plain(class_map),
            "dropped_keys": dropped, "source": source, **extra}
    return model, info


def teacher_state_from_checkpoint(ckpt: Any, source: str = "checkpoint"
                                  ) -> tuple[str, dict, dict, Any, dict, list, dict]:
    """What a teacher checkpoint holds, without building a model:
    ``(format, state, stored arch, class_map, paco classifier, dropped keys, extra info)``.

    ``state`` has no wrapper prefixes; for ``paco`` it is the query backbone only and the
    classifier (``linear.*`` without the prefix) is the fifth item (empty otherwise).
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    stored: dict = {}
    class_map, dropped, extra, paco_classifier = None, [], {}, {}
    if ckpt.get("kind") == "teacher":
        fmt, state = "project", strip_wrapper_prefixes(ckpt["model"])
        stored = dict(ckpt.get("arch") or {})
        class_map = ckpt.get("class_map")
        extra = {"epoch": to_plain(ckpt.get("epoch")), "metrics": to_plain(ckpt.get("metrics")),
                 "config": to_plain(ckpt.get("config")),
                 "class_names": to_plain(ckpt.get("class_names")),
                 "train_counts": to_plain(ckpt.get("train_counts"))}
    elif "kind" in ckpt:
        raise CheckpointError(f"{source}: is a {ckpt['kind']!r} checkpoint, not a teacher")
    elif isinstance(ckpt.get("state_dict"), Mapping):
        state = strip_wrapper_prefixes(ckpt["state_dict"])
        if isinstance(ckpt.get("arch"), str):
            stored["arch"] = ckpt["arch"]
        extra = {"epoch": to_plain(ckpt.get("epoch")), "best_acc1": to_plain(ckpt.get("best_acc1"))}
        fmt = "paco" if any(k.startswith("encoder_q.") for k in state) else "ldam"
    elif isinstance(ckpt.get("model"), Mapping):
        fmt, state = "plain", strip_wrapper_prefixes(ckpt["model"])
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        fmt, state = "plain", strip_wrapper_prefixes(ckpt)
    else:
        raise CheckpointError(f"{source}: unrecognised teacher checkpoint (keys: {sorted(ckpt)[:10]})")

    if fmt == "paco":
        state, paco_classifier, dropped = split_paco_state_dict(state)
    return fmt, state, stored, class_map, paco_classifier, dropped, extra


def load_teacher(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
                 head: str | None = None) -> tuple[nn.Module, dict]:
    """Teacher from any supported checkpoint file, strictly loaded, in eval mode.

    Returns ``(model, info)`` with ``info = {'format': 'project'|'plain'|'ldam'|'paco',
    'arch': {...}, 'class_map': list or None, 'dropped_keys': [...], ...}``.
    """
    ckpt = read_checkpoint(path)
    return _reading(path, lambda: teacher_from_checkpoint(
        ckpt, arch=arch, num_classes=num_classes, head=head, source=os.fspath(path)))


# ----------------------------------------------------------------------------- safetensors


SAFETENSORS_FORMAT = "deit-lt"  # metadata["format"] of the files write_safetensors makes
SAFETENSORS_VERSION = "1"
EMA_PREFIX = "model_ema."
_TENSOR_ENTRIES = ("model", "model_ema")  # payload entries stored as tensors, not metadata
_RESERVED_METADATA = ("format", "format_version", "model_ema", "model_ema_prefix")
_RAW_STRINGS = ("kind",)  # metadata stored as the string itself; every other entry is JSON


def is_safetensors_path(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def _safetensors_tensors(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The payload's ``model`` and ``model_ema`` state dicts as one flat dict of contiguous CPU
    tensors (EMA keys prefixed); a tensor whose storage is already stored is copied, since a
    safetensors file cannot hold shared storage."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()

    def add(key: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and storage in seen:
            t = t.clone()
        elif t.numel():
            seen.add(storage)
        tensors[key] = t

    model = payload.get("model")
    if not isinstance(model, Mapping):
        raise ValueError("the payload has no 'model' state dict")
    for key, value in model.items():
        if key.startswith(EMA_PREFIX):
            raise ValueError(f"model key {key!r} starts with the EMA prefix {EMA_PREFIX!r}")
        add(key, value)
    for key, value in (payload.get("model_ema") or {}).items():
        add(EMA_PREFIX + key, value)
    return tensors


def write_safetensors(payload: Mapping[str, Any], path: str | os.PathLike) -> int:
    """Write a portable checkpoint (``make_checkpoint``'s payload) as one safetensors file.

    Weights as tensors (EMA under the ``model_ema.`` prefix), everything else as JSON strings
    in the metadata (see the module docstring). Atomic like ``utils._atomic_write``: written to
    a temporary file in the same folder, fsynced, then renamed over ``path``. Returns the bytes
    written.
    """
    from safetensors.torch import save

    metadata = {"format": SAFETENSORS_FORMAT, "format_version": SAFETENSORS_VERSION,
                "model_ema": "true" if payload.get("model_ema") is not None else "false",
                "model_ema_prefix": EMA_PREFIX}
    for key, value in payload.items():
        if key in _TENSOR_ENTRIES:
            continue
        if key in _RESERVED_METADATA:
            raise ValueError(f"payload entry {key!r} clashes with a reserved metadata key")
        if key in _RAW_STRINGS:
            if not isinstance(value, str):
                raise ValueError(f"payload entry {key!r} must be a string, got {value!r}")
            metadata[key] = value
        else:
            metadata[key] = json.dumps(to_plain(value))
    # utils' atomic writer: a temporary file in the same folder, fsync, then rename
    return atomic_write_bytes(path, save(_safetensors_tensors(payload), metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> dict:
    """The payload of a ``.safetensors`` checkpoint, as ``make_checkpoint`` made it.

    Only ``safetensors`` reads the file (tensors and strings; nothing is unpickled). A file
    without the project's metadata is a bare state dict: wrapped as ``{"model": ...}`` when it
    holds distilled-ViT weights, returned as is otherwise (a plain teacher state dict).
    Raises FileNotFoundError naming the path, or CheckpointError for an unreadable file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(path, device="cpu")
    except Exception as e:  # safetensors' own error types (a damaged or non-safetensors file)
        raise CheckpointError(f"{path}: not a readable safetensors file: {type(e).__name__}: {e}") from None
    if metadata.get("format") != SAFETENSORS_FORMAT:
        return {"model": tensors} if is_student_state(tensors) else tensors
    prefix = metadata.get("model_ema_prefix", EMA_PREFIX)
    payload: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in _RESERVED_METADATA:
            continue
        if key in _RAW_STRINGS:
            payload[key] = value
            continue
        try:
            payload[key] = json.loads(value)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata entry {key!r} is not JSON: {e}") from None
    payload["model"] = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    ema = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    payload["model_ema"] = ema if metadata.get("model_ema") == "true" else None
    return payload


RUN_CHECKPOINTS = ("checkpoint.pth", "best_checkpoint.pth", "checkpoint.safetensors",
                   "best_checkpoint.safetensors")


def check_not_resume_state(path: str | os.PathLike) -> None:
    """CheckpointError for a file inside a run's resume state (``<run>/state/``, marked by
    its ``progress.json``; engine/run_folder.py): accelerate's bare weights there carry no arch
    or config, so the readers would only fail on a detail; the message names the run's
    checkpoints to use instead."""
    folder = os.path.dirname(os.fspath(path)) or "."
    if not os.path.isfile(os.path.join(folder, "progress.json")):
        return
    run = os.path.dirname(os.path.normpath(folder)) or "."
    found = [os.path.join(run, n) for n in RUN_CHECKPOINTS if os.path.isfile(os.path.join(run, n))]
    use = (f"use {' or '.join(found)}" if found else
           f"use {os.path.join(run, 'checkpoint.pth')} (or best_checkpoint.pth / the .safetensors "
           f"beside it) once the run has written one")
    raise CheckpointError(f"{os.fspath(path)} is part of the run's resume state (its state/ folder, "
                          f"read only to resume training), not a checkpoint: {use}")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """The content of a checkpoint file: ``read_safetensors`` for a ``.safetensors`` path,
    ``safe_load`` (``weights_only=True`` plus the allow-list) for anything else; a hub id or
    folder in timm's hub layout (``hf-hub:``, ``local-dir:``) is read by ``models.hub``. A file
    of a run's resume state is refused (``check_not_resume_state``)."""
    from models.hub import is_hub_source, read_source

    if is_hub_source(path):
        return read_source(path)
    check_not_resume_state(path)
    if is_safetensors_path(path):
        return read_safetensors(path)
    return safe_load(path)


# ----------------------------------------------------------------------------- initialising from weights
#
# Starting a run from weights (DeiT's ``--finetune``): the model is built for the new run (its
# classes, resolution) and takes from a file what fits. Unlike the strict loaders above,
# missing and unexpected keys are allowed, and every departure is named in the returned report,
# which the scripts print and keep with the run. Shapes that cannot be adapted (another patch
# size or width) are refused; the position embedding is resampled to the model's grid; the
# classifiers are reset when the class count differs.

STUDENT_HEAD_MODULES = ("head", "head_dist")  # DistilledStudent.head_modules(), by module name
_PACO_DERIVED = ("encoder_k.", "linear_k.", "queue")  # copies / buffers of a PaCo model


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side and side * side == n else None


def _tensor_state(state: Any, source: str) -> dict:
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{source}: holds no state dict of weights")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: state dict entries that are not tensors: {bad[:10]}")
    return strip_wrapper_prefixes(state)


def student_init_state(ckpt: Any, source: str = "checkpoint", ema: bool = False
                       ) -> tuple[str, str, dict]:
    """``(format, weights entry, state dict)`` of any ViT checkpoint a student can start from.

    Formats: ``project`` (``kind: student``), ``reference`` (the reference's training state,
    with ``args``), ``timm`` (a timm / DeiT ImageNet checkpoint: ``{"model": sd}`` as DeiT
    releases them, ``{"state_dict": sd}`` as timm's train.py saves them, or a bare state
    dict, .pth or .safetensors). ``ema=True`` takes the EMA weights (``model_ema`` /
    ``state_dict_ema``). Wrapper prefixes (``module.``, ``_orig_mod.``) are removed.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    kind = ckpt.get("kind")
    if kind is not None and kind != "student":
        raise CheckpointError(f"{source}: is a {kind!r} checkpoint, not a student's (a ViT's) weights")
    if kind == "student" or isinstance(ckpt.get("model"), Mapping):
        fmt = "project" if kind == "student" else ("reference" if "args" in ckpt else "timm")
        key = "model_ema" if ema else "model"
    elif isinstance(ckpt.get("state_dict"), Mapping):
        fmt, key = "timm", "state_dict_ema" if ema else "state_dict"
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if ema:
            raise CheckpointError(f"{source}: a bare state dict has no EMA weights")
        fmt, key, state = "timm", "", strip_wrapper_prefixes(ckpt)
    else:
        raise CheckpointError(f"{source}: unrecognised checkpoint (keys: {sorted(map(str, ckpt))[:10]})")
    if key:
        if ckpt.get(key) is None:
            raise CheckpointError(f"{source}: has no {key!r} weights")
        state = _tensor_state(ckpt[key], f"{source} [{key}]")
    needed = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
    if needed:
        raise CheckpointError(f"{source}: not a ViT checkpoint (no {', '.join(needed)} in its "
                              f"{key or 'state dict'})")
    return fmt, key, state


def _prefix_tokens(model: nn.Module) -> list[str]:
    """Names of the model's prefix tokens in sequence order (cls, dist for the student)."""
    heads = getattr(model, "HEADS", None)
    if isinstance(heads, Mapping):
        return sorted(heads, key=heads.get)
    return ["cls", "dist"][: int(getattr(model, "num_prefix_tokens", 1))]


def adapt_pos_embed(file_state: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint",
                    interpolation: str = "bicubic", antialias: bool = True) -> tuple[torch.Tensor, dict]:
    """The file's ``pos_embed`` made to fit ``model``: its patch grid resampled to the model's
    (``timm.layers.resample_abs_pos_embed`` with the file's number of prefix positions, as
    timm's own checkpoint filter does), its prefix positions mapped by token name. A model
    token the file does not have (the DIST token of a plain timm ViT, any token of a
    ``no_embed_class`` file) keeps the model's own (fresh) position.

    Returns ``(pos_embed, detail)``; CheckpointError for another width or a non-square grid.
    """
    from timm.layers import resample_abs_pos_embed

    pe, own = file_state["pos_embed"], model.state_dict()["pos_embed"]
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[-1] != own.shape[-1]:
        raise CheckpointMismatchError(f"{source}: pos_embed: file {tuple(pe.shape)} vs model "
                                      f"{tuple(own.shape)} (another width cannot be adapted)")
    tokens = ["cls"] + (["dist"] if "dist_token" in file_state else []) \
        + ["reg"] * (int(file_state["reg_token"].shape[1]) if "reg_token" in file_state else 0)
    n = pe.shape[1]
    if _square_side(n - len(tokens)) is not None:
        file_prefix = tokens
    elif _square_side(n) is not None:  # timm's no_embed_class (DeiT III...): no prefix positions
        file_prefix = []
    else:
        raise CheckpointError(f"{source}: pos_embed has {n} positions: not {len(tokens)} prefix "
                              f"tokens plus a square patch grid")
    side = _square_side(n - len(file_prefix))
    model_grid = [int(g) for g in model.patch_embed.grid_size]
    model_tokens = _prefix_tokens(model)
    model_prefix = own.shape[1] - model_grid[0] * model_grid[1]
    if model_prefix not in (0, len(model_tokens)):
        raise ValueError(f"the model's pos_embed {tuple(own.shape)} does not fit its grid {model_grid}")
    model_tokens = model_tokens[:model_prefix]
    detail = {"file_grid": [side, side], "model_grid": model_grid,
              "file_prefix_tokens": len(file_prefix), "model_prefix_tokens": len(model_tokens),
              "kept_model_positions": [t for t in model_tokens if t not in file_prefix]}
    if [side, side] != model_grid:
        pe = resample_abs_pos_embed(pe.float(), new_size=model_grid, old_size=[side, side],
                                    num_prefix_tokens=len(file_prefix), interpolation=interpolation,
                                    antialias=antialias).to(own.dtype)
    grid = pe[:, len(file_prefix):]
    prefix = [pe[:, file_prefix.index(t)] if t in file_prefix else own[:, i].to(pe.dtype)
              for i, t in enumerate(model_tokens)]
    out = torch.cat([torch.stack(prefix, dim=1), grid], dim=1) if prefix else grid
    return out.to(own.dtype).contiguous(), detail


def _partial_load(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, *,
                  head_modules: Sequence[str], reset_heads: bool | None,
                  head_type_differs: Callable[[str], bool] = lambda _: False) -> dict:
    """Load what fits of ``state`` into ``model`` (``strict=False``) and say what did not.

    A head module (its keys ``<name>.*``) is reset, i.e. keeps the model's fresh init, when any
    of its shapes differ (another class count) or ``head_type_differs(name)``, always with
    ``reset_heads=True``, never with ``reset_heads=False`` (a difference is then an error).
    Any other shape difference is a CheckpointMismatchError naming keys and shapes.
    """
    own = model.state_dict()
    check_float_dtypes(own, state, source)

    def shape_differs(k: str) -> bool:
        return k in own and tuple(own[k].shape) != tuple(state[k].shape)

    reset: list[str] = []
    for name in head_modules:
        keys = [k for k in own if k.startswith(name + ".") and k in state]
        differs = any(shape_differs(k) for k in keys) or (bool(keys) and head_type_differs(name))
        if reset_heads is False and differs:
            raise CheckpointMismatchError(
                f"{source}: classifier {name!r} does not fit (another class count or head type) and "
                f"reset_heads=False" + "".join(f"\n  {k}: file {tuple(state[k].shape)} vs model "
                                               f"{tuple(own[k].shape)}" for k in keys))
        if keys and (differs or reset_heads):
            reset += keys
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k not in reset and shape_differs(k)]
    if mismatched:
        raise CheckpointMismatchError(
            f"{source}: cannot initialise the model from it: shapes differ where they cannot be "
            f"adapted (another patch size, width or architecture)\n  " + "\n  ".join(mismatched))
    to_load = {k: v for k, v in state.items() if k in own and k not in reset}
    if not to_load:
        raise CheckpointMismatchError(f"{source}: shares no weights with the model (file keys: "
                                      f"{list(state)[:10]})")
    model.load_state_dict(to_load, strict=False)
    # BatchNorm's num_batches_tracked is absent from old torchvision files; its default is fine.
    missing = [k for k in own if k not in to_load and k not in reset
               and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    return {"loaded": len(to_load), "reset": reset, "missing": missing, "unexpected": unexpected}


def init_student_from(model: nn.Module, path: str | os.PathLike, *, ema: bool = False,
                      reset_heads: bool | None = None) -> dict:
    """Initialise a freshly built ``DistilledStudent`` from a checkpoint (DeiT's ``--finetune``).

    ``path``: anything ``evaluate.py`` reads as a student (the project's .pth / .safetensors,
    the reference's student file) or a timm / DeiT ImageNet ViT checkpoint (bare, or under
    ``model`` / ``state_dict``, with or without wrapper prefixes; a plain ViT without
    ``dist_token`` / ``head_dist`` also works: those stay initialised). Read safely
    (``read_checkpoint``: nothing is unpickled beyond the allow-list).

    * ``pos_embed``: resampled to the model's patch grid when it differs (``adapt_pos_embed``);
    * another patch size or width: CheckpointMismatchError naming keys and shapes;
    * ``head.*`` / ``head_dist.*``: reset (the model's fresh init kept) when the class count
      differs; ``reset_heads=True`` always resets them (the same count in another class
      order, e.g. ImageNet-1k into frequency-sorted ImageNet-LT), ``False`` refuses a mismatch;
    * ``ema=True``: start from the file's EMA weights.

    Returns the report ``{"source", "format", "weights", "resized", "reset", "missing",
    "unexpected", "loaded", "pos_embed"}`` (plain types, for the run's log / config).
    """
    from models.student import unwrap

    source = os.fspath(path)
    target = unwrap(model)
    ckpt = read_checkpoint(path)

    def build():
        fmt, key, state = student_init_state(ckpt, source, ema=ema)
        state = dict(state)
        resized = []
        pe, detail = adapt_pos_embed(state, target, source)
        if detail["file_grid"] != detail["model_grid"] \
                or detail["file_prefix_tokens"] != detail["model_prefix_tokens"]:
            resized.append("pos_embed")
        state["pos_embed"] = pe
        report = _partial_load(target, state, source, head_modules=STUDENT_HEAD_MODULES,
                               reset_heads=reset_heads)
        return {"source": source, "format": fmt, "weights": key or "state dict",
                "resized": resized, "reset": report["reset"], "missing": report["missing"],
                "unexpected": report["unexpected"], "loaded": report["loaded"], "pos_embed": detail}

    return _reading(path, build)


def init_teacher_from(model: nn.Module, path: str | os.PathLike, *,
                      reset_classifier: bool | None = None) -> dict:
    """Initialise a freshly built teacher (``build_teacher``, or ``build_paco``'s PaCo model)
    from any teacher checkpoint ``load_teacher`` reads (project, plain / bare, LDAM, PaCo,
    .pth or .safetensors), or a timm / torchvision state dict of the same architecture.

    The classifier is reset (the model's fresh init kept) when its class count or head type
    (linear / normed) differs; ``reset_classifier=True`` always resets it, ``False`` refuses a
    mismatch. Other shape differences: CheckpointMismatchError naming keys and shapes. A PaCo
    model gets the backbone in ``encoder_q`` and the classifier in ``linear``, then the key
    encoder and ``linear_k`` are set equal to them (as at PaCo's start); its projection keeps
    its init. Returns ``{"source", "format", "reset", "missing", "unexpected", "loaded",
    "dropped_keys"}``.
    """
    from models.paco import PaCoModel
    from models.resnet_cifar import NormedLinear
    from models.student import unwrap
    from models.teacher import classifier_name

    source = os.fspath(path)
    target = unwrap(model)
    ckpt = read_checkpoint(path)

    def build():
        if isinstance(ckpt, Mapping) and ckpt.get("kind") == "student":
            raise CheckpointError(f"{source}: is a 'student' checkpoint, not a teacher's weights")
        fmt, state, _, _, paco_classifier, dropped, _ = teacher_state_from_checkpoint(ckpt, source)
        paco = isinstance(target, PaCoModel)
        backbone = target.encoder_q if paco else target
        arch = getattr(backbone, "teacher_arch", {}).get("arch")
        if arch is not None:
            classifier = classifier_name_of(arch)
        elif paco:
            raise ValueError("a PaCo model not made by build_paco: its backbone's arch is unknown")
        else:
            classifier = classifier_name(target)
        state = dict(state)
        if fmt == "paco":
            state.update({f"{classifier}.{k}": v for k, v in paco_classifier.items()})
        file_normed = f"{classifier}.weight" in state and f"{classifier}.bias" not in state
        if paco:  # the plain teacher's keys -> PaCo's: backbone in encoder_q, classifier `linear`
            head = "linear"
            state = {(f"linear.{k[len(classifier) + 1:]}" if k.startswith(classifier + ".")
                      else f"encoder_q.{k}"): v for k, v in state.items()}
            model_normed = False
        else:
            head = classifier
            model_normed = isinstance(target.get_submodule(classifier), NormedLinear)
        report = _partial_load(target, state, source, head_modules=[head], reset_heads=reset_classifier,
                               head_type_differs=lambda _: file_normed != model_normed)
        if paco:
            with torch.no_grad():
                target.encoder_k.load_state_dict(target.encoder_q.state_dict())
                target.linear_k.load_state_dict(target.linear.state_dict())
            report["missing"] = [k for k in report["missing"] if not k.startswith(_PACO_DERIVED)]
        return {"source": source, "format": fmt, **report, "dropped_keys": dropped}

    return _reading(path, build)


# ----------------------------------------------------------------------------- teachers by name


def _fill_num_batches_tracked(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """``state`` plus the model's own ``*.num_batches_tracked`` where the file has none (old
    torchvision files predate that buffer; it only counts updates and is not used in eval)."""
    state, filled = dict(state), []
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            state[key] = value.clone()
            filled.append(key)
    return state, filled


def load_named_teacher(name: str, num_classes: int, ckpt: str | os.PathLike | None = None,
                       pretrained: bool = False) -> tuple[nn.Module, dict]:
    """A teacher by architecture name (``resnet32``, ``resnet50`` or any timm CNN), strictly
    loaded, in eval mode.

    ``ckpt``: weights in timm's or torchvision's own format (a bare state dict, or under
    ``state_dict`` / ``model``; .pth or .safetensors) whose keys are exactly timm's /
    torchvision's for that model (``build_teacher`` keeps timm's keys for timm names; our
    ``resnet50`` has torchvision's = timm's ResNet-50 keys); a project, LDAM or PaCo file
    also loads (with its own head). Missing / unexpected keys and shape mismatches are a
    CheckpointMismatchError naming them (a missing BatchNorm ``num_batches_tracked`` is
    filled in and listed in ``info['filled']``).

    ``pretrained=True`` instead: ``timm.create_model(name, pretrained=True,
    num_classes=num_classes)`` (needs the network or timm's cache); with another class count
    than the pretrained weights', timm gives a fresh classifier (``info['classifier']``).

    ``info``: like ``load_teacher``'s: ``{"kind": "teacher", "format": "timm" (or the file's
    'project' / 'paco' format), "arch": {...}, "class_map": None (or the project file's),
    "dropped_keys", "source", "pretrained", "filled", ...}``.
    """
    import timm

    from models.teacher import teacher_arch_of

    if pretrained and ckpt is not None:
        raise ConfigError(f"teacher {name!r}: give a checkpoint or pretrained=True, not both")
    if not pretrained and ckpt is None:
        raise ConfigError(f"teacher {name!r}: needs a checkpoint or pretrained=True (a randomly "
                          f"initialised teacher teaches nothing)")
    if pretrained:
        if name == "resnet32" or not timm.is_model(name):
            raise ConfigError(f"teacher {name!r}: pretrained=True needs a timm model name "
                              f"(timm.list_models(pretrained=True))")
        source = f"timm:{name} (pretrained)"
        donor = timm.create_model(name, pretrained=True, num_classes=num_classes)
        model = build_teacher(name, num_classes, head="linear")
        state, filled = _fill_num_batches_tracked(model, strip_wrapper_prefixes(donor.state_dict()))
        load_state_dict_strict(model, state, f"{source} weights")
        cfg = getattr(donor, "pretrained_cfg", None)
        if isinstance(cfg, Mapping):
            model.pretrained_cfg = dict(cfg)  # teacher_normalization reads the weights' mean/std
        pretrained_classes = cfg.get("num_classes") if isinstance(cfg, Mapping) else None
        info = {"kind": "teacher", "format": "timm", "arch": teacher_arch_of(model), "class_map": None,
                "dropped_keys": [], "source": source, "pretrained": True, "filled": filled,
                "classifier": "pretrained" if pretrained_classes == num_classes else
                f"fresh (the pretrained weights have {pretrained_classes} classes)"}
        return model.eval(), info

    source = os.fspath(ckpt)
    raw = read_checkpoint(ckpt)

    def build():
        if isinstance(raw, Mapping) and raw.get("kind") not in (None, "teacher"):
            raise CheckpointError(f"{source}: is a {raw['kind']!r} checkpoint, not a teacher")
        fmt, state, stored, class_map, paco_classifier, dropped, extra = \
            teacher_state_from_checkpoint(raw, source)
        classifier = classifier_name_of(name)
        if fmt == "paco":
            state.update({f"{classifier}.{k}": v for k, v in paco_classifier.items()})
        head = stored.get("head") or ("normed" if f"{classifier}.weight" in state
                                      and f"{classifier}.bias" not in state else "linear")
        model = build_teacher(name, num_classes, head=head)
        state, filled = _fill_num_batches_tracked(model, state)
        label = "timm" if fmt in ("plain", "ldam") else fmt  # a bare / wrapped state dict
        load_state_dict_strict(model, state, f"{source} ({label} state dict for teacher {name!r})")
        info = {"kind": "teacher", "format": label, "arch": teacher_arch_of(model),
                "class_map": to_plain(class_map), "dropped_keys": dropped, "source": source,
                "pretrained": False, "filled": filled,
                **{k: v for k, v in extra.items() if v is not None}}
        return model.eval(), info

    return _reading(ckpt, build)
