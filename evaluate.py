"""Evaluate a DeiT-LT student or a CNN teacher checkpoint on the long-tailed benchmark's test split.

    python evaluate.py --ckpt runs/c10lt/best_checkpoint.pth --json eval.json --out-dir eval/
    python evaluate.py --ckpt ../shared/parity/reference_student_checkpoint.pth \
        data.path=../shared/data/cifar10-jpeg eval.analysis=true --teacher runs/teacher/checkpoint.pth
    accelerate launch --multi_gpu --num_processes 2 evaluate.py --ckpt ... # same numbers
    python evaluate.py --ckpt runs/c10lt/checkpoint.pth eval.ema=true --export hub/c10lt  # then:
    python evaluate.py --ckpt local-dir:hub/c10lt   # or timm.create_model("local-dir:hub/c10lt", pretrained=True)

Reports top-1 and top-5, per-class accuracy (from the confusion matrix) and head / mid / tail
(means of per-class accuracies over the groups' classes, docs/recipe.md section 6) for each of
the student's heads and their combination (``DistilledStudent.combine``: the mean of the logits,
'avg', the reported prediction as the reference); for a teacher, for its single head. Every
process evaluates a shard; per batch each head is reduced to per-image predictions that are
gathered and de-duplicated, and counted per class (``engine.metrics``): one or several processes
give identical numbers, and memory does not grow with images x classes (``eval.save_logits``
keeps the logits for those who want them). Beside them (``engine/posthoc.py``): the field's
count-rule groups (many > 100 / medium / few < 20 training images), post-hoc rows (logit
adjustment; expert combinations tuned on images they are not reported on), calibration (ECE,
NLL, a reliability diagram) and accuracy under forward / backward long-tailed test priors. A
checkpoint trained in bf16 (fp16) is evaluated in it unless ``eval.mixed_precision`` says otherwise.

Checkpoints: the project's portable files and the reference's released formats (student,
LDAM, CE, PaCo teachers), always through ``models.checkpoint.safe_load``
(``weights_only=True``; a pickle that would run code is refused) and strict loading.

The config loader is the training scripts' (``utils.parse_config``): defaults < the
checkpoint's stored ``data``/``aug`` sections (project files) or what a reference file implies
(a CIFAR ResNet-32 teacher: 32x32 input, CIFAR normalisation, no resize) < ``--config`` (a
training config works: its other sections are skipped) < ``section.key=value`` overrides. A
student's input size is its architecture's ``img_size``.

Sharing (models/export.py): ``--export DIR`` then writes the scored weights in timm's hub layout
(config.json, model.safetensors, a model card README.md with the table just measured);
``--push-to-hub user/name`` uploads that folder. ``--ckpt`` and ``--teacher`` also take such a
model: ``hf-hub:user/name``, ``local-dir:DIR`` or the folder itself (models/hub.py).

``eval.analysis=true`` (implied by ``--teacher``) adds the paper's analyses (``analysis.py``): mean attention distance per block
and head, CLS/DIST attention spread, the rank of the CLS and DIST features, and the agreement
of CLS, DIST and (with ``--teacher``) the teacher's predictions.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Subset

import analysis
from data import (AUG_SPEC, DATA_SPEC, build_datasets, build_transform, validate_aug_config,
                  validate_data_config)
from data.build import check_input_size
from data.groups import count_rule_groups
from engine import posthoc
from engine.device import build_accelerator, fast_math_summary, precision_summary
from engine.metrics import EvalCounts, group_mean, stream_evaluation
from errors import CheckpointError, ConfigError, ProjectError, run_main
from models.checkpoint import load_any, load_student, load_teacher
from models.export import DEFAULT_LICENSE, check_exportable, check_push, export_folder, push_folder
from models.hub import is_hub_source, resolve_folder
from models.student import output_names, student_outputs
from models.teacher import teacher_input_size
from utils import atomic_write_text, check, git_sha, parse_config, print_config

EVAL_SPEC = {
    "batch_size": (128, "images per process and batch"),
    "mixed_precision": (None, "null: the checkpoint's bf16/fp16 training precision, else accelerate's "
                              "choice; logits are cast to fp32 before any argmax or combination",
                        ("no", "bf16", "fp16")),
    "tf32": (True, "on CUDA: TF32 matmuls and cudnn.benchmark (as train.tf32); no effect on a CPU"),
    "ema": (False, "evaluate the student's EMA weights (model_ema) instead of model"),
    "analysis": (False, "run the paper's analyses: attention distance, feature rank, agreement"),
    "max_samples": (None, "evaluate only this many test images, evenly spaced over the split (quick "
                          "checks; the numbers are then not the benchmark's)", int),
    "teacher_input_size": (None, "input size of --teacher; null = its stored data.input_size, else 32 "
                                 "for resnet32 and 224 otherwise", int),
    "save_logits": (None, "also write every head's logits (N x C float32, split order) and the targets to "
                          "this .pt file; off by default: the evaluation itself streams per-class counts "
                          "and never holds N x C", str),
    "posthoc": (True, "report the post-hoc rows (logit adjustment, expert combinations), calibration "
                      "(ECE, NLL) and accuracy under shifted test priors"),
    "tune_list": (None, "split file (as data.val_list) of the images the post-hoc parameters are tuned on, "
                        "e.g. ImageNet_LT_val.txt; null: the run's hold-out, else eval.tune_fraction", str),
    "tune_fraction": (0.5, "without a tuning list or hold-out: the seeded share of the evaluation images "
                           "the parameters are tuned on; the post-hoc rows are reported on the rest; 0: "
                           "no tuned rows", float),
    "tune_seed": (0, "seed of the tuning split and of the sample below"),
    "tune_max_mb": (256, "cap on the tuning logits kept in memory (fp16): beyond it a seeded sample of the "
                         "tuning images is used, so the evaluation's memory stays bounded at any class count"),
    "allow_class_mismatch": (False, "evaluate even when the checkpoint's class names differ from the "
                                    "data's (its numbers then mean little); false: refuse"),
}
SPEC = {"data": DATA_SPEC, "aug": AUG_SPEC, "eval": EVAL_SPEC}

# A reference CIFAR teacher (LDAM-DRW, CE, PaCo code) was trained and tested on 32x32 images
# normalised with the CIFAR mean/std and no resize; its files carry no config to say so.
REFERENCE_CIFAR_TEACHER = {"data": {"input_size": 32}, "aug": {"normalize": "cifar", "eval_crop_ratio": 1.0}}
REFERENCE_FORMATS = ("reference", "ldam", "paco", "plain")


class EvalError(ProjectError, RuntimeError):
    """A problem with the inputs (file, checkpoint, data); the message says what to fix."""


def validate(cfg: dict) -> None:
    """Range checks of the resolved config (ConfigError naming the key). They run after every
    layer is merged, so values from the checkpoint's stored data/aug sections get the same
    checks as typed ones (a stored data.input_size of 100000 would otherwise make the eval
    transform resize every image to 100000 x 100000)."""
    validate_data_config(cfg["data"])
    validate_aug_config(cfg["aug"], cfg["data"]["input_size"])
    e = cfg["eval"]
    check(e["batch_size"] >= 1, "eval.batch_size", f"must be >= 1, got {e['batch_size']}")
    check(e["max_samples"] is None or e["max_samples"] >= 1, "eval.max_samples",
          f"must be >= 1 (null: the whole split), got {e['max_samples']}")
    check(0.0 <= e["tune_fraction"] < 1.0, "eval.tune_fraction", f"must be in [0, 1), got {e['tune_fraction']}")
    check(e["tune_max_mb"] >= 1, "eval.tune_max_mb", f"must be >= 1, got {e['tune_max_mb']}")
    if e["teacher_input_size"] is not None:
        check_input_size(e["teacher_input_size"], "eval.teacher_input_size")


def validate_with_origin(cfg: dict, args: argparse.Namespace, stored: dict) -> None:
    """``validate(cfg)``; a refused value that came from the checkpoint (not typed, not in
    --config) says so, since the user never wrote it."""
    try:
        validate(cfg)
    except ConfigError as e:
        section, _, key = str(e).split(":", 1)[0].partition(".")
        if f"{section}.{key}" not in args.explicit_keys and key in (stored.get(section) or {}):
            raise ConfigError(f"{e} (the value comes from the stored config of {args.ckpt})") from None
        raise


def check_output_paths(json_path: str | None, out_dir: str | None) -> None:
    """Refuse, before any evaluation, output paths that could only fail once it is done: an
    --out-dir that is a file (or lies under one), a --json that is a folder (or lies under a
    file)."""
    def blocking_file(path: Path) -> Path | None:
        for candidate in (path, *path.parents):
            if candidate.exists():
                return candidate if not candidate.is_dir() else None
        return None

    if out_dir:
        blocker = blocking_file(Path(out_dir))
        if blocker is not None:
            what = "is an existing file" if blocker == Path(out_dir) else f"lies under the file {blocker}"
            raise EvalError(f"--out-dir {out_dir} {what}, not a folder")
    if json_path:
        path = Path(json_path)
        if path.is_dir():
            raise EvalError(f"--json {json_path} is an existing folder; give a file name")
        blocker = blocking_file(path.parent)
        if blocker is not None:
            raise EvalError(f"--json {json_path} lies under the file {blocker}, not a folder")


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """evaluate.py's own flags (everything else is a ``section.key=value`` config key)."""
    parser.add_argument("--ckpt", required=True, help="checkpoint to evaluate: the project's "
                        "checkpoint.pth / best_checkpoint.pth, a reference student or teacher file, or an "
                        "exported model: hf-hub:user/name, local-dir:DIR")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the metrics as JSON here "
                        "(default with --out-dir: OUT_DIR/eval.json)")
    parser.add_argument("--out-dir", default=None, metavar="DIR", help="write per_class_accuracy.png, "
                        "confusion_matrix.png (and the analyses' JSON and PNG files) here")
    parser.add_argument("--teacher", default=None, metavar="PATH", help="a teacher checkpoint for the "
                        "DIST-vs-teacher agreement analysis (implies eval.analysis=true)")
    parser.add_argument("--export", default=None, metavar="DIR", help="after evaluating, write the model in "
                        "timm's hub layout (config.json, model.safetensors, model card README.md) here")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload that folder to the "
                        "Hugging Face hub (user/name; token from HF_TOKEN or the login cache)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, metavar="ID", help="the model card's licence "
                        "field (a hub licence id, e.g. apache-2.0, cc-by-nc-4.0)")


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str, ema: bool = False, teacher: bool = False) -> tuple[torch.nn.Module, dict]:
    """A student or teacher (``teacher=True``: a teacher only) from ``path``, strictly and
    safely loaded; EvalError naming the problem otherwise."""
    what = "teacher checkpoint" if teacher else "checkpoint"
    if is_hub_source(path):  # hf-hub:user/name, local-dir:DIR or a folder in timm's hub layout
        path = str(resolve_folder(path, "--teacher" if teacher else "--ckpt"))
    elif not Path(path).is_file():
        raise EvalError(f"{what} not found: {path}")
    try:
        if teacher:
            return load_teacher(path)
        return load_student(path, ema=True) if ema else load_any(path)
    except CheckpointError as e:
        raise EvalError(f"cannot load {what} {path}: {e}") from None


