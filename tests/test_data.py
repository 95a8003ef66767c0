"""Tests of the data package: LT subsets against the reference, sources, class maps, groups,
transforms, samplers, bad inputs and the ``data.summary`` command.

Images are generated in temporary folders (tests/helpers.py); the real ImageNet-LT and
iNaturalist split files and the shared CIFAR-10 copy come from ``../shared/data``.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import (AUG_SPEC, DATA_SPEC, RASampler, build_datasets, build_train_sampler, build_transform,
                  class_groups, get_img_num_per_cls, longtail_indices)
from data.longtail import (CIFAR10_FIRST_TEN, CIFAR100_FIRST_TEN, frequency_class_map, hub_to_original_order,
                           resolve_source_order)
from data.sources import read_split_file
from helpers import class_image, make_image_dataset, make_split_files
from utils import load_config, split_spec

ROOT = Path(__file__).resolve().parents[1]
DATA_DEFAULTS, _, _ = split_spec({"data": DATA_SPEC, "aug": AUG_SPEC})


def data_cfg(**kw) -> dict:
    return {**DATA_DEFAULTS["data"], **kw}


def aug_cfg(**kw) -> dict:
    return {**DATA_DEFAULTS["aug"], **kw}


def nearest_class(img: Image.Image, num_classes: int) -> int:
    """The class whose generated colour is nearest to the image's mean colour (helpers.py)."""
    mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)
    rng = np.random.default_rng(0)
    refs = [np.asarray(class_image(c, num_classes, rng, 8)).reshape(-1, 3).mean(0)
            for c in range(num_classes)]
    refs = [r / np.linalg.norm(r) for r in refs]
    return int(np.argmax([mean @ r / np.linalg.norm(mean) for r in refs]))


# ----------------------------------------------------------------------------- config


def test_specs_have_the_contract_keys():
    assert list(DATA_SPEC) == ["dataset", "path", "hub_name", "image_column", "label_column", "train_split",
                               "val_split", "imb_type", "imb_factor", "subset_seed", "source_order", "root",
                               "train_list", "val_list", "groups", "group_thresholds", "group_boundaries", "val_holdout", "num_workers", "input_size"]
    assert set(AUG_SPEC) == {"train_crop", "hflip", "aa", "color_jitter", "train_interpolation", "reprob",
                             "remode", "recount", "normalize", "eval_crop_ratio", "eval_interpolation", "repeated_aug",
                             "ra_repeats", "gpu_feed",
                             "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode", "smoothing"}
    cfg = load_config({"data": DATA_SPEC, "aug": AUG_SPEC},
                      ["aug.aa=null", "data.imb_factor=2e-2", "data.path=/x", "aug.train_crop=pad_crop"])
    assert cfg["aug"]["aa"] is None and cfg["data"]["imb_factor"] == 0.02 and cfg["data"]["path"] == "/x"
    with pytest.raises(SystemExit):
        load_config({"data": DATA_SPEC}, ["data.source_order=sorted"])


# ----------------------------------------------------------------------------- long-tailed subsets


@pytest.fixture(scope="module")
def longtail_fixture(parity_dir):
    with open(parity_dir / "longtail_subsets.json") as f:
        return json.load(f)


PARITY_KEYS = ["cifar10_if100_class_sorted", "cifar10_if100_shuffled", "cifar10_if50_class_sorted",
               "cifar10_if50_shuffled", "cifar10_if100_step_class_sorted", "cifar100_if100_class_sorted",
               "cifar100_if100_shuffled", "cifar100_if50_class_sorted", "cifar100_if50_shuffled",
               "cifar100_if100_step_class_sorted"]


@pytest.mark.parametrize("key", PARITY_KEYS)
def test_longtail_subset_matches_reference(longtail_fixture, key):
    case = longtail_fixture[key]
    state = np.random.get_state()
    selected, counts = longtail_indices(case["source_labels"], case["num_classes"], case["imb_type"],
                                        case["imb_factor"], seed=case["seed"])
    assert counts == case["img_num_per_cls"]
    assert selected.tolist() == case["selected_source_indices"]
    assert np.asarray(case["source_labels"])[selected].tolist() == case["selected_labels"]
    assert np.array_equal(np.random.get_state()[1], state[1])  # the global numpy state is untouched


