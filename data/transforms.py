"""Image transforms (docs/recipe.md section 2) and the ``aug`` config section.

Training, ``train_crop='rrc'``: exactly the reference's timm ``create_transform`` call
(RandomResizedCrop 0.08-1, flip, RandAugment, ToTensor, Normalize, RandomErasing; colour
jitter inactive while RandAugment is on). ``train_crop='pad_crop'``: the same pipeline with
the first step replaced by ``RandomCrop(input_size, padding=4)``, which is what DeiT's own
``build_transform`` does for inputs of 32 pixels or less; it suits native-resolution CIFAR.
Evaluation: Resize(int(input_size / eval_crop_ratio), bicubic) + CenterCrop, as DeiT (0.875,
i.e. 256 -> 224; not timm's 0.9).
"""
from __future__ import annotations

from typing import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from utils import Nullable, check
from errors import DataError

# The CIFAR statistics of the LDAM-DRW and PaCo CIFAR code (docs/recipe.md section 4); ImageNet's are timm's.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

AUG_SPEC = {
    "train_crop": ("rrc", "training crop: RandomResizedCrop(0.08-1) as timm (the reference), or "
                          "RandomCrop(input_size, padding 4) for native-resolution CIFAR",
                   ("rrc", "pad_crop")),
    "hflip": (0.5, "horizontal flip probability"),
    "aa": ("rand-m9-mstd0.5-inc1", "timm auto-augment policy (RandAugment string); null = none",
           Nullable(str)),
    "color_jitter": (0.3, "colour jitter strength; inactive while aa is set (timm)"),
    "train_interpolation": ("bicubic", "interpolation of the training crop and RandAugment",
                            ("bicubic", "bilinear", "nearest", "lanczos", "random")),
    "reprob": (0.25, "random erasing probability"),
    "remode": ("pixel", "random erasing fill mode", ("pixel", "rand", "const")),
    "recount": (1, "random erasing count"),
    "normalize": ("imagenet", "mean/std: 'imagenet' (the reference, also for CIFAR) or 'cifar' "
                              "(the statistics the CIFAR teachers were trained with)", ("imagenet", "cifar")),
    "eval_crop_ratio": (0.875, "eval: Resize(int(input_size / ratio)) + CenterCrop(input_size)"),
    "eval_interpolation": ("bicubic", "interpolation of the eval Resize: bicubic (DeiT, the reference's "
                                      "students) or bilinear (the published ImageNet-LT / iNat teachers)",
                           ("bicubic", "bilinear")),
    "repeated_aug": (True, "repeated augmentation sampler (each image ra_repeats times per epoch)"),
    "ra_repeats": (3, "copies of each image per epoch with repeated_aug"),
    "mixup": (0.8, "mixup alpha (0 = off)"),
    "cutmix": (1.0, "cutmix alpha (0 = off)"),
    "mixup_prob": (1.0, "probability of applying mixup or cutmix to a batch"),
    "mixup_switch_prob": (0.5, "probability of cutmix instead of mixup when both are on"),
    "mixup_mode": ("batch", "mixup granularity", ("batch", "pair", "elem")),
    "smoothing": (0.1, "label smoothing"),
}

# Every probability in AUG_SPEC: each must lie in [0, 1].
PROBABILITY_KEYS = ("hflip", "reprob", "mixup_prob", "mixup_switch_prob")


