"""ResNet-32 for 32x32 inputs, the CIFAR-LT teacher of DeiT-LT (docs/recipe.md section 4).

Same layers, parameter names and initialisation as the reference teachers (Y. Idelbayev's
CIFAR ResNet as used by LDAM-DRW and the DeiT-LT repository): 3 stages x 5 BasicBlocks with
16/32/64 channels, option-A shortcuts (stride-2 subsample plus zero channel padding, no
parameters), kaiming-normal conv/linear weights, and either a plain ``nn.Linear(64, C)``
or LDAM's cosine ``NormedLinear(64, C)`` head named ``linear``. The state_dict keys are
``conv1``, ``bn1``, ``layer1..3``, ``linear``, so the reference checkpoints load strictly.

Every teacher exposes ``forward_features(x) -> (B, 64)`` pooled features and
``forward_head(features) -> logits``; the PaCo code builds on ``forward_features``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW: logits = normalize(x) @ normalize(W, dim=0).

    The weight has shape (in_features, out_features) and no bias, exactly as in LDAM's code,
    so LDAM checkpoints (``linear.weight`` of shape (64, C)) load without transposing.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        # LDAM's init: uniform, then every column renormalised to unit norm.
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class OptionAShortcut(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels (no parameters).

    The reference uses a lambda inside a LambdaLayer; a named module does the same and
    can be printed and pickled.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """The CIFAR ResNet family (``ResNet_s`` in the reference) with a teacher interface."""

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10,
                 head: str = "linear") -> None:
        super().__init__()
        if head not in ("linear", "normed"):
            raise ValueError(f"head must be 'linear' or 'normed', got {head!r}")
        self.num_classes = num_classes
        self.num_features = 64
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        if head == "normed":
            self.linear: nn.Module = NormedLinear(64, num_classes)
        else:
            self.linear = nn.Linear(64, num_classes)
        self.apply(_weights_init)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 64): the reference's ``avg_pool2d(out, out.size(3))`` on
        square maps, written as a global average so other input sizes also work."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _weights_init(m: nn.Module) -> None:
    # Reference init: kaiming-normal (fan_in) on conv and nn.Linear weights only; the
    # NormedLinear keeps its own init, BatchNorm and biases keep PyTorch defaults.
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.kaiming_normal_(m.weight)


def resnet32(num_classes: int = 10, head: str = "linear") -> ResNetCifar:
    """ResNet-32 for CIFAR (0.46M parameters with 10 classes). ``head``: 'linear' (CE, PaCo)
    or 'normed' (LDAM's cosine classifier)."""
    return ResNetCifar((5, 5, 5), num_classes=num_classes, head=head)