def check_class_names(model_names, data_names, perm: torch.Tensor | None, what: str,
                      allow: bool, log: Callable) -> None:
    """Refuse (EvalError) a model trained on other classes than the data's (``model_names``: the
    class names a project checkpoint stores, None for reference files): the data's class j
    is compared with the model's class ``perm[j]`` (the column its logits come from), so a
    mere reordering that the class maps explain is no mismatch. ``allow`` turns the refusal
    into a warning (``eval.allow_class_mismatch``)."""
    if not model_names or data_names is None:
        return
    n = len(data_names)
    if len(model_names) != n:
        differ = [f"it has {len(model_names)} class names, the data {n}"]
    else:
        order = perm.tolist() if perm is not None else list(range(n))
        pairs = [(j, model_names[order[j]], data_names[j]) for j in range(n)]
        wrong = [(j, m, d) for j, m, d in pairs if str(m) != str(d)]
        differ = [f"class {j} is {m!r} there, {d!r} in the data" for j, m, d in wrong[:3]]
        if len(wrong) > 3:
            differ.append(f"... {len(wrong)} of {n} differ")
    if not differ:
        return
    message = f"the {what} was trained on other classes than the data's: {'; '.join(differ)}"
    if not allow:
        raise EvalError(f"{message}; set eval.allow_class_mismatch=true to evaluate anyway")
    log(f"WARNING: {message}; evaluated anyway (eval.allow_class_mismatch=true)")


