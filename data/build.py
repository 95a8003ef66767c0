"""``build_datasets``: the long-tailed train set and the evaluation set, in the project's labels.

Pipeline (docs/recipe.md section 5):
1. load the source (``data/sources.py``): labels of every row plus lazily opened images;
2. CIFAR-10/100-LT: restore the original row order where the source is a known permutation,
   then draw the reference's exponential (or step) subset, class by class; the labels are
   then already frequency-sorted, so there is no class map (``class_map = None``);
   ImageNet-LT / iNaturalist-2018: the source is long-tailed already, no subsetting;
   ``generic``: subsetting only if ``imb_factor < 1`` was set explicitly (``finalize_data``);
3. non-CIFAR: sort classes by training count (ties by original label) and remap every label;
4. optionally hold out part of each class's training images as the validation split;
5. count the training images per class and form the head / mid / tail groups.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .benchmarks import BENCHMARKS, DATASETS, benchmark
from .groups import check_group_config, class_groups, group_rule, is_int
from .longtail import (frequency_class_map, get_img_num_per_cls, holdout_split, longtail_indices,
                       resolve_source_order)
from .sources import load_source
from errors import DataError
from utils import check

DATA_SPEC = {
    "dataset": ("cifar10_lt", "benchmark: sets the hub name, column names, label order rules and group "
                              "thresholds",
                DATASETS),
    "path": (None, "local copy: a folder datasets.load_dataset reads (e.g. ../shared/data/cifar10-jpeg), "
                   "a save_to_disk folder, or parquet file/folder; null = the hub name", str),
    "hub_name": (None, "hub dataset name; null = uoft-cs/cifar10 or uoft-cs/cifar100 by dataset", str),
    "image_column": (None, "image column; null = 'img' for CIFAR, 'image' otherwise", str),
    "label_column": (None, "label column; null = 'fine_label' for cifar100_lt, 'label' otherwise", str),
    "train_split": ("train", "training split name"),
    "val_split": ("test", "evaluation split name (the reference evaluates on the test split)"),
    "imb_type": ("exp", "CIFAR-style imbalance profile", ("exp", "step")),
    "imb_factor": (0.01, "n_min / n_max as the reference's --imb_factor, in (0, 1]; 1.0 = keep every "
                         "image; for CIFAR-style subsetting: cifar*_lt, and generic only when set "
                         "explicitly (your data is used as it is otherwise)", float),
    "subset_seed": (0, "numpy seed of the subset (the reference: 0)"),
    "source_order": ("auto", "CIFAR row order before subsetting: the original pickle order ('auto' "
                             "restores it, 'original' insists on it) or the rows as stored",
                     ("auto", "original", "as_is")),
    "root": (None, "image root the split files' paths are relative to", str),
    "train_list": (None, "ImageNet-LT / iNat training split file ('relative/path label' lines)", str),
    "val_list": (None, "ImageNet-LT / iNat evaluation split file", str),
    "groups": ("reference", "head/mid/tail: the reference's class-index ranges or the count rule "
                            "(many > 100, few < 20 training images)", ("reference", "count")),
    "group_thresholds": (None, "[many, few] of the count rule: head > many, tail < few training "
                               "images; null = [100, 20]", list),
    "group_boundaries": (None, "[c0, c1] of groups=reference: head [0, c0), mid [c0, c1), tail [c1, C) "
                               "of the sorted classes; null = the benchmark's", list),
    "val_holdout": (0.0, "fraction of each class's LT training images held out as the validation split; "
                         "0 = evaluate on val_split like the reference", float),
    "num_workers": (2, "DataLoader worker processes"),
    "input_size": (224, "model input resolution; the transforms resize / crop to it"),
}

# The largest input resolution accepted anywhere (data.input_size, a teacher checkpoint's stored
# data.input_size, distill/eval.teacher_input_size, model.img_size). 4096 is several times the
# largest resolution published CNNs and ViTs are trained or tested at (ImageNet models: 224-600,
# a few 800), while one 3 x 4096 x 4096 float image is already 200 MB (a batch of 128: 26 GB):
# anything above is a typo or a corrupt or hostile file, and refusing it up front keeps
# evaluate.py from resizing every image to 100000 x 100000 and a run from allocating a
# gigantic teacher input or position embedding.
MAX_INPUT_SIZE = 4096
# Keys naming a file, folder, hub dataset, column or split: null means "the default", an empty
# string is always a mistake (data.path='' would read the current folder as a dataset).
_NAME_KEYS = ("path", "hub_name", "image_column", "label_column", "train_split", "val_split",
              "root", "train_list", "val_list")


# Keys naming local files or folders: stored absolute, so that a run's stored config (and
# evaluate.py reading it from a checkpoint) finds them from any working folder.
_PATH_KEYS = ("path", "root", "train_list", "val_list")


def finalize_data(cfg: dict, explicit_keys: set[str]) -> None:
    """Defaults of the ``data`` section that depend on what the user set (``parse_config``'s
    ``finalize``), written into ``cfg`` so the stored config says what ran:

    - ``generic`` data is the user's own, usually long-tailed already: without an explicit
      ``data.imb_factor`` (config file or command line) every image is kept (1.0); the CIFAR
      default 0.01 would silently draw a second long-tailed subset of it;
    - relative paths become absolute (from the current folder)."""
    d = cfg.get("data")
    if not isinstance(d, dict):
        return
    if d.get("dataset") == "generic" and "data.imb_factor" not in explicit_keys:
        d["imb_factor"] = 1.0
    for key in _PATH_KEYS:
        if isinstance(d.get(key), str) and d[key].strip():
            d[key] = os.path.abspath(os.path.expanduser(d[key]))


def check_input_size(value, key: str) -> None:
    """ConfigError naming ``key`` unless ``value`` is a whole number of pixels in
    [1, MAX_INPUT_SIZE]."""
    check(is_int(value) and 1 <= value <= MAX_INPUT_SIZE, key,
          f"must be a whole number of pixels in [1, {MAX_INPUT_SIZE}], got {value!r}")


def validate_data_config(d: dict) -> None:
    """Range checks of the ``data`` section (ConfigError naming the key), for values typed on
    the command line and values read from files (a config, a checkpoint's stored config) alike.
    Missing keys are skipped (a partial section falls back to DATA_SPEC's defaults)."""
    if d.get("input_size") is not None:
        check_input_size(d["input_size"], "data.input_size")
    if d.get("imb_factor") is not None:
        check(0.0 < float(d["imb_factor"]) <= 1.0, "data.imb_factor",
              f"must be in (0, 1] (n_min / n_max), got {d['imb_factor']}")
    if d.get("val_holdout") is not None:
        check(0.0 <= float(d["val_holdout"]) < 1.0, "data.val_holdout",
              f"must be in [0, 1), got {d['val_holdout']}")
    if "num_workers" in d:
        check(is_int(d["num_workers"]) and d["num_workers"] >= 0, "data.num_workers",
              f"must be an integer >= 0, got {d['num_workers']!r}")
    if "subset_seed" in d:  # numpy's RandomState takes seeds in [0, 2**32)
        check(is_int(d["subset_seed"]) and 0 <= d["subset_seed"] < 2**32, "data.subset_seed",
              f"must be an integer in [0, 2**32), got {d['subset_seed']!r}")
    for key in _NAME_KEYS:
        value = d.get(key)
        if isinstance(value, str):
            check(value.strip() != "", f"data.{key}",
                  "must not be empty (null means the default"
                  + ("; an empty path would read the current folder)" if key == "path" else ")"))


CIFAR = tuple(name for name, row in BENCHMARKS.items() if row.cifar_subset)


def expected_train_images(d: dict) -> int | None:
    """Training images the ``data`` section gives, when known without reading the data: the
    hub's CIFAR-10/100 (no data.path) subset by the reference's rule, no hold-out; else None."""
    facts = benchmark(d.get("dataset"))
    if facts.source_per_class is None or d.get("path") is not None \
            or d.get("train_list") is not None or d.get("val_holdout"):
        return None
    imb = d.get("imb_factor", DATA_SPEC["imb_factor"][0])
    if not isinstance(imb, (int, float)) or not 0 < imb <= 1:
        return None  # validate_data_config names it
    return sum(get_img_num_per_cls(facts.source_per_class, facts.num_classes, d.get("imb_type", "exp"),
                                   float(imb)))


class LongTailDataset:
    """Rows ``source_indices`` of one source split, with labels in the project's class order.

    A plain map-style dataset (``__len__`` / ``__getitem__``, all a DataLoader needs): not a
    ``torch.utils.data.Dataset`` subclass, so that building it (``python -m data.summary``)
    does not import torch.

    ``__getitem__`` opens the image (RGB) only when asked, then applies ``transform`` (a plain
    attribute: evaluation code may swap it). Picklable for DataLoader workers: it holds a
    memory-mapped ``datasets`` table or a list of file names, never decoded images.
    """

    def __init__(self, source, source_indices: Sequence[int], targets: Sequence[int], *, split: str,
                 num_classes: int, class_names: list[str], train_counts: list[int],
                 class_map: list[int] | None, groups: dict[str, list[int]],
                 transform: Callable | None = None):
        self.source = source
        self.source_indices = [int(i) for i in source_indices]
        self.targets = [int(t) for t in targets]
        self.split = split  # which source split source_indices refer to
        self.num_classes = num_classes
        self.class_names = class_names
        self.train_counts = train_counts
        self.class_map = class_map
        self.groups = groups
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int, lazy_jpeg: bool = False) -> Image.Image:
        return self.source.load(self.source_indices[index], lazy_jpeg)

    def __getitem__(self, index: int):
        # A transform with lazy_jpeg decodes JPEGs itself, at the scale its crop needs.
        img = self.load_image(index, getattr(self.transform, "lazy_jpeg", False))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def resolve_data_config(data_cfg: dict) -> dict:
    """``data_cfg`` over DATA_SPEC's defaults, with its values checked; raises ValueError."""
    unknown = set(data_cfg) - set(DATA_SPEC)
    if unknown:
        raise DataError(f"unknown data keys: {', '.join(sorted(unknown))}; known: {', '.join(DATA_SPEC)}")
    cfg = {key: leaf[0] for key, leaf in DATA_SPEC.items()}
    cfg.update(data_cfg)
    if not 0.0 < float(cfg["imb_factor"]) <= 1.0:
        raise DataError(f"data.imb_factor must be in (0, 1] (n_min / n_max), got {cfg['imb_factor']}")
    if not 0.0 <= float(cfg["val_holdout"]) < 1.0:
        raise DataError(f"data.val_holdout must be in [0, 1), got {cfg['val_holdout']}")
    if cfg["dataset"] not in DATA_SPEC["dataset"][2]:
        raise DataError(f"data.dataset={cfg['dataset']!r} is not one of {DATA_SPEC['dataset'][2]}")
    validate_data_config(cfg)
    check_group_config(cfg["groups"], cfg["group_thresholds"], cfg["group_boundaries"], cfg["dataset"])
    return cfg


def build_datasets(data_cfg: dict, train_transform: Callable | None = None,
                   eval_transform: Callable | None = None, *,
                   verbose: bool = True) -> tuple[LongTailDataset, LongTailDataset]:
    """``(dataset_train, dataset_val)`` for the ``data`` config section (see DATA_SPEC).

    Both return ``(transformed image, project label)`` and carry ``targets``, ``num_classes``,
    ``class_names``, ``train_counts`` (images per class in the training set as used, i.e.
    after subsetting and any hold-out), ``class_map``, ``groups`` and ``source_indices`` (rows
    of the source split named by ``.split``). Missing keys take DATA_SPEC's defaults. Errors
    (missing files, wrong columns or splits, labels out of range, empty classes) raise before
    anything is returned. ``verbose=False`` silences the ``[data]`` lines (non-main ranks).
    """
    def _log(message: str) -> None:
        if verbose:
            print(f"[data] {message}", flush=True)

    cfg = resolve_data_config(data_cfg)
    dataset = cfg["dataset"]
    raw = load_source(cfg)
    _log(f"source: {raw.description}")
    num_classes = len(raw.class_names)
    labels = raw.train.labels

    # ---- 2. long-tailed subset (CIFAR-style) or the whole training split
    imb = float(cfg["imb_factor"])
    subset_note, order_note = "", None
    if dataset in CIFAR or (dataset == "generic" and imb < 1.0):
        order, order_note = (resolve_source_order(labels, dataset, cfg["source_order"]) if dataset in CIFAR
                             else (None, "source order: rows used as they are"))
        _log(order_note)
        canonical = labels if order is None else labels[order]
        picked, _ = longtail_indices(canonical, num_classes, cfg["imb_type"], imb, cfg["subset_seed"])
        rows = picked if order is None else order[picked]
        subset_note = f" after subsetting (imb_type={cfg['imb_type']}, imb_factor={imb})"
        _log(f"long-tailed subset (data.imb_factor={imb}, imb_type={cfg['imb_type']}): "
             f"{len(rows)} of {len(labels)} training images kept")
    else:
        if dataset == "generic":
            _log("generic: every training image used, as given (data.imb_factor=1.0; set it "
                 "explicitly, e.g. 0.01, to draw a CIFAR-style long-tailed subset)")
        if dataset in BENCHMARKS and imb != 1.0:  # a named benchmark that is not a CIFAR subset
            _log(f"{dataset} is long-tailed as published: imb_factor={imb} ignored, "
                 f"every training image used")
        rows = np.arange(len(labels), dtype=np.int64)
    row_labels = labels[rows]
    counts = np.bincount(row_labels, minlength=num_classes)
    empty = np.where(counts == 0)[0]
    if len(empty):
        names = ", ".join(f"{c} ({raw.class_names[c]})" for c in empty[:10])
        raise DataError(f"{len(empty)} class(es) have no training images{subset_note}: {names}"
                         f"{' ...' if len(empty) > 10 else ''}")

    # ---- 3. class order: CIFAR-LT labels are frequency-sorted by construction
    if dataset in CIFAR:
        class_map = None
        targets = row_labels
        class_names = list(raw.class_names)
    else:
        class_map = frequency_class_map(counts)
        lookup = np.asarray(class_map, dtype=np.int64)
        targets = lookup[row_labels]
        class_names = [""] * num_classes
        for original, project in enumerate(class_map):
            class_names[project] = raw.class_names[original]

    # ---- 4. evaluation split: the source's val split, or held-out training images
    train_split = cfg["train_split"] if cfg.get("train_list") is None else "train_list"
    holdout = float(cfg["val_holdout"])
    if holdout > 0:
        keep, held = holdout_split(targets, num_classes, holdout, seed=cfg["subset_seed"])
        val_source, val_rows, val_targets = raw.train.source, rows[held], targets[held]
        val_split = train_split
        rows, targets = rows[keep], targets[keep]
        _log(f"validation: {len(held)} training images held out ({holdout:.0%} of each class)")
    else:
        if raw.val is None:
            raise DataError("no evaluation split: set data.val_split / data.val_list, "
                             "or data.val_holdout > 0")
        val_source, val_rows = raw.val.source, np.arange(len(raw.val.labels), dtype=np.int64)
        val_targets = raw.val.labels if class_map is None else np.asarray(class_map)[raw.val.labels]
        val_split = cfg["val_split"] if cfg.get("train_list") is None else "val_list"

    # ---- 5. counts of the training set actually used, and groups
    train_counts = np.bincount(targets, minlength=num_classes).tolist()
    group_args = (cfg["groups"], cfg["group_thresholds"], cfg["group_boundaries"])
    groups = class_groups(dataset, train_counts, *group_args)
    rule = group_rule(dataset, num_classes, *group_args)  # in words, e.g. "reference ranges [3, 7)"
    expected = benchmark(dataset).num_classes
    if cfg["groups"] == "reference" and cfg["group_boundaries"] is None and expected not in (None, num_classes):
        _log(f"WARNING: the reference's group ranges assume {expected} classes, this dataset has "
             f"{num_classes}: ranges clipped")
    common = dict(num_classes=num_classes, class_names=class_names, train_counts=train_counts,
                  class_map=class_map, groups=groups)
    dataset_train = LongTailDataset(raw.train.source, rows, targets, split=train_split,
                                    transform=train_transform, **common)
    dataset_train.source_order_note = order_note  # how the CIFAR subset's row order was chosen
    dataset_val = LongTailDataset(val_source, val_rows, val_targets, split=val_split,
                                  transform=eval_transform, **common)
    dataset_train.group_rule = dataset_val.group_rule = rule  # the groups' rule in words
    _log(f"{dataset}: {num_classes} classes, {len(dataset_train)} training images (max {max(train_counts)}, "
         f"min {min(train_counts)}), {len(dataset_val)} evaluation images; groups by {rule}: "
         + ", ".join(f"{k} {len(v)}" for k, v in groups.items()))
    return dataset_train, dataset_val
