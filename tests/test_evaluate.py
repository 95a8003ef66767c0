"""evaluate.py end to end on generated data, and the analyses on inputs with known answers.

The data: 10 classes at 32x32, a balanced generated training split that the CIFAR-10-LT rule
subsets to 20..2 images per class (imb_factor 0.1), and a 37-image test split (odd, so two
processes get unequal shards and accelerate pads one). The models: a tiny student (patch 4,
depth 1, width 48, 3 heads) and a ResNet-32 teacher, saved in the project's portable format,
plus the reference files from ../shared/parity.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import free_port, make_image_dataset

ROOT = Path(__file__).resolve().parents[1]
TEST_COUNTS = [4, 4, 4, 4, 4, 4, 4, 3, 3, 3]  # 37 images
STUDENT_ARCH = dict(name="tiny_test", num_classes=10, img_size=32, patch_size=4, embed_dim=48,
                    depth=1, num_heads=3, mlp_ratio=2.0)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Generated data, a project student and teacher, their data config."""
    from models import build_student, build_teacher

    tmp = tmp_path_factory.mktemp("evaluate")
    data_path = make_image_dataset(tmp / "data", [20] * 10, TEST_COUNTS)
    cfg = {"data": {"dataset": "cifar10_lt", "path": str(data_path), "imb_factor": 0.1, "num_workers": 0,
                    "input_size": 32},
           "aug": {"normalize": "imagenet", "eval_crop_ratio": 1.0},
           "optim": {"lr": 5e-4}}  # a training section evaluate.py does not know: skipped
    torch.manual_seed(0)
    student = build_student(STUDENT_ARCH)
    save_student(student, cfg, tmp / "student.pth")
    teacher = build_teacher("resnet32", 10)
    torch.save({"kind": "teacher", "arch": {"arch": "resnet32", "num_classes": 10, "head": "linear"},
                "model": teacher.state_dict(), "model_ema": None, "epoch": 5, "config": cfg, "metrics": {},
                "class_map": None, "train_counts": None, "class_names": None}, tmp / "teacher.pth")
    overrides = [f"data.path={data_path}", "data.imb_factor=0.1", "data.num_workers=0"]
    return {"tmp": tmp, "data": data_path, "cfg": cfg, "student": tmp / "student.pth",
            "teacher": tmp / "teacher.pth", "data_overrides": overrides}


def save_student(student, cfg: dict, path: Path, **changes) -> None:
    ckpt = {"kind": "student", "arch": dict(student.student_arch), "model": student.state_dict(),
            "model_ema": None, "epoch": 7, "config": cfg, "metrics": {"acc1": 0.0}, "class_map": None,
            "train_counts": None, "class_names": None}
    ckpt.update(changes)
    torch.save(ckpt, path)


def run_eval(args: list, tmp: Path, launcher: list | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp / "hf_cache"), PYTHONUNBUFFERED="1")
    cmd = (launcher or [sys.executable]) + [str(ROOT / "evaluate.py")] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_ok(args: list, tmp: Path, launcher: list | None = None) -> subprocess.CompletedProcess:
    proc = run_eval(args, tmp, launcher)
    assert proc.returncode == 0, f"evaluate.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def check_metric_object(m: dict, groups: dict, num_classes: int) -> None:
    assert set(m) >= {"top1", "top5", "head", "mid", "tail", "per_class"}
    assert len(m["per_class"]) == num_classes
    for name in ("head", "mid", "tail"):
        values = [m["per_class"][c] for c in groups[name] if m["per_class"][c] is not None]
        assert m[name] == pytest.approx(sum(values) / len(values), abs=1e-9)
    assert 0.0 <= m["top1"] <= m["top5"] <= 100.0


@pytest.fixture(scope="module")
def student_run(work) -> dict:
    """One full student evaluation with every output, shared by the tests that read it."""
    out = work["tmp"] / "student_out"
    proc = run_ok(["--ckpt", work["student"], "--out-dir", out, "--json", out / "eval.json",
                   "--teacher", work["teacher"], "eval.batch_size=8"], work["tmp"])
    return {"json": json.loads((out / "eval.json").read_text()), "out": out, "stdout": proc.stdout}


# ----------------------------------------------------------------------------- students and teachers


