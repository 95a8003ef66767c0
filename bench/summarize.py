"""Collect a teacher / DeiT-LT / baseline benchmark run into JSON, a markdown table and a plot.

    python bench/summarize.py --out output/bench_cifar10_lt_cpu --name cifar10_lt_cpu

Reads ``<out>/{teacher,deitlt,baseline}/eval.json`` (written by evaluate.py) and the training
logs; writes ``bench/results/<name>.json``, ``<name>.md`` and ``<name>_experts.png``. When the
DeiT-LT student's evaluation has evaluate.py's post-hoc rows (its default), it also writes
``<name>_posthoc.json``: every row (the reference's prediction under ``avg``) with its top-1,
head/mid/tail, ECE and NLL, its parameter and where it was tuned (``tuned_on``), the reported and
tuning image counts, the test-prior table, which rows beat ``avg`` overall and on the tail, and
``<name>_reliability.png``; its table is appended to ``<name>.md``.
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
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the files are written")
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
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [("teacher (ResNet-32 LDAM-DRW + SAM)", result["teacher"])]
    for run, label in (("deitlt", "DeiT-LT student"), ("baseline", "ViT without teacher")):
        rows += [(f"{label}: {h}", result[run][h]) for h in evals[run]["heads"]]
    lines = ["| model | overall | head | mid | tail |", "|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in KEYS) + " |" for name, m in rows]
    if "posthoc" in evals["deitlt"]:
        lines += ["", posthoc_summary(res_dir, args.name, evals["deitlt"], result["meta"])]
    (res_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    for src, dst in (("per_class_accuracy.png", "experts"), ("reliability.png", "reliability")):
        plot = out / "deitlt" / "eval" / src
        if plot.is_file():
            shutil.copy(plot, res_dir / f"{args.name}_{dst}.png")
    print("\n".join(lines))
    print(json.dumps(result["claims"], indent=2))


def posthoc_summary(res_dir: Path, name: str, e: dict, meta: dict) -> str:
    """``<name>_posthoc.json`` from the DeiT-LT student's evaluate.py JSON, and its markdown table."""
    avg = e["posthoc"]["avg"]
    rows = {row: {**m, **e.get("calibration", {}).get(row, {})} for row, m in e["posthoc"].items()}
    beats = {row: {"overall": m["top1"] > avg["top1"], "tail": m["tail"] > avg["tail"]}
             for row, m in rows.items() if row != "avg"}
    out = {"checkpoint": e["checkpoint"], "reference_row": "avg", "reported_images": e["posthoc_images"],
           "evaluated_images": e["num_samples"], "tuning": e.get("posthoc_tuning"), "rows": rows,
           "beats_avg": beats, "rows_beating_avg_overall_and_tail":
               [row for row, b in beats.items() if b["overall"] and b["tail"]],
           "test_priors": e.get("test_priors"), "count_groups": e.get("count_groups"), "meta": meta}
    (res_dir / f"{name}_posthoc.json").write_text(json.dumps(out, indent=2) + "\n")
    tuning = e.get("posthoc_tuning") or {}
    lines = [f"Post-hoc rows of the DeiT-LT student on {out['reported_images']} test images "
             f"(tuned parameters chosen on {tuning.get('images', 0)} other images, `{tuning.get('tuned_on')}`):", "",
             "| row | tuned on | parameter | top-1 | head | mid | tail | ECE | NLL | beats avg (overall / tail) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, m in rows.items():
        b = beats.get(row)
        param = "-" if not m["param"] else ", ".join(f"{k}={v}" for k, v in m["param"].items())
        lines.append(f"| {row} | {m['tuned_on']} | {param} | " + " | ".join(
            f"{m[k]:.1f}" if k in ("top1", "head", "mid", "tail", "ece") else f"{m[k]:.3f}"
            for k in ("top1", "head", "mid", "tail", "ece", "nll") if k in m)
            + f" | {'-' if b is None else ('yes' if b['overall'] else 'no') + ' / ' + ('yes' if b['tail'] else 'no')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