def test_longtail_fixture_has_every_case(longtail_fixture):
    assert sorted(longtail_fixture) == sorted(PARITY_KEYS)


def test_img_num_per_cls_totals():
    assert sum(get_img_num_per_cls(5000, 10, "exp", 0.01)) == 12406
    assert sum(get_img_num_per_cls(5000, 10, "exp", 0.02)) == 13996
    assert sum(get_img_num_per_cls(500, 100, "exp", 0.01)) == 10847
    assert sum(get_img_num_per_cls(500, 100, "exp", 0.02)) == 12608
    assert get_img_num_per_cls(5000, 10, "step", 0.01) == [5000] * 5 + [50] * 5
    assert get_img_num_per_cls(7, 4, "exp", 1.0) == [7, 7, 7, 7]


# ----------------------------------------------------------------------------- CIFAR-10 hub row order


def _original_labels(rng) -> np.ndarray:
    labels = np.repeat(np.arange(10), 5000)
    rng.shuffle(labels)
    labels[:10] = CIFAR10_FIRST_TEN  # class sizes shift by a few rows; irrelevant here
    return labels


def test_hub_order_is_restored_before_subsetting():
    rng = np.random.default_rng(1)
    original = _original_labels(rng)
    blocks = [original[(b - 1) * 10000: b * 10000] for b in (4, 3, 2, 5, 1)]  # the hub's block order
    hub = np.concatenate(blocks)
    perm, note = resolve_source_order(hub, "cifar10_lt", "auto")
    assert perm is not None and "restored" in note
    assert np.array_equal(hub[perm], original)
    assert np.array_equal(perm, hub_to_original_order(50000))
    # The subset drawn in the restored order, expressed as hub rows, holds the same images as
    # the reference's subset of the original rows.
    ref_rows, _ = longtail_indices(original, 10, "exp", 0.01)
    hub_rows, _ = longtail_indices(hub[perm], 10, "exp", 0.01)
    assert np.array_equal(hub[perm[hub_rows]], original[ref_rows])
    assert np.array_equal(perm[hub_rows], np.concatenate([np.arange(40000, 50000), np.arange(20000, 30000),
                                                          np.arange(10000, 20000), np.arange(0, 10000),
                                                          np.arange(30000, 40000)])[ref_rows])
    # As-is subsetting of the hub rows picks other images.
    assert not np.array_equal(longtail_indices(hub, 10, "exp", 0.01)[0], perm[hub_rows])


def test_source_order_cases():
    rng = np.random.default_rng(2)
    original = _original_labels(rng)
    assert resolve_source_order(original, "cifar10_lt", "auto")[0] is None
    assert "original pickle order" in resolve_source_order(original, "cifar10_lt", "original")[1]
    c100 = np.concatenate([CIFAR100_FIRST_TEN, np.repeat(np.arange(100), 500)[10:]])
    assert "original pickle order" in resolve_source_order(c100, "cifar100_lt", "auto")[1]
    grouped = np.repeat(np.arange(10), 5000)
    perm, note = resolve_source_order(grouped, "cifar10_lt", "original")
    assert perm is None and "grouped by class" in note
    scrambled = rng.permutation(original)
    perm, note = resolve_source_order(scrambled, "cifar10_lt", "auto")
    assert perm is None and note.startswith("WARNING") and "differ" in note
    with pytest.raises(ValueError, match="source_order=original"):
        resolve_source_order(scrambled, "cifar10_lt", "original")
    assert resolve_source_order(scrambled, "cifar10_lt", "as_is")[0] is None


def test_build_maps_a_restored_order_back_to_source_rows(tmp_path, monkeypatch, capsys):
    """build_datasets draws the subset in the restored order and reports source rows."""
    import data.build

    root = make_image_dataset(tmp_path / "c", [8] * 3, [1] * 3)
    reverse = None

    def fake_order(labels, dataset, mode):
        nonlocal reverse
        reverse = np.arange(len(labels))[::-1].copy()
        return reverse, "source order: test permutation restored"

    monkeypatch.setattr(data.build, "resolve_source_order", fake_order)
    train, _ = build_datasets(data_cfg(path=str(root), imb_factor=0.5, input_size=32))
    assert "test permutation restored" in capsys.readouterr().out
    import datasets as hf
    labels = np.asarray(hf.load_dataset(str(root))["train"]["label"][:])
    picked, counts = longtail_indices(labels[reverse], 3, "exp", 0.5)
    assert train.source_indices == reverse[picked].tolist()
    assert train.train_counts == counts == [8, 5, 4]


