"""The two augmented views of PaCo's training images (query view, key view).

Published recipes (Cui et al., PaCo code: ``paco_cifar.py`` with ``--aug cifar100`` on
imbalanced data, ``paco_lt.py`` with ``--aug randcls_sim`` for ImageNet-LT / iNat):

CIFAR-LT
    query: RandomCrop(32, pad 4), flip, AutoAugment (CIFAR-10 policy), ToTensor, Cutout(1 hole,
           16 px), Normalize(CIFAR mean/std)
    key:   RandomResizedCrop(32, scale 0.2-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) w.p. 0.8,
           RandomGrayscale(0.2), GaussianBlur(sigma 0.1-2) w.p. 0.5, ToTensor, Normalize
ImageNet-LT / iNat
    query: RandomResizedCrop(224, scale 0.08-1), flip, ColorJitter(0.4, 0.4, 0.4, 0),
           RandAugment 'rand-n2-m10-mstd0.5' (translate 45% of 224, fill = ImageNet mean),
           ToTensor, Normalize
    key:   RandomResizedCrop(224), ColorJitter(0.4, 0.4, 0.4, 0), RandomGrayscale(0.2),
           GaussianBlur(sigma 0.1-2) w.p. 0.5, flip, ToTensor, Normalize

Where this module differs, and why:

* AutoAugment is torchvision's ``AutoAugment(CIFAR10)`` (the same policy table as the
  published ``CIFAR10Policy``) with grey fill 128 as the published one; torchvision's magnitude
  bins differ from it in the last digit for a few ops.
* RandAugment is timm's ``rand_augment_transform``, of which PaCo's ``randaugment.py`` is a copy.
* Non-CIFAR data is normalised with the ImageNet mean/std also for iNat (PaCo used iNat's own
  statistics there): the DeiT-LT student feeds the teacher ImageNet-normalised images.
* Crop sizes follow ``data_cfg['input_size']`` (32 / 224 in the published recipes); for CIFAR
  an image of another size is first resized to it.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T

from .transforms import CIFAR_MEAN, CIFAR_STD

__all__ = ["paco_transform", "TwoViews", "Cutout", "GaussianBlur", "CIFAR_MEAN", "CIFAR_STD"]


class TwoViews:
    """Apply the query and the key transform to the same image: returns ``[q_view, k_view]``."""

    def __init__(self, query: Callable, key: Callable) -> None:
        self.query, self.key = query, key

    def __call__(self, img: Image.Image) -> list:
        return [self.query(img), self.key(img)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n query={self.query},\n key={self.key})"


class Cutout:
    """Zero one ``length`` x ``length`` square (clipped at the borders) of a CHW tensor.

    DeVries & Taylor's Cutout as PaCo uses it: after ToTensor, before Normalize, so the hole is
    black in pixel space. The centre is uniform over the image, so the hole can be partly outside.
    """

    def __init__(self, n_holes: int = 1, length: int = 16) -> None:
        self.n_holes, self.length = n_holes, length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        mask = torch.ones((h, w), dtype=img.dtype)
        for _ in range(self.n_holes):
            cy, cx = random.randrange(h), random.randrange(w)
            y0, y1 = max(cy - self.length // 2, 0), min(cy + self.length // 2, h)
            x0, x1 = max(cx - self.length // 2, 0), min(cx + self.length // 2, w)
            mask[y0:y1, x0:x1] = 0
        return img * mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_holes={self.n_holes}, length={self.length})"


class GaussianBlur:
    """SimCLR / MoCo-v2 blur on a PIL image with a radius drawn uniformly from ``sigma``.

    PIL's radius-based blur, as published; torchvision's version needs a kernel size and
    would blur 32x32 images differently.
    """

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def _input_size(data_cfg: dict) -> int:
    size = data_cfg["input_size"]
    if isinstance(size, (tuple, list)):  # timm style (3, H, W)
        size = size[-1]
    return int(size)


def _cifar_views(size: int, mean_std) -> TwoViews:
    normalize = T.Normalize(*mean_std)
    resize = [] if size == 32 else [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    query = T.Compose(resize + [
        T.RandomCrop(size, padding=4),
        T.RandomHorizontalFlip(),
        T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=[128, 128, 128]),
        T.ToTensor(),
        Cutout(n_holes=1, length=size // 2),  # 16 px on 32 x 32
        normalize,
    ])
    key = T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),  # PaCo/LT/paco_cifar.py (docs/recipe.md section 4)
        T.ToTensor(),
        normalize,
    ])
    return TwoViews(query, key)


def _imagenet_views(size: int, randaug_n: int, randaug_m: int, mean_std) -> TwoViews:
    from timm.data.auto_augment import rand_augment_transform

    normalize = T.Normalize(*mean_std)
    ra_hparams = dict(translate_const=int(size * 0.45),
                      img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN))
    query = T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.4, 0.4, 0.4, 0.0),  # RandomApply(p=1.0) in the published code
        rand_augment_transform(f"rand-n{randaug_n}-m{randaug_m}-mstd0.5", ra_hparams),
        T.ToTensor(),
        normalize,
    ])
    key = T.Compose([
        T.RandomResizedCrop(size),
        T.ColorJitter(0.4, 0.4, 0.4, 0.0),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ])
    return TwoViews(query, key)


def paco_transform(data_cfg: dict, dataset: str, mean_std=None) -> TwoViews:
    """PaCo's training transform: a callable mapping a PIL image to ``[q_view, k_view]`` tensors.

    ``data_cfg['input_size']`` (int or (3, H, W)) sets the crop size; optional
    ``data_cfg['randaug_n']`` / ``['randaug_m']`` (default 2 / 10) set RandAugment for
    non-CIFAR data. ``dataset`` names starting with 'cifar' get the CIFAR recipe, all others
    the ImageNet-LT / iNat recipe. ``mean_std`` = (mean, std) of the final Normalize (the
    teacher's ``aug.normalize``, so the evaluation transform matches); by default the CIFAR
    statistics for CIFAR data (the published recipe), the ImageNet ones otherwise.
    """
    size = _input_size(data_cfg)
    cifar = dataset.lower().startswith("cifar")
    if mean_std is None:
        mean_std = (CIFAR_MEAN, CIFAR_STD) if cifar else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    if cifar:
        return _cifar_views(size, mean_std)
    return _imagenet_views(size, int(data_cfg.get("randaug_n", 2)), int(data_cfg.get("randaug_m", 10)),
                           mean_std)
