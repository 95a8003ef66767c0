"""The long-tail literature's rows (engine/posthoc.py): logit adjustment, expert combinations,
calibration, count-rule groups, test-prior shift; and one evaluate.py run that writes them.

Unit tests on synthetic logits with answers known by construction; the one end-to-end run
reuses test_evaluate.py's generated data and tiny student.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine import posthoc
from engine.metrics import EvalCounts


def test_logit_adjustment_rows():
    prior = posthoc.log_prior([90, 9, 1])
    torch.testing.assert_close(prior, torch.tensor([0.9, 0.09, 0.01]).log())
    z = {"cls": torch.tensor([[2.0, 1.0, 0.0]]), "dist": torch.tensor([[0.0, 1.0, 2.0]])}
    z["avg"] = (z["cls"] + z["dist"]) / 2
    params = {"tau": 0.5, "w": 0.25, "T": {"cls": 2.0, "dist": 0.5}}
    r = posthoc.rows(z, posthoc.row_names(["cls", "dist", "avg"]), params, prior)
    torch.testing.assert_close(r["cls_la"], z["cls"] - prior)
    torch.testing.assert_close(r["avg_la_tuned"], z["avg"] - 0.5 * prior)
    torch.testing.assert_close(r["avg_cls_la"], (z["cls"] - prior + z["dist"]) / 2)
    torch.testing.assert_close(r["weighted"], 0.25 * z["cls"] + 0.75 * z["dist"])
    torch.testing.assert_close(r["temp_avg"], (z["cls"] / 2 + z["dist"] / 0.5) / 2)
    assert posthoc.param_of("avg_la", params) == {"tau": 1.0}
    assert posthoc.param_of("weighted", params) == {"w_cls": 0.25} and posthoc.param_of("avg", params) is None
    # A class never seen in training counts as one image, not log 0.
    assert torch.isfinite(posthoc.log_prior([5, 0])).all()


def test_tuning_finds_the_planted_parameters():
    """Logits built with known answers: DIST is CLS scaled by 4 (the fitted temperatures keep
    that ratio); an uninformative CLS gets no weight; a head biased by the training prior is
    corrected by the tuned tau = 1."""
    g = torch.Generator().manual_seed(0)
    num_classes, n = 20, 4000
    targets = torch.arange(n) % num_classes
    counts = [int(1000 * 0.8 ** c) + 1 for c in range(num_classes)]
    prior = posthoc.log_prior(counts)
    clean = torch.randn(n, num_classes, generator=g) + 3.0 * torch.nn.functional.one_hot(targets, num_classes)
    params = posthoc.tune({"cls": clean, "dist": 4.0 * clean}, targets, ["cls", "dist", "avg"], prior, num_classes)
    assert params["T"]["dist"] / params["T"]["cls"] == pytest.approx(4.0, rel=0.01)
    noise = torch.randn(n, num_classes, generator=g)
    assert posthoc.tune({"cls": noise.half(), "dist": clean.half()}, targets, ["cls", "dist", "avg"], prior,
                        num_classes)["w"] == 0.0
    single = posthoc.tune({"logits": (clean + prior).half()}, targets, ["logits"], prior, num_classes)
    assert single["tau"] == pytest.approx(1.0, abs=0.2) and set(single["T"]) == {"logits"}


def test_temperature_fit_minimises_the_nll():
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 10, (2000,), generator=g)
    logits = 5.0 * (torch.randn(2000, 10, generator=g) + 2.0 * torch.nn.functional.one_hot(targets, 10))
    weights = torch.ones(2000, dtype=torch.float64)
    t = posthoc.fit_temperature(logits, targets, weights)
    best = posthoc.balanced_nll(logits, targets, t, weights)
    for other in (0.8 * t, 1.25 * t):
        assert best < posthoc.balanced_nll(logits, targets, other, weights)


def test_ece_and_nll_streamed_equal_the_direct_computation():
    g = torch.Generator().manual_seed(2)
    logits = 3.0 * torch.randn(500, 7, generator=g)
    targets = torch.randint(0, 7, (500,), generator=g)
    counts = EvalCounts(7, ["x"], calibration=["x"])
    for s in range(0, 500, 64):
        counts.update(counts.summarise({"x": logits[s:s + 64]}, targets[s:s + 64]))
    got = posthoc.ece_nll(counts.bins["x"])
    probs = logits.double().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == targets).double()
    ece = 0.0
    for b in range(15):
        mask = (conf > b / 15) & (conf <= (b + 1) / 15)
        if mask.any():
            ece += mask.double().mean() * (correct[mask].mean() - conf[mask].mean()).abs()
    assert got["ece"] == pytest.approx(100 * float(ece), abs=1e-6)
    assert got["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits.double(), targets)), abs=1e-5)
    rel = posthoc.reliability(counts.bins["x"])
    assert sum(rel["count"]) == 500 and len(rel["accuracy"]) == 15


def test_test_prior_accuracies_exact():
    """4 classes in count order: accuracies 100, 50, 50, 0. Forward rho: weights rho^(-k/3)."""
    per_class = [50.0, 100.0, 0.0, 50.0]
    order = [1, 0, 3, 2]  # class 1 most frequent, then 0, 3, 2
    acc = posthoc.test_prior_accuracies(per_class, order)
    assert list(acc) == ["forward_50", "forward_25", "forward_10", "forward_5", "forward_2", "uniform",
                         "backward_2", "backward_5", "backward_10", "backward_25", "backward_50"]
    assert acc["uniform"] == pytest.approx(50.0)
    w = [50 ** (-k / 3) for k in range(4)]
    assert acc["forward_50"] == pytest.approx(sum(wk * a for wk, a in zip(w, [100, 50, 50, 0])) / sum(w))
    assert acc["backward_50"] == pytest.approx(sum(wk * a for wk, a in zip(w, [0, 50, 50, 100])) / sum(w))
    # A class without test images is left out and the prior renormalised.
    assert posthoc.test_prior_accuracies([None, 80.0], [0, 1])["forward_50"] == pytest.approx(80.0)


def test_count_rule_groups():
    from data.groups import count_rule_groups

    counts = [500, 101, 100, 20, 19, 1]
    assert count_rule_groups(counts) == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    assert count_rule_groups(counts, [50, 10]) == {"many": [0, 1, 2], "medium": [3, 4], "few": [5]}


def test_posthoc_row_names():
    assert posthoc.row_names(["cls", "dist", "avg"])[:3] == ["cls", "dist", "avg"]
    assert posthoc.row_names(["logits"]) == ["logits", "logits_la", "logits_la_tuned", "logits_temp"]
    assert math.isclose(posthoc.TAU_GRID[10], 1.0)


# ----------------------------------------------------------------------------- evaluate.py end to end


def test_checkpoint_precision_is_the_default():
    from evaluate import checkpoint_precision

    bf16 = {"format": "project", "config": {"train": {"mixed_precision": "bf16"}}}
    assert checkpoint_precision(None, bf16) == "bf16"
    assert checkpoint_precision("no", bf16) == "no"  # asked for: kept
    assert checkpoint_precision(None, {"format": "project", "config": {"train": {"mixed_precision": None}}}) is None
    assert checkpoint_precision(None, {"format": "reference"}) is None


@pytest.fixture(scope="module")
def field_run(tmp_path_factory):
    """evaluate.py --json --out-dir on test_evaluate.py's tiny student and generated data."""
    from test_evaluate import STUDENT_ARCH, TEST_COUNTS, run_ok, save_student  # noqa: F401
    from helpers import make_image_dataset
    from models import build_student

    tmp = tmp_path_factory.mktemp("field")
    data_path = make_image_dataset(tmp / "data", [20] * 10, TEST_COUNTS)
    cfg = {"data": {"dataset": "cifar10_lt", "path": str(data_path), "imb_factor": 0.1, "num_workers": 0,
                    "input_size": 32}, "aug": {"normalize": "imagenet", "eval_crop_ratio": 1.0}}
    torch.manual_seed(0)
    student = build_student(STUDENT_ARCH)
    save_student(student, cfg, tmp / "student.pth")
    out = tmp / "out"
    proc = run_ok(["--ckpt", tmp / "student.pth", "--out-dir", out, "--json", out / "eval.json",
                   "eval.batch_size=8", f"eval.save_logits={tmp / 'logits.pt'}"], tmp)
    return {"json": json.loads((out / "eval.json").read_text()), "out": out, "stdout": proc.stdout, "cfg": cfg,
            "logits": torch.load(tmp / "logits.pt", weights_only=True)}