# ----------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One small dataset per layout: 3 classes, counts chosen so the frequency sort permutes them."""
    base = tmp_path_factory.mktemp("generated")
    counts_train, counts_test = [5, 12, 8], [3, 3, 3]
    out = {fmt: make_image_dataset(base / fmt, counts_train, counts_test, fmt=fmt)
           for fmt in ("parquet", "save_to_disk", "imagefolder")}
    out["split_files"] = make_split_files(base / "split_files", counts_train, counts_test)
    return out


def _check_generic(train, val, n_val=9):
    # original counts [5, 12, 8] -> project order: original 1, 2, 0
    assert train.class_map == [2, 0, 1]
    assert train.train_counts == [12, 8, 5] and len(train) == 25 and len(val) == n_val
    assert train.class_names == ["class_1", "class_2", "class_0"] == val.class_names
    assert Counter(train.targets) == {0: 12, 1: 8, 2: 5}
    inverse = {p: o for o, p in enumerate(train.class_map)}
    for ds in (train, val):
        for i in range(len(ds)):
            img, y = ds[i]
            assert img.mode == "RGB" and img.size == (32, 32) and y == ds.targets[i]
            assert nearest_class(img, 3) == inverse[y]  # the label follows its image through the map


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk", "imagefolder"])
def test_datasets_sources(generated, fmt):
    column = "image" if fmt == "imagefolder" else "img"
    train, val = build_datasets(data_cfg(dataset="generic", path=str(generated[fmt]), image_column=column,
                                         imb_factor=1.0))
    _check_generic(train, val)
    assert sorted(train.source_indices) == list(range(25)) and train.split == "train" and val.split == "test"


def test_single_parquet_file_with_holdout(generated):
    file = generated["parquet"] / "plain_text" / "train-00000-of-00001.parquet"
    train, val = build_datasets(data_cfg(dataset="generic", path=str(file), image_column="img",
                                         imb_factor=1.0, val_holdout=0.25))
    assert val.split == "train" == train.split
    assert sorted(train.source_indices + val.source_indices) == list(range(25))
    assert train.train_counts == [9, 6, 4] and len(val) == 6  # round(0.25 * n) per class
    assert train.class_map == [2, 0, 1]  # the map comes from the whole LT set, before the hold-out
    with pytest.raises(ValueError, match="available splits: train"):
        build_datasets(data_cfg(dataset="generic", path=str(file), image_column="img", imb_factor=1.0))


def test_split_files_source(generated, capsys):
    image_root, train_list, val_list = generated["split_files"]
    train, val = build_datasets(data_cfg(dataset="imagenet_lt", root=str(image_root),
                                         train_list=str(train_list), val_list=str(val_list)), verbose=False)
    assert capsys.readouterr().out == ""
    _check_generic(train, val)
    assert (train.split, val.split) == ("train_list", "val_list")


def test_generic_subsetting_and_cifar_defaults(tmp_path):
    root = make_image_dataset(tmp_path / "c100", [6] * 100, [1] * 100, size=8, label_column="fine_label")
    train, val = build_datasets(data_cfg(dataset="cifar100_lt", path=str(root), imb_factor=0.2,
                                         source_order="as_is", input_size=8))
    assert train.class_map is None and train.num_classes == 100 and len(val) == 100
    assert train.train_counts == get_img_num_per_cls(6, 100, "exp", 0.2)
    assert train.groups["head"] == list(range(36)) and train.groups["tail"] == list(range(71, 100))
    import datasets as hf
    labels = hf.load_dataset(str(root))["train"]["fine_label"][:]
    assert train.source_indices == longtail_indices(labels, 100, "exp", 0.2)[0].tolist()
    assert [labels[r] for r in train.source_indices] == train.targets


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_images_become_rgb(tmp_path, mode):
    root = make_image_dataset(tmp_path / mode, [4, 3], [2, 2], mode=mode)
    train, val = build_datasets(data_cfg(dataset="generic", path=str(root), image_column="img",
                                         imb_factor=1.0))
    assert all(train[i][0].mode == "RGB" for i in range(len(train)))


