"""The DeiT-LT student: timm's ``VisionTransformerDistilled`` with any size (docs/recipe.md section 2).

The architecture is one plain dict (``student_arch``), resolved from a timm-style name
``deit_{tiny,small,base}_distilled_patch{p}_{res}`` plus explicit overrides, stored in every
checkpoint and passed back to ``build_student`` to rebuild the model. This lifts the
reference's hard-wired 224/16/768 patch embedding (docs/recipe.md, reference bug 6): a patch-4, 32x32, depth-6
student for CPU runs is the same code path as DeiT-B on 224x224.

The model is timm's own class, so its state_dict keys equal timm's and the reference's
(``cls_token``, ``dist_token``, ``pos_embed`` (1, N+2, D), ``blocks.*``, ``norm``, ``head``,
``head_dist``) and reference checkpoints load strictly without renaming.
"""
from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled

# DeiT's sizes (Touvron et al. 2021, Table 1): embed_dim, depth, num_heads; MLP ratio 4.
DEIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
_NAME = re.compile(r"^deit_(tiny|small|base)_distilled_patch(\d+)_(\d+)$")


def parse_student_name(name: str) -> dict | None:
    """Defaults implied by a timm DeiT name, or None when the name is not of that form."""
    m = _NAME.match(name)
    if m is None:
        return None
    size, patch, res = m.group(1), int(m.group(2)), int(m.group(3))
    return dict(img_size=res, patch_size=patch, mlp_ratio=4.0, **DEIT_SIZES[size])


def student_arch(name: str, num_classes: int, img_size: int | None = None,
                 patch_size: int | None = None, embed_dim: int | None = None,
                 depth: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float | None = None) -> dict:
    """Fully resolved student architecture: the name's defaults, then explicit values.

    The result has exactly this function's parameters as keys, so ``student_arch(**arch)``
    re-validates a stored dict. The name is kept as given (a label); the numbers rule.
    """
    given = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                 num_heads=num_heads, mlp_ratio=mlp_ratio)
    defaults = parse_student_name(name) or {}
    arch = {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
    missing = [k for k, v in arch.items() if v is None]
    if missing:
        raise ValueError(f"student {name!r} is not a timm name deit_{{tiny,small,base}}_distilled_"
                         f"patch{{p}}_{{res}}, so these must be given: {', '.join(missing)}")
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        value = arch[key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"student {key} must be a positive integer, got {arch[key]!r}")
        arch[key] = value
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"student num_classes must be a positive integer, got {num_classes!r}")
    arch["mlp_ratio"] = float(arch["mlp_ratio"])
    if not arch["mlp_ratio"] > 0:
        raise ValueError(f"student mlp_ratio must be > 0, got {arch['mlp_ratio']}")
    if arch["img_size"] % arch["patch_size"]:
        raise ValueError(f"student img_size {arch['img_size']} is not divisible by "
                         f"patch_size {arch['patch_size']}")
    if arch["embed_dim"] % arch["num_heads"]:
        raise ValueError(f"student embed_dim {arch['embed_dim']} is not divisible by "
                         f"num_heads {arch['num_heads']}")
    if (arch["embed_dim"] * arch["mlp_ratio"]) % 1:
        raise ValueError(f"student embed_dim x mlp_ratio must be an integer, got "
                         f"{arch['embed_dim']} x {arch['mlp_ratio']}")
    return {"name": name, "num_classes": num_classes, **arch}


class DistilledStudent(VisionTransformerDistilled):
    """timm's ``VisionTransformerDistilled`` with the project's head contract.

    **The head contract** (the one place to change for a head ablation):

    - ``forward(x)`` returns the heads' logits by name, ``{"cls": ..., "dist": ...}``, in
      train and eval mode alike (timm returns the mean of the heads in eval mode unless
      ``distilled_training`` is set). The training loss reads the heads by name, and the
      call goes through ``model(x)``, which a DDP/FSDP wrapper needs to synchronise gradients.
    - ``HEADS`` maps each head to its prefix token (position in the token sequence) and
      ``head_modules()`` to its classifier; ``analysis.py`` and ``evaluate.py`` read both.
    - ``combine(heads)`` turns the heads' logits into the reported prediction,
      ``PREDICTION`` ("avg"): the mean of the logits, as the reference (docs/recipe.md
      section 2, "inference"). A weighted or learned combination is an edit of this method
      (a learned weight: an ``nn.Parameter`` made in ``__init__``); the training scripts,
      ``evaluate.py``, ``analysis.py`` and the benchmark all call it through
      ``student_outputs``.

    Parameters and state_dict keys are timm's, untouched.
    """

    HEADS = {"cls": 0, "dist": 1}  # head name -> index of its prefix token
    PREDICTION = "avg"

    def head_modules(self) -> dict[str, nn.Module]:
        return {"cls": self.head, "dist": self.head_dist}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.forward_features(x)
        # head_drop is timm's dropout before the heads (drop_rate, 0 in DeiT).
        return {name: head(self.head_drop(tokens[:, self.HEADS[name]]))
                for name, head in self.head_modules().items()}

    def combine(self, heads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reported prediction from the heads' logits: their mean."""
        return (heads["cls"] + heads["dist"]) / 2


def build_student(arch: dict, drop_path_rate: float = 0.0,
                  fused_attn: bool = True) -> DistilledStudent:
    """A freshly initialised distilled ViT for ``arch`` (a ``student_arch`` dict).

    DeiT's choices: qkv bias, LayerNorm eps 1e-6, class + distillation tokens, learned
    position embedding over N+2 tokens, drop-path rising linearly to ``drop_path_rate``.
    """
    arch = student_arch(**arch)
    model = DistilledStudent(
        img_size=arch["img_size"], patch_size=arch["patch_size"], num_classes=arch["num_classes"],
        embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
        mlp_ratio=arch["mlp_ratio"], qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=drop_path_rate,
    )
    # timm's initialisation, which is the reference's: the class token from normal(std=1e-6),
    # the distillation token and position embedding from trunc_normal(std=0.02)
    # (docs/recipe.md section 2, "token init"; DeiT's own repository differs).
    set_fused_attn(model, fused_attn)
    model.student_arch = arch
    return model


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch every block between ``F.scaled_dot_product_attention`` and the explicit
    softmax(QK^T/sqrt(d))V formula (timm's ``attn.fused_attn`` flag); same weights, same math."""
    for block in model.blocks:
        block.attn.fused_attn = bool(enabled)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP1 (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def output_names(model: nn.Module) -> list[str]:
    """What ``student_outputs`` returns, in report order: the heads, then the prediction."""
    inner = unwrap(model)
    return [*inner.HEADS, inner.PREDICTION]


def student_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The heads' logits and the reported prediction, ``{"cls", "dist", "avg"}``.

    ``model`` is a ``DistilledStudent``, possibly wrapped (DDP, FSDP, torch.compile): the
    forward goes through ``model(x)`` so the wrapper's hooks run, the combination through
    the student's own ``combine``.
    """
    heads = dict(model(x))
    return {**heads, unwrap(model).PREDICTION: unwrap(model).combine(heads)}