def test_evaluate_writes_the_field_rows(field_run):
    r = field_run["json"]
    names = ["cls", "dist", "avg", "cls_la", "dist_la", "avg_la", "avg_cls_la", "avg_la_tuned", "weighted",
             "temp_avg"]
    assert list(r["posthoc"]) == names and list(r["calibration"]) == names and list(r["test_priors"]) == names
    # 37 test images: a seeded half (18) tunes, the other 19 report; the headline covers all 37.
    assert r["num_samples"] == 37 and r["posthoc_images"] == 19
    assert r["posthoc_tuning"]["tuned_on"] == "tune_split" and r["posthoc_tuning"]["images"] == 18
    for name, row in r["posthoc"].items():
        assert set(row) == {"top1", "head", "mid", "tail", "param", "tuned_on"}
        assert row["tuned_on"] == ("tune_split" if name in ("avg_la_tuned", "weighted", "temp_avg") else "none")
        assert set(r["calibration"][name]) == {"ece", "nll"} and 0 <= r["calibration"][name]["ece"] <= 100
        assert r["test_priors"][name]["uniform"] is not None and "forward_50" in r["test_priors"][name]
    assert r["posthoc"]["avg_la"]["param"] == {"tau": 1.0}
    assert set(r["posthoc"]["temp_avg"]["param"]) == {"T_cls", "T_dist"}
    # Count rule beside the reference ranges: training counts 20, 15, 11, 9, ... -> 20 is medium.
    assert r["count_groups"]["classes"] == {"many": [], "medium": [0], "few": list(range(1, 10))}
    assert r["count_groups"]["avg"]["many"] is None and r["count_groups"]["avg"]["medium"] is not None
    assert "post-hoc rows on 19 images" in field_run["stdout"] and "plotting" in field_run["stdout"]
    assert "forward" in field_run["stdout"] and "count rule" in field_run["stdout"]
    assert (field_run["out"] / "reliability.png").stat().st_size > 1000