def test_dataloader_workers_and_pickle(generated):
    train, val = build_datasets(data_cfg(dataset="generic", path=str(generated["parquet"]),
                                         image_column="img", imb_factor=1.0, input_size=32))
    train.transform = build_transform(True, data_cfg(input_size=32), aug_cfg(train_crop="pad_crop"))
    clone = pickle.loads(pickle.dumps(train))
    assert clone.targets == train.targets and clone[3][0].shape == (3, 32, 32)
    loader = torch.utils.data.DataLoader(train, batch_size=8, num_workers=2, sampler=RASampler(train, seed=0))
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == len(train) and batches[0][0].shape == (8, 3, 32, 32)
    val.transform = None  # settable: evaluation may swap it
    assert isinstance(val[0][0], Image.Image)


# ----------------------------------------------------------------------------- real split files


def _one_image_root(tmp_path: Path, relative: str) -> Path:
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path, format="JPEG")
    return tmp_path


def test_imagenet_lt_split_file(shared_data_dir, tmp_path):
    split = shared_data_dir / "splits" / "ImageNet_LT_test.txt"
    paths, labels = read_split_file(split)
    assert len(paths) == 50000 and np.array_equal(np.bincount(labels), np.full(1000, 50))
    root = _one_image_root(tmp_path, paths[0])
    train, val = build_datasets(data_cfg(dataset="imagenet_lt", root=str(root), train_list=str(split),
                                         val_list=str(split)))
    assert train.num_classes == 1000 and len(train) == 50000 == len(val)
    assert train.class_map == list(range(1000))  # all tied: original label order, on any machine
    assert train.class_names[0] == "n01440764"
    assert [len(train.groups[g]) for g in ("head", "mid", "tail")] == [390, 445, 165]
    assert train[0][0].size == (40, 30)
    with pytest.raises(FileNotFoundError, match=paths[1].split("/")[-1]):
        train[1]


def test_inaturalist_split_file(shared_data_dir, tmp_path):
    split = shared_data_dir / "splits" / "iNaturalist18_val.txt"
    paths, labels = read_split_file(split)
    assert len(paths) == 24426 and np.array_equal(np.bincount(labels), np.full(8142, 3))
    root = _one_image_root(tmp_path, paths[0])
    train, _ = build_datasets(data_cfg(dataset="inat18", root=str(root), train_list=str(split),
                                       val_list=str(split)))
    assert train.num_classes == 8142 and train.class_map == list(range(8142))
    assert train.class_names[labels[0]] == Path(paths[0]).parent.name
    assert [len(train.groups[g]) for g in ("head", "mid", "tail")] == [842, 3701, 3599]