def stored_config(info: dict) -> dict | None:
    """The project's checkpoints hold the resolved training config; reference files do not."""
    if info.get("format") != "project":
        return None
    return info.get("config") or info.get("args")


def checkpoint_precision(asked: str | None, info: dict) -> str | None:
    """``eval.mixed_precision``, or when null the checkpoint's ``train.mixed_precision`` if it
    names bf16 or fp16: a bf16-trained student is evaluated in bf16, as in its training log
    (null again: accelerate's choice)."""
    stored = ((stored_config(info) or {}).get("train") or {}).get("mixed_precision")
    return asked if asked is not None or stored not in ("bf16", "fp16") else stored


def as_class_map(value, num_classes: int, what: str) -> list[int] | None:
    """A class map as a list ``map[original] = index``; JSON-made dicts have string keys."""
    if value is None:
        return None
    try:
        if isinstance(value, dict):
            value = [value[str(o)] if str(o) in value else value[o] for o in range(num_classes)]
        value = [int(v) for v in value]
    except (KeyError, TypeError, ValueError):
        raise EvalError(f"{what} does not map the original labels 0..{num_classes - 1}") from None
    if sorted(value) != list(range(num_classes)):
        raise EvalError(f"{what} is not a permutation of the {num_classes} classes (it has {len(value)} entries)")
    return value


def class_permutation(model_map: list | None, data_map: list | None, num_classes: int,
                      original_labels: bool) -> torch.Tensor | None:
    """Column order that puts a model's logits into the evaluation data's class order.

    A class map sends an original label to a project index (classes sorted by count). A
    model without one predicts in the data's order, except reference teachers, which were
    trained on original labels (docs/recipe.md section 2: ImageNet-LT teachers go through class_map).
    Returns None when no reordering is needed.
    """
    identity = list(range(num_classes))
    data_map = as_class_map(data_map, num_classes, "the data's class map")
    model_map = as_class_map(model_map, num_classes, "the checkpoint's class map")
    data_map = data_map if data_map is not None else identity
    if model_map is None:
        model_map = identity if original_labels else data_map
    perm = [0] * num_classes
    for original in range(num_classes):
        perm[data_map[original]] = model_map[original]
    return None if perm == identity else torch.tensor(perm)


# ----------------------------------------------------------------------------- evaluation