def test_posthoc_rows_are_the_reported_images_numbers(field_run):
    """Recompute from the saved logits: the post-hoc rows score exactly the 19 images outside the
    tuning split; the headline scores all 37 (the saved rows' order is given by 'indices')."""
    from engine.metrics import classification_metrics

    r, saved = field_run["json"], field_run["logits"]
    order = saved["indices"]
    assert sorted(order) == list(range(37))
    report = torch.tensor([i >= 18 for i in range(37)])  # the tuning part comes first
    targets = saved["targets"]
    groups = r["groups"]
    for name in ("cls", "avg"):
        assert classification_metrics(saved["logits"][name], targets, groups, 10)["per_class"] == r[name]["per_class"]
    prior = posthoc.log_prior(r["train_counts"])
    expected = classification_metrics(saved["logits"]["avg"][report] - prior, targets[report], groups, 10)
    assert r["posthoc"]["avg_la"]["top1"] == pytest.approx(expected["top1"])
    assert r["posthoc"]["avg_la"]["tail"] == pytest.approx(expected["tail"])
    acc = classification_metrics(saved["logits"]["avg"][report], targets[report], groups, 10)
    assert r["test_priors"]["avg"]["uniform"] == pytest.approx(
        sum(a for a in acc["per_class"] if a is not None) / sum(a is not None for a in acc["per_class"]))