def test_split_file_tolerates_blank_lines(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("\na/x 0.jpg 1\n\nb/y.jpg 0\n   \n")
    paths, labels = read_split_file(f)
    assert paths == ["a/x 0.jpg", "b/y.jpg"] and labels.tolist() == [1, 0]


# ----------------------------------------------------------------------------- class map and groups


def test_class_map_is_stable_on_ties():
    assert frequency_class_map([5, 7, 5, 7, 1]) == [2, 0, 3, 1, 4]
    assert frequency_class_map([3, 3, 3]) == [0, 1, 2]
    counts = np.random.default_rng(0).integers(1, 5, size=2000)  # many ties
    class_map = frequency_class_map(counts)
    order = sorted(range(2000), key=lambda c: (-counts[c], c))
    assert [class_map[c] for c in order] == list(range(2000))


def test_groups_per_benchmark():
    sizes = lambda g: [len(g["head"]), len(g["mid"]), len(g["tail"])]  # noqa: E731
    g = class_groups("cifar10_lt", get_img_num_per_cls(5000, 10, "exp", 0.01), "reference")
    assert g == {"head": [0, 1, 2], "mid": [3, 4, 5, 6], "tail": [7, 8, 9]}
    assert sizes(class_groups("cifar100_lt", [1] * 100, "reference")) == [36, 35, 29]
    assert sizes(class_groups("imagenet_lt", [1] * 1000, "reference")) == [390, 445, 165]
    assert sizes(class_groups("inat18", [1] * 8142, "reference")) == [842, 3701, 3599]
    counts = [200, 101, 100, 20, 19, 5]
    assert class_groups("cifar10_lt", counts, "count") == {"head": [0, 1], "mid": [2, 3], "tail": [4, 5]}
    assert class_groups("generic", counts, "reference") == class_groups("generic", counts, "count")
    # CIFAR-10-LT IF100 under the count rule: 'few' is empty (the tail has 50+ images)
    assert sizes(class_groups("cifar10_lt", get_img_num_per_cls(5000, 10, "exp", 0.01), "count")) == [8, 2, 0]


# ----------------------------------------------------------------------------- transforms


def test_rrc_transform_is_the_reference_call():
    from timm.data import create_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation

    t = build_transform(True, data_cfg(input_size=224), aug_cfg())
    ref = create_transform(224, is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
                           interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
    assert repr(t) == repr(ref)
    assert isinstance(t.transforms[0], RandomResizedCropAndInterpolation)
    assert t.transforms[0].scale == (0.08, 1.0)
    assert not any("ColorJitter" in repr(s) for s in t.transforms)  # inactive with RandAugment
    out = t(Image.new("RGB", (32, 32), (10, 200, 30)))
    assert out.shape == (3, 224, 224)
    t = build_transform(True, data_cfg(input_size=224), aug_cfg(aa=None))
    assert any("ColorJitter" in repr(s) for s in t.transforms)


def test_pad_crop_transform():
    t = build_transform(True, data_cfg(input_size=32), aug_cfg(train_crop="pad_crop", normalize="cifar"))
    assert "RandomCrop(size=(32, 32), padding=4)" in repr(t.transforms[0])
    ra = t.transforms[2]
    assert ra.ops[0].hparams["translate_const"] == 14 and ra.ops[0].hparams["img_mean"] == (125, 123, 114)
    assert "RandomErasing" in repr(t.transforms[-1])
    assert t(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


def test_eval_transform_crop_ratio():
    from torchvision import transforms

    t = build_transform(False, data_cfg(input_size=224), aug_cfg())
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)  # 224 / 0.875
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert t(img).shape == (3, 224, 224)
    # ratio 1.0 at the image's own size: just ToTensor + Normalize
    t = build_transform(False, data_cfg(input_size=32), aug_cfg(eval_crop_ratio=1.0, normalize="cifar"))
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255
    expected = (pixels - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(t(img), expected, atol=1e-6)
    # the interpolation of the resize is aug.eval_interpolation: the same pixels as torchvision's
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 280, 3), dtype=np.uint8))
    for mode in ("bicubic", "bilinear"):
        t = build_transform(False, data_cfg(input_size=224), aug_cfg(eval_interpolation=mode))
        resized = transforms.CenterCrop(224)(transforms.Resize(256, transforms.InterpolationMode(mode))(big))
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1) / 255
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        assert torch.allclose(t(big), (pixels - mean[:, None, None]) / std[:, None, None], atol=1e-6), mode


def test_training_transform_survives_thousands_of_images():
    """RandAugment rand-m9-mstd0.5-inc1 + erasing on random images (Pillow 13 breaks posterize
    with 0 bits, which magnitude ~10 reaches; requirements pin Pillow 12.3)."""
    from timm.data.auto_augment import posterize

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(50)]
    posterize(images[0], 0)
    small = build_transform(True, data_cfg(input_size=32), aug_cfg(train_crop="pad_crop"))
    large = build_transform(True, data_cfg(input_size=224), aug_cfg())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker; intra-op threads only slow per-image ops
    try:
        for i in range(2500):
            assert small(images[i % 50]).shape == (3, 32, 32)
        for i in range(100):
            assert torch.isfinite(large(images[i % 50])).all()
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- samplers


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n,replicas", [(1000, 1), (1000, 2), (768, 3), (100, 2)])
def test_ra_sampler(n, replicas):
    samplers = [build_train_sampler(_Sized(n), aug_cfg(), replicas, r, seed=5) for r in range(replicas)]
    per_rank = [list(s) for s in samplers]
    expected_len = n // 256 * 256 // replicas if n >= 256 else -(-n // replicas)
    assert all(len(s) == expected_len == len(p) for s, p in zip(samplers, per_rank))
    # rank r takes positions r, r + R, ... of the list with every index 3 times in a row
    interleaved = [per_rank[r][i] for i in range(expected_len) for r in range(replicas)]
    counts = Counter(interleaved)
    assert len(set(counts.values()) - {3}) <= 2  # only the first and last index may be cut
    assert all(interleaved[i] == interleaved[i - (i % 3)] for i in range(len(interleaved)))
    # deterministic given (seed, epoch); a new order each epoch; the seed matters
    again = build_train_sampler(_Sized(n), aug_cfg(), replicas, 0, seed=5)
    assert list(again) == per_rank[0]
    again.set_epoch(1)
    assert list(again) != per_rank[0]
    assert list(build_train_sampler(_Sized(n), aug_cfg(), replicas, 0, seed=6)) != per_rank[0]