def test_student_json_and_plots(work, student_run):
    r = student_run["json"]
    assert r["kind"] == "student" and r["format"] == "project" and r["epoch"] == 7
    assert r["num_samples"] == 37 and r["world_size"] == 1
    assert r["groups"] == {"head": [0, 1, 2], "mid": [3, 4, 5, 6], "tail": [7, 8, 9]}  # reference ranges
    assert r["train_counts"] == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert len(r["class_names"]) == 10
    for head in ("cls", "dist", "avg"):
        check_metric_object(r[head], r["groups"], 10)
    assert r["overall"] == r["avg"]["top1"] and r["top5"] == r["avg"]["top5"]
    assert (r["head"], r["mid"], r["tail"]) == (r["avg"]["head"], r["avg"]["mid"], r["avg"]["tail"])
    assert r["config"]["data"]["input_size"] == 32 and r["config"]["eval"]["batch_size"] == 8
    for name in ("per_class_accuracy.png", "confusion_matrix.png", "attention_distance.png",
                 "feature_rank.png", "agreement.png"):
        assert (student_run["out"] / name).stat().st_size > 1000, name
    for name in ("attention", "feature_rank", "agreement"):
        assert json.loads((student_run["out"] / f"analysis_{name}.json").read_text()) == r["analysis"][name]
    assert "avg" in student_run["stdout"] and "tail" in student_run["stdout"]


def test_student_numbers_match_an_independent_pass(work, student_run):
    """Recompute the logits here, without evaluate.py's code, and compare every number."""
    from data import build_datasets, build_transform
    from engine.metrics import classification_metrics
    from models import load_student, student_outputs

    cfg = work["cfg"]
    _, dataset_val = build_datasets(cfg["data"], None, build_transform(False, cfg["data"], cfg["aug"]))
    model, _ = load_student(work["student"])
    images = torch.stack([dataset_val[i][0] for i in range(len(dataset_val))])
    targets = torch.tensor(dataset_val.targets)
    with torch.no_grad():
        out = student_outputs(model, images)
        cls_logits, dist_logits = out["cls"], out["dist"]
    r = student_run["json"]
    for name, logits in (("cls", cls_logits), ("dist", dist_logits), ("avg", (cls_logits + dist_logits) / 2)):
        expected = classification_metrics(logits, targets, dataset_val.groups, 10)
        assert r[name]["per_class"] == pytest.approx(expected["per_class"])
        assert r[name]["top1"] == pytest.approx(expected["top1"])
        assert r[name]["top5"] == pytest.approx(expected["top5"])
    same = (cls_logits.argmax(1) == dist_logits.argmax(1)).double().mean().item() * 100
    assert r["analysis"]["agreement"]["cls_vs_dist"]["overall"] == pytest.approx(same)


def test_student_analysis_fields(student_run):
    a = student_run["json"]["analysis"]
    att = a["attention"]
    assert att["grid_size"] == [8, 8] and att["patch_size"] == 4 and att["num_samples"] == 37
    for key in ("mean_distance", "mean_distance_raw", "prefix_attention"):
        assert len(att[key]) == 1 and len(att[key][0]) == 3  # depth 1, 3 heads
    for token in ("cls", "dist"):
        assert 0.0 <= min(att[token]["entropy"][0]) <= max(att[token]["entropy"][0]) <= 1.0
    # An 8x8 grid: no two patches are further apart than 7 * sqrt(2).
    assert all(0.0 < d < 7 * 2 ** 0.5 for d in att["mean_distance"][0])
    for token in ("cls", "dist"):
        rank = a["feature_rank"][token]
        assert rank["dim"] == 48 and rank["num_samples"] == 37
        assert rank["components_90"] <= rank["components_99"] <= rank["rank"] <= 36  # centred: <= N - 1
    assert set(a["agreement"]) == {"cls_vs_dist", "dist_vs_teacher", "cls_vs_teacher", "avg_vs_teacher"}
    assert a["teacher_input_size"] == 32
    check_metric_object(a["teacher"], student_run["json"]["groups"], 10)


def test_project_teacher(work):
    out = work["tmp"] / "teacher_out"
    run_ok(["--ckpt", work["teacher"], "--out-dir", out], work["tmp"])
    r = json.loads((out / "eval.json").read_text())  # --out-dir alone writes eval.json there
    assert r["kind"] == "teacher" and r["prediction"] == "logits" and "cls" not in r
    check_metric_object(r["logits"], r["groups"], 10)
    assert r["overall"] == r["logits"]["top1"] and r["num_samples"] == 37
    assert (out / "per_class_accuracy.png").exists() and (out / "confusion_matrix.png").exists()


