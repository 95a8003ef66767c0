"""The code's shape: the head contract is one local edit, no import cycles, short signatures.

The head-contract test edits ``DistilledStudent.combine`` (the one place that turns the heads
into the reported prediction) in a copy of the repository, then trains, evaluates and reports
with the copy's unchanged scripts: the reported prediction must be the new combination.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_image_dataset

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "output", "runs", "__pycache__", ".pytest_cache", "tests", "bench", "docs"}


def project_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if not SKIP & set(p.relative_to(ROOT).parts))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_among_project_modules():
    modules = {module_name(p): p for p in project_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    assert {"engine.loop", "models.checkpoint", "models.safe_load"} <= set(graph)
    assert not {d for d in graph["models.safe_load"] if d.startswith("models")}, "safe_load imports a model"

    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_function_takes_more_than_eight_positional_parameters():
    too_long = []
    for path in project_files() + sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 8:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(positional)})")
    assert not too_long, too_long


# ----------------------------------------------------------------------------- head contract

COMBINE = "        return (heads[\"cls\"] + heads[\"dist\"]) / 2\n"
WEIGHTED = "        return 0.25 * heads[\"cls\"] + 0.75 * heads[\"dist\"]\n"


def copy_repository(dest: Path) -> Path:
    def ignore(folder, names):
        return [n for n in names if n in SKIP - {"tests", "bench", "docs"} or n.endswith(".pyc")]

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def test_head_combination_is_one_local_edit(tmp_path):
    """Replace the mean of the heads by a weighted mean in models/student.py only: the
    training script's evaluation, evaluate.py and its report all use the new rule."""
    from data import build_datasets, build_transform
    from engine.metrics import classification_metrics
    from models import load_student, student_outputs

    repo = copy_repository(tmp_path / "repo")
    student_py = repo / "models" / "student.py"
    source = student_py.read_text()
    assert source.count(COMBINE) == 1, "DistilledStudent.combine is no longer the plain mean"
    student_py.write_text(source.replace(COMBINE, WEIGHTED))
    changed = [p.relative_to(repo) for p in repo.rglob("*.py")
               if (ROOT / p.relative_to(repo)).read_text() != p.read_text()]
    assert changed == [Path("models/student.py")]

    data = make_image_dataset(tmp_path / "data", [30, 20, 12, 8, 6, 5, 4, 3, 3, 3], [5] * 10, size=32)
    out = tmp_path / "run"
    common = ["data.dataset=generic", "data.image_column=img", "data.imb_factor=1.0", "data.num_workers=0",
              f"data.path={data}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    train = subprocess.run(
        [sys.executable, "train_student.py", *common, "data.input_size=32", "model.name=deit_tiny_distilled_patch4_32",
         "model.depth=1", "model.embed_dim=48", "model.num_heads=3", "aug.train_crop=pad_crop", "train.epochs=1",
         "train.batch_size=16", "train.max_steps_per_epoch=2", "distill.type=none", "sched.warmup_epochs=0",
         "log.progress=false", "train.mixed_precision=no", f"train.output_dir={out}"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    report = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(out / "checkpoint.pth"),
                             "--json", str(tmp_path / "eval.json")],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())

    # An independent pass with this repository's (unedited) code: the heads' logits, combined here.
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    cfg = ckpt["config"]
    _, dataset_val = build_datasets(cfg["data"], None, build_transform(False, cfg["data"], cfg["aug"]))
    model, _ = load_student(out / "checkpoint.pth")
    images = torch.stack([dataset_val[i][0] for i in range(len(dataset_val))])
    targets = torch.tensor(dataset_val.targets)
    with torch.no_grad():
        heads = student_outputs(model, images)
    weighted = classification_metrics(0.25 * heads["cls"] + 0.75 * heads["dist"], targets, dataset_val.groups, 10)
    mean = classification_metrics(heads["avg"], targets, dataset_val.groups, 10)

    assert result["heads"] == ["cls", "dist", "avg"] and result["prediction"] == "avg"
    assert result["avg"]["per_class"] == pytest.approx(weighted["per_class"])
    assert result["overall"] == pytest.approx(weighted["top1"])
    assert "avg" in report.stdout  # the printed table has the combined row
    # the training script's own evaluation reported the same combination
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert log[-1]["avg_top1"] == pytest.approx(weighted["top1"])
    # ... and the comparison can tell the two rules apart on this data, or says why not
    if mean["per_class"] == weighted["per_class"]:
        logits_differ = not torch.allclose(heads["avg"], 0.25 * heads["cls"] + 0.75 * heads["dist"])
        assert logits_differ  # same argmax by chance, but different combined logits


def test_loss_and_analyses_read_the_head_names_from_heads():
    """The distillation loss and the attention analysis take the heads' names from
    ``DistilledStudent.HEADS`` (the head contract), not from literals: renamed there, the loss
    reads the renamed outputs (first head: labels, second: teacher)."""
    code = (
        "import torch, torch.nn as nn\n"
        "from models.student import DistilledStudent\n"
        "DistilledStudent.HEADS = {'gt': 0, 'kd': 1}\n"
        "from analysis import STUDENT_TOKENS\n"
        "from losses.distillation import DistillationLoss\n"
        "torch.manual_seed(0)\n"
        "a, b, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])\n"
        "loss, terms = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', 0.25, 1.0)(None, {'gt': a, 'kd': b}, y)\n"
        "print(STUDENT_TOKENS, repr(terms['base'].item()), repr(terms['distill'].item()))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    a, b, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy
    expected = f"('gt', 'kd') {(ce(a, y) * 0.75).item()!r} {(ce(b, y) * 0.25).item()!r}"
    assert proc.stdout.strip() == expected


def test_no_python_file_cites_a_style_guide_missing_from_the_repository():
    """Comments say their reason themselves: the house style guide is not in the repository."""
    name = "STYLE" + ".md"
    files = [p for p in ROOT.rglob("*.py") if not {".git", ".venv", "tests"} & set(p.relative_to(ROOT).parts)]
    assert not (ROOT / name).exists()
    assert [str(p.relative_to(ROOT)) for p in files if name in p.read_text()] == []


def test_help_strings_fit_two_lines():
    """A config key's help says what it does and why in a line or two (at most 200 characters);
    provenance belongs in docs/recipe.md."""
    import evaluate
    import train_student
    import train_teacher
    from utils import split_spec

    long = {f"{mod.__name__}: {key}": len(text) for mod in (train_student, train_teacher, evaluate)
            for key, text in split_spec(mod.SPEC)[1].items() if len(text) > 200}
    assert long == {}
