"""What an up-front check of every image would cost: decode all CIFAR-10 train + test images of
the shared copy, and time the decode of an ImageNet-sized (500x375) JPEG to estimate the
ImageNet-LT figure. A benchmark, not a test; prints and saves JSON.

    python bench/image_decode_cost.py [--data ../shared/data/cifar10-jpeg] [--json OUT]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data import build_datasets  # noqa: E402
from data.build import DATA_SPEC  # noqa: E402
from utils import atomic_write_text, split_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "image_decode_cost.json"))
    args = parser.parse_args()
    cfg, _, _ = split_spec({"data": DATA_SPEC})
    data_cfg = {**cfg["data"], "dataset": "cifar10_lt", "path": args.data, "imb_factor": 1.0, "num_workers": 0}
    decode_only = lambda img: 0  # noqa: E731 - the dataset decodes and converts to RGB itself
    splits = build_datasets(data_cfg, decode_only, decode_only, verbose=False)
    start = time.perf_counter()
    count = 0
    for ds in splits:
        for i in range(len(ds)):
            ds[i]
            count += 1
    cifar_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    start = time.perf_counter()
    for _ in range(200):
        Image.open(io.BytesIO(jpeg)).convert("RGB")
    per_image = (time.perf_counter() - start) / 200
    result = {"cifar10_images": count, "cifar10_seconds": cifar_s, "cifar10_ms_per_image": 1000 * cifar_s / count,
              "jpeg_500x375_ms": 1000 * per_image, "jpeg_bytes": len(jpeg),
              "imagenet_lt_166k_minutes_one_core": 166_000 * per_image / 60,
              "note": "in-memory decode; disk reads come on top"}
    print(json.dumps(result, indent=1))
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
