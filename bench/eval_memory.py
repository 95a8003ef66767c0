"""Peak host memory of evaluation at iNaturalist-2018's size (8,142 classes, 24,426 test images).

    python bench/eval_memory.py [--repo .] [--work /tmp/eval_memory] [--json OUT]

The real iNat-2018 val list (``../shared/data/splits/iNaturalist18_val.txt``, every line, no
evaluation cap) over tiny generated 16x16 JPEGs, and a tiny student (patch 4, depth 1, width
48): the cost measured is the evaluation pipeline's, not the model's. The training list reuses
the val images, long-tailed on purpose so every count-rule group has classes: the first 150
labels 40 times each (120 images: many-shot), the next 850 labels 10 times (30: medium), the
rest once (3: few-shot); 64,926 lines.

Two commands under ``/usr/bin/time -v`` (apt-get install time), their "Maximum resident set
size" printed in MB:
- ``train_student.py``: one epoch of 2 steps (distill.type=none) with its evaluation;
- ``evaluate.py`` on that checkpoint with every report it writes by default (--json, --out-dir).
``--repo`` runs another checkout's scripts on the same data (e.g. /work/main for the figures
before a change). This is a benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAL_LIST = ROOT.parent / "shared" / "data" / "splits" / "iNaturalist18_val.txt"


def make_data(work: Path, val_list: Path) -> tuple[Path, Path]:
    """Tiny JPEGs at every path of ``val_list``; a long-tailed training list over them."""
    import numpy as np
    from PIL import Image

    root = work / "images"
    lines = [line.split() for line in val_list.read_text().splitlines() if line.strip()]
    train, val = work / "train.txt", work / "val.txt"
    if not val.exists():
        rng = np.random.default_rng(0)
        for rel, label in lines:
            path = root / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                shade = (int(label) * 37) % 256
                pixels = np.clip(shade + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(path, quality=90)
        out = []
        for rel, label in lines:
            repeat = 40 if int(label) < 150 else 10 if int(label) < 1000 else 1
            out += [f"{rel} {label}"] * repeat
        train.write_text("\n".join(out) + "\n")
        val.write_text("\n".join(f"{rel} {label}" for rel, label in lines) + "\n")
    return train, val


def peak_mb(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    """Run ``cmd`` under ``/usr/bin/time -v``; its maximum resident set size in MB."""
    start = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + "\n----- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    print(f"  {time.time() - start:.0f} s, peak {kb / 1024:.0f} MB  ({log})", flush=True)
    return kb / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(ROOT), help="checkout whose scripts run")
    parser.add_argument("--work", default="/tmp/eval_memory", help="generated data and run folders")
    parser.add_argument("--val-list", default=str(VAL_LIST))
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--eval-args", nargs="*", default=[], help="extra evaluate.py overrides")
    args = parser.parse_args()
    repo, work = Path(args.repo).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    train, val = make_data(work, Path(args.val_list))
    tag = repo.name
    out = work / f"run_{tag}"
    data = ["data.dataset=inat18", f"data.root={work / 'images'}", f"data.train_list={train}",
            f"data.val_list={val}", "data.num_workers=0", "data.input_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    print(f"train_student.py ({repo})", flush=True)
    train_mb = peak_mb([sys.executable, "train_student.py", *data, "model.name=deit_tiny_distilled_patch4_32",
                        "model.img_size=16", "model.depth=1", "model.embed_dim=48", "model.num_heads=3",
                        "aug.train_crop=pad_crop", "distill.type=none", "train.epochs=1",
                        "train.batch_size=16", "train.max_steps_per_epoch=2", "train.eval_batch_size=256",
                        "sched.warmup_epochs=0", "log.progress=false", "train.mixed_precision=no",
                        f"train.output_dir={out}"], repo, env, work / f"train_{tag}.log")
    print(f"evaluate.py ({repo})", flush=True)
    eval_mb = peak_mb([sys.executable, "evaluate.py", "--ckpt", str(out / "checkpoint.pth"),
                       "--json", str(work / f"eval_{tag}.json"), "--out-dir", str(work / f"eval_{tag}"),
                       *data[1:], "eval.batch_size=256", *args.eval_args], repo, env, work / f"eval_{tag}.log")
    result = {"repo": str(repo), "train_student_peak_mb": round(train_mb), "evaluate_peak_mb": round(eval_mb)}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
