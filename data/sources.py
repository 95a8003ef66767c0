"""Where images and labels come from: ``datasets`` splits (hub or local copy) or split files.

A source gives, per split, the labels of every row (original label space) and a picklable
``ImageSource`` that opens row ``i`` as an RGB PIL image on demand. Nothing is decoded up
front: the ``datasets`` table is memory-mapped Arrow and the image column is read undecoded
(``Image(decode=False)``), so a DataLoader worker decodes only the rows it is asked for.

Supported sources (``data`` config section):
- a hub name (``hub_name``, default ``uoft-cs/cifar10`` / ``uoft-cs/cifar100``);
- ``path``: a folder ``datasets.load_dataset`` reads (the hub layout with parquet files, or an
  image folder ``split/class/*.png``), a ``save_to_disk`` folder, or a single parquet file
  (then it is the train split);
- ``train_list`` / ``val_list`` split files (``relative/path label`` per line, the
  ImageNet-LT / iNaturalist-2018 format) with images under ``root``.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from errors import DataError
from .benchmarks import benchmark


def to_rgb(img: Image.Image, what: str) -> Image.Image:
    """``img`` as an 8-bit RGB image. Grayscale, RGBA and palette images go through
    ``convert('RGB')``. High-bit-depth grayscale is scaled, not clipped (PIL's convert
    saturates every value above 255 to white):

    - 16-bit (``I;16*``, e.g. 16-bit PNGs): value / 257, so 0..65535 maps onto 0..255;
    - 32-bit integer (``I``): PIL's mode for 16-bit data from several decoders, so taken as
      0..65535 as well; values outside that range are refused (their scale is unknown);
    - 32-bit float (``F``): taken as 0..1 (x 255); values outside [0, 1] or NaN are refused.

    Refusals are DataErrors naming ``what``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        pixels = np.asarray(img)
        if mode == "F":
            if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
                raise DataError(f"cannot read image {what}: 32-bit float pixels (PIL mode F) outside "
                                f"[0, 1] (min {np.nanmin(pixels):g}, max {np.nanmax(pixels):g}); their "
                                f"scale is unknown, convert the image to 8 or 16 bits")
            scaled = pixels.astype(np.float64) * 255.0
        else:
            if mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
                raise DataError(f"cannot read image {what}: 32-bit integer pixels (PIL mode I) outside "
                                f"0..65535 (min {pixels.min()}, max {pixels.max()}); their scale is "
                                f"unknown, convert the image to 8 or 16 bits")
            scaled = pixels.astype(np.float64) / 257.0
        gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    return img.convert("RGB")


def open_rgb(fp: Any, what: str, lazy_jpeg: bool = False) -> Image.Image:
    """Open an image file or file object as RGB (docs/recipe.md section 5: ``convert('RGB')``,
    high-bit-depth grayscale scaled by ``to_rgb``).

    Grayscale, RGBA and palette images are converted. A missing or unreadable image raises an
    error that names ``what`` (the file path or the split and row), not a bare PIL error.
    ``lazy_jpeg``: an RGB JPEG comes back undecoded, for a crop that decodes only the scale it
    needs (data/transforms.py, DraftRandomResizedCrop, which names ``what`` on a decode error).
    """
    try:
        img = Image.open(fp)
        if lazy_jpeg and img.format == "JPEG" and img.mode == "RGB":
            img.info["what"] = what
            return img
        img.load()  # decodes and, for a file path, closes the file
        if img.mode == "RGB":
            return img  # skips convert's copy: a third of the decode time at 32x32
        rgb = to_rgb(img, what)
        img.close()
        return rgb
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image not found: {what}") from e
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {what}: {type(e).__name__}: {e}") from e


class HFImageSource:
    """Images of one ``datasets`` split, read undecoded and opened row by row."""

    def __init__(self, ds, image_column: str, split: str):
        import datasets

        self.split = split
        self.image_column = image_column
        ds = ds.select_columns([image_column])
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, row: int, lazy_jpeg: bool = False) -> Image.Image:
        value = self.ds[int(row)][self.image_column]
        what = f"row {row} of the {self.split!r} split"
        if isinstance(value, dict):  # datasets Image: {'bytes': ..., 'path': ...}
            if value.get("bytes") is not None:
                name = f" ({value['path']})" if value.get("path") else ""
                return open_rgb(io.BytesIO(value["bytes"]), what + name, lazy_jpeg)
            if value.get("path"):
                return open_rgb(value["path"], f"{value['path']} ({what})", lazy_jpeg)
            raise DataError(f"cannot read image {what}: neither bytes nor a path stored")
        if isinstance(value, (bytes, bytearray)):
            return open_rgb(io.BytesIO(value), what, lazy_jpeg)
        if isinstance(value, str):
            return open_rgb(value, f"{value} ({what})", lazy_jpeg)
        if isinstance(value, Image.Image):
            return to_rgb(value, what)
        raise DataError(f"cannot read image {what}: unsupported value of type {type(value).__name__}")


