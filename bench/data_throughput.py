"""Images per second of the training input pipeline: decode, augment, collate via a DataLoader.

    python bench/data_throughput.py [--data-path ../shared/data/cifar10-jpeg] [--json OUT]
    python bench/data_throughput.py --transform imagenet --modes float,uint8 [--json OUT]

``--transform imagenet``: a data-loader worker's CPU time per image for the ImageNet-LT
training transform (configs/imagenet_lt.yaml: RandomResizedCrop 224, flip, RandAugment,
erasing 0.25) on a 500x375 JPEG (matplotlib's sample photo, as ImageNet's: quality 90), in one
process: decode (the project's ``open_rgb``), the transform under the image's seed (the same
draws in every mode), and the collate into shared memory that a worker does (torch's own
worker branch of ``default_collate``). Modes: ``float`` (the workers normalise and erase, as on
CPU) and ``uint8`` (``aug.gpu_feed``: uint8 images plus erasing boxes, normalised on the
device). The modes alternate round by round and each figure is the median over rounds, so a
load that varies over the run hits both alike. The figures are merged into the JSON file
(``cpu_ms_per_image``, ``shm_bytes_per_batch``, ``imagenet`` with the breakdown), keeping its
other keys.

Two pipelines on the CIFAR-10-LT IF100 subset (12,406 images) of the local CIFAR-10 copy:
- 32x32: ``pad_crop`` + RandAugment rand-m9-mstd0.5-inc1 + random erasing (native resolution);
- 224x224: the reference's ``rrc`` transform (docs/recipe.md section 2), 32x32 upsampled.
each with 0, 1 and 2 DataLoader workers. The first batch (worker start-up) is timed apart;
the rate is over the batches after it. With 0 workers the CPU time per image is reported as
well: it depends less than the wall-clock rates on what else runs on the machine (shared
caches and a busy hypervisor still inflate it; the load average is recorded for that reason).
Numbers are printed and saved as JSON.
This is a benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data import AUG_SPEC, DATA_SPEC, build_datasets, build_transform  # noqa: E402
from data.sources import open_rgb  # noqa: E402
from engine.seeding import seed_everything  # noqa: E402
from utils import atomic_write_text, split_spec  # noqa: E402

PIPELINES = {
    "32x32 pad_crop+RA+erase": (32, {"train_crop": "pad_crop"}),
    "224x224 rrc+RA+erase (reference)": (224, {"train_crop": "rrc"}),
}


def measure(dataset, batch_size: int, workers: int, images: int) -> dict:
    """Time ``images`` images (after a first, separately timed batch) through a DataLoader."""
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=generator, drop_last=True)
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    seen, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while seen < images:
        x, _ = next(iterator)
        seen += len(x)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del iterator
    result = {"workers": workers, "images": seen, "seconds": elapsed, "images_per_s": seen / elapsed,
              "first_batch_s": first, "batch_shape": list(x.shape)}
    if workers == 0:
        # All the work ran in this process: CPU time per image estimates what one free core
        # would take (an upper bound while other processes share the machine).
        result["cpu_ms_per_image"] = 1000 * cpu / seen
        result["images_per_s_per_free_core"] = seen / cpu
    return result


def photo_jpeg(size: tuple[int, int] = (500, 375), quality: int = 90) -> bytes:
    """A ``size`` JPEG of a real photo (matplotlib's sample: a natural image's entropy, which a
    noise image would overstate): centre-cropped to the aspect of ``size``, then resized."""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB")
    w, h = img.size
    ch = min(h, round(w * size[1] / size[0]))
    cw = min(w, round(ch * size[0] / size[1]))
    img = img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def worker_collate(samples: list):
    """``default_collate`` as in a data-loader worker: the batch is stacked straight into
    shared memory (torch's worker branch), which is what the main process then receives."""
    from torch.utils.data import default_collate

    with mock.patch("torch.utils.data.get_worker_info", return_value=object()):
        return default_collate(samples)


def batch_bytes(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.nbytes
    if isinstance(batch, dict):
        batch = list(batch.values())
    return sum(batch_bytes(b) for b in batch)


def worker_round(jpeg: bytes, transform, images: int, batch_size: int, lazy_jpeg: bool) -> dict:
    """CPU milliseconds per image of ``images`` images: decode, transform (image n under seed
    n), and the shared-memory collate of each ``batch_size`` of them. ``lazy_jpeg``: the crop
    decodes (as the dataset hands JPEGs to the uint8 transform), so "decode" is the header only."""
    clock = time.process_time
    decode = augment = collate = 0.0
    samples, shm = [], 0
    for n in range(images):
        t0 = clock()
        img = open_rgb(io.BytesIO(jpeg), "bench image", lazy_jpeg)
        t1 = clock()
        seed_everything(n)
        samples.append((transform(img), 0))
        t2 = clock()
        decode, augment = decode + t1 - t0, augment + t2 - t1
        if len(samples) == batch_size:
            t0 = clock()
            batch = worker_collate(samples)
            collate += clock() - t0
            shm = batch_bytes(batch)
            samples, batch = [], None
    per = 1000 / images
    return {"total": (decode + augment + collate) * per, "decode": decode * per, "transform": augment * per,
            "collate": collate * per, "shm_bytes_per_batch": shm}


def imagenet_transforms(modes: list[str]) -> dict:
    """The ImageNet-LT training transform (configs/imagenet_lt.yaml keeps the aug defaults) per
    mode: 'float', 'uint8' (as training builds it: JPEGs decoded by the crop at the scale it
    needs), 'uint8_full_decode' (uint8 with every JPEG decoded in full, to isolate that gain)."""
    defaults, _, _ = split_spec({"data": DATA_SPEC, "aug": AUG_SPEC})
    data_cfg, aug_cfg = {**defaults["data"], "input_size": 224}, defaults["aug"]
    known = ("float", "uint8", "uint8_full_decode")
    for mode in modes:
        if mode not in known:
            raise SystemExit(f"--modes: unknown mode {mode!r}; known: {', '.join(known)}")
    return {mode: build_transform(True, data_cfg, aug_cfg, uint8=mode != "float") for mode in modes}


def run_imagenet(args) -> None:
    """Alternating rounds of the modes on one JPEG; medians; merged into ``args.json``."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    transforms = imagenet_transforms(modes)
    jpeg = photo_jpeg(tuple(args.jpeg_size))
    load_before = os.getloadavg()
    lazy = {m: getattr(t, "lazy_jpeg", False) and m != "uint8_full_decode" for m, t in transforms.items()}
    for mode in modes:  # warm-up: imports, caches, first allocations
        worker_round(jpeg, transforms[mode], 8, 8, lazy[mode])
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            rounds[mode].append(worker_round(jpeg, transforms[mode], args.images, args.batch_size, lazy[mode]))
            print(f"  round {r + 1}/{args.rounds} {mode:<17} {rounds[mode][-1]['total']:6.2f} CPU ms/img", flush=True)
    median = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in rounds.items()}
    load_after = os.getloadavg()
    print(f"\n{'mode':<17} {'CPU ms/img':>10} {'decode':>7} {'transform':>9} {'collate':>8} {'shm MB/batch':>13}")
    for m, v in median.items():
        print(f"{m:<17} {v['total']:>10.2f} {v['decode']:>7.2f} {v['transform']:>9.2f} {v['collate']:>8.2f} "
              f"{v['shm_bytes_per_batch'] / 1e6:>13.1f}")
    ratio = {f"{m}/{modes[0]}": median[m]["total"] / median[modes[0]]["total"] for m in modes[1:]}
    for name, value in ratio.items():
        print(f"{name}: {value:.3f}x the CPU time per image")
    path = Path(args.json)
    record = json.loads(path.read_text()) if path.exists() else {}
    details = {
        "what": "one process, a data-loader worker's CPU time per image: decode + the ImageNet-LT "
                "training transform + the shared-memory collate; median over alternating rounds",
        "command": "python bench/data_throughput.py " + " ".join(sys.argv[1:]),
        "jpeg_size": list(args.jpeg_size), "jpeg_bytes": len(jpeg), "batch_size": args.batch_size,
        "images_per_round": args.images, "rounds": args.rounds, "ratio": ratio,
        "median_ms_per_image": median, "rounds_ms_per_image": {m: [x["total"] for x in rs]
                                                                for m, rs in rounds.items()},
        "load_average_before": load_before, "load_average_after": load_after,
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if tuple(args.jpeg_size) == (500, 375):  # the headline figures: ImageNet's typical image
        record.update({"cpu_ms_per_image": {m: v["total"] for m, v in median.items()},
                       "shm_bytes_per_batch": {m: int(v["shm_bytes_per_batch"]) for m, v in median.items()},
                       "imagenet": details})
    else:  # other sizes (the decode reduction of large JPEGs) beside them
        record[f"imagenet_jpeg_{args.jpeg_size[0]}x{args.jpeg_size[1]}"] = details
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "data_throughput.json"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images-32", type=int, default=4096, help="images timed per 32x32 run")
    parser.add_argument("--images-224", type=int, default=1024, help="images timed per 224x224 run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--transform", choices=("cifar", "imagenet"), default="cifar",
                        help="cifar: the DataLoader rates above; imagenet: a worker's CPU ms per image of "
                             "the ImageNet-LT transform on a 500x375 JPEG, per --modes")
    parser.add_argument("--modes", default="float,uint8", help="imagenet: comma-separated, the first is the base")
    parser.add_argument("--rounds", type=int, default=5, help="imagenet: alternating rounds per mode")
    parser.add_argument("--images", type=int, default=256, help="imagenet: images per round")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], help="imagenet: JPEG width height")
    args = parser.parse_args()

    # One intra-op thread in the main process, as DataLoader workers have: per-image tensor ops
    # gain nothing from threads, and on a busy machine idle-spinning threads made the
    # workers=0 rate of the 224 pipeline ~10x worse.
    torch.set_num_threads(args.threads)
    if args.transform == "imagenet":
        if args.images % args.batch_size:
            raise SystemExit("--images must be a multiple of --batch-size (whole batches are collated)")
        return run_imagenet(args)
    defaults, _, _ = split_spec({"data": DATA_SPEC, "aug": AUG_SPEC})
    load_before = os.getloadavg()
    results = []
    for name, (size, aug_overrides) in PIPELINES.items():
        data_cfg = {**defaults["data"], "path": args.data_path, "input_size": size}
        aug_cfg = {**defaults["aug"], **aug_overrides}
        dataset, _ = build_datasets(data_cfg, build_transform(True, data_cfg, aug_cfg), None)
        for workers in args.workers:
            r = measure(dataset, args.batch_size, workers, args.images_32 if size == 32 else args.images_224)
            r["pipeline"] = name
            results.append(r)
            print(f"  {name:<34} workers={workers}: {r['images_per_s']:8.0f} img/s", flush=True)

    print(f"\n{'pipeline':<34} {'workers':>7} {'img/s':>8} {'ms/batch':>9} {'first batch s':>14} "
          f"{'CPU ms/img':>11} {'img/s per free core':>20}")
    for r in results:
        cpu = (f"{r['cpu_ms_per_image']:>11.2f} {r['images_per_s_per_free_core']:>20.0f}"
               if "cpu_ms_per_image" in r else f"{'':>11} {'':>20}")
        print(f"{r['pipeline']:<34} {r['workers']:>7} {r['images_per_s']:>8.0f} "
              f"{1000 * args.batch_size / r['images_per_s']:>9.1f} {r['first_batch_s']:>14.2f} {cpu}")
    load_after = os.getloadavg()
    print(f"\nbatch {args.batch_size}; {os.cpu_count()} CPUs; load average before {load_before[0]:.1f}, "
          f"after {load_after[0]:.1f} (other processes share the CPUs when this is above ~0)")
    record = {
        "results": results, "batch_size": args.batch_size, "data_path": args.data_path,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": load_after,
        "python": platform.python_version(), "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