def test_tuning_split_sources(tmp_path):
    """eval.tune_list > the checkpoint's hold-out > a seeded eval.tune_fraction split (disjoint
    from the reported images) > none."""
    import contextlib

    from data import build_datasets
    from evaluate import EVAL_SPEC, tuning_split
    from helpers import make_split_files

    root, train_list, val_list = make_split_files(tmp_path, [6, 4, 3], [3, 3, 3], size=8)
    data = {"dataset": "imagenet_lt", "root": str(root), "train_list": str(train_list),
            "val_list": str(val_list), "num_workers": 0, "input_size": 8}
    _, dataset_val = build_datasets(data, None, None, verbose=False)
    cfg = {"data": {**data, "val_holdout": 0.0, "train_list": str(train_list)},
           "eval": {k: v[0] for k, v in EVAL_SPEC.items()}}
    quiet = contextlib.nullcontext()
    tune, report, tuned_on = tuning_split(cfg, dataset_val, 0.0, None, 2, 3, quiet)
    assert tuned_on == "tune_split" and len(tune) == 4 and len(report) == 5  # round(0.5 * 9)
    assert not set(tune.indices) & set(report.indices)
    again, _, _ = tuning_split(cfg, dataset_val, 0.0, None, 2, 3, quiet)
    assert again.indices == tune.indices  # seeded
    tune, report, tuned_on = tuning_split(cfg, dataset_val, 0.5, None, 2, 3, quiet)
    _, held_out = build_datasets({**data, "val_holdout": 0.5}, None, None, verbose=False)
    assert tuned_on == "holdout" and report is dataset_val
    assert len(tune) == len(held_out) and tune.dataset.targets == held_out.targets
    cfg["eval"]["tune_list"] = str(train_list)
    tune, report, tuned_on = tuning_split(cfg, dataset_val, 0.5, None, 2, 3, quiet)
    assert tuned_on == "tune_list" and report is dataset_val and len(tune) == 13
    # The kept fp16 logits are capped (eval.tune_max_mb): 1 MB of 2 heads x 2**18 classes = 1 image.
    cfg["eval"].update(tune_list=None, tune_max_mb=1)
    tune, report, tuned_on = tuning_split(cfg, dataset_val, 0.0, None, 2, 2 ** 18, quiet)
    assert tuned_on == "tune_split" and len(tune) == 1 and len(report) == 8
    cfg["eval"].update(tune_fraction=0.0)
    assert tuning_split(cfg, dataset_val, 0.0, None, 2, 3, quiet) == (None, dataset_val, "none")


def test_benchmark_summary_writes_the_posthoc_file(field_run, tmp_path):
    """bench/summarize.py (the claim benchmark's last step) turns the DeiT-LT student's evaluation
    into <name>_posthoc.json: every row with its calibration, where it was tuned, the image counts,
    and which rows beat the reference's avg; the table is appended to <name>.md."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = field_run["json"]
    four = {"top1": 50.0, "head": 60.0, "mid": 50.0, "tail": 40.0}
    evals = {"teacher": {"logits": four}, "deitlt": r,
             "baseline": {"prediction": "avg", "heads": ["cls", "dist", "avg"], "cls": four, "dist": four, "avg": four}}
    for run, e in evals.items():
        (tmp_path / "out" / run).mkdir(parents=True)
        (tmp_path / "out" / run / "eval.json").write_text(json.dumps(e))
        (tmp_path / "out" / run / "log.txt").write_text(json.dumps({"time_s": 1.0}) + "\n")
    (tmp_path / "out" / "deitlt" / "eval").symlink_to(field_run["out"])  # the benchmark's --out-dir
    proc = subprocess.run([sys.executable, str(root / "bench" / "summarize.py"), "--out", str(tmp_path / "out"),
                           "--name", "bench", "--results", str(tmp_path / "res")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "res" / "bench_posthoc.json").read_text())
    assert out["reference_row"] == "avg" and out["reported_images"] == 19 and out["evaluated_images"] == 37
    assert out["tuning"] == r["posthoc_tuning"] and out["test_priors"] == r["test_priors"]
    assert list(out["rows"]) == list(r["posthoc"])
    for name, row in out["rows"].items():
        assert row == {**r["posthoc"][name], **r["calibration"][name]}
    avg = r["posthoc"]["avg"]
    for name, b in out["beats_avg"].items():
        assert b == {"overall": r["posthoc"][name]["top1"] > avg["top1"], "tail": r["posthoc"][name]["tail"] > avg["tail"]}
    assert out["rows_beating_avg_overall_and_tail"] == [n for n, b in out["beats_avg"].items() if all(b.values())]
    table = (tmp_path / "res" / "bench.md").read_text()
    assert "Post-hoc rows of the DeiT-LT student on 19 test images" in table and "| temp_avg | tune_split |" in table
    assert (tmp_path / "res" / "bench_reliability.png").is_file()
