"""Print what a config's ``data`` section builds: classes, training counts, groups.

    python -m data.summary --config configs/cifar10_lt.yaml data.path=../shared/data/cifar10-jpeg \
        --json summary.json

Reads a script's full config file (sections other than ``data`` are skipped), builds the
datasets without decoding any image and prints one row per class (project index, name,
training count, evaluation count, group). ``--json`` writes the same facts, including the
training rows' ``source_indices``, atomically. A ``generic`` dataset is reported as it is
unless ``data.imb_factor`` is set explicitly (then its long-tailed subset). Errors print one
line ``error: ...`` and exit with status 2, as the training scripts.

Only the data modules are imported (no torch, torchvision or timm): it starts in a fraction
of a second.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from data.build import DATA_SPEC, build_datasets, finalize_data  # noqa: E402
from utils import atomic_write_text, load_config  # noqa: E402


def summarize(data_cfg: dict) -> dict:
    """Build the datasets for ``data_cfg`` and return their facts as plain types."""
    dataset_train, dataset_val = build_datasets(data_cfg, None, None)
    val_counts = Counter(dataset_val.targets)
    group_of = {c: name for name, members in dataset_train.groups.items() for c in members}
    return {
        "dataset": data_cfg["dataset"],
        "num_classes": dataset_train.num_classes,
        "num_train": len(dataset_train),
        "num_val": len(dataset_val),
        "class_names": dataset_train.class_names,
        "train_counts": dataset_train.train_counts,
        "val_counts": [val_counts.get(c, 0) for c in range(dataset_train.num_classes)],
        "groups": dataset_train.groups,
        "group_of_class": [group_of[c] for c in range(dataset_train.num_classes)],
        "class_map": dataset_train.class_map,
        "source_order": dataset_train.source_order_note,
        "train_split": dataset_train.split,
        "val_split": dataset_val.split,
        "source_indices": dataset_train.source_indices,
        "val_source_indices": dataset_val.source_indices,
        "data_config": data_cfg,
    }


def format_table(summary: dict, max_rows: int = 60) -> str:
    """One line per class; long class lists show their first and last rows."""
    n = summary["num_classes"]
    half = max_rows // 2
    rows = list(range(n)) if n <= max_rows else list(range(half)) + [None] + list(range(n - half, n))
    width = max([len(summary["class_names"][c]) for c in range(n)] + [5])
    lines = [f"{'class':>6}  {'name':<{width}}  {'train':>7}  {'val':>6}  group"]
    for c in rows:
        if c is None:
            lines.append(f"{'...':>6}")
            continue
        lines.append(f"{c:>6}  {summary['class_names'][c]:<{width}}  {summary['train_counts'][c]:>7}  "
                     f"{summary['val_counts'][c]:>6}  {summary['group_of_class'][c]}")
    counts = summary["train_counts"]
    lines.append(f"total: {summary['num_train']} training images in {n} classes "
                 f"(imbalance {max(counts)}/{min(counts)} = {max(counts) / min(counts):.1f}), "
                 f"{summary['num_val']} evaluation images")
    lines.append("groups: " + ", ".join(f"{k} {len(v)} classes / {sum(counts[c] for c in v)} images"
                                        for k, v in summary["groups"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--json", default=None, help="write the summary as JSON to this file")
    known, rest = pre.parse_known_args(argv)
    cfg = load_config({"data": DATA_SPEC}, rest, other_sections_ok=True, finalize=finalize_data,
                      description=__doc__.split("\n")[0] + " Extra option: --json OUT.")
    try:
        summary = summarize(cfg["data"])
    except (ValueError, OSError) as e:  # bad paths, columns, labels: a message, not a traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_table(summary))
    if known.json:
        atomic_write_text(known.json, json.dumps(summary) + "\n")
        print(f"wrote {known.json}")
    return summary


if __name__ == "__main__":
    main()