def make_forward(kind: str, model: torch.nn.Module, teacher: torch.nn.Module | None,
                 teacher_size: int | None, analyse: bool, perm: torch.Tensor | None = None,
                 teacher_perm: torch.Tensor | None = None) -> tuple[Callable, contextlib.ExitStack]:
    """``forward(model, images) -> dict`` of logits (plus features and attention statistics
    for the analyses), and the context that holds the analysis hooks. ``perm`` /
    ``teacher_perm`` reorder the model's / the teacher's logits to the data's classes."""
    hooks = contextlib.ExitStack()
    features: dict[str, torch.Tensor] = {}
    recorder = None
    if analyse:
        recorder = hooks.enter_context(analysis.AttentionRecorder(model))
        # The pre-head features are read off the heads' inputs, so they are exactly what
        # produced the logits whatever the forward does before.
        for name, head in model.head_modules().items():
            handle = head.register_forward_pre_hook(lambda m, args, name=name: features.__setitem__(name, args[0]))
            hooks.callback(handle.remove)

    def forward(model, images):
        out = {"logits": model(images)} if kind == "teacher" else student_outputs(model, images)
        if perm is not None:
            out = {k: v[:, perm.to(v.device)] for k, v in out.items()}
        if recorder is not None:
            out.update({f"feat_{k}": v for k, v in features.items()})
            out.update({f"attn_{k}": v for k, v in recorder.pop().items()})
        if teacher is not None:
            logits = teacher(analysis.resize_for_teacher(images, teacher_size))
            out["teacher"] = logits if teacher_perm is None else logits[:, teacher_perm.to(logits.device)]
        return out

    return forward, hooks


