"""CNN teachers: build them by name, and load every teacher checkpoint format strictly.

Architectures (RECIPE sections 2-3): ``resnet32`` (CIFAR, ``models/resnet_cifar.py``),
``resnet50`` (torchvision layout, ImageNet-LT / iNat), or any timm CNN name. Heads:
``linear`` (CE, PaCo) or ``normed`` (LDAM's cosine ``NormedLinear``). Every teacher has
``forward_features(x) -> (B, D)`` pooled features and ``forward_head(features) -> logits``.

Checkpoint formats that ``load_teacher`` recognises (RECIPE section 7):

* ``project``: ``{"kind": "teacher", "arch": {"arch", "num_classes", "head"}, "model", ...}``
* ``plain``: ``{"model": state_dict}`` (the reference CE ResNet-32), or a bare state_dict
* ``ldam``: ``{"state_dict", "arch": "resnet32", "epoch", "best_acc1", ...}``, keys with or
  without ``module.``
* ``paco``: the whole MoCo module under ``state_dict`` with ``module.`` prefixes. Only the
  query encoder's backbone and the classifier ``linear`` produce the logits at evaluation
  (``linear(avgpool(encoder_q backbone))``), so those are kept; the projection ``fc.*``, the
  key encoder, ``linear_k`` and the queues are dropped and listed in ``info['dropped_keys']``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import timm
import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from models.checkpoint import load_state_dict_strict, safe_load, strip_prefix, to_plain
from models.resnet_cifar import NormedLinear, resnet32

HEADS = ("linear", "normed")


class ResNet50Teacher(ResNet):
    """torchvision's ResNet-50 (same keys: ``conv1``, ``bn1``, ``layer1..4``, ``fc``) with the
    teacher interface; ``head='normed'`` makes ``fc`` a ``NormedLinear(2048, C)`` as in the
    reference ImageNet LDAM teachers (``fc.weight`` of shape (2048, C))."""

    def __init__(self, num_classes: int, head: str = "linear") -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
        if head == "normed":
            self.fc = NormedLinear(2048, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _TimmTeacher:
    """Mixin giving a timm CNN the teacher interface while keeping timm's state_dict keys
    (a wrapper module would prefix every key and break loading timm-made weights).

    timm's own ``forward_features`` returns the unpooled map; here it returns the pooled
    pre-logits features, and ``forward_head`` is the final classifier only.
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_head(super().forward_features(x), pre_logits=True)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.get_classifier()(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _timm_teacher(name: str, num_classes: int, head: str) -> nn.Module:
    if not timm.is_model(name):
        raise ValueError(f"unknown teacher arch {name!r}: use 'resnet32', 'resnet50' or a timm "
                         f"model name (timm.list_models())")
    model = timm.create_model(name, num_classes=num_classes, pretrained=False)
    if not hasattr(model, "get_classifier") or not isinstance(model.get_classifier(), nn.Linear):
        raise ValueError(f"teacher arch {name!r}: expected a timm CNN with one linear classifier")
    if head == "normed":
        fc = model.get_classifier()
        fc_name = next(n for n, m in model.named_modules() if m is fc)
        model.set_submodule(fc_name, NormedLinear(fc.in_features, num_classes))
    model.__class__ = type(f"Teacher{type(model).__name__}", (_TimmTeacher, type(model)), {})
    return model


def build_teacher(arch: str, num_classes: int, head: str = "linear") -> nn.Module:
    """A freshly initialised teacher; ``build_teacher(**teacher_arch_of(model))`` rebuilds one."""
    if head not in HEADS:
        raise ValueError(f"teacher head must be one of {HEADS}, got {head!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"teacher num_classes must be a positive integer, got {num_classes!r}")
    if arch == "resnet32":
        model = resnet32(num_classes=num_classes, head=head)
    elif arch == "resnet50":
        model = ResNet50Teacher(num_classes=num_classes, head=head)
    else:
        model = _timm_teacher(arch, num_classes, head)
    model.teacher_arch = {"arch": arch, "num_classes": num_classes, "head": head}
    return model


def teacher_arch_of(model: nn.Module) -> dict:
    """The ``{'arch', 'num_classes', 'head'}`` dict to store in a checkpoint."""
    if not hasattr(model, "teacher_arch"):
        raise ValueError("model was not made by build_teacher/load_teacher; its arch is unknown")
    return dict(model.teacher_arch)


# ----------------------------------------------------------------------------- loading


def _classifier_name(arch: str) -> str:
    if arch == "resnet32":
        return "linear"
    if arch == "resnet50":
        return "fc"
    model = _timm_teacher(arch, 1, "linear")  # timm: ask the model where its classifier is
    fc = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is fc)


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
        raise ValueError(f"no classifier weights {classifier}.weight in the checkpoint")
    if f"{classifier}.bias" in state_dict:
        return "linear", int(weight.shape[0])
    return "normed", int(weight.shape[1])


def _split_paco(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """(query-encoder backbone, classifier ``linear``, dropped keys) from a MoCo state_dict."""
    backbone, classifier, dropped = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith("encoder_q.") and not key.startswith("encoder_q.fc."):
            backbone[key[len("encoder_q."):]] = value
        elif key.startswith("linear."):
            classifier[key[len("linear."):]] = value
        else:  # encoder_q.fc.* (projection), encoder_k.*, linear_k.*, queue, queue_l, queue_ptr
            dropped.append(key)
    return backbone, classifier, dropped


def teacher_from_checkpoint(ckpt: Any, arch: str | None = None, num_classes: int | None = None,
                            head: str | None = None, source: str = "checkpoint"
                            ) -> tuple[nn.Module, dict]:
    """Build and strictly load a teacher from an already loaded checkpoint object.

    Given ``arch``/``num_classes``/``head`` take precedence over what the file says or implies;
    a contradiction then shows up as a strict-loading error naming the keys and shapes.
    """
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    stored: dict = {}
    class_map, dropped, extra = None, [], {}
    if ckpt.get("kind") == "teacher":
        fmt, state = "project", dict(ckpt["model"])
        stored = dict(ckpt.get("arch") or {})
        class_map = ckpt.get("class_map")
        extra = {"epoch": to_plain(ckpt.get("epoch")), "metrics": to_plain(ckpt.get("metrics")),
                 "config": to_plain(ckpt.get("config"))}
    elif "kind" in ckpt:
        raise ValueError(f"{source}: is a {ckpt['kind']!r} checkpoint, not a teacher")
    elif isinstance(ckpt.get("state_dict"), Mapping):
        state = strip_prefix(ckpt["state_dict"])
        if isinstance(ckpt.get("arch"), str):
            stored["arch"] = ckpt["arch"]
        extra = {"epoch": to_plain(ckpt.get("epoch")), "best_acc1": to_plain(ckpt.get("best_acc1"))}
        fmt = "paco" if any(k.startswith("encoder_q.") for k in state) else "ldam"
    elif isinstance(ckpt.get("model"), Mapping):
        fmt, state = "plain", strip_prefix(ckpt["model"])
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        fmt, state = "plain", strip_prefix(ckpt)
    else:
        raise ValueError(f"{source}: unrecognised teacher checkpoint (keys: {sorted(ckpt)[:10]})")

    if fmt == "paco":
        state, paco_classifier, dropped = _split_paco(state)
    arch = arch or stored.get("arch") or infer_teacher_arch(state)
    if arch is None:
        raise ValueError(f"{source}: cannot infer the teacher architecture from its keys; pass arch=")
    classifier = _classifier_name(arch)
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
    return teacher_from_checkpoint(safe_load(path), arch=arch, num_classes=num_classes,
                                   head=head, source=os.fspath(path))


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every BatchNorm that follows a conv (or linear)
    folded into its weights: the same function in fewer kernels (a ResNet-32 teacher forward,
    bf16 on CPU, ran 1.5-1.6x faster in bench/train_step.py; fp32 logits agree to ~1e-7). Returns
    ``(model, folded)``; a model torch.fx cannot trace comes back as it is (in eval mode)
    with ``folded = 0``."""
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    try:
        fused = fuse(model)  # a deep copy; the original keeps its BatchNorms
    except Exception:  # noqa: BLE001 - untraceable control flow: keep the model as it is
        return model, 0
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused.eval(), before - after


def teacher_input_size(info: dict, default: int) -> int:
    """The resolution a loaded teacher was trained at: the project checkpoint's stored
    ``data.input_size``, else 32 for the CIFAR ResNet-32 (the reference teachers), else
    ``default`` (the student's size, e.g. 224 for ImageNet-LT ResNet-50 teachers)."""
    stored = (info.get("config") or {}).get("data") or {}
    if stored.get("input_size"):
        return int(stored["input_size"])
    return 32 if info["arch"].get("arch") == "resnet32" else default
