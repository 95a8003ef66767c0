"""Image transforms (docs/recipe.md section 2) and the ``aug`` config section.

Training, ``train_crop='rrc'``: exactly the reference's timm ``create_transform`` call
(RandomResizedCrop 0.08-1, flip, RandAugment, ToTensor, Normalize, RandomErasing; colour
jitter inactive while RandAugment is on). ``train_crop='pad_crop'``: the same pipeline with
the first step replaced by ``RandomCrop(input_size, padding=4)``, which is what DeiT's own
``build_transform`` does for inputs of 32 pixels or less; it suits native-resolution CIFAR.
Evaluation: Resize(int(input_size / eval_crop_ratio), bicubic) + CenterCrop, as DeiT (0.875,
i.e. 256 -> 224; not timm's 0.9).
uint8 feed (``aug.gpu_feed``, on by default on CUDA): the training transform stops at the uint8
image and the erasing boxes it draws; ``DeviceFeed`` normalises and erases the batch on the
device; the crop decodes large JPEGs at the scale it needs (``DraftRandomResizedCrop``).
"""
from __future__ import annotations

import random
from typing import Callable

import torch
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
    "gpu_feed": ("auto", "ship uint8 training batches; normalise and erase them on the device (timm's "
                         "PrefetchLoader: same images and boxes as the float path); auto: on CUDA",
                 ("auto", "on", "off")),
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


def build_transform(is_train: bool, data_cfg: dict, aug_cfg: dict, uint8: bool = False) -> Callable:
    """PIL image -> normalised tensor of shape (3, input_size, input_size).

    ``uint8`` (training only): the same transform up to the image's last PIL step, then a uint8
    tensor and, with random erasing, the boxes it draws (``EraseBoxes``); ``DeviceFeed`` does the
    rest on the device."""
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
    if uint8:
        transform.transforms[:] = uint8_tail(transform.transforms, float(aug_cfg["reprob"]),
                                             int(aug_cfg["recount"]))
        if aug_cfg["train_crop"] == "rrc":
            first = transform.transforms[0]
            transform.transforms[0] = DraftRandomResizedCrop(first.size, first.scale, first.ratio,
                                                             aug_cfg["train_interpolation"])
            transform.lazy_jpeg = True  # LongTailDataset: hand JPEGs over undecoded
    return transform


# ----------------------------------------------------------------------------- uint8 feed
# The float path ends ToTensor -> Normalize -> RandomErasing in the worker (per image, on
# float32: 4 bytes a pixel through shared memory and the copy to the device). The uint8 path
# stops at the PIL image, ships it as uint8, and ``DeviceFeed`` normalises and erases the batch
# on the device with the same arithmetic, as timm's PrefetchLoader does. The erasing boxes are
# still drawn in the worker, by timm's own RandomErasing code from the image's seeded RNG, so
# every image gets exactly the float path's boxes (a resumed run too); only the noise that
# fills a box ('pixel' / 'rand' modes: N(0, 1), as timm's) is drawn on the device, per batch,
# from the step's seeded generator. With the same images the two paths give identical batches
# except those noise values (tests/test_feed.py).


class DraftRandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation (the same draws, in the same order) that decodes
    a JPEG handed over undecoded (``open_rgb(..., lazy_jpeg=True)``) at a reduced scale when the
    crop allows it: libjpeg's DCT scaling by 1/s, s in 2, 4, 8, costs about 1/s^2 of the decode.

    Why the distribution is kept: the crop box is drawn on the full image size before any
    decoding, exactly as timm draws it, and s is the largest power of two for which the box
    still covers at least the output size in both dimensions at scale 1/s; the box is then
    resampled (float coordinates, the same interpolation) from the reduced image. The output is
    still a downscale of the same region, from a source at least as fine as the output (the DCT
    scaling is an anti-aliased reduction), never an upscale of a coarser one. A crop under twice
    the output size (every crop of a 500x375 ImageNet image at 224) decodes in full and gives
    timm's pixels exactly (tests/test_feed.py)."""

    def __init__(self, size, scale, ratio, interpolation: str) -> None:
        from timm.data.transforms import RandomResizedCropAndInterpolation

        self.crop = RandomResizedCropAndInterpolation(size, scale, ratio, interpolation)
        self.size, self.scale, self.ratio = self.crop.size, self.crop.scale, self.crop.ratio

    def __call__(self, img):
        from PIL import JpegImagePlugin
        from torchvision.transforms import functional as F

        if not (isinstance(img, JpegImagePlugin.JpegImageFile) and img.tile):
            return self.crop(img)  # already decoded: timm's crop as it is
        i, j, h, w = self.crop.get_params(img, self.scale, self.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        fit = min(h // self.size[0], w // self.size[1])  # how many times the box covers the output
        s = next(k for k in (8, 4, 2, 1) if k <= max(fit, 1))
        width, height = img.size
        if s > 1:
            img.draft("RGB", (-(-width // s), -(-height // s)))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"cannot read image {img.info.get('what', img.filename)}: {type(e).__name__}: {e}") from e
        s = img.decoderconfig[0] if img.decoderconfig else 1  # the scale libjpeg applied
        if s == 1:
            return F.resized_crop(img, i, j, h, w, list(self.size), interpolation)
        return img.resize(self.size[::-1], F.pil_modes_mapping[interpolation],
                          box=(j / s, i / s, (j + w) / s, (i + h) / s))

    def __repr__(self) -> str:
        return f"Draft{self.crop!r}"


class _BoxRecorder:
    """Stands in for the image in timm's ``RandomErasing._erase``: records each box it would
    fill (``img[:, top:top + h, left:left + w] = ...``) instead of filling it."""

    def __init__(self) -> None:
        self.boxes: list[tuple[int, int, int, int]] = []

    def __setitem__(self, key, value) -> None:
        _, rows, cols = key
        self.boxes.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start))


class EraseBoxes:
    """uint8 CHW image -> ``{"image": it, "erase": (recount, 4) int32 boxes}`` (top, left,
    height, width; a zero height marks no box). The draws are timm's ``RandomErasing``'s, in
    its order, from the same RNG: the float path's boxes for the same seed."""

    def __init__(self, probability: float, max_count: int) -> None:
        from timm.data.random_erasing import RandomErasing

        # 'const' makes _erase's fill a 3x1x1 zero tensor: no noise is drawn here.
        self.eraser = RandomErasing(probability, mode="const", max_count=max_count, device="cpu")
        self.max_count = max_count

    def __call__(self, img: torch.Tensor) -> dict:
        recorder = _BoxRecorder()
        self.eraser._erase(recorder, *img.shape, torch.float32)
        boxes = torch.zeros((self.max_count, 4), dtype=torch.int32)
        if recorder.boxes:
            boxes[:len(recorder.boxes)] = torch.tensor(recorder.boxes, dtype=torch.int32)
        return {"image": img, "erase": boxes}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.eraser.probability}, count=(1, {self.max_count}))"


def uint8_tail(steps: list, reprob: float, recount: int) -> list:
    """The float transform's steps with its tail (ToTensor, Normalize, RandomErasing) swapped
    for uint8 conversion and, when erasing is on, the box draws."""
    from timm.data.transforms import MaybePILToTensor, MaybeToTensor

    cut = next(i for i, t in enumerate(steps) if isinstance(t, (MaybeToTensor, transforms.ToTensor)))
    return steps[:cut] + [MaybePILToTensor()] + ([EraseBoxes(reprob, recount)] if reprob > 0 else [])


class DeviceFeed:
    """A uint8 micro-batch (a tensor, or ``EraseBoxes``' dict of them) -> the normalised, erased
    float32 batch on ``device``: ToTensor's ``/ 255`` and Normalize's ``(x - mean) / std`` as the
    same float32 operations (identical values), then the boxes filled as timm's RandomErasing
    fills them ('pixel': per-pixel N(0, 1); 'rand': one N(0, 1) colour per box; 'const': 0)."""

    def __init__(self, mean, std, mode: str, device) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.mode = mode

    def __call__(self, batch) -> torch.Tensor:
        boxes = None
        if isinstance(batch, dict):
            batch, boxes = batch["image"], batch["erase"].to(self.device, non_blocking=True)
        x = batch.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
        return x if boxes is None else self.erase(x, boxes)

    def erase(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Fill ``boxes`` (B, count, 4) of ``x`` (B, C, H, W), later boxes over earlier ones as
        timm's loop does; masks instead of a per-image loop (no host synchronisation)."""
        n, c, h, w = x.shape
        rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
        for box in boxes.unbind(1):  # (B, 4) each: one box per image
            top, left, bh, bw = (v.view(n, 1, 1, 1) for v in box.unbind(1))
            inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
            if self.mode == "pixel":
                fill = torch.empty_like(x).normal_()
            elif self.mode == "rand":
                fill = torch.empty((n, c, 1, 1), dtype=x.dtype, device=x.device).normal_()
            else:
                fill = x.new_zeros(())
            x = torch.where(inside, fill, x)
        return x


def uses_device_feed(aug_cfg: dict, device) -> bool:
    """Whether ``aug.gpu_feed`` ships uint8 training batches to ``device`` ('auto': a CUDA device)."""
    mode = aug_cfg.get("gpu_feed", "auto")
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda")


def build_device_feed(aug_cfg: dict, device) -> DeviceFeed | None:
    """The training batches' ``DeviceFeed`` when ``uses_device_feed``, else None (the float
    path: the workers normalise and erase)."""
    if not uses_device_feed(aug_cfg, device):
        return None
    mean, std = NORMALIZATION[aug_cfg["normalize"]]
    return DeviceFeed(mean, std, aug_cfg["remode"], device)