def test_ra_sampler_three_ranks_each_image_three_times():
    per_rank = [list(RASampler(_Sized(768), 3, r, num_repeats=3, seed=0)) for r in range(3)]
    assert per_rank[0] == per_rank[1] == per_rank[2]  # the same images, augmented on each rank
    assert len(set(per_rank[0])) == len(per_rank[0]) == 256


def test_plain_sampler():
    s = build_train_sampler(_Sized(50), aug_cfg(repeated_aug=False), 1, 0, seed=0)
    first = list(s)
    assert sorted(first) == list(range(50))
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(50))
    halves = [list(build_train_sampler(_Sized(50), aug_cfg(repeated_aug=False), 2, r, seed=0))
              for r in range(2)]
    assert sorted(halves[0] + halves[1]) == list(range(50))


# ----------------------------------------------------------------------------- bad input


def test_missing_path_and_files(tmp_path, generated):
    with pytest.raises(FileNotFoundError, match="data.path does not exist"):
        build_datasets(data_cfg(path=str(tmp_path / "nowhere")))
    image_root, train_list, val_list = generated["split_files"]
    with pytest.raises(FileNotFoundError, match="split file not found"):
        build_datasets(data_cfg(dataset="imagenet_lt", root=str(image_root),
                                train_list=str(tmp_path / "x.txt")))
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_datasets(data_cfg(dataset="imagenet_lt", root=str(tmp_path / "no"), train_list=str(train_list)))
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_datasets(data_cfg(dataset="imagenet_lt", root=str(tmp_path), train_list=str(train_list),
                                val_list=str(val_list)))
    with pytest.raises(ValueError, match="needs data.root"):
        build_datasets(data_cfg(dataset="imagenet_lt", train_list=str(train_list)))
    with pytest.raises(ValueError, match="has no hub copy"):
        build_datasets(data_cfg(dataset="inat18"))
    with pytest.raises(ValueError, match="no evaluation split"):
        build_datasets(data_cfg(dataset="imagenet_lt", root=str(image_root), train_list=str(train_list)))
    from data.summary import main as summary_main
    with pytest.raises(SystemExit) as exit_info:  # as the scripts: "error: ...", status 2
        summary_main([f"data.path={tmp_path / 'nowhere'}"])
    assert exit_info.value.code == 2


def test_hub_unreachable_offline():
    import datasets as hf

    if not hf.config.HF_HUB_OFFLINE:  # conftest sets offline mode; never download in tests
        pytest.skip("HF_HUB_OFFLINE is not set")
    with pytest.raises(ConnectionError, match="data.path"):
        build_datasets(data_cfg(dataset="cifar10_lt"))


def test_wrong_column_and_split(generated):
    with pytest.raises(ValueError, match="available columns: img, label"):
        build_datasets(data_cfg(dataset="generic", path=str(generated["parquet"]), imb_factor=1.0))
    with pytest.raises(ValueError, match="available columns: img, label"):
        build_datasets(data_cfg(path=str(generated["parquet"]), label_column="fine_label"))
    with pytest.raises(ValueError, match="split 'valid' not found.*available splits: train, test"):
        build_datasets(data_cfg(path=str(generated["parquet"]), val_split="valid"))


