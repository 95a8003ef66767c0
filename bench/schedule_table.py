"""What each change of the CPU claim benchmark's schedule gave: one table from the results files.

    python bench/schedule_table.py        # writes bench/results/cifar10_lt_cpu_schedules.md

Each row is one ``bench/results/<stem>.json`` written by ``bench/summarize.py`` (run by
``bench/cifar10_lt_cpu.sh``); RUNS says in words what that run changed against the row above.
Add a row here after a new run. Top-1 (%) on the 10,000 balanced CIFAR-10 test images.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = [  # (results stem, what changed against the row above)
    ("cifar10_lt_cpu_teacher10", "start: teacher 10 epochs; students 12 epochs, DRW + no-mixup from 9"),
    ("cifar10_lt_cpu_teacher25", "teacher 25 epochs (DRW and lr x0.1 at 18, x0.01 at 23); baseline reused"),
    ("cifar10_lt_cpu_student16", "current code (teacher retrained, same 25 epochs); students 16 epochs, "
                                 "DRW + no-mixup from 10 (6 DRW epochs instead of 3)"),
    ("cifar10_lt_cpu_cb4e5b3", "students 20 epochs, DRW + no-mixup from 12 (8 DRW epochs)"),
    ("cifar10_lt_cpu", "the same schedule rerun from scratch by the script on later code (teacher retrained); "
                       "the current result"),
]


def row(stem: str, change: str) -> str:
    r = json.loads((RESULTS / f"{stem}.json").read_text())
    d, b, c = r["deitlt"], r["baseline"], r["claims"]
    seconds = sum(sum(v) for v in r["meta"]["epoch_seconds"].values())
    cells = [f"`{stem}`", change, r["meta"]["commit"],
             f"{r['teacher']['overall']:.1f} / {r['teacher']['tail']:.1f}",
             f"{d['cls']['tail']:.1f} / {d['dist']['tail']:.1f} / {d['avg']['tail']:.1f}",
             f"{d['cls']['head']:.1f} / {d['dist']['head']:.1f}",
             f"{d['avg']['overall']:.1f}", f"{b['avg']['overall']:.1f} / {b['avg']['tail']:.1f}",
             f"**{c['avg_minus_baseline_overall']:+.1f} / {c['avg_minus_baseline_tail']:+.1f}**",
             f"{seconds / 60:.0f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    lines = [
        "# CIFAR-10-LT IF100 on 2 CPU cores: what each schedule change gave",
        "",
        "Written by `python bench/schedule_table.py` from the results files. Gain = DeiT-LT's",
        "average of the two heads minus the no-teacher ViT's, overall / tail (targets +10 / +20).",
        "Minutes = the sum of the three trainings' epoch times (evaluation by evaluate.py not included).",
        "",
        "| results | change | commit | teacher overall / tail | DeiT-LT tail cls / dist / avg "
        "| head cls / dist | DeiT-LT avg overall | baseline avg overall / tail | gain overall / tail | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(stem, change) for stem, change in RUNS if (RESULTS / f"{stem}.json").is_file()]
    out = RESULTS / "cifar10_lt_cpu_schedules.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
