"""Mean and standard deviation over training seeds of a bench/seeds.sh run.

    python bench/seeds_summary.py --out output/bench_seeds --seeds 0 1 2

Reads ``<out>/{deitlt,baseline}_s<seed>/eval.json`` (evaluate.py's JSON) and
``<out>/teacher/eval.json``; writes ``bench/results/<name>.json``:
``{"deitlt": {"seeds": [...], "avg": {"overall": {"mean", "std", "values"}, "head": ..., "mid": ...,
"tail": ...}, "cls": ..., "dist": ...}, "baseline": {...}, "teacher": {...}, "claims": ..., "meta": ...}``
and a markdown table ``<name>.md``. The standard deviation is the sample one (n - 1).
When evaluate.py wrote its post-hoc rows (the default), ``<name>_posthoc.json`` gets, per row,
the same statistics of top-1 / head / mid / tail / ECE / NLL, with each seed's tuned parameter
and where it was tuned (the reference's prediction is the row ``avg``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("overall", "head", "mid", "tail")


def four(metrics: dict) -> dict:
    return {"overall": metrics["top1"], "head": metrics["head"], "mid": metrics["mid"], "tail": metrics["tail"]}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(evals: list[dict]) -> dict:
    """Per head (and the reported prediction) and per group: mean, std and the per-seed values."""
    first = evals[0]
    names = [*first["heads"], first["prediction"]] if first["prediction"] not in first["heads"] else first["heads"]
    return {name: {k: spread([four(e[name])[k] for e in evals]) for k in KEYS} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="bench/seeds.sh's output folder")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="the training seeds to collect")
    parser.add_argument("--name", default="cifar10_lt_cpu_seeds", help="results file stem")
    parser.add_argument("--command", default="", help="the command that produced the runs")
    parser.add_argument("--schedule", default="", help="the overrides the runs were trained with")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole run")
    args = parser.parse_args()
    out = Path(args.out)

    def load(run: str) -> dict:
        return json.loads((out / run / "eval.json").read_text())

    result: dict = {}
    for run in ("deitlt", "baseline"):
        evals = [load(f"{run}_s{s}") for s in args.seeds]
        result[run] = {"seeds": args.seeds, **summarise(evals)}
    result["teacher"] = four(load("teacher")["logits"])
    d, b = result["deitlt"]["avg"], result["baseline"]["avg"]
    gains = {k: [x - y for x, y in zip(d[k]["values"], b[k]["values"])] for k in ("overall", "tail")}
    result["claims"] = {
        "avg_minus_baseline_overall": spread(gains["overall"]),
        "avg_minus_baseline_tail": spread(gains["tail"]),
        "seeds_where_deitlt_beats_baseline_overall": sum(g > 0 for g in gains["overall"]),
        "seeds_where_dist_beats_cls_on_tail": sum(
            x > y for x, y in zip(result["deitlt"]["dist"]["tail"]["values"], result["deitlt"]["cls"]["tail"]["values"])),
    }
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    first = load(f"deitlt_s{args.seeds[0]}")
    result["meta"] = {
        "command": args.command, "schedule": args.schedule, "commit": sha, "wall_seconds": args.seconds,
        "std": "sample standard deviation (n - 1) over the seeds",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "data": first.get("dataset"), "num_test_images": first["num_samples"], "groups": first["groups"],
    }
    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), mean ± sample std, top-1 %", "",
             "| model | overall | head | mid | tail |", "|---|---|---|---|---|",
             "| teacher (one, shared) | " + " | ".join(f"{result['teacher'][k]:.1f}" for k in KEYS) + " |"]
    for run, label in (("deitlt", "DeiT-LT student"), ("baseline", "ViT without teacher")):
        for name in (n for n in result[run] if n != "seeds"):
            m = result[run][name]
            lines.append(f"| {label}: {name} | " + " | ".join(f"{m[k]['mean']:.1f} ± {m[k]['std']:.1f}" for k in KEYS) + " |")
    c = result["claims"]
    lines += ["", f"avg - baseline avg: overall {c['avg_minus_baseline_overall']['mean']:+.1f} ± "
              f"{c['avg_minus_baseline_overall']['std']:.1f}, tail {c['avg_minus_baseline_tail']['mean']:+.1f} ± "
              f"{c['avg_minus_baseline_tail']['std']:.1f}"]
    if all("posthoc" in load(f"deitlt_s{s}") for s in args.seeds):
        lines += ["", posthoc_summary(res_dir, args.name, [load(f"deitlt_s{s}") for s in args.seeds], args.seeds,
                                      result["meta"])]
    (res_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def posthoc_summary(res_dir: Path, name: str, evals: list[dict], seeds: list[int], meta: dict) -> str:
    """``<name>_posthoc.json`` (every post-hoc row over the seeds) and its markdown table."""
    rows: dict = {}
    for row in evals[0]["posthoc"]:
        stats = {k: spread([e["posthoc"][row][k] for e in evals]) for k in ("top1", "head", "mid", "tail")}
        stats.update({k: spread([e["calibration"][row][k] for e in evals]) for k in ("ece", "nll")
                      if row in evals[0].get("calibration", {})})
        rows[row] = {**stats, "param": [e["posthoc"][row]["param"] for e in evals],
                     "tuned_on": evals[0]["posthoc"][row]["tuned_on"]}
    beats = {row: {"overall": sum(e["posthoc"][row]["top1"] > e["posthoc"]["avg"]["top1"] for e in evals),
                   "tail": sum(e["posthoc"][row]["tail"] > e["posthoc"]["avg"]["tail"] for e in evals)}
             for row in rows if row != "avg"}
    out = {"seeds": seeds, "reported_images": evals[0]["posthoc_images"],
           "tuning": [e.get("posthoc_tuning") for e in evals], "rows": rows,
           "seeds_beating_avg": beats, "reference_row": "avg", "meta": meta}
    (res_dir / f"{name}_posthoc.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"Post-hoc rows (DeiT-LT student, {len(seeds)} seeds, each on {out['reported_images']} test images; "
             f"tuned parameters chosen on the other {evals[0]['num_samples'] - out['reported_images']}):", "",
             "| row | tuned on | top-1 | head | mid | tail | ECE | seeds beating avg (overall / tail) |",
             "|---|---|---|---|---|---|---|---|"]
    for row, s in rows.items():
        b = beats.get(row)
        lines.append(f"| {row} | {s['tuned_on']} | " + " | ".join(f"{s[k]['mean']:.1f} ± {s[k]['std']:.1f}"
                     for k in ("top1", "head", "mid", "tail", "ece") if k in s)
                     + f" | {'-' if b is None else str(b['overall']) + ' / ' + str(b['tail'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
