"""Sharing models in timm's hub layout (models/export.py, models/hub.py, evaluate.py --export).

One module fixture evaluates (evaluate.main, in-process) a tiny project student (patch 4, 32x32, depth 1, width 48: not a
registered timm size) with ``--export`` on generated data; the tests read that folder back with
plain timm in a subprocess that imports no project code, with ``evaluate.py --ckpt local-dir:``
and as ``model.init_ckpt``. A timm ``resnet10t`` teacher exported the same way distils a student
through ``distill.teacher_ckpt=local-dir:DIR``. The upload itself (``--push-to-hub``) needs the
network and a token, so only its offline refusal is tested.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from errors import CheckpointError
from helpers import make_image_dataset
from test_train import COUNTS_TEST, COUNTS_TRAIN, STUDENT_ARGS, log_lines, run

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(name="deit_tiny_distilled_patch4_32", num_classes=10, img_size=32, patch_size=4, embed_dim=48,
            depth=1, num_heads=3, mlp_ratio=2.0)


def dataset_of(names):
    return SimpleNamespace(class_map=None, train_counts=COUNTS_TRAIN, class_names=names)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Generated data, a tiny project student (model + different EMA weights), and its
    evaluation with --export (EMA weights)."""
    import evaluate
    from helpers import class_names
    from models.checkpoint import make_checkpoint
    from models.student import build_student

    tmp = tmp_path_factory.mktemp("export")
    data = make_image_dataset(tmp / "data", COUNTS_TRAIN, COUNTS_TEST, size=32)
    cfg = {"data": {"dataset": "generic", "path": str(data), "image_column": "img", "imb_factor": 1.0,
                    "num_workers": 0, "input_size": 32},
           "aug": {"normalize": "cifar", "eval_crop_ratio": 1.0, "eval_interpolation": "bilinear"},
           "distill": {"type": "hard", "teacher_ckpt": "runs/teacher/checkpoint.pth"}}
    torch.manual_seed(0)
    model, ema = build_student(ARCH), build_student(ARCH)
    ckpt = make_checkpoint("student", model.student_arch, model.state_dict(), ema_state=ema.state_dict(),
                           epoch=4, config=cfg, metrics={}, dataset=dataset_of(class_names(10)))
    torch.save(ckpt, tmp / "student.pth")
    out, stdout = tmp / "exported", io.StringIO()
    with contextlib.redirect_stdout(stdout):  # in-process: the script's own main, without a second start-up
        status = evaluate.main(["--ckpt", str(tmp / "student.pth"), "eval.ema=true", "--export", str(out),
                                "--json", str(tmp / "eval.json")])
    assert status == 0, stdout.getvalue()[-3000:]
    return {"tmp": tmp, "data": data, "ckpt": ckpt, "ema": ema, "out": out, "stdout": stdout.getvalue(),
            "eval": json.loads((tmp / "eval.json").read_text()), "names": class_names(10)}


PLAIN_TIMM = """
import json, sys, torch, timm
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    y = model(x)
torch.save({"out": y, "state": model.state_dict()}, sys.argv[3])
print(json.dumps({"label_names": model.pretrained_cfg["label_names"], "arch": type(model).__name__,
                  "data": timm.data.resolve_data_config({}, model=model),
                  "project": sorted(m for m in sys.modules if m.split(".")[0] in
                                    ("models", "evaluate", "engine", "losses", "data", "analysis"))}))
"""