def validate_aug_config(a: dict, input_size: int | None = None) -> None:
    """Range checks of the ``aug`` section (ConfigError naming the key), for typed values and
    values read from files (a config, a checkpoint's stored config) alike. Missing keys are
    skipped. With ``input_size`` (data.input_size), the evaluation resize
    ``input_size / eval_crop_ratio`` is bounded like the input size itself."""
    for key in PROBABILITY_KEYS:
        if key in a:
            check(0.0 <= a[key] <= 1.0, f"aug.{key}", f"is a probability: must be in [0, 1], got {a[key]}")
    if "smoothing" in a:
        check(0.0 <= a["smoothing"] < 1.0, "aug.smoothing",
              f"must be in [0, 1) (1 would make every target uniform), got {a['smoothing']}")
    for key in ("color_jitter", "mixup", "cutmix"):
        if key in a:
            check(a[key] >= 0, f"aug.{key}", f"must be >= 0 (0 = off), got {a[key]}")
    if "eval_crop_ratio" in a:
        check(0.0 < a["eval_crop_ratio"] <= 1.0, "aug.eval_crop_ratio",
              f"must be in (0, 1] (resize to input_size / ratio, then centre crop), got {a['eval_crop_ratio']}")
        if isinstance(input_size, int):
            from .build import MAX_INPUT_SIZE

            resize = int(input_size / a["eval_crop_ratio"])
            check(resize <= MAX_INPUT_SIZE, "aug.eval_crop_ratio",
                  f"{a['eval_crop_ratio']} would resize the evaluation images to {resize} pixels "
                  f"(data.input_size / ratio), above the {MAX_INPUT_SIZE} allowed")
    for key in ("recount", "ra_repeats"):
        if key in a:
            check(a[key] >= 1, f"aug.{key}", f"must be >= 1, got {a[key]}")


NORMALIZATION = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "cifar": (CIFAR_MEAN, CIFAR_STD),
}


def _aa_policy(aa) -> str | None:
    if aa is None or (isinstance(aa, str) and aa.strip().lower() in ("", "none")):
        return None
    if not isinstance(aa, str):
        raise DataError(f"aug.aa must be a timm auto-augment string or null, got {aa!r}")
    return aa


def build_transform(is_train: bool, data_cfg: dict, aug_cfg: dict) -> Callable:
    """PIL image -> normalised tensor of shape (3, input_size, input_size)."""
    from timm.data import create_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation

    input_size = int(data_cfg["input_size"])
    mean, std = NORMALIZATION[aug_cfg["normalize"]]
    if not is_train:
        # DeiT: size = int(input_size / eval_crop_ratio); Resize(size, interpolation=3 (bicubic));
        # the published ImageNet-LT / iNat teachers: Resize(256), bilinear (docs/recipe.md section 4);
        # an aug section from before the key (a stored config) means bicubic.
        ratio = float(aug_cfg["eval_crop_ratio"])
        if not 0.0 < ratio <= 1.0:
            raise DataError(f"aug.eval_crop_ratio must be in (0, 1], got {ratio}")
        return transforms.Compose([
            transforms.Resize(int(input_size / ratio),
                              interpolation=transforms.InterpolationMode(aug_cfg.get("eval_interpolation", "bicubic"))),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ])

    # The reference's call (DeiT datasets.build_transform), docs/recipe.md section 2.
    transform = create_transform(
        input_size=input_size,
        is_training=True,
        hflip=float(aug_cfg["hflip"]),
        color_jitter=float(aug_cfg["color_jitter"]) or None,  # 0: no ColorJitter at all
        auto_augment=_aa_policy(aug_cfg["aa"]),
        interpolation=aug_cfg["train_interpolation"],
        re_prob=float(aug_cfg["reprob"]),
        re_mode=aug_cfg["remode"],
        re_count=int(aug_cfg["recount"]),
        mean=mean,
        std=std,
    )
    if aug_cfg["train_crop"] == "pad_crop":
        # DeiT's build_transform for small inputs: swap the RandomResizedCrop for a padded
        # random crop; RandAugment keeps timm's hparams for this size (translate 45% of it,
        # fill with the normalisation mean), so only the crop differs. The images must already
        # be input_size pixels (native-resolution CIFAR).
        assert isinstance(transform.transforms[0], RandomResizedCropAndInterpolation)
        transform.transforms[0] = transforms.RandomCrop(input_size, padding=4)
    elif aug_cfg["train_crop"] != "rrc":
        raise DataError(f"aug.train_crop must be 'rrc' or 'pad_crop', got {aug_cfg['train_crop']!r}")
    return transform
