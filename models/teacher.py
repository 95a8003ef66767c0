"""CNN teachers: build them by name, fold their BatchNorms, tell their input size.

Architectures (docs/recipe.md section 3): ``resnet32`` (CIFAR, ``models/resnet_cifar.py``),
``resnet50`` (torchvision layout, ImageNet-LT / iNat), or any timm CNN name. Heads:
``linear`` (CE, PaCo) or ``normed`` (LDAM's cosine ``NormedLinear``). Every teacher has
``forward_features(x) -> (B, D)`` pooled features and ``forward_head(features) -> logits``.
Reading teacher checkpoints (the project's and the published formats) is
``models/checkpoint.py``'s job.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from errors import CheckpointError, ConfigError
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
        raise ConfigError(f"unknown teacher arch {name!r}: use 'resnet32', 'resnet50' or a timm "
                         f"model name (timm.list_models())")
    model = timm.create_model(name, num_classes=num_classes, pretrained=False)
    if not hasattr(model, "get_classifier") or not isinstance(model.get_classifier(), nn.Linear):
        raise ConfigError(f"teacher arch {name!r}: expected a timm CNN with one linear classifier")
    if head == "normed":
        fc = model.get_classifier()
        fc_name = next(n for n, m in model.named_modules() if m is fc)
        model.set_submodule(fc_name, NormedLinear(fc.in_features, num_classes))
    model.__class__ = type(f"Teacher{type(model).__name__}", (_TimmTeacher, type(model)), {})
    return model


def build_teacher(arch: str, num_classes: int, head: str = "linear") -> nn.Module:
    """A freshly initialised teacher; ``build_teacher(**teacher_arch_of(model))`` rebuilds one."""
    if head not in HEADS:
        raise ConfigError(f"teacher head must be one of {HEADS}, got {head!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"teacher num_classes must be a positive integer, got {num_classes!r}")
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


# ----------------------------------------------------------------------------- classifier


def classifier_name(model: nn.Module) -> str:
    """Dotted name of a teacher's (or backbone's) final classifier: ``linear`` (ResNet-32),
    ``fc`` (ResNet-50), timm's own (``fc``, ``head.fc``, ``classifier``, ...)."""
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        for name, module in model.named_modules():
            if module is clf and name:
                return name
    for name in ("linear", "fc"):
        if isinstance(getattr(model, name, None), (nn.Linear, NormedLinear)):
            return name
    raise ValueError(f"cannot find the classifier of {type(model).__name__}")


def classifier_name_of(arch: str) -> str:
    """``classifier_name`` of the teacher ``arch`` builds (without building the two built-ins)."""
    known = {"resnet32": "linear", "resnet50": "fc"}
    return known[arch] if arch in known else classifier_name(build_teacher(arch, 1))


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
    ``default`` (the student's size, e.g. 224 for ImageNet-LT ResNet-50 teachers).

    A value read from the file gets the checks of a typed ``data.input_size``: a whole number
    of pixels in [1, data.MAX_INPUT_SIZE] (4096; the bound is explained there), else a
    CheckpointError naming the file and the key, before any tensor of that size exists."""
    from data.build import MAX_INPUT_SIZE

    config = info.get("config")
    stored = config.get("data") if isinstance(config, dict) else None
    if isinstance(stored, dict) and stored.get("input_size") is not None:
        size = stored["input_size"]
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_INPUT_SIZE:
            raise CheckpointError(
                f"{info.get('source', 'teacher checkpoint')}: stored config.data.input_size is "
                f"{size!r}, not a whole number of pixels in [1, {MAX_INPUT_SIZE}]; a corrupt or "
                f"foreign file? (distill.teacher_input_size / eval.teacher_input_size set it explicitly)")
        return size
    return 32 if info["arch"].get("arch") == "resnet32" else default


# ----------------------------------------------------------------------------- input normalisation


def _mean_std(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        return None
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        return None
    return mean, std


def teacher_normalization(model: nn.Module | None, info: dict | None = None
                          ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The (mean, std) a teacher expects its input normalised with, or None when unknown.

    First what the teacher was trained with, when the checkpoint says (``info['config']
    ['aug']['normalize']`` of a project checkpoint: 'imagenet' or 'cifar'); else the timm
    model's ``pretrained_cfg`` mean/std (the statistics of timm's pretrained weights for that
    name; ``load_named_teacher(pretrained=True)`` sets those of the weights it loaded). Call it
    before ``fold_batchnorm``, whose traced copy does not keep ``pretrained_cfg``.
    """
    from data.transforms import NORMALIZATION
    from models.student import unwrap

    config = info.get("config") if isinstance(info, dict) else None
    aug = config.get("aug") if isinstance(config, dict) else None
    if isinstance(aug, dict) and aug.get("normalize") in NORMALIZATION:
        return NORMALIZATION[aug["normalize"]]
    if model is None:
        return None
    model = unwrap(model)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
            found = _mean_std(cfg["mean"], cfg["std"])
            if found is not None:
                return found
    return None


TEACHER_NORMALIZE = ("student", "teacher", "imagenet", "cifar")


def teacher_renormalization(mode: str, student_normalize, teacher: nn.Module | None = None,
                            info: dict | None = None) -> tuple | None:
    """``DistillationLoss(renormalize=...)`` for ``mode`` (``distill.teacher_normalize``), or None.

    ``student``: none, the teacher sees the student's normalised batch (the reference);
    ``teacher``: to the teacher's own mean/std (``teacher_normalization``; ConfigError when it
    says nothing); ``imagenet`` / ``cifar``: to those statistics. ``student_normalize``: the
    student's ``aug.normalize`` name or a (mean, std) pair. None too when the two agree.
    """
    from data.transforms import NORMALIZATION

    if mode not in TEACHER_NORMALIZE:
        raise ConfigError(f"distill.teacher_normalize must be one of {TEACHER_NORMALIZE}, got {mode!r}")
    if mode == "student":
        return None
    if isinstance(student_normalize, str):
        if student_normalize not in NORMALIZATION:
            raise ConfigError(f"aug.normalize must be one of {tuple(NORMALIZATION)}, got {student_normalize!r}")
        student_normalize = NORMALIZATION[student_normalize]
    source = _mean_std(*student_normalize)
    if source is None:
        raise ConfigError(f"the student's normalisation must be (3 means, 3 positive stds), got {student_normalize!r}")
    if mode == "teacher":
        target = teacher_normalization(teacher, info)
        if target is None:
            raise ConfigError("distill.teacher_normalize=teacher: the teacher does not say which mean/std "
                              "it expects (no stored aug.normalize, no timm pretrained_cfg); use "
                              "'imagenet' or 'cifar', or 'student' for the reference's behaviour")
    else:
        target = NORMALIZATION[mode]
    target = _mean_std(*target)
    if all(abs(a - b) < 1e-12 for a, b in zip(source[0] + source[1], target[0] + target[1])):
        return None
    return (source[0], source[1], target[0], target[1])