def test_plain_timm_loads_the_export(work):
    """In a fresh interpreter with no project code: the weights are the checkpoint's EMA weights,
    the eval output is the project's avg, label_names are the class names, the data config is
    the evaluation's."""
    from models.checkpoint import load_student
    from models.student import student_outputs

    tmp = work["tmp"]
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp / "x.pt")
    (tmp / "plain_timm.py").write_text(PLAIN_TIMM)
    proc = subprocess.run([sys.executable, "-I", str(tmp / "plain_timm.py"), str(work["out"]), str(tmp / "x.pt"),
                           str(tmp / "y.pt")], cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["project"] == [] and report["arch"] == "VisionTransformerDistilled"
    assert report["label_names"] == work["names"]
    assert report["data"]["input_size"] == [3, 32, 32] and report["data"]["interpolation"] == "bilinear"
    assert report["data"]["crop_pct"] == 1.0 and report["data"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    got = torch.load(tmp / "y.pt")
    ema = work["ckpt"]["model_ema"]
    assert set(got["state"]) == set(ema) and all(torch.equal(got["state"][k], ema[k]) for k in ema)
    model, _ = load_student(tmp / "student.pth", ema=True)
    with torch.no_grad():
        avg = student_outputs(model, x)["avg"]
    torch.testing.assert_close(got["out"], avg, rtol=0, atol=1e-6)


def test_config_and_card(work):
    config = json.loads((work["out"] / "config.json").read_text())
    assert config["architecture"] == "deit_tiny_distilled_patch16_224"  # no registered name: its sizes differ
    assert {k: config["model_args"].get(k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")} \
        == {"patch_size": 4, "embed_dim": 48, "depth": 1, "num_heads": None, "mlp_ratio": 2.0}  # 3 heads: tiny's
    assert config["model_args"]["img_size"] == [32, 32] and config["num_classes"] == 10
    ours = config["deit_lt"]
    assert ours["kind"] == "student" and ours["weights"] == "model_ema" and ours["epoch"] == 4
    assert ours["config"] == work["ckpt"]["config"] and ours["class_names"] == work["names"]
    card = (work["out"] / "README.md").read_text()
    top1 = work["eval"]["avg"]["top1"]
    assert f"| avg | {top1:.2f} |" in card and f"**{work['eval']['num_samples']} images**" in card
    assert "EMA weights" in card and "runs/teacher/checkpoint.pth" in card and "license: unknown" in card
    assert f'timm.create_model("local-dir:{work["out"]}", pretrained=True)' in card
    assert "accelerate launch train_student.py --config train_config.yaml" in card and "@inproceedings" in card
    assert (work["out"] / "train_config.yaml").is_file()
    # the field's rows (evaluate.py's defaults measure them): count-rule groups, post-hoc rows with calibration
    ev = work["eval"]
    count = ev["count_groups"]
    assert count["rule"] in card and "| output | many | medium | few |" in card
    assert "| avg | " + " | ".join(f"{count['avg'][g]:.2f}" if count["avg"][g] is not None else "-"
                                   for g in ("many", "medium", "few")) + " |" in card
    assert f"**{ev['posthoc_images']} images**" in card and ev["posthoc"]
    table = card.split("| row | top-1 |")[1].split("\n\n")[0].splitlines()
    for name, row in ev["posthoc"].items():
        cal = ev["calibration"][name]
        line = next(line for line in table if line.startswith(f"| {name} | {row['top1']:.2f} | "))
        assert f"| {cal['ece']:.2f} | {cal['nll']:.3f} |" in line and line.endswith(f"| {row['tuned_on']} |")
    w = ev["posthoc"]["weighted"]
    assert w["tuned_on"] != "none" and f"w_cls={w['param']['w_cls']:.4g}" in card
    assert "exported student (model_ema weights)" in work["stdout"]


def test_evaluate_reads_the_folder(work):
    """evaluate.py --ckpt local-dir:DIR needs no data path (the stored config has it) and gives
    the numbers of the EMA checkpoint it was exported from; a plain folder works too."""
    import evaluate

    tmp = work["tmp"]
    assert evaluate.main(["--ckpt", f"local-dir:{work['out']}", "--json", str(tmp / "again.json")]) == 0
    again = json.loads((tmp / "again.json").read_text())
    for head in ("cls", "dist", "avg"):
        assert again[head]["top1"] == work["eval"][head]["top1"]
    assert again["num_samples"] == work["eval"]["num_samples"]

    model, info = evaluate.load_checkpoint(str(work["out"]))  # a plain folder in that layout
    assert info["kind"] == "student" and info["class_names"] == work["names"]
    assert torch.equal(model.head.weight, work["ema"].head.weight)


def test_init_ckpt_from_the_folder(work):
    from models.checkpoint import init_student_from
    from models.student import build_student

    model = build_student(ARCH)
    report = init_student_from(model, f"local-dir:{work['out']}")
    assert report["reset"] == [] and report["missing"] == [] and report["resized"] == []
    assert all(torch.equal(v, work["ckpt"]["model_ema"][k]) for k, v in model.state_dict().items())


def test_timm_teacher_folder_distils(work, tmp_path):
    """A timm resnet10t teacher exported the same way is a distill.teacher_ckpt=local-dir:DIR."""
    import timm

    from models.checkpoint import load_teacher, make_checkpoint
    from models.export import export_folder
    from models.teacher import build_teacher

    torch.manual_seed(1)
    teacher = build_teacher("resnet10t", 10)
    cfg = {"data": dict(work["ckpt"]["config"]["data"]), "aug": {"normalize": "cifar", "eval_crop_ratio": 1.0,
                                                                  "eval_interpolation": "bicubic"}}
    torch.save(make_checkpoint("teacher", teacher.teacher_arch, teacher.state_dict(), epoch=2, config=cfg,
                               metrics={}, dataset=dataset_of(work["names"])), tmp_path / "teacher.pth")
    model, info = load_teacher(tmp_path / "teacher.pth")
    metric = {k: 50.0 for k in ("top1", "top5", "head", "mid", "tail")}
    results = {"heads": ["logits"], "prediction": "logits", "logits": metric, "num_samples": 49, "split": "test",
               "dataset": "generic", "group_rule": "reference", "groups": {"head": [0], "mid": [1], "tail": [2]},
               "class_names": work["names"], "train_counts": COUNTS_TRAIN}
    folder = export_folder(tmp_path / "teacher_hub", model, info, results, {**cfg, "data": {**cfg["data"]}},
                           source="teacher.pth")
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-6)
    out = tmp_path / "student"
    proc = run(["train_student.py", *STUDENT_ARGS, f"data.path={work['data']}", f"train.output_dir={out}",
                "train.epochs=1", "distill.drw_epoch=null", f"distill.teacher_ckpt=local-dir:{folder}"])
    assert "'arch': 'resnet10t'" in proc.stdout and log_lines(out)[0]["train_distill"] > 0


def test_resnet32_teacher_refused_before_evaluating(work, capsys):
    import evaluate
    from models.checkpoint import make_checkpoint
    from models.teacher import build_teacher

    teacher = build_teacher("resnet32", 10)
    path = work["tmp"] / "resnet32.pth"
    torch.save(make_checkpoint("teacher", teacher.teacher_arch, teacher.state_dict(), epoch=1,
                               config=work["ckpt"]["config"], metrics={}, dataset=dataset_of(work["names"])), path)
    assert evaluate.main(["--ckpt", str(path), "--export", str(work["tmp"] / "r32")]) == 2
    captured = capsys.readouterr()
    assert "CIFAR ResNet-32" in captured.err and "models.checkpoint.load_teacher" in captured.err
    assert "evaluating" not in captured.out and not (work["tmp"] / "r32").exists()


def test_hub_id_offline_is_one_line(work, capsys, monkeypatch):
    """Offline, a hub id stops with one line naming the key and the id before any data is
    built; so does --push-to-hub before any evaluation."""
    import evaluate
    import train_student
    from utils import load_config

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert evaluate.main(["--ckpt", "hf-hub:nobody/no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--ckpt: hf-hub:nobody/no-such-model" in err and "offline" in err
    assert evaluate.main(["--ckpt", str(work["tmp"] / "student.pth"), "--push-to-hub", "me/model"]) == 2
    captured = capsys.readouterr()
    assert "--push-to-hub me/model" in captured.err and "offline" in captured.err
    assert "evaluating" not in captured.out
    cfg = load_config(train_student.SPEC, [*STUDENT_ARGS, f"data.path={work['data']}",
                                           f"train.output_dir={work['tmp'] / 'never'}",
                                           "distill.teacher_ckpt=hf-hub:nobody/teacher"])
    with pytest.raises(CheckpointError) as e:
        train_student.validate(cfg)
    assert str(e.value).startswith("distill.teacher_ckpt: hf-hub:nobody/teacher") and "offline" in str(e.value)
    assert not (work["tmp"] / "never").exists()


def test_push_uploads_the_folder(work, monkeypatch, capsys):
    """What --push-to-hub does with huggingface_hub (the upload itself needs the network and a
    token: a stand-in HfApi records the calls); without a token it stops before evaluating."""
    import evaluate
    from models.export import push_folder

    calls = []

    class FakeApi:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def create_repo(self, repo_id, exist_ok):
            calls.append(("create_repo", repo_id, exist_ok))
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload_folder", repo_id, folder_path))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert push_folder(work["out"], "me/model") == "https://huggingface.co/me/model/commit/abc"
    assert calls[1:] == [("create_repo", "me/model", True), ("upload_folder", "me/model", str(work["out"]))]
    assert calls[0][1]["library_name"] == "timm"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert evaluate.main(["--ckpt", str(work["tmp"] / "student.pth"), "--push-to-hub", "me/model"]) == 2
    captured = capsys.readouterr()
    assert "--push-to-hub me/model: no Hugging Face token" in captured.err and "evaluating" not in captured.out


def test_teacher_architectures():
    """A project ResNet-50 (torchvision layout) is timm's resnet50, weights and logits alike;
    LDAM's cosine head is no timm classifier and is refused naming the project's loader."""
    from models.export import to_timm
    from models.teacher import build_teacher

    torch.manual_seed(2)
    teacher = build_teacher("resnet50", 7).eval()
    exported = to_timm(teacher, "teacher", teacher.teacher_arch)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert type(exported).__name__ == "ResNet" and torch.equal(exported(x), teacher(x))
    with pytest.raises(CheckpointError, match="'normed' .*models.checkpoint.load_teacher"):
        to_timm(teacher, "teacher", {**teacher.teacher_arch, "head": "normed"})


def test_a_changed_combine_is_not_exported(monkeypatch):
    """timm's student predicts the mean of the heads: a weighted combine() is refused."""
    from models.export import check_exportable
    from models.student import DistilledStudent, build_student

    torch.manual_seed(3)
    model = build_student(ARCH).eval()
    check_exportable(model, "student", model.student_arch, 32)  # the mean: timm's prediction
    monkeypatch.setattr(DistilledStudent, "combine", lambda self, h: 0.8 * h["cls"] + 0.2 * h["dist"])
    with pytest.raises(CheckpointError, match="combine"):
        check_exportable(model, "student", model.student_arch, 32)
