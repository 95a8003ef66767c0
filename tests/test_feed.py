"""The uint8 data feed (aug.gpu_feed): workers ship uint8 images and the erasing boxes they
drew, ``DeviceFeed`` normalises and erases on the device. Same seeds and images give the float
path's batch: identical values in 'const' erasing mode, identical outside the boxes (and the same
boxes) in 'pixel' mode, whose N(0, 1) noise is drawn on the device instead of in the worker."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from data import AUG_SPEC, DATA_SPEC, build_transform
from data.transforms import DeviceFeed, NORMALIZATION, build_device_feed, uses_device_feed
from engine.seeding import seed_everything
from helpers import class_image, make_split_files
from utils import split_spec

DEFAULTS, _, _ = split_spec({"data": DATA_SPEC, "aug": AUG_SPEC})


def _images(n: int = 6) -> list:
    rng = np.random.default_rng(0)
    return [class_image(i % 3, 3, rng, size=40 + 4 * i) for i in range(n)]


def _both_paths(aug: dict, images: list, input_size: int = 32):
    """(float batch, uint8 batch after DeviceFeed, the uint8 batch as the workers ship it),
    each image transformed under the same seed in both paths."""
    data_cfg = {**DEFAULTS["data"], "input_size": input_size}
    aug_cfg = {**DEFAULTS["aug"], **aug}
    float_tf = build_transform(True, data_cfg, aug_cfg)
    uint8_tf = build_transform(True, data_cfg, aug_cfg, uint8=True)
    floats, shipped = [], []
    for seed, img in enumerate(images):
        seed_everything(100 + seed)
        floats.append(float_tf(img))
        seed_everything(100 + seed)
        shipped.append(uint8_tf(img))
    batch = default_collate(shipped)
    mean, std = NORMALIZATION[aug_cfg["normalize"]]
    return torch.stack(floats), DeviceFeed(mean, std, aug_cfg["remode"], "cpu")(batch), batch


def test_uint8_feed_gives_the_float_paths_batch():
    """'const' erasing (every image erased, up to 2 boxes) and RandAugment at 32 pixels: the
    device-normalised batch is bitwise the workers' float batch; the workers ship uint8."""
    floats, fed, shipped = _both_paths({"reprob": 1.0, "remode": "const", "recount": 2}, _images())
    assert shipped["image"].dtype == torch.uint8 and shipped["erase"].shape == (6, 2, 4)
    assert (shipped["erase"][:, 0, 2] > 0).all()  # each image has a first box
    assert fed.dtype == torch.float32 and torch.equal(fed, floats)
    # without erasing the workers ship the bare uint8 batch
    floats, fed, shipped = _both_paths({"reprob": 0.0, "train_crop": "pad_crop"}, _images())
    assert isinstance(shipped, torch.Tensor) and torch.equal(fed, floats)


def test_pixel_erasing_same_boxes_noise_from_the_device():
    """Default 'pixel' mode: the float path erases exactly the boxes the workers ship; outside
    them the batches are identical; inside, the device's fill is N(0, 1) noise like timm's."""
    aug = {"reprob": 1.0, "recount": 1}
    floats, fed, shipped = _both_paths(aug, _images(8), input_size=48)
    plain, _, _ = _both_paths({**aug, "reprob": 0.0}, _images(8), input_size=48)
    inside = torch.zeros_like(floats, dtype=torch.bool)
    for i, (top, left, h, w) in enumerate(shipped["erase"][:, 0].tolist()):
        inside[i, :, top:top + h, left:left + w] = True
    assert inside.any()
    assert torch.equal(floats != plain, inside)  # the float path erased the shipped boxes
    assert torch.equal(fed[~inside], floats[~inside])
    noise = fed[inside]
    assert not torch.equal(noise, floats[inside])
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


def test_gpu_feed_key_auto_means_cuda():
    aug = dict(DEFAULTS["aug"])
    assert aug["gpu_feed"] == "auto"
    assert uses_device_feed(aug, "cuda") and uses_device_feed(aug, torch.device("cuda", 1))
    assert not uses_device_feed(aug, "cpu") and build_device_feed(aug, "cpu") is None
    assert not uses_device_feed({**aug, "gpu_feed": "off"}, "cuda")
    assert isinstance(build_device_feed({**aug, "gpu_feed": "on"}, "cpu"), DeviceFeed)


