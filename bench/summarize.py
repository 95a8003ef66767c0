"""Collect a teacher / DeiT-LT / baseline benchmark run into JSON, a markdown table and a plot.

    python bench/summarize.py --out output/bench_cifar10_lt_cpu --name cifar10_lt_cpu

Reads ``<out>/{teacher,deitlt,baseline}/eval.json`` (written by evaluate.py) and the training
logs; writes ``bench/results/<name>.json``, ``<name>.md`` and ``<name>_experts.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("overall", "head", "mid", "tail")


def four(metrics: dict) -> dict:
    return {"overall": metrics["top1"], "head": metrics["head"], "mid": metrics["mid"],
            "tail": metrics["tail"]}


def epoch_times(run_dir: Path) -> list[float]:
    log = run_dir / "log.txt"
    return [json.loads(line)["time_s"] for line in log.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the benchmark's output folder")
    parser.add_argument("--name", default="cifar10_lt_cpu", help="results file stem")
    parser.add_argument("--command", default="", help="the command that produced the run")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole run")
    parser.add_argument("--schedule", default="", help="the overrides each run was trained with")
    args = parser.parse_args()
    out = Path(args.out)
    evals = {run: json.loads((out / run / "eval.json").read_text()) for run in ("teacher", "deitlt", "baseline")}
    result = {"teacher": four(evals["teacher"]["logits"])}
    for run in ("deitlt", "baseline"):
        e = evals[run]  # evaluate.py's JSON: its heads, then the reported prediction
        result[run] = {**four(e[e["prediction"]]), **{h: four(e[h]) for h in e["heads"]}}
    agreement = evals["deitlt"].get("analysis", {}).get("agreement")
    if agreement:
        result["deitlt"]["agreement"] = agreement
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    result["meta"] = {
        "command": args.command, "schedule": args.schedule, "commit": sha, "wall_seconds": args.seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "epoch_seconds": {run: epoch_times(out / run) for run in ("teacher", "deitlt", "baseline")},
        "data": evals["deitlt"].get("dataset"), "num_test_images": evals["deitlt"]["num_samples"],
        "groups": evals["deitlt"]["groups"],
    }
    d, b = result["deitlt"]["avg"], result["baseline"]["avg"]
    result["claims"] = {
        "avg_minus_baseline_overall": d["overall"] - b["overall"],
        "avg_minus_baseline_tail": d["tail"] - b["tail"],
        "dist_beats_cls_on_tail": result["deitlt"]["dist"]["tail"] > result["deitlt"]["cls"]["tail"],
        "cls_beats_dist_on_head": result["deitlt"]["cls"]["head"] > result["deitlt"]["dist"]["head"],
    }
    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [("teacher (ResNet-32 LDAM-DRW + SAM)", result["teacher"])]
    for run, label in (("deitlt", "DeiT-LT student"), ("baseline", "ViT without teacher")):
        rows += [(f"{label}: {h}", result[run][h]) for h in evals[run]["heads"]]
    lines = ["| model | overall | head | mid | tail |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in KEYS) + " |" for name, m in rows]
    (res_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot = out / "deitlt" / "eval" / "per_class_accuracy.png"
    if plot.is_file():
        shutil.copy(plot, res_dir / f"{args.name}_experts.png")
    print("\n".join(lines))
    print(json.dumps(result["claims"], indent=2))


if __name__ == "__main__":
    main()
