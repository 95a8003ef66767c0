"""The project's checkpoint format: one writer, and the readers of every format we load.

Portable checkpoint (``make_checkpoint``; ``checkpoint.pth`` / ``best_checkpoint.pth`` of the
training scripts): plain types only, loadable with ``weights_only=True``::

    {"kind": "student" | "teacher", "arch": {...}, "model": state_dict, "model_ema": state_dict
     or None, "epoch", "config": resolved config, "metrics", "class_map", "train_counts",
     "class_names"}

``arch`` is what ``build_student(arch)`` / ``build_teacher(**arch)`` rebuild the model from.
State dicts never carry wrapper prefixes (DDP ``module.``, torch.compile ``_orig_mod.``), and a
PaCo teacher is stored as its plain teacher (query backbone + classifier, head ``linear``).

Readers (all through ``models.safe_load``: no code runs, loading is strict):

* students: the project format, and the reference's training state ``{"model", "model_ema",
  "optimizer", "lr_scheduler", "scaler", "epoch", "args": Namespace, <metrics>}`` whose
  ``model`` keys equal timm's ``VisionTransformerDistilled`` (architecture inferred from the
  shapes);
* teachers: ``project``; ``plain`` ``{"model": state_dict}`` (the reference CE ResNet-32) or
  a bare state_dict; ``ldam`` ``{"state_dict", "arch", "epoch", "best_acc1", ...}`` with or
  without ``module.``; ``paco``: the whole MoCo module under ``state_dict``, of which the
  query backbone and ``linear`` are kept (``models.paco.split_paco_state_dict``).

``load_any`` dispatches on content; docs/recipe.md section 8 describes the published formats.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError
from models.paco import paco_to_teacher_state_dict, split_paco_state_dict
from errors import ConfigError
from models.safe_load import load_state_dict_strict, safe_load, strip_wrapper_prefixes
from models.student import DistilledStudent, build_student, parse_student_name, student_arch
from models.teacher import build_teacher, classifier_name_of
from utils import to_plain

__all__ = ["make_checkpoint", "load_student", "load_teacher", "load_any", "student_from_checkpoint",
           "teacher_from_checkpoint", "CheckpointError", "CheckpointMismatchError",
           "UnsafeCheckpointError"]


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
    model = build_student(arch)
    load_state_dict_strict(model, strip_wrapper_prefixes(ckpt[key]), f"{source} [{key}]")
    model.eval()
    info = {"kind": "student", "format": fmt, "arch": arch, "class_map": to_plain(class_map),
            "args": args, "epoch": to_plain(ckpt.get("epoch")), "metrics": metrics,
            "weights": key, "source": source}
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
    ckpt = safe_load(path)
    return _reading(path, lambda: student_from_checkpoint(
        ckpt, num_classes=num_classes, num_heads=num_heads, ema=ema, source=os.fspath(path)))


def load_any(path: str | os.PathLike, **kwargs) -> tuple[nn.Module, dict]:
    """Student or teacher, whichever the file holds; ``info['kind']`` says which.

    ``kwargs`` go to the matching loader (``num_classes``, ``ema``... for students; ``arch``,
    ``num_classes``, ``head`` for teachers).
    """
    ckpt = safe_load(path)
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
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    stored: dict = {}
    class_map, dropped, extra = None, [], {}
    if ckpt.get("kind") == "teacher":
        fmt, state = "project", strip_wrapper_prefixes(ckpt["model"])
        stored = dict(ckpt.get("arch") or {})
        class_map = ckpt.get("class_map")
        extra = {"epoch": to_plain(ckpt.get("epoch")), "metrics": to_plain(ckpt.get("metrics")),
                 "config": to_plain(ckpt.get("config"))}
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


def load_teacher(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None,
                 head: str | None = None) -> tuple[nn.Module, dict]:
    """Teacher from any supported checkpoint file, strictly loaded, in eval mode.

    Returns ``(model, info)`` with ``info = {'format': 'project'|'plain'|'ldam'|'paco',
    'arch': {...}, 'class_map': list or None, 'dropped_keys': [...], ...}``.
    """
    ckpt = safe_load(path)
    return _reading(path, lambda: teacher_from_checkpoint(
        ckpt, arch=arch, num_classes=num_classes, head=head, source=os.fspath(path)))
