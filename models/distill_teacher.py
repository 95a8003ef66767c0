"""The student's distillation teacher: read, checked and made ready for the loss, in one place.

``load_distillation_teacher`` is what ``train_student.py`` calls once the data exist (a teacher
by name needs their class count); ``read_teacher_file`` is its first half, called before the
data are built so that a bad teacher file, or timm's pretrained weights missing offline, stop
the run at once. Both report problems as one line (CheckpointError / ConfigError) naming the
file or the config key.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from errors import CheckpointError, ConfigError
from models.checkpoint import load_named_teacher, load_teacher
from models.teacher import fold_batchnorm, teacher_input_size, teacher_renormalization

__all__ = ["read_teacher_file", "load_distillation_teacher", "check_teacher_weights",
           "check_pretrained_available", "refuse_constant_teacher", "teacher_class_map"]

NO_TEACHER = {"teacher": None, "class_map": None, "input_size": None, "renormalize": None}


def check_teacher_weights(teacher: nn.Module, source: str) -> None:
    bad = [k for k, v in teacher.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"teacher {source} has non-finite weights ({len(bad)} tensors: "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}): it cannot teach")


def refuse_constant_teacher(teacher: nn.Module, source: str) -> None:
    """Check the teacher's first forward (the first training batch) once: logits identical for
    every image mean one predicted class whatever the input (e.g. weights all zeros), so a
    CheckpointError naming ``source``. A forward hook that removes itself: one host sync in
    the whole run, none per step. A batch of one image cannot tell and passes."""
    def check_first_batch(module, inputs, logits) -> None:
        handle.remove()
        # Non-finite logits are left to the loop's check (teacher_logit_max), which names them.
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and len(logits) > 1 \
                and bool((logits == logits[:1]).all() & torch.isfinite(logits[0]).all()):
            raise CheckpointError(
                f"teacher {source} gives identical logits for all {len(logits)} images of the first "
                f"batch (it predicts class {int(logits[0].argmax())} whatever the input; weights all "
                f"zeros?): it cannot teach")

    handle = teacher.register_forward_hook(check_first_batch)


def check_pretrained_available(name: str) -> None:
    """Load timm's pretrained weights of ``name`` once, before the data are built: offline and
    not in the cache (or not downloadable) is a ConfigError naming ``distill.teacher_pretrained``
    and the model, not a hub error after the data. Online it fills the cache the later load reads."""
    import timm

    if name == "resnet32" or not timm.is_model(name):
        raise ConfigError(f"distill.teacher_pretrained=true: distill.teacher_model={name!r} is no timm "
                          f"model name with pretrained weights (timm.list_models(pretrained=True))")
    try:
        timm.create_model(name, pretrained=True, num_classes=0)
    except (OSError, RuntimeError) as e:  # the hub's not-in-cache / connection errors are OSErrors
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        why = ("they are not in the local cache and the hub cannot be reached (offline?)"
               if "local cache" in first else f"{type(e).__name__}: {first[:300]}")
        raise ConfigError(f"distill.teacher_pretrained=true: timm's pretrained weights for "
                          f"distill.teacher_model={name!r} cannot be loaded: {why}; fill timm's "
                          f"cache with network access first, or give the weights as "
                          f"distill.teacher_ckpt") from None


def read_teacher_file(cfg: dict) -> tuple[nn.Module, dict] | None:
    """A teacher given by file (``distill.teacher_ckpt`` without ``teacher_model``), read and
    checked before any data is built: a bad file (unsafe, damaged, non-finite weights, a stored
    input size out of range) stops the run at once. None for other teachers (by name, they
    need the data's class count; timm's pretrained weights are checked to be at hand) or
    without distillation."""
    dcfg = cfg["distill"]
    if dcfg["type"] == "none":
        return None
    if dcfg["teacher_model"]:
        if dcfg["teacher_pretrained"]:
            check_pretrained_available(dcfg["teacher_model"])
        return None
    teacher, tinfo = load_teacher(dcfg["teacher_ckpt"])
    check_teacher_weights(teacher, dcfg["teacher_ckpt"])
    teacher_input_size(tinfo, 0)  # the stored size's checks (the value is resolved later)
    return teacher, tinfo


def teacher_class_map(cfg: dict, info: dict, dataset, accelerator) -> list | None:
    """Mapping teacher label -> student label, or None; decided explicitly, never silently."""
    mode, student_map, teacher_map = cfg["distill"]["map_targets"], dataset.class_map, info.get("class_map")
    if mode == "no" or student_map is None and teacher_map is None:
        return None
    if mode == "yes" or (teacher_map is None and student_map is not None):
        accelerator.print(f"teacher predictions are mapped through the data's class map "
                          f"(teacher trained on original labels; distill.map_targets={mode})")
        return list(student_map)
    if teacher_map == student_map:
        return None
    raise CheckpointError(
        f"the teacher's label order (class map stored in {cfg['distill']['teacher_ckpt']}) differs "
        f"from the student's data: it was trained on other data or another class order. Use a "
        f"teacher trained on this data, or distill.map_targets=yes/no to say how its labels map")


def load_distillation_teacher(cfg: dict, dataset, student_size: int, accelerator,
                              preloaded: tuple[nn.Module, dict] | None = None) -> dict:
    """The teacher of ``distill`` and what the loss needs to call it: ``{"teacher", "class_map",
    "input_size", "renormalize"}`` (all None without a teacher). ``preloaded``: what
    ``read_teacher_file`` returned.

    The teacher is not prepared (never wrapped or sharded): DistillationLoss freezes it (eval
    mode, no gradients) and makes it channels-last. Its first batch is checked for constant
    logits (``refuse_constant_teacher``).
    """
    dcfg = cfg["distill"]
    if dcfg["type"] == "none":
        return dict(NO_TEACHER)
    source = dcfg["teacher_ckpt"] or f"timm's pretrained {dcfg['teacher_model']}"
    if preloaded is not None:
        teacher, tinfo = preloaded
    elif dcfg["teacher_model"]:  # by name: timm's / torchvision's own weights, or timm's pretrained
        teacher, tinfo = load_named_teacher(dcfg["teacher_model"], dataset.num_classes,
                                            dcfg["teacher_ckpt"], dcfg["teacher_pretrained"])
        check_teacher_weights(teacher, source)
    else:
        teacher, tinfo = load_teacher(dcfg["teacher_ckpt"])
        check_teacher_weights(teacher, source)
    t_classes = tinfo["arch"]["num_classes"]
    if t_classes != dataset.num_classes:
        raise CheckpointError(f"teacher {source} predicts {t_classes} classes but the data has "
                              f"{dataset.num_classes}")
    class_map = teacher_class_map(cfg, tinfo, dataset, accelerator)
    # before folding: the folded copy no longer carries timm's pretrained_cfg
    renormalize = teacher_renormalization(dcfg["teacher_normalize"], cfg["aug"]["normalize"], teacher, tinfo)
    if dcfg["fold_bn"]:
        teacher, folded = fold_batchnorm(teacher)
        accelerator.print(f"teacher: {folded} BatchNorm layers folded into the layer before them")
    t_size = dcfg["teacher_input_size"] or teacher_input_size(tinfo, student_size)
    accelerator.print(f"teacher {tinfo['arch']} ({tinfo['format']} checkpoint), input {t_size}"
                      + (f", re-normalised {renormalize}" if renormalize else ""))
    refuse_constant_teacher(teacher, source)
    return {"teacher": teacher.to(accelerator.device), "class_map": class_map, "input_size": t_size,
            "renormalize": renormalize}