def test_bad_values():
    with pytest.raises(ValueError, match="imb_factor"):
        build_datasets(data_cfg(imb_factor=0.0))
    with pytest.raises(ValueError, match="imb_factor"):
        build_datasets(data_cfg(imb_factor=1.5))
    with pytest.raises(ValueError, match="val_holdout"):
        build_datasets(data_cfg(val_holdout=1.0))
    with pytest.raises(ValueError, match="unknown data keys: colour"):
        build_datasets({"colour": 1})


def test_corrupt_images(tmp_path):
    import datasets as hf

    good = class_image(0, 2, np.random.default_rng(0))
    features = hf.Features({"img": hf.Image(), "label": hf.ClassLabel(names=["a", "b"])})
    rows = {"img": [good, {"bytes": b"not an image", "path": None}, good], "label": [0, 1, 1]}
    path = tmp_path / "bad.parquet"
    hf.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    train, _ = build_datasets(data_cfg(dataset="generic", path=str(path), image_column="img", imb_factor=1.0,
                                       val_holdout=0.2))  # round(0.2 * 2) = 0: nothing held out
    assert train[train.source_indices.index(0)][1] == train.class_map[0] == 1  # "b" has more images
    with pytest.raises(ValueError, match="row 1 of the 'train' split"):
        train[train.source_indices.index(1)]
    # split files: the message names the file
    image_root, train_list, val_list = make_split_files(tmp_path / "sf", [2, 2], [1, 1])
    victim = train_list.read_text().split("\n")[1].split()[0]
    (image_root / victim).write_bytes(b"\xff\xd8\xff garbage")
    train, _ = build_datasets(data_cfg(dataset="imagenet_lt", root=str(image_root),
                                       train_list=str(train_list), val_list=str(val_list)))
    with pytest.raises(ValueError, match=victim.split("/")[-1]):
        train[train.source_indices.index(1)]


def test_labels_out_of_range_and_empty_classes(tmp_path, generated):
    image_root, train_list, val_list = generated["split_files"]
    lines = train_list.read_text().split("\n")
    bad_val = tmp_path / "val.txt"
    bad_val.write_text(val_list.read_text() + "\n" + lines[0].split()[0] + " 7")
    with pytest.raises(ValueError, match="label 7, outside the class range 0..2"):
        build_datasets(data_cfg(dataset="imagenet_lt", root=str(image_root), train_list=str(train_list),
                                val_list=str(bad_val)))
    negative = tmp_path / "neg.txt"
    negative.write_text("\n".join(lines + [lines[0].split()[0] + " -1"]))
    with pytest.raises(ValueError, match="label -1"):
        build_datasets(data_cfg(dataset="imagenet_lt", root=str(image_root), train_list=str(negative),
                                val_list=str(val_list)))
    no_class_1 = tmp_path / "gap.txt"
    no_class_1.write_text("\n".join(line for line in lines if not line.endswith(" 1")))
    with pytest.raises(ValueError, match="no training images.*1 \\(1\\)"):
        build_datasets(data_cfg(dataset="imagenet_lt", root=str(image_root), train_list=str(no_class_1),
                                val_list=str(val_list)))
    # CIFAR-style subsetting that leaves a class empty: int(10 * 0.01) = 0 for the last class
    root = make_image_dataset(tmp_path / "small", [10] * 4, [1] * 4, size=8)
    with pytest.raises(ValueError, match="no training images after subsetting.*imb_factor=0.01"):
        build_datasets(data_cfg(path=str(root), source_order="as_is"))


# ----------------------------------------------------------------------------- summary command


def test_summary_on_shared_cifar10(shared_data_dir, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n  dataset: cifar10_lt\n  imb_factor: 0.01\noptim:\n  lr: 5e-4\n")
    out = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "data.summary", "--config", str(config),
                             f"data.path={shared_data_dir / 'cifar10-jpeg'}", "--json", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "truck" in result.stdout and "12406 training images" in result.stdout
    summary = json.loads(out.read_text())
    assert summary["num_classes"] == 10
    assert summary["train_counts"] == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(summary["source_indices"]) == 12406 == sum(summary["train_counts"])
    assert summary["groups"] == {"head": [0, 1, 2], "mid": [3, 4, 5, 6], "tail": [7, 8, 9]}
    # the shared copy is grouped by class: the reference's subset is rows c * 5000 + p
    assert summary["source_indices"][:3] == [398, 3833, 4836]
