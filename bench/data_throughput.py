"""Images per second of the training input pipeline: decode, augment, collate via a DataLoader.

    python bench/data_throughput.py [--data-path ../shared/data/cifar10-jpeg] [--json OUT]

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
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data import AUG_SPEC, DATA_SPEC, build_datasets, build_transform  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "data_throughput.json"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--images-32", type=int, default=4096, help="images timed per 32x32 run")
    parser.add_argument("--images-224", type=int, default=1024, help="images timed per 224x224 run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()

    # One intra-op thread in the main process, as DataLoader workers have: per-image tensor ops
    # gain nothing from threads, and on a busy machine idle-spinning threads made the
    # workers=0 rate of the 224 pipeline ~10x worse.
    torch.set_num_threads(args.threads)
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
