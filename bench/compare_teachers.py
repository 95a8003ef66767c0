"""Collect teacher-comparison runs (bench/teacher_compare_cpu.sh) into JSON and a markdown table.

    python bench/compare_teachers.py --run "LDAM-DRW + SAM=output/bench_cifar10_lt_cpu" \\
        --run "PaCo + SAM=output/bench_teacher_compare_cpu/paco" --name teacher_compare_cpu

Each ``--run LABEL=DIR`` reads ``DIR/teacher/eval.json`` and ``DIR/deitlt/eval.json`` (written
by evaluate.py) and both training logs; writes ``bench/results/<name>.json`` and ``<name>.md``
(teacher accuracy, the student's cls/dist/avg accuracy and the training time of each).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

from summarize import KEYS, ROOT, epoch_times, four


def collect(run_dir: Path) -> dict:
    teacher = json.loads((run_dir / "teacher" / "eval.json").read_text())
    student = json.loads((run_dir / "deitlt" / "eval.json").read_text())
    result = {"dir": str(run_dir), "teacher": four(teacher["logits"]),
              "student": {h: four(student[h]) for h in student["heads"]},  # evaluate.py's heads + prediction
              "teacher_epoch_seconds": epoch_times(run_dir / "teacher"),
              "student_epoch_seconds": epoch_times(run_dir / "deitlt")}
    agreement = student.get("analysis", {}).get("agreement")
    if agreement:
        result["student"]["agreement"] = agreement
    result["teacher_train_seconds"] = sum(result["teacher_epoch_seconds"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="a teacher kind and the folder holding its teacher/ and deitlt/ runs")
    parser.add_argument("--name", default="teacher_compare_cpu", help="results file stem")
    parser.add_argument("--command", default="", help="the command that produced the runs")
    parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole run")
    args = parser.parse_args()
    runs = {}
    for spec in args.run:
        label, sep, folder = spec.partition("=")
        if not sep:
            parser.error(f"--run {spec!r}: expected LABEL=DIR")
        runs[label] = collect(Path(folder))
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    result = {"runs": runs, "meta": {
        "command": args.command, "commit": sha, "wall_seconds": args.seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}"}}
    lines = ["| teacher kind | model | overall | head | mid | tail |", "|---|---|---|---|---|---|"]
    for label, run in runs.items():
        rows = [("teacher", run["teacher"])] + [(f"student {h}", run["student"][h]) for h in run["student"]]
        lines += [f"| {label} | {name} | " + " | ".join(f"{m[k]:.1f}" for k in KEYS) + " |" for name, m in rows]
    lines += ["", "| teacher kind | teacher training (s) | mean s/epoch |", "|---|---|---|"]
    for label, run in runs.items():
        times = run["teacher_epoch_seconds"]
        lines.append(f"| {label} | {sum(times):.0f} | {sum(times) / len(times):.1f} |")
    res_dir = ROOT / "bench" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (res_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