def test_student_step_on_the_uint8_loader(tmp_path):
    """build_loaders with aug.gpu_feed=on ships uint8 batches; train_step turns them into the
    float path's batch: the same loss and the same updated weights as with the float loader."""
    from accelerate import Accelerator

    import train_student
    from engine import loop
    from losses import DistillationLoss
    from models import build_student
    from utils import load_config

    image_root, train_list, val_list = make_split_files(tmp_path, [6, 4], [1, 1], size=40)
    overrides = [f"data.root={image_root}", f"data.train_list={train_list}", f"data.val_list={val_list}",
                 "data.dataset=imagenet_lt", "data.input_size=32", "data.num_workers=0",
                 "aug.remode=const", "aug.reprob=1.0", "aug.repeated_aug=false", "train.batch_size=4",
                 f"train.output_dir={tmp_path / 'out'}"]
    accelerator = Accelerator(cpu=True)
    runs = []
    for mode in ("off", "on"):
        cfg = load_config(train_student.SPEC, overrides + [f"aug.gpu_feed={mode}"])
        *_, data_loader, _ = loop.build_loaders(cfg, accelerator)
        feed = build_device_feed(cfg["aug"], accelerator.device)
        window = [next(iter(data_loader))]
        assert isinstance(window[0][0], dict) == (mode == "on")
        torch.manual_seed(0)
        model = build_student(dict(name="tiny", num_classes=2, img_size=32, patch_size=8, embed_dim=24,
                                   depth=1, num_heads=2, mlp_ratio=2.0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        criterion = DistillationLoss(train_student.build_base_criterion(False), None, "none", 0.5, 1.0)
        terms = train_student.train_step(model, criterion, window, optimizer, accelerator, feed=feed)
        runs.append((terms["loss"], copy.deepcopy(model.state_dict())))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def _smooth_jpeg(width: int, height: int) -> bytes:
    """A JPEG of smooth content (gradients and slow waves), where a resampling error would show."""
    import io

    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.5 + 0.4 * np.sin(7 * x + 3 * y), x, 0.5 + 0.4 * np.cos(5 * y - 2 * x)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray((255 * rgb).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_draft_crop_keeps_the_crop_distribution():
    """DraftRandomResizedCrop on an undecoded JPEG: timm's draws (the same RNG state after the
    call), the same region; a 1200x900 image is decoded at 1/2 or 1/4 for large crops and the
    result stays within a few grey levels of timm's full decode; a 500x375 image (no crop twice
    224) gives timm's pixels exactly."""
    import io
    import random

    from timm.data.transforms import RandomResizedCropAndInterpolation

    from data.sources import open_rgb
    from data.transforms import DraftRandomResizedCrop

    timm_crop = RandomResizedCropAndInterpolation(224, interpolation="bicubic")
    draft_crop = DraftRandomResizedCrop(224, timm_crop.scale, timm_crop.ratio, "bicubic")
    for (w, h), seeds in (((1200, 900), range(12)), ((500, 375), range(4))):
        jpeg = _smooth_jpeg(w, h)
        scales = []
        for seed in seeds:
            random.seed(seed)
            expected = np.asarray(timm_crop(open_rgb(io.BytesIO(jpeg), "full")), dtype=np.int16)
            after = random.getstate()
            random.seed(seed)
            lazy = open_rgb(io.BytesIO(jpeg), "lazy", lazy_jpeg=True)
            assert lazy.tile  # not decoded yet
            got = np.asarray(draft_crop(lazy), dtype=np.int16)
            assert random.getstate() == after
            scales.append(lazy.decoderconfig[0] if lazy.decoderconfig else 1)
            if scales[-1] == 1:
                assert np.array_equal(got, expected)
            else:
                assert np.abs(got - expected).mean() < 0.5, (seed, scales[-1])
        if w == 500:
            assert set(scales) == {1}
        else:
            assert {1, 2} <= set(scales)


def test_uint8_transform_decodes_jpegs_in_the_crop(tmp_path):
    """The uint8 training transform asks the dataset for undecoded JPEGs (the crop decodes
    them); a truncated JPEG still fails with a DataError naming the file."""
    from data import build_datasets
    from errors import DataError

    image_root, train_list, val_list = make_split_files(tmp_path, [3, 2], [1, 1], size=40)
    data_cfg = {**DEFAULTS["data"], "dataset": "imagenet_lt", "root": str(image_root),
                "train_list": str(train_list), "val_list": str(val_list), "input_size": 32}
    transform = build_transform(True, data_cfg, DEFAULTS["aug"], uint8=True)
    assert transform.lazy_jpeg and not hasattr(build_transform(True, data_cfg, DEFAULTS["aug"]), "lazy_jpeg")
    train, _ = build_datasets(data_cfg, transform, None)
    assert train.load_image(0, lazy_jpeg=True).tile and not train.load_image(0).tile
    victim = image_root / train.source.paths[train.source_indices[0]]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError, match=victim.name):
        train[0]