def test_reference_student_file(work, parity_dir):
    """The reference's pickled-Namespace file (224x224, DeiT-B width, depth 1) on a slice of
    the generated data, upsampled with the reference's eval transform."""
    out = work["tmp"] / "ref_student.json"
    run_ok(["--ckpt", parity_dir / "reference_student_checkpoint.pth", "--json", out, "eval.max_samples=10",
            *work["data_overrides"]], work["tmp"])
    r = json.loads(out.read_text())
    assert r["kind"] == "student" and r["format"] == "reference" and r["num_samples"] == 10
    assert r["config"]["data"]["input_size"] == 224
    assert r["config"]["aug"]["normalize"] == "imagenet" and r["config"]["aug"]["eval_crop_ratio"] == 0.875
    check_metric_object(r["avg"], r["groups"], 10)


@pytest.mark.parametrize("name, fmt", [("reference_teacher_ldam_resnet32.pth.tar", "ldam"),
                                       ("reference_teacher_ce_resnet32.pth", "plain"),
                                       ("reference_teacher_paco_resnet32.pth.tar", "paco")])
def test_reference_teacher_files(work, parity_dir, name, fmt):
    out = work["tmp"] / f"{fmt}.json"
    run_ok(["--ckpt", parity_dir / name, "--json", out, *work["data_overrides"]], work["tmp"])
    r = json.loads(out.read_text())
    assert r["kind"] == "teacher" and r["format"] == fmt and r["num_samples"] == 37
    # The reference CIFAR teachers' own test protocol: 32x32, CIFAR mean/std, no resize.
    assert r["config"]["data"]["input_size"] == 32
    assert r["config"]["aug"]["normalize"] == "cifar" and r["config"]["aug"]["eval_crop_ratio"] == 1.0
    check_metric_object(r["logits"], r["groups"], 10)


def test_distributed_equals_single_process(work, student_run):
    """Two gloo processes (37 images: unequal shards, padded last batch) == one process."""
    two = work["tmp"] / "two.json"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(free_port())]
    proc = run_ok(["--ckpt", work["student"], "--teacher", work["teacher"], "eval.batch_size=8", "--json", two],
                  work["tmp"], launcher=launcher)
    a, b = student_run["json"], json.loads(two.read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert proc.stdout.count("processes   2") == 1  # only the main process reports
    assert a["num_samples"] == b["num_samples"] == 37
    for key in ("overall", "top5", "head", "mid", "tail", "cls", "dist", "avg", "groups", "count_groups",
                "posthoc_images"):
        assert a[key] == b[key], key
    for name in ("cls", "dist", "avg", "avg_la", "avg_cls_la"):  # untuned post-hoc rows: the same images
        assert a["posthoc"][name] == b["posthoc"][name], name
    ra, rb = a["analysis"], b["analysis"]
    assert ra["agreement"] == rb["agreement"] and ra["teacher"] == rb["teacher"]
    for token in ("cls", "dist"):
        for key in ("rank", "components_90", "components_99", "num_samples"):
            assert ra["feature_rank"][token][key] == rb["feature_rank"][token][key]
    # Per-image floats may differ in the last bits between batch shapes; the means must not.
    assert torch.tensor(ra["attention"]["mean_distance"]) == pytest.approx(
        torch.tensor(rb["attention"]["mean_distance"]), rel=1e-5)
    assert ra["attention"]["num_samples"] == rb["attention"]["num_samples"] == 37


# ----------------------------------------------------------------------------- config and errors


def test_help_lists_every_option(capsys):
    import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--ckpt", "--config", "--json", "--out-dir", "--teacher", "--print-config",
                   "eval.analysis", "eval.ema", "eval.batch_size", "eval.max_samples", "data.path",
                   "aug.normalize"):
        assert option in text, option
    for gone in ("--analysis", "--ema", "--batch-size"):  # one spelling per knob: the config keys
        assert gone not in text, gone