def tuning_split(cfg: dict, dataset, stored_holdout: float, transform, tune_heads: int, num_classes: int,
                 quiet) -> tuple:
    """``(tune_dataset, report_dataset, tuned_on)``: the images the post-hoc parameters are tuned on
    and those the post-hoc rows are reported on, never the same ones (docstring of engine/posthoc.py).

    ``eval.tune_list`` (tuned_on ``tune_list``), else the checkpoint's held-out training images
    when it was trained with ``data.val_holdout`` and the test split is evaluated (``holdout``),
    else a seeded ``eval.tune_fraction`` of the evaluation images (``tune_split``; 0: no tuning,
    ``none``). At most ``eval.tune_max_mb`` of fp16 logits: a seeded sample beyond it.
    """
    e = cfg["eval"]
    generator = torch.Generator().manual_seed(e["tune_seed"])
    cap = max(1, e["tune_max_mb"] * 2 ** 20 // (2 * num_classes * tune_heads))

    def capped(ds, n: int) -> list[int]:
        return sorted(torch.randperm(len(ds), generator=generator)[:min(n, cap)].tolist())

    source = None
    if e["tune_list"] is not None:
        if cfg["data"]["train_list"] is None:
            raise EvalError("eval.tune_list needs split files (data.train_list / data.val_list, the ImageNet-LT "
                            "/ iNat layout); for other data use eval.tune_fraction")
        source, tuned_on = {**cfg["data"], "val_list": e["tune_list"], "val_holdout": 0.0}, "tune_list"
    elif stored_holdout and not cfg["data"]["val_holdout"]:
        source, tuned_on = {**cfg["data"], "val_holdout": stored_holdout}, "holdout"
    if source is not None:
        try:
            with quiet:
                _, tune_set = build_datasets(source, None, transform, verbose=False)
        except (ValueError, FileNotFoundError, ConnectionError) as err:
            raise EvalError(f"cannot build the tuning images ({tuned_on}): {err}") from None
        return Subset(tune_set, capped(tune_set, len(tune_set))), dataset, tuned_on
    n = int(round(e["tune_fraction"] * len(dataset)))
    if n == 0:
        return None, dataset, "none"
    tune = capped(dataset, n)
    chosen = set(tune)
    return Subset(dataset, tune), Subset(dataset, [i for i in range(len(dataset)) if i not in chosen]), "tune_split"


def posthoc_results(counts: EvalCounts, names: list[str], params: dict, tuned_on: str, groups: dict,
                    train_counts: list[int]) -> dict:
    """The JSON's ``posthoc``, ``calibration``, ``test_priors`` and reliability bins."""
    metrics = counts.metrics(groups)
    order = analysis.count_order(train_counts)
    out = {"posthoc": {}, "calibration": {}, "test_priors": {}, "reliability": {}}
    for name in names:
        key = f"posthoc/{name}"  # the rows' names in the counts, apart from the heads'
        m = metrics[key]
        out["posthoc"][name] = {"top1": m["top1"], "head": m["head"], "mid": m["mid"], "tail": m["tail"],
                                "param": posthoc.param_of(name, params),
                                "tuned_on": tuned_on if posthoc.is_tuned(name) else "none"}
        out["calibration"][name] = posthoc.ece_nll(counts.bins[key])
        out["reliability"][name] = posthoc.reliability(counts.bins[key])
        out["test_priors"][name] = posthoc.test_prior_accuracies(m["per_class"], order)
    out["posthoc_images"] = int(counts.support.sum())
    return out


def image_order(tune_set, report_set, tuned_on: str, n: int) -> list[int]:
    """Positions in the evaluated split of the saved logits' rows: the tuning part first when
    it was cut from the evaluation images (tune_split), else the split's order."""
    if tuned_on == "tune_split":
        return list(tune_set.indices) + list(report_set.indices)
    return list(range(n))


def run_analyses(outputs: dict, counts: EvalCounts, groups: dict, model: torch.nn.Module, arch: dict) -> dict:
    """The paper's analyses on the gathered features and attention statistics and the counted
    predictions (see analysis.py for the definitions)."""
    heads, prediction = list(model.HEADS), model.PREDICTION
    targets = counts.all_targets()
    attention = {k[len("attn_"):]: v for k, v in outputs.items() if k.startswith("attn_")}
    result = {
        "attention": analysis.summarise_attention(attention, arch["patch_size"], model.patch_embed.grid_size,
                                                  tokens=heads),
        "feature_rank": {name: analysis.feature_rank(outputs[f"feat_{name}"]) for name in heads},
    }
    preds = {name: counts.prediction(name) for name in (*heads, prediction)}
    pairs = {f"{a}_vs_{b}": analysis.agreement(preds[a], preds[b], targets, groups)
             for i, a in enumerate(heads) for b in heads[i + 1:]}
    if "teacher" in counts.names:
        preds["teacher"] = counts.prediction("teacher")
        for name in (*heads[::-1], prediction):  # dist first: the head that learns from the teacher
            pairs[f"{name}_vs_teacher"] = analysis.agreement(preds[name], preds["teacher"], targets, groups)
        result["teacher"] = counts.metrics(groups, ["teacher"])["teacher"]
    result["agreement"] = pairs
    return result


# ----------------------------------------------------------------------------- reporting


def format_report(results: dict) -> str:
    """The readable table printed at the end."""
    def fmt(v):
        return f"{v:6.1f}" if v is not None else "     -"

    groups = results["groups"]
    lines = [
        f"checkpoint  {results['checkpoint']} ({results['kind']}, {results['format']} format, "
        f"epoch {results['epoch']}, weights {results['weights']})",
        f"data        {results['dataset']} split {results['split']!r}: {results['num_samples']} images, "
        f"{len(results['class_names'])} classes; groups by {results['group_rule']}: "
        + ", ".join(f"{g} {len(groups[g])}" for g in ("head", "mid", "tail")),
        f"processes   {results['world_size']}",
        "",
        f"{'':8}" + "".join(f" {title:>6}" for title in ("top-1", "top-5", "head", "mid", "tail")),
    ]
    heads = results["heads"]
    for h in heads:
        lines.append(f"{h:8}" + "".join(f" {fmt(results[h][k])}" for k in ("top1", "top5", "head", "mid", "tail")))
    if len(results["class_names"]) <= 20:  # per-class rows stay readable for CIFAR-10-sized label sets
        member = {c: g for g in ("head", "mid", "tail") for c in groups[g]}
        lines += ["", f"{'class':<14}{'train':>7}  {'group':<6}" + "".join(f" {h:>6}" for h in heads)]
        for c, name in enumerate(results["class_names"]):
            lines.append(f"{name[:13]:<14}{results['train_counts'][c]:>7}  {member.get(c, ''):<6}"
                         + "".join(f" {fmt(results[h]['per_class'][c])}" for h in heads))
    count = results.get("count_groups")
    if count:
        sizes = ", ".join(f"{g} {len(count['classes'][g])}" for g in ("many", "medium", "few"))
        lines += ["", f"groups by the field's count rule ({count['rule']}): {sizes}",
                  f"{'':8}" + "".join(f" {t:>6}" for t in ("many", "medium", "few"))]
        lines += [f"{h:8}" + "".join(f" {fmt(count[h][g])}" for g in ("many", "medium", "few")) for h in heads]
    if results.get("posthoc"):
        tuning = results["posthoc_tuning"]
        lines += ["", f"post-hoc rows on {results['posthoc_images']} images (tuned on {tuning['tuned_on']}: "
                      f"{tuning['images']} images; ECE % over 15 bins, NLL per image)",
                  f"{'':13}" + "".join(f" {t:>6}" for t in ("top-1", "head", "mid", "tail", "ECE", "NLL"))
                  + "  param"]
        for name, row in results["posthoc"].items():
            cal = results["calibration"][name]
            param = ", ".join(f"{k}={v:g}" for k, v in (row["param"] or {}).items())
            lines.append(f"{name:13}" + "".join(f" {fmt(row[k])}" for k in ("top1", "head", "mid", "tail"))
                         + f" {fmt(cal['ece'])} {cal['nll']:6.3f}  {param}")
        names = posthoc.prior_names()
        short = [n.replace("forward_", "f").replace("backward_", "b").replace("uniform", "1") for n in names]
        lines += ["", "accuracy under long-tailed test priors (f: forward, b: backward imbalance; 1: uniform)",
                  f"{'':13}" + "".join(f" {t:>5}" for t in short)]
        for name, acc in results["test_priors"].items():
            lines.append(f"{name:13}" + "".join(f" {acc[n]:5.1f}" if acc[n] is not None else "     -" for n in names))
    extra = results.get("analysis")
    if extra:
        att, ranks = extra["attention"], extra["feature_rank"]
        per_block = ", ".join(f"{sum(b) / len(b):.2f}" for b in att["mean_distance"])
        lines += ["", f"mean attention distance of patches per block (patches): {per_block}"]
        for token in ranks:
            spread = ", ".join(f"{sum(b) / len(b):.2f}" for b in att[token]["spread"])
            lines.append(f"{token.upper()} attention spread per block (patches): {spread}")
        for token in ranks:
            r = ranks[token]
            lines.append(f"{token.upper()} features: rank {r['rank']} of {r['dim']}, 90% energy in "
                         f"{r['components_90']}, 99% in {r['components_99']} components")
        for pair, a in extra["agreement"].items():
            lines.append(f"agreement {pair}: {fmt(a['overall']).strip()}% (head {fmt(a['head']).strip()}, "
                         f"mid {fmt(a['mid']).strip()}, tail {fmt(a['tail']).strip()})")
    return "\n".join(lines)


def write_outputs(results: dict, counts: EvalCounts, block: int, json_path: str | None,
                  out_dir: str | None) -> None:
    title = f"{Path(results['checkpoint']).name}: {results['dataset']}, {results['num_samples']} images"
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        print(f"plotting the figures into {out} ...", flush=True)
        per_class = {h: results[h]["per_class"] for h in results["heads"]}
        analysis.plot_per_class(out / "per_class_accuracy.png", per_class, results["train_counts"],
                                results["groups"], title)
        analysis.plot_confusion(out / "confusion_matrix.png", counts.confusion, results["train_counts"],
                                results["class_names"], f"{title} ({results['prediction']})", block)
        if results.get("reliability"):
            analysis.plot_reliability(out / "reliability.png", results["reliability"], title)
        extra = results.get("analysis")
        if extra:
            analysis.plot_attention(out / "attention_distance.png", extra["attention"])
            analysis.plot_feature_rank(out / "feature_rank.png", extra["feature_rank"])
            analysis.plot_agreement(out / "agreement.png", extra["agreement"])
            for name in ("attention", "feature_rank", "agreement"):
                atomic_write_text(out / f"analysis_{name}.json", json.dumps(extra[name], indent=1))
        json_path = json_path or str(out / "eval.json")
    if json_path:
        atomic_write_text(json_path, json.dumps(results, indent=1))


def share(args: argparse.Namespace, model: torch.nn.Module, info: dict, results: dict, cfg: dict,
          perm: torch.Tensor | None) -> None:
    """--export / --push-to-hub: the folder in timm's hub layout with the card of ``results``."""
    import tempfile

    folder = args.export or tempfile.mkdtemp(prefix="deit_lt_export_")
    export_folder(folder, model, info, results, cfg, perm=None if perm is None else perm.tolist(),
                  source=str(args.ckpt), license=args.license, hub_id=args.push_to_hub)
    print(f"exported {results['kind']} ({info.get('weights', 'model')} weights) in timm's hub layout to {folder}")
    if args.push_to_hub:
        print(f"uploaded to https://huggingface.co/{args.push_to_hub}: {push_folder(folder, args.push_to_hub)}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 with one line naming the bad key, file or value."""
    return run_main(evaluate_checkpoint, argv)


def evaluate_checkpoint(argv: list[str] | None) -> int:
    # ---------------------------------------------------------------- checkpoint and config
    loaded: dict = {}

    def checkpoint_layers(args) -> list:
        """The checkpoint's stored data/aug sections, or what a reference file implies."""
        model, info = load_checkpoint(args.ckpt)
        loaded.update(model=model, info=info)
        layers = [("the checkpoint's stored config", stored_config(info) or {})]
        if info["kind"] == "teacher" and info["format"] in REFERENCE_FORMATS and info["arch"]["arch"] == "resnet32":
            layers.append(("the checkpoint's format", REFERENCE_CIFAR_TEACHER))
        return layers

    cfg, args = parse_config(SPEC, argv, __doc__.split("\n\n")[0], add_arguments=add_arguments,
                             base_layers=checkpoint_layers, other_sections_ok=True)
    model, info = loaded["model"], loaded["info"]
    kind, arch = info["kind"], info["arch"]
    if args.teacher:
        cfg["eval"]["analysis"] = True
    if cfg["eval"]["ema"]:
        model, info = load_checkpoint(args.ckpt, ema=True)
    if kind == "student":  # a ViT's position embedding fixes its input size
        if "data.input_size" in args.explicit_keys and cfg["data"]["input_size"] != arch["img_size"]:
            raise EvalError(f"data.input_size={cfg['data']['input_size']} but the checkpoint's student "
                            f"takes {arch['img_size']}x{arch['img_size']} images (arch img_size)")
        cfg["data"]["input_size"] = arch["img_size"]
    # The test split, not the held-out training images a run with data.val_holdout > 0 chose
    # its best checkpoint on (its stored data section carries val_holdout): unless asked for.
    split_note = None
    stored_holdout = cfg["data"]["val_holdout"]
    if stored_holdout and "data.val_holdout" not in args.explicit_keys:
        cfg["data"]["val_holdout"] = 0.0
        split_note = (f"the checkpoint was trained with data.val_holdout={stored_holdout}: evaluating the "
                      f"test split (data.val_split={cfg['data']['val_split']!r}), not the held-out "
                      f"training images (set data.val_holdout={stored_holdout} to score those)")
    if cfg["eval"]["analysis"] and kind != "student":
        raise EvalError("eval.analysis needs a student checkpoint (attention, CLS/DIST features)")
    if not args.print_config:
        validate_with_origin(cfg, args, stored_config(info) or {})
        check_output_paths(args.json, args.out_dir)
        if args.export or args.push_to_hub:  # refused before any evaluation
            check_exportable(model, kind, arch, cfg["data"]["input_size"])
            if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
                raise EvalError(f"--export {args.export} is an existing file, not a folder")
            if args.push_to_hub:
                check_push(args.push_to_hub)
    teacher, teacher_info = load_checkpoint(args.teacher, teacher=True) if args.teacher else (None, None)
    if args.print_config:
        print_config(cfg)
        return 0
    teacher_size = None
    if teacher is not None:  # a stored size is checked (CheckpointError naming the file) before any data
        teacher_size = cfg["eval"]["teacher_input_size"] or teacher_input_size(teacher_info, 224)

    accelerator = build_accelerator({"mixed_precision": checkpoint_precision(cfg["eval"]["mixed_precision"], info),
                                     "tf32": cfg["eval"]["tf32"]})
    main_process = accelerator.is_main_process
    log = accelerator.print
    if split_note:
        log(split_note)

    # ---------------------------------------------------------------- data
    eval_transform = build_transform(False, cfg["data"], cfg["aug"])
    quiet = contextlib.nullcontext() if main_process else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            _, dataset_val = build_datasets(cfg["data"], None, eval_transform)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        raise EvalError(f"cannot build the data: {e}") from None
    num_classes = dataset_val.num_classes
    if arch["num_classes"] != num_classes:
        raise EvalError(f"class count mismatch: the checkpoint predicts {arch['num_classes']} classes, "
                        f"the data ({cfg['data']['dataset']}) has {num_classes}")
    perm = class_permutation(info.get("class_map"), dataset_val.class_map, num_classes,
                             original_labels=kind == "teacher" and info["format"] in REFERENCE_FORMATS)
    if perm is not None:
        log("the checkpoint's class order differs from the data's: its logits are reordered to the data's")
    check_class_names(info.get("class_names"), dataset_val.class_names, perm,
                      f"checkpoint {args.ckpt}", cfg["eval"]["allow_class_mismatch"], log)
    if cfg["data"]["val_holdout"]:
        log(f"evaluation split: {len(dataset_val)} held-out training images (data.val_holdout="
            f"{cfg['data']['val_holdout']} of split {dataset_val.split!r}), not the test split")
    else:
        log(f"evaluation split: {dataset_val.split!r} ({len(dataset_val)} images)")
    dataset = dataset_val
    if cfg["eval"]["max_samples"] is not None and cfg["eval"]["max_samples"] < len(dataset_val):
        n = cfg["eval"]["max_samples"]
        dataset = Subset(dataset_val, [i * len(dataset_val) // n for i in range(n)])

    def loader(images) -> DataLoader:
        return accelerator.prepare(DataLoader(images, batch_size=cfg["eval"]["batch_size"], shuffle=False,
                                              num_workers=cfg["data"]["num_workers"],
                                              pin_memory=torch.cuda.is_available(), drop_last=False))

    heads = output_names(model) if kind == "student" else ["logits"]
    base_heads = [h for h in heads if h in ("cls", "dist")] or heads  # a student's avg is derived
    tune_set, report_set, tuned_on = None, dataset, "none"
    if cfg["eval"]["posthoc"]:
        tune_set, report_set, tuned_on = tuning_split(cfg, dataset, stored_holdout, eval_transform,
                                                      len(base_heads), num_classes, quiet)
        log(f"post-hoc rows: tuned on {tuned_on} ({len(tune_set) if tune_set is not None else 0} images), "
            f"reported on {len(report_set)} images")

    # ---------------------------------------------------------------- teacher (agreement analysis)
    teacher_perm = None
    if teacher is not None:
        if teacher_info["arch"]["num_classes"] != num_classes:
            raise EvalError(f"class count mismatch: the teacher predicts {teacher_info['arch']['num_classes']} "
                            f"classes, the data has {num_classes}")
        teacher_perm = class_permutation(teacher_info.get("class_map"), dataset_val.class_map, num_classes,
                                         original_labels=teacher_info["format"] in REFERENCE_FORMATS)
        check_class_names(teacher_info.get("class_names"), dataset_val.class_names,
                          teacher_perm, f"teacher checkpoint {args.teacher}",
                          cfg["eval"]["allow_class_mismatch"], log)
        teacher = teacher.to(accelerator.device).eval()

    # ---------------------------------------------------------------- evaluation
    model = model.to(accelerator.device).eval()
    log(f"evaluating {args.ckpt} ({kind}, {info['format']} format) on {len(dataset)} images, "
        f"{accelerator.num_processes} process(es), device {accelerator.device}{fast_math_summary()}, git {git_sha()}")
    forward, hooks = make_forward(kind, model, teacher, teacher_size, cfg["eval"]["analysis"], perm, teacher_perm)
    prediction = heads[-1]  # the student's combination of its heads, or the teacher's logits
    columns, num_columns, block = analysis.confusion_columns(dataset_val.train_counts)
    counts = EvalCounts(num_classes, heads + (["teacher"] if teacher is not None else []),
                        keep_predictions=cfg["eval"]["analysis"], confusion=prediction,
                        columns=columns, num_columns=num_columns)
    keep = (("feat_", "attn_") if cfg["eval"]["analysis"] else ()) + (tuple(heads) if cfg["eval"]["save_logits"] else ())
    prior = posthoc.log_prior(dataset_val.train_counts)
    combine = getattr(model, "combine", posthoc.mean_of_heads)  # the student's own rule (one place)
    params: dict = {}
    names = posthoc.row_names(heads)
    passes = []
    with hooks:
        if tune_set is not None:
            # The tuning images: kept as fp16 logits (capped); when they are test images
            # (tune_split) they also count in the headline numbers, which cover every image.
            counted = tuned_on == "tune_split"
            tuning = stream_evaluation(model, loader(tune_set), accelerator, forward, counts if counted else None,
                                       keep=tuple(base_heads) + (keep if counted else ()), desc="tune",
                                       fp16=() if cfg["eval"]["save_logits"] else tuple(base_heads))
            params = posthoc.tune({h: tuning[h] for h in base_heads}, tuning["targets"], heads, prior,
                                  num_classes, combine)
            log(f"post-hoc parameters tuned on {len(tune_set)} images ({tuned_on}): {params}")
            if counted:
                passes.append(tuning)
        else:
            names = [n for n in names if not posthoc.is_tuned(n)]
        rows_counts = EvalCounts(num_classes, [f"posthoc/{n}" for n in names],
                                 calibration=[f"posthoc/{n}" for n in names]) if cfg["eval"]["posthoc"] else None

        def forward_rows(model, images):
            out = forward(model, images)
            if rows_counts is not None:
                out.update({f"posthoc/{k}": v for k, v in
                            posthoc.rows({h: out[h] for h in heads}, names, params, prior, combine).items()})
            return out

        passes.append(stream_evaluation(model, loader(report_set), accelerator, forward_rows,
                                        [c for c in (counts, rows_counts) if c is not None], keep=keep))
    outputs = {k: torch.cat([p[k] for p in passes]) for k in passes[-1]}  # the tune part first

    groups = dataset_val.groups
    metrics = counts.metrics(groups, heads)
    results = {
        "kind": kind, "checkpoint": str(args.ckpt), "format": info["format"], "epoch": info.get("epoch"),
        "weights": info.get("weights", "model"), "prediction": prediction, "heads": heads,
        "overall": metrics[prediction]["top1"], "top5": metrics[prediction]["top5"],
        "head": metrics[prediction]["head"], "mid": metrics[prediction]["mid"],
        "tail": metrics[prediction]["tail"],
        **metrics,
        "num_samples": metrics[prediction]["num_samples"], "world_size": accelerator.num_processes,
        "dataset": cfg["data"]["dataset"], "split": dataset_val.split, "group_rule": dataset_val.group_rule,
        "groups": groups, "class_names": dataset_val.class_names, "train_counts": dataset_val.train_counts,
        "arch": arch, "config": cfg, "precision": precision_summary(accelerator),
    }
    rule = count_rule_groups(dataset_val.train_counts, cfg["data"]["group_thresholds"])
    many, few = cfg["data"]["group_thresholds"] or (100, 20)
    results["count_groups"] = {"rule": f"many > {many}, medium {few}-{many}, few < {few} training images",
                               "classes": rule}
    for h in heads:
        results["count_groups"][h] = {g: group_mean(metrics[h]["per_class"], rule[g]) for g in rule}
    if rows_counts is not None:
        results.update(posthoc_results(rows_counts, names, params, tuned_on, groups, dataset_val.train_counts))
        results["posthoc_tuning"] = {"tuned_on": tuned_on, "images": len(tune_set) if tune_set is not None else 0,
                                     "params": params}
    if cfg["eval"]["analysis"]:
        results["analysis"] = run_analyses(outputs, counts, groups, model, arch)
        if teacher is not None:
            results["analysis"]["teacher_checkpoint"] = str(args.teacher)
            results["analysis"]["teacher_input_size"] = teacher_size

    # ---------------------------------------------------------------- report
    if main_process:
        print(format_report(results))
        write_outputs(results, counts, block, args.json, args.out_dir)
        if args.export or args.push_to_hub:
            share(args, model, info, results, cfg, perm)
        if cfg["eval"]["save_logits"]:
            Path(cfg["eval"]["save_logits"]).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"logits": {h: outputs[h].float() for h in heads}, "targets": outputs["targets"].long(),
                        "indices": image_order(tune_set, report_set, tuned_on, len(dataset)),
                        "class_names": dataset_val.class_names}, cfg["eval"]["save_logits"])
            print(f"logits written to {cfg['eval']['save_logits']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # tears down the process group of a multi-process launch
    return 0


if __name__ == "__main__":
    sys.exit(main())
