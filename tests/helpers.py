"""Tiny generated image datasets for tests, in the layouts the data package reads.

``make_image_dataset`` writes class-coloured images (each class its own hue plus per-image
noise and brightness, so a small model can learn them in a few steps) as
- ``parquet``: the hub's layout, ``<root>/plain_text/{train,test}-00000-of-00001.parquet``
  with ``Image`` and ``ClassLabel`` features, so ``datasets.load_dataset(root)`` reads it;
- ``save_to_disk``: a ``DatasetDict`` saved with ``save_to_disk``;
- ``imagefolder``: ``<root>/{train,test}/<class name>/<n>.png`` (columns ``image`` / ``label``
  whatever ``image_column`` / ``label_column`` say, as the imagefolder builder names them).
``make_split_files`` writes image files plus ImageNet-LT style split files.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image


def class_names(num_classes: int) -> list[str]:
    """``class_0 ...`` zero-padded so that sorting the names keeps the class order."""
    width = len(str(max(num_classes - 1, 0)))
    return [f"class_{c:0{width}d}" for c in range(num_classes)]


def class_image(label: int, num_classes: int, rng: np.random.Generator, size: int = 32,
                mode: str = "RGB") -> Image.Image:
    """A ``size`` x ``size`` image whose colour identifies ``label``."""
    r, g, b = colorsys.hsv_to_rgb(label / max(num_classes, 1), 0.85, 0.9)
    base = np.array([r, g, b]) * 255 * rng.uniform(0.7, 1.0)
    pixels = base + rng.normal(0.0, 12.0, size=(size, size, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE)
    return img.convert(mode)


def _examples(counts: list[int], rng: np.random.Generator, size: int, mode: str,
              shuffle: bool) -> tuple[list[Image.Image], list[int]]:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    if shuffle:
        labels = [labels[i] for i in rng.permutation(len(labels))]
    return [class_image(y, len(counts), rng, size, mode) for y in labels], labels


def make_image_dataset(root: Path, counts_train: list[int], counts_test: list[int], size: int = 32,
                       fmt: str = "parquet", image_column: str = "img", label_column: str = "label",
                       mode: str = "RGB", seed: int = 0, shuffle: bool = True) -> Path:
    """Write a two-split (``train``, ``test``) image dataset under ``root``; return ``root``.

    ``counts_*[c]`` images of class c; rows are shuffled (seeded) unless ``shuffle=False``
    (then grouped by class). ``mode`` is the stored image mode ('RGB', 'L', 'RGBA', 'P').
    """
    import datasets

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = class_names(len(counts_train))
    splits = {"train": _examples(counts_train, rng, size, mode, shuffle),
              "test": _examples(counts_test, rng, size, mode, shuffle)}
    if fmt == "imagefolder":
        for split, (images, labels) in splits.items():
            for n, (img, y) in enumerate(zip(images, labels)):
                folder = root / split / names[y]
                folder.mkdir(parents=True, exist_ok=True)
                img.save(folder / f"{n:05d}.png")
        return root
    features = datasets.Features({image_column: datasets.Image(),
                                  label_column: datasets.ClassLabel(names=names)})
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)
        for split, (images, labels) in splits.items()})
    if fmt == "parquet":
        for split, ds in dd.items():
            out = root / "plain_text" / f"{split}-00000-of-00001.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(out))
    elif fmt == "save_to_disk":
        dd.save_to_disk(str(root))
    else:
        raise ValueError(f"fmt must be 'parquet', 'save_to_disk' or 'imagefolder', got {fmt!r}")
    return root


def make_split_files(root: Path, counts_train: list[int], counts_test: list[int], size: int = 32,
                     seed: int = 0, ext: str = "jpg") -> tuple[Path, Path, Path]:
    """ImageNet-LT style: images under ``root/images/{train,val}/<class>/`` and the split files
    ``root/train.txt`` / ``root/val.txt`` (``train/<class>/<n>.jpg label``, no final newline).
    Returns ``(image root, train list, val list)``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = class_names(len(counts_train))
    image_root = root / "images"
    lists = []
    for split, counts in (("train", counts_train), ("val", counts_test)):
        images, labels = _examples(counts, rng, size, "RGB", shuffle=True)
        lines = []
        for n, (img, y) in enumerate(zip(images, labels)):
            rel = f"{split}/{names[y]}/{n:05d}.{ext}"
            (image_root / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(image_root / rel)
            lines.append(f"{rel} {y}")
        list_file = root / f"{split}.txt"
        list_file.write_text("\n".join(lines))
        lists.append(list_file)
    return image_root, lists[0], lists[1]


def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process launch (29500 may still be held)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