class FileListSource:
    """Images named by a split file, relative to ``root``."""

    def __init__(self, root: str | os.PathLike, paths: list[str]):
        self.root = str(root)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, row: int, lazy_jpeg: bool = False) -> Image.Image:
        path = os.path.join(self.root, self.paths[int(row)])
        return open_rgb(path, path, lazy_jpeg)


@dataclass
class RawSplit:
    """One split as stored: an image source and each row's label (original label space)."""

    source: Any  # HFImageSource or FileListSource
    labels: np.ndarray  # int64, index into class_names of the RawSource
    description: str


@dataclass
class RawSource:
    train: RawSplit
    val: RawSplit | None
    class_names: list[str]  # original label space: label i is class_names[i]
    description: str


# ----------------------------------------------------------------------------- split files


def read_split_file(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Parse ``relative/path label`` lines; blank lines and a missing final newline are fine."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    paths, labels = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)  # the label is the last field; paths may hold spaces
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {text!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{path}:{lineno}: the label {parts[1]!r} is not an integer") from None
            paths.append(parts[0])
            labels.append(label)
    if not paths:
        raise DataError(f"split file {path} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def check_label_spread(labels: np.ndarray, where) -> int:
    """The class count of integer labels taken as class indices (max + 1), after refusing a
    largest label far beyond the number of distinct labels (more than 10 x distinct + 1000):
    one stray label of 1e9 would otherwise make a billion classes (and their names) before
    anything is said. ``where(row)`` names a row for the message (a file and line, a split
    and row)."""
    if not len(labels):
        return 0
    top = max(int(labels.max()), -1)
    distinct = len(np.unique(labels))
    if top + 1 > 10 * distinct + 1000:
        row = int(np.argmax(labels))
        raise DataError(f"{where(row)} has label {top}, far beyond the {distinct} distinct labels of "
                        f"the split: integer labels are class indices 0..C-1; fix or renumber them "
                        f"(or store the labels as strings, which are mapped to indices)")
    return top + 1


def _names_from_paths(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """Class i's name: the parent folder of its first training file (an ImageNet wnid, an
    iNaturalist category id), or ``str(i)`` where there is none."""
    names = [str(i) for i in range(num_classes)]
    seen = set()
    for p, y in zip(paths, labels.tolist()):
        if y not in seen and 0 <= y < num_classes:
            seen.add(y)
            parent = Path(p).parent.name
            if parent:
                names[y] = parent
    return names


def load_split_files(cfg: dict) -> RawSource:
    """ImageNet-LT / iNaturalist style: ``train_list`` (+ ``val_list``) under ``root``."""
    if cfg.get("path") is not None:
        raise DataError("set either data.path or data.train_list (split files under data.root), not both")
    if cfg.get("root") is None:
        raise DataError("data.train_list needs data.root, the folder the listed paths are relative to")
    root = Path(cfg["root"]).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root is not a folder: {root}")
    train_paths, train_labels = read_split_file(cfg["train_list"])
    num_classes = check_label_spread(train_labels, lambda row: f"{cfg['train_list']}: {train_paths[row]}")
    class_names = _names_from_paths(train_paths, train_labels, num_classes)
    splits = {"train": (cfg["train_list"], train_paths, train_labels)}
    if cfg.get("val_list") is not None:
        splits["val"] = (cfg["val_list"],) + read_split_file(cfg["val_list"])
    raw = {}
    for key, (list_file, paths, labels) in splits.items():
        bad = np.where((labels < 0) | (labels >= num_classes))[0]
        if len(bad):
            raise DataError(f"{list_file}: {paths[bad[0]]} has label {labels[bad[0]]}, outside the "
                             f"class range 0..{num_classes - 1} of {cfg['train_list']}")
        # One stat per split catches a wrong root before training starts; a missing file
        # further down is reported by __getitem__ with its path.
        first = root / paths[0]
        if not first.exists():
            raise FileNotFoundError(f"{list_file} names {paths[0]}, but {first} does not exist "
                                    f"(is data.root={cfg['root']} right?)")
        raw[key] = RawSplit(FileListSource(root, paths), labels, f"{list_file} ({len(paths)} images)")
    return RawSource(raw["train"], raw.get("val"), class_names, f"split files under {root}")


# ----------------------------------------------------------------------------- datasets library


def _load_dataset_dict(cfg: dict) -> tuple[dict, str]:
    """``{split name: datasets.Dataset}`` from the hub or a local copy, and a description."""
    import datasets

    path = cfg.get("path")
    if path is None:
        name = cfg.get("hub_name") or benchmark(cfg["dataset"]).hub_name
        if name is None:
            raise DataError(f"data.dataset={cfg['dataset']} has no hub copy: set data.path (a local "
                             f"dataset) or data.train_list + data.root (split files)")
        try:
            return dict(datasets.load_dataset(name)), f"hub dataset {name}"
        except ConnectionError as e:
            raise ConnectionError(f"could not load {name!r} from the Hugging Face hub ({e}); "
                                  f"without network set data.path to a local copy") from e
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path does not exist: {p}")
    if p.is_file():
        if p.suffix != ".parquet":
            raise DataError(f"data.path {p} is a file but not .parquet; give a parquet file, "
                             f"a folder datasets.load_dataset reads, or a save_to_disk folder")
        ds = datasets.load_dataset("parquet", data_files={"train": str(p)})
        return dict(ds), f"parquet file {p} (as the train split)"
    if (p / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(p))), f"save_to_disk folder {p}"
    if (p / "state.json").is_file():  # a single saved Dataset: the train split
        return {"train": datasets.load_from_disk(str(p))}, f"save_to_disk folder {p} (as the train split)"
    return dict(datasets.load_dataset(str(p))), f"local dataset {p}"


def _labels_of(ds, label_column: str) -> list:
    return ds[label_column][:]


def load_hf(cfg: dict) -> RawSource:
    """A ``datasets`` source: checks columns and splits, and puts labels in one index space.

    Label space: a ClassLabel feature gives the class names; integer labels are taken as
    class indices (``num_classes = max + 1``, as split files); other labels (strings) are
    mapped to the sorted unique training values.
    """
    import datasets

    splits, description = _load_dataset_dict(cfg)
    dataset = cfg["dataset"]
    image_column = cfg.get("image_column") or benchmark(dataset).image_column
    label_column = cfg.get("label_column") or benchmark(dataset).label_column
    wanted = [cfg["train_split"]] + ([cfg["val_split"]] if cfg.get("val_holdout", 0.0) == 0 else [])
    for split in wanted:
        if split not in splits:
            raise DataError(f"split {split!r} not found in {description}; available splits: "
                             f"{', '.join(splits)} (set data.train_split / data.val_split, or "
                             f"data.val_holdout > 0 to hold out part of the training set)")
    train = splits[cfg["train_split"]]
    for key, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in train.column_names:
            hint = (f" (data.dataset={dataset}{', the default,' if dataset == 'cifar10_lt' else ''} "
                    f"expects CIFAR's columns; for your own data set data.dataset=generic)"
                    if benchmark(dataset).cifar_subset else "")
            raise DataError(f"data.{key}={column!r} is not a column of {description}; available "
                             f"columns: {', '.join(train.column_names)}{hint}")

    feature = train.features[label_column]
    train_values = _labels_of(train, label_column)
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
        to_index = None
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in train_values[:1000]):
        num_classes = check_label_spread(np.asarray(train_values, dtype=np.int64), lambda row: (
            f"row {row} of split {cfg['train_split']!r} of {description}"))
        class_names = [str(i) for i in range(num_classes)]
        to_index = None
    else:
        class_names = sorted({str(v) for v in train_values})
        lookup = {name: i for i, name in enumerate(class_names)}
        to_index = lambda values: [lookup.get(str(v), -1) for v in values]  # noqa: E731

    def make_split(name: str, values: list) -> RawSplit:
        ds = splits[name]
        if image_column not in ds.column_names or label_column not in ds.column_names:
            raise DataError(f"split {name!r} of {description} lacks column {image_column!r} or "
                             f"{label_column!r}; available: {', '.join(ds.column_names)}")
        labels = np.asarray(to_index(values) if to_index else values, dtype=np.int64)
        bad = np.where((labels < 0) | (labels >= len(class_names)))[0]
        if len(bad):
            raise DataError(f"split {name!r} of {description}: row {bad[0]} has label "
                             f"{values[bad[0]]!r}, outside the {len(class_names)} training classes")
        return RawSplit(HFImageSource(ds, image_column, name), labels,
                        f"{description}, split {name!r} ({len(ds)} rows)")

    train_split = make_split(cfg["train_split"], train_values)
    val_split = None
    if cfg["val_split"] in splits and cfg.get("val_holdout", 0.0) == 0:
        val_split = make_split(cfg["val_split"], _labels_of(splits[cfg["val_split"]], label_column))
    return RawSource(train_split, val_split, class_names, description)


def load_source(cfg: dict) -> RawSource:
    """Split files when ``data.train_list`` is set, else the ``datasets`` source."""
    if cfg.get("train_list") is not None:
        return load_split_files(cfg)
    return load_hf(cfg)