def test_config_precedence(work, capsys):
    """stored < --config < overrides; a training config file's other sections skipped."""
    import evaluate

    config = work["tmp"] / "train_config.yaml"
    config.write_text(yaml.safe_dump({"data": {"num_workers": 1, "groups": "count"},
                                      "eval": {"batch_size": 3}, "optim": {"lr": 1e-3}}))
    assert evaluate.main(["--ckpt", str(work["student"]), "--config", str(config), "data.num_workers=0",
                          "eval.batch_size=5", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["path"] == str(work["data"])      # from the checkpoint
    assert cfg["data"]["groups"] == "count"              # --config over the checkpoint
    assert cfg["data"]["num_workers"] == 0               # override over --config
    assert cfg["eval"]["batch_size"] == 5                # override over --config
    assert "optim" not in cfg


def test_reference_teacher_implies_cifar_protocol(work, parity_dir, capsys):
    """A reference ResNet-32 file has no config: 32x32, CIFAR mean/std, no resize; the user wins."""
    import evaluate

    ckpt = str(parity_dir / "reference_teacher_ldam_resnet32.pth.tar")
    assert evaluate.main(["--ckpt", ckpt, "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["data"]["input_size"], cfg["aug"]["normalize"], cfg["aug"]["eval_crop_ratio"]) == (32, "cifar", 1.0)
    assert evaluate.main(["--ckpt", ckpt, "aug.normalize=imagenet", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["aug"]["normalize"] == "imagenet"


def expect_error(argv: list, capsys, *fragments: str) -> None:
    """evaluate.main fails with exit status 2 and a message holding every fragment."""
    import evaluate

    assert evaluate.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_errors_name_the_problem(work, capsys):
    expect_error(["--ckpt", work["tmp"] / "does_not_exist.pth"], capsys, "checkpoint not found")
    expect_error(["--ckpt", work["student"], "eval.bogus=1"], capsys, "eval.bogus")
    expect_error(["--ckpt", work["student"], "data.input_size=64"], capsys, "input_size", "32x32")
    expect_error(["--ckpt", work["teacher"], "eval.analysis=true"], capsys, "needs a student")
    expect_error(["--ckpt", work["student"], "--teacher", work["tmp"] / "nope.pth", "--print-config"], capsys,
                 "teacher checkpoint not found")
    expect_error(["--ckpt", work["student"], "--teacher", work["student"], "--print-config"], capsys,
                 "not a teacher")


def test_class_count_mismatch(work, capsys):
    from models import build_student

    path = work["tmp"] / "student_5_classes.pth"
    save_student(build_student({**STUDENT_ARCH, "num_classes": 5}), work["cfg"], path)
    expect_error(["--ckpt", path], capsys, "class count mismatch", "predicts 5 classes", "has 10")


def test_missing_keys_refused(work, capsys):
    from models import build_student

    model = build_student(STUDENT_ARCH)
    state = model.state_dict()
    del state["head_dist.weight"]
    path = work["tmp"] / "student_missing_key.pth"
    save_student(model, work["cfg"], path, model=state)
    expect_error(["--ckpt", path], capsys, "missing keys", "head_dist.weight")


def test_architecture_mismatch_refused(work, capsys):
    """Stored arch says depth 2, weights are depth 1: refused before building, never a partial model."""
    from models import build_student

    path = work["tmp"] / "student_wrong_arch.pth"
    model = build_student(STUDENT_ARCH)
    save_student(model, work["cfg"], path, arch={**model.student_arch, "depth": 2})
    expect_error(["--ckpt", path], capsys, "the stored arch has depth 2, the weights 1 blocks")


def test_ema_weights(work, capsys):
    """eval.ema on a checkpoint without EMA weights says so; with them, it loads model_ema."""
    import evaluate
    from models import build_student

    expect_error(["--ckpt", work["student"], "eval.ema=true", "--print-config"], capsys, "model_ema")
    model, ema = build_student(STUDENT_ARCH), build_student(STUDENT_ARCH)
    path = work["tmp"] / "student_ema.pth"
    save_student(model, work["cfg"], path, model_ema=ema.state_dict())
    loaded, info = evaluate.load_checkpoint(str(path), ema=True)
    assert info["weights"] == "model_ema"
    torch.testing.assert_close(loaded.head.weight, ema.head.weight)


class _Exploit:
    """Pickles as a call to os.system: what a malicious checkpoint looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused(work):
    marker = work["tmp"] / "pwned"
    path = work["tmp"] / "malicious.pth"
    torch.save({"kind": "student", "model": {}, "payload": _Exploit(marker)}, path)
    proc = run_eval(["--ckpt", path], work["tmp"])
    assert proc.returncode != 0
    assert "refusing to load" in proc.stderr and "system" in proc.stderr
    assert not marker.exists()


# ----------------------------------------------------------------------------- analyses, known answers


def _neighbour_attention(grid: int, offsets: list[tuple[int, int]], prefix: int = 2,
                         prefix_mass: float = 0.0) -> torch.Tensor:
    """(1, 1, N, N) attention: each patch spreads 1 - prefix_mass uniformly over the patches at
    ``offsets`` that exist, and prefix_mass over the CLS/DIST tokens; CLS/DIST rows uniform."""
    m = grid * grid
    n = m + prefix
    attn = torch.zeros(n, n)
    attn[:prefix] = 1.0 / n
    for r in range(grid):
        for c in range(grid):
            keys = [(r + dr) * grid + (c + dc) for dr, dc in offsets
                    if 0 <= r + dr < grid and 0 <= c + dc < grid]
            q = prefix + r * grid + c
            for k in keys:
                attn[q, prefix + k] = (1.0 - prefix_mass) / len(keys)
            attn[q, :prefix] = prefix_mass / prefix
    return attn[None, None]


def test_attention_distance_known_answers():
    from analysis import attention_statistics

    grid = 6
    self_only = attention_statistics(_neighbour_attention(grid, [(0, 0)]), (grid, grid))
    assert self_only["mean_distance"].item() == pytest.approx(0.0, abs=1e-7)
    four = _neighbour_attention(grid, [(-1, 0), (1, 0), (0, -1), (0, 1)])
    assert attention_statistics(four, (grid, grid))["mean_distance"].item() == pytest.approx(1.0)
    diagonal = _neighbour_attention(grid, [(-1, -1), (1, 1), (-1, 1), (1, -1)])
    assert attention_statistics(diagonal, (grid, grid))["mean_distance"].item() == pytest.approx(2 ** 0.5)
    # Half of each patch's attention on CLS/DIST: the renormalised distance is unchanged,
    # the notebook-style raw distance halves.
    half = attention_statistics(_neighbour_attention(grid, [(0, 1), (0, -1)], prefix_mass=0.5), (grid, grid))
    assert half["mean_distance"].item() == pytest.approx(1.0)
    assert half["mean_distance_raw"].item() == pytest.approx(0.5)
    assert half["prefix_attention"].item() == pytest.approx(0.5)
    # CLS/DIST rows uniform over a 6x6 grid: spread sqrt(2 (n^2 - 1) / 12), entropy 1.
    uniform = attention_statistics(four, (grid, grid))
    expected = (2 * (grid ** 2 - 1) / 12) ** 0.5
    assert uniform["cls_spread"].item() == pytest.approx(expected)
    assert uniform["dist_entropy"].item() == pytest.approx(1.0)


def test_token_reads_one_patch_has_no_spread():
    from analysis import attention_statistics

    attn = _neighbour_attention(4, [(0, 0)])
    attn[0, 0, 0] = 0.0
    attn[0, 0, 0, 2 + 5] = 1.0  # CLS reads patch 5 only
    stats = attention_statistics(attn, (4, 4))
    assert stats["cls_spread"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["cls_entropy"].item() == pytest.approx(0.0, abs=1e-6)


def test_recorder_matches_timm_attention_and_sees_local_attention():
    """The recorder (timm's AttentionExtract on the explicit path) gives exactly the statistics
    of softmax(q k^T * scale) recomputed by hand in float32 from each block's input, on a model
    with fused attention, which it restores; a model built so every patch attends to itself
    gives mean attention distance 0."""
    from analysis import AttentionRecorder, attention_statistics
    from models import build_student

    def by_hand(attn, x):  # the recompute the project used before AttentionExtract
        B, N, _ = x.shape
        qkv = F.linear(x.float(), attn.qkv.weight.float(), attn.qkv.bias.float())
        q, k = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[:2]
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    torch.manual_seed(0)
    model = build_student({**STUDENT_ARCH, "depth": 2}).eval()
    assert all(block.attn.fused_attn for block in model.blocks)
    inputs = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), AttentionRecorder(model) as recorder:
        model(x)
        stats = recorder.pop()
    assert stats["mean_distance"].shape == (3, 2, 3)
    for block, (attn, block_input) in enumerate(inputs):
        expected = attention_statistics(by_hand(attn, block_input), (8, 8), ["cls", "dist"])
        for name, value in expected.items():
            assert torch.equal(stats[name][:, block], value), (block, name)
    assert all(block.attn.fused_attn for block in model.blocks)  # restored
    assert not model.blocks[0].attn.attn_drop._forward_hooks  # the recorder removed its hooks

    # Self-attention only: one-hot position embeddings, no patch content, and q = k = a large
    # multiple of the normalised token, so q.k is largest for a token with itself.
    local = build_student({**STUDENT_ARCH, "embed_dim": 72, "num_heads": 1, "depth": 1}).eval()
    with torch.no_grad():
        n = local.pos_embed.shape[1]  # 66 tokens <= 72 dims
        local.patch_embed.proj.weight.zero_()
        local.patch_embed.proj.bias.zero_()
        local.cls_token.zero_()
        local.dist_token.zero_()
        local.pos_embed.zero_()
        local.pos_embed[0, torch.arange(n), torch.arange(n)] = 1.0
        qkv = local.blocks[0].attn.qkv
        qkv.weight.zero_()
        qkv.bias.zero_()
        qkv.weight[:72] = 50.0 * torch.eye(72)
        qkv.weight[72:144] = 50.0 * torch.eye(72)
    with torch.no_grad(), AttentionRecorder(local) as recorder:
        local(torch.randn(2, 3, 32, 32))
        stats = recorder.pop()
    assert stats["mean_distance"].max().item() == pytest.approx(0.0, abs=1e-4)


def test_feature_rank_known_spectrum():
    from analysis import feature_rank

    torch.manual_seed(0)
    n, d = 200, 32
    # Rank 5 plus centring: the rank is 5.
    low = torch.randn(n, 5) @ torch.randn(5, d) + torch.randn(d)  # an offset must not count
    r = feature_rank(low)
    assert r["rank"] == 5 and r["dim"] == d and r["num_samples"] == n
    # Exact energies 0.85, 0.10, 0.04, 0.01: 90% needs 2 components, 99% needs 3.
    a = torch.randn(n, 4, dtype=torch.float64)
    u, _ = torch.linalg.qr(a - a.mean(0))
    v, _ = torch.linalg.qr(torch.randn(d, 4, dtype=torch.float64))
    energies = torch.tensor([0.85, 0.10, 0.04, 0.01], dtype=torch.float64)
    features = (u * energies.sqrt()) @ v.T
    r = feature_rank(features)
    assert (r["rank"], r["components_90"], r["components_99"]) == (4, 2, 3)
    assert r["energy_fraction"][:4] == pytest.approx(energies.tolist())
    full = feature_rank(torch.randn(n, d))
    assert full["rank"] == d


def test_agreement_and_class_permutation():
    from analysis import agreement
    from evaluate import EvalError, class_permutation

    groups = {"head": [0, 1], "mid": [2], "tail": [3]}
    preds = torch.tensor([0, 1, 2, 3, 3, 2])
    targets = torch.tensor([0, 1, 2, 3, 3, 2])
    assert agreement(preds, preds.clone(), targets, groups) == {"overall": 100.0, "head": 100.0,
                                                                "mid": 100.0, "tail": 100.0}
    other = torch.tensor([0, 0, 2, 3, 1, 1])
    a = agreement(preds, other, targets, groups)
    assert a["overall"] == pytest.approx(50.0) and a["head"] == 50.0 and a["mid"] == 50.0 and a["tail"] == 50.0

    # Data order: original label o -> project index data_map[o]; a model trained on original
    # labels must have its columns reordered so column j means project class j.
    data_map = [2, 0, 1]
    perm = class_permutation(None, data_map, 3, original_labels=True)
    logits = torch.tensor([[10.0, 20.0, 30.0]])  # columns: original labels 0, 1, 2
    reordered = logits[:, perm]
    for original, project in enumerate(data_map):
        assert reordered[0, project] == logits[0, original]
    assert class_permutation(None, data_map, 3, original_labels=False) is None
    assert class_permutation(data_map, data_map, 3, original_labels=False) is None
    # A map stored through JSON has string keys; a map of other classes is refused.
    assert class_permutation({"0": 2, "1": 0, "2": 1}, data_map, 3, original_labels=False) is None
    with pytest.raises(EvalError, match="not a permutation"):
        class_permutation([0, 0, 1], data_map, 3, original_labels=False)


def test_pooled_confusion_keeps_rows_at_100():
    from analysis import pool_confusion

    rows = 100.0 * torch.eye(105, dtype=torch.float64)
    pooled, block = pool_confusion(rows, max_cells=100)
    assert block == 2 and pooled.shape == (53, 53)
    torch.testing.assert_close(pooled.diagonal(), torch.full((53,), 100.0, dtype=torch.float64))
    torch.testing.assert_close(pooled.sum(1), torch.full((53,), 100.0, dtype=torch.float64))
    same, block = pool_confusion(rows[:20, :20])
    assert block == 1 and same.shape == (20, 20)
