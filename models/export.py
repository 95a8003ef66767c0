"""Export a student or teacher in timm's Hugging Face hub layout, with a measured model card.

``evaluate.py --export DIR`` (and ``--push-to-hub REPO_ID``) calls ``export_folder`` after it has
measured the checkpoint. The folder, written by timm's own ``timm.models.save_for_hf``:

* ``model.safetensors``: the weights evaluate.py just scored (``model_ema`` with
  ``eval.ema=true``, else ``model``), as the state dict of the timm model they were loaded into;
* ``config.json``: timm's ``architecture``, ``num_classes``, ``model_args`` (every size that
  differs from the named timm model: a patch-4 32x32 student is ``deit_tiny_distilled_patch16_224``
  with ``img_size``, ``patch_size``, ``depth``...), ``label_names`` (class names in the order of
  the model's outputs) and ``pretrained_cfg`` (input size, mean / std, interpolation and crop of
  the evaluation); plus, under ``deit_lt``, the project's own entries (kind, arch, run config,
  class map, class names, training counts, the measured numbers) from which ``models.hub`` rebuilds
  the portable checkpoint, so ``evaluate.py --ckpt local-dir:DIR`` needs at most a data path;
* ``README.md``: the model card (what the model is, teacher, data, the training config and
  command, the commit, the table just measured and, when evaluate.py measured them, the field's
  rows: count-rule groups, post-hoc rows with calibration; loading with timm, licence, citation);
* ``train_config.yaml``: the stored training config, when the checkpoint has one.

The student is timm's ``VisionTransformerDistilled``; in eval mode timm's forward returns the mean
of the CLS and DIST logits, which is the project's reported prediction ``avg``
(``DistilledStudent.combine``). Teachers export as their timm (or, for ``resnet50``, the
torchvision layout timm shares) architecture; the CIFAR ResNet-32 and LDAM's cosine
(``normed``) head are no timm models and are refused, naming the project's loader instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import yaml

from errors import CheckpointError, ConfigError
from models.hub import CONFIG_KEY
from utils import atomic_write_text, git_sha, to_plain

FORMAT_VERSION = 1
DEFAULT_LICENSE = "unknown"  # a hub licence id; the weights' licence is the publisher's choice
CITATION = """@inproceedings{rangwani2024deitlt,
  title     = {DeiT-LT: Distillation Strikes Back for Vision Transformer Training on Long-Tailed Datasets},
  author    = {Rangwani, Harsh and Mondal, Pradipto and Mishra, Mayank and Asokan, Ashish Ramayee and Babu, R. Venkatesh},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}"""
DATASET_TITLES = {"cifar10_lt": "CIFAR-10-LT", "cifar100_lt": "CIFAR-100-LT", "imagenet_lt": "ImageNet-LT",
                  "inat18": "iNaturalist 2018", "generic": "a generic image dataset"}
# timm's registered distilled DeiTs; a student of another size is the one of its width plus model_args
_TIMM_STUDENTS = {192: "deit_tiny_distilled_patch16_224", 384: "deit_small_distilled_patch16_224",
                  768: "deit_base_distilled_patch16_224"}
_REFUSAL = "load it with the project's own loader instead (models.checkpoint.load_teacher, evaluate.py --ckpt FILE)"


# ----------------------------------------------------------------------------- timm architecture


def timm_architecture(kind: str, arch: dict) -> tuple[str, dict]:
    """``(timm model name, create_model keyword arguments)`` that rebuild the model timm-side;
    CheckpointError for a teacher timm cannot build."""
    from models.student import parse_student_name

    if kind == "student":
        import timm

        name = arch["name"] if timm.is_model(arch["name"]) and parse_student_name(arch["name"]) else \
            _TIMM_STUDENTS.get(arch["embed_dim"], _TIMM_STUDENTS[192])
        defaults = parse_student_name(name)
        sizes = {k: arch[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
                 if arch[k] != defaults[k]}
        return name, {"num_classes": arch["num_classes"], **sizes}
    name, head = arch["arch"], arch.get("head", "linear")
    if name == "resnet32":
        raise CheckpointError(f"cannot export the CIFAR ResNet-32 teacher: timm has no such model; {_REFUSAL}")
    if head != "linear":
        raise CheckpointError(f"cannot export teacher {name!r} with its {head!r} (LDAM cosine) head: timm "
                              f"models have a linear classifier; {_REFUSAL}")
    return name, {"num_classes": arch["num_classes"]}


def to_timm(model: nn.Module, kind: str, arch: dict) -> nn.Module:
    """A timm model (``timm.create_model``, so timm records its arguments) holding ``model``'s
    weights, strictly loaded, in eval mode."""
    import timm

    from models.safe_load import load_state_dict_strict
    from models.student import unwrap

    name, kwargs = timm_architecture(kind, arch)
    out = timm.create_model(name, pretrained=False, **kwargs)
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    load_state_dict_strict(out, state, f"timm {name}")
    return out.eval()


def check_same_prediction(model: nn.Module, exported: nn.Module, size: int) -> None:
    """CheckpointError unless the timm model's eval output is the student's reported prediction:
    timm's ``VisionTransformerDistilled`` returns the mean of the two heads, so a student whose
    ``combine`` was changed (a weighted or learned mean) cannot be shared as that timm model."""
    from models.student import student_outputs, unwrap

    inner = unwrap(model)
    device = next(inner.parameters()).device
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = student_outputs(inner, x.to(device))[inner.PREDICTION].float().cpu()
        theirs = exported(x)
    if not torch.allclose(theirs, ours, rtol=1e-3, atol=1e-3 * max(1.0, ours.abs().max().item())):
        raise CheckpointError(f"cannot export this student as timm's VisionTransformerDistilled: timm predicts "
                              f"the mean of the CLS and DIST logits, this student's combine() differs (by up to "
                              f"{(theirs - ours).abs().max().item():.3g}); share the project's checkpoint instead")


def check_exportable(model: nn.Module, kind: str, arch: dict, size: int) -> None:
    """The refusals of ``export_folder``, before any evaluation: an architecture timm cannot
    build, a student whose prediction is not timm's."""
    if kind == "student":
        check_same_prediction(model, to_timm(model, kind, arch), size)
    else:
        timm_architecture(kind, arch)


# ----------------------------------------------------------------------------- class order


def in_model_order(values: Sequence | None, perm: Sequence[int] | None) -> list | None:
    """A per-class list in the data's order, put in the order of the model's outputs:
    ``perm[j]`` is the output column of the data's class j (evaluate.class_permutation)."""
    if values is None:
        return None
    values = list(values)
    if perm is None:
        return values
    out = [None] * len(values)
    for j, column in enumerate(perm):
        out[int(column)] = values[j]
    return out


# ----------------------------------------------------------------------------- the model card


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _data_line(data: dict, train_counts: Sequence[int] | None) -> str:
    title = DATASET_TITLES.get(data.get("dataset"), str(data.get("dataset")))
    imb = data.get("imb_factor")
    if data.get("dataset") in ("imagenet_lt", "inat18"):
        profile = "long-tailed as published"
    elif imb is not None and float(imb) < 1.0:
        profile = f"imbalance factor {1 / float(imb):g} (data.imb_factor={imb}, {data.get('imb_type', 'exp')} profile)"
    else:
        profile = "as stored (no subsetting)"
    counts = ""
    if train_counts:
        counts = (f"; {sum(train_counts)} training images, {max(train_counts)} in the largest class and "
                  f"{min(train_counts)} in the smallest")
    return f"{title}, {profile}{counts}"


def _teacher_line(run_config: dict | None) -> str:
    d = (run_config or {}).get("distill") or {}
    if not d:
        return "not recorded (the checkpoint holds no project config)"
    if d.get("type") == "none":
        return "none (distill.type=none: both heads trained on the labels)"
    what = d.get("teacher_ckpt") or f"timm's pretrained {d.get('teacher_model')}"
    name = f" ({d['teacher_model']})" if d.get("teacher_model") and d.get("teacher_ckpt") else ""
    return f"`{what}`{name}, {d.get('type')} distillation"


def _field_rows(results: dict) -> list[str]:
    """The card's tables of the field's rows, when evaluate.py measured them: many / medium / few
    by training count (``count_groups``), and the post-hoc rows with their calibration
    (``posthoc``, ``calibration``, on ``posthoc_images`` images). Empty without them."""
    lines = []
    count = results.get("count_groups")
    if count:
        sizes = " / ".join(str(len(count["classes"][g])) for g in ("many", "medium", "few"))
        lines += ["", f"Many / medium / few by the field's count rule ({count['rule']}; {sizes} classes), "
                      f"on the same {results['num_samples']} images:", "",
                  "| output | many | medium | few |", "|---|---|---|---|"]
        lines += [f"| {h} | " + " | ".join(_fmt(count[h][g]) for g in ("many", "medium", "few")) + " |"
                  for h in results["heads"] if h in count]
    if results.get("posthoc"):
        tuning = results.get("posthoc_tuning") or {}
        where = (f"; tuned rows chose their parameter on {tuning['images']} other images "
                 f"({tuning['tuned_on']})" if tuning.get("images") else "")
        lines += ["", f"Post-hoc rows (evaluate.py's `posthoc`: logit adjustment by the training prior, expert "
                      f"combinations; ECE in % over 15 bins, NLL per image), on **{results['posthoc_images']} "
                      f"images**{where}. timm's forward returns `avg`; the other rows need the training "
                      f"counts (config.json `deit_lt`).", "",
                  "| row | top-1 | head | mid | tail | ECE | NLL | parameter | tuned on |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, row in results["posthoc"].items():
            cal = (results.get("calibration") or {}).get(name) or {}
            nll = "-" if cal.get("nll") is None else f"{cal['nll']:.3f}"
            param = ", ".join(f"{k}={v:.4g}" for k, v in (row.get("param") or {}).items()) or "-"
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in ("top1", "head", "mid", "tail"))
                         + f" | {_fmt(cal.get('ece'))} | {nll} | {param} | {row.get('tuned_on', 'none')} |")
    return lines


def model_card(*, kind: str, arch: dict, timm_name: str, info: dict, results: dict, run_config: dict | None,
               data: dict, train_counts, weights: str, load_id: str, license: str, source: str,
               subset: bool = False) -> str:
    """The README.md of the exported folder."""
    title = DATASET_TITLES.get(data.get("dataset"), str(data.get("dataset")))
    if kind == "student":
        what = (f"A DeiT-LT student (Rangwani et al., CVPR 2024): timm's `VisionTransformerDistilled` "
                f"(`{timm_name}` with {arch['img_size']}x{arch['img_size']} input, patch {arch['patch_size']}, "
                f"width {arch['embed_dim']}, depth {arch['depth']}, {arch['num_heads']} heads), with a CLS and a "
                f"DIST head. Its prediction is the mean of the two heads' logits (`avg`), which is what timm's "
                f"eval-mode forward returns.")
    else:
        what = (f"A CNN teacher for DeiT-LT (Rangwani et al., CVPR 2024): timm's `{timm_name}` with a linear "
                f"classifier, trained by this project's train_teacher.py.")
    weight_text = ("the EMA weights (`model_ema`, eval.ema=true)" if weights == "model_ema"
                   else "the trained weights (`model`; not the EMA)")
    rows = [f"| {h} | " + " | ".join(_fmt(results[h].get(k)) for k in ("top1", "top5", "head", "mid", "tail")) + " |"
            for h in results["heads"]]
    groups = results["groups"]
    script = "train_student.py" if kind == "student" else "train_teacher.py"
    size = int(data["input_size"])
    lines = [
        "---",
        "tags:", "- image-classification", "- timm", "- deit-lt", "- long-tailed",
        "library_name: timm",
        f"license: {license}",
        "pipeline_tag: image-classification",
        "---",
        f"# DeiT-LT {kind}: {arch.get('name') or arch.get('arch')} on {title}",
        "",
        what,
        "",
        f"- **Teacher:** {_teacher_line(run_config) if kind == 'student' else 'none (this is a teacher)'}",
        f"- **Data:** {_data_line(data, train_counts)}",
        f"- **Classes:** {len(results['class_names'])} (config.json `label_names`, in the order of the outputs)",
        f"- **Weights:** {weight_text}, epoch {info.get('epoch')}, from `{source}` ({info.get('format')} format)",
        f"- **Preprocessing:** {data['eval_interpolation']} resize to {int(size / data['eval_crop_ratio'])}, centre "
        f"crop {size}, {data['normalize']} mean / std (config.json `pretrained_cfg`, which timm's data config reads)",
        f"- **Exported at commit:** `{git_sha()}` of deit-lt (the checkpoint does not record the commit it was "
        f"trained at)",
        f"- **Licence:** {license}",
        "",
        "## Results (measured by evaluate.py at export)",
        "",
        f"{results['dataset']} split `{results['split']}`, **{results['num_samples']} images**; head / mid / tail: "
        f"mean per-class top-1 over {len(groups['head'])} / {len(groups['mid'])} / {len(groups['tail'])} classes "
        f"({results['group_rule']})." + (" **A subset (eval.max_samples): not the benchmark's numbers.**"
                                          if subset else ""),
        "",
        "| output | top-1 | top-5 | head | mid | tail |",
        "|---|---|---|---|---|---|",
        *rows,
        *_field_rows(results),
        "",
        f"Measured again with `python evaluate.py --ckpt {load_id} data.path=DATA`.",
        "",
        "## Use with timm (no deit-lt code needed)",
        "",
        "```python",
        "import timm, torch",
        f'model = timm.create_model("{load_id}", pretrained=True).eval()',
        "probs = model(torch.randn(1, *model.pretrained_cfg['input_size'])).softmax(-1)  # label_names order",
        "```",
        "",
        "Preprocessing: `timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))`.",
        "",
        "## Training",
        "",
    ]
    if run_config:
        lines += [f"Trained with this project's `{script}`; the resolved config below (also `train_config.yaml` "
                  f"in this folder) re-runs it:", "",
                  "```bash", f"accelerate launch {script} --config train_config.yaml", "```", "",
                  "```yaml", yaml.safe_dump(run_config, sort_keys=False).rstrip(), "```"]
    else:
        lines += [f"Not trained by this project ({info.get('format')} checkpoint format): no training config "
                  f"was stored with it."]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing


def export_folder(out_dir: str | os.PathLike, model: nn.Module, info: dict, results: dict, cfg: dict, *,
                  perm: Sequence[int] | None = None, source: str, license: str = DEFAULT_LICENSE,
                  hub_id: str | None = None) -> Path:
    """Write ``out_dir`` in timm's hub layout (see the module docstring) for a model evaluate.py
    has just scored: ``results`` its result dict, ``cfg`` the resolved data / aug config of the
    evaluation, ``perm`` the output column of each of the data's classes (None: the same order)."""
    from timm.models import save_for_hf

    from data.transforms import NORMALIZATION

    kind, arch = info["kind"], info["arch"]
    timm_name, _ = timm_architecture(kind, arch)
    timm_model = to_timm(model, kind, arch)
    if kind == "student":
        check_same_prediction(model, timm_model, cfg["data"]["input_size"])
    label_names = in_model_order(results["class_names"], perm)
    train_counts = info.get("train_counts") or in_model_order(results.get("train_counts"), perm)
    class_map = info.get("class_map")
    if class_map is None and kind == "teacher" and info.get("format") != "project":
        class_map = list(range(arch["num_classes"]))  # reference teachers predict the original labels
    # a project file's resolved training config (evaluate.stored_config); reference files have none
    stored = (info.get("config") or info.get("args")) if info.get("format") == "project" else None
    run_config = to_plain(stored) if isinstance(stored, dict) else None
    data, aug = cfg["data"], cfg["aug"]
    mean, std = NORMALIZATION[aug["normalize"]]
    size = data["input_size"]
    measured = {k: results[k] for k in ("heads", "prediction", "num_samples", "split", "dataset", "group_rule",
                                        "groups")}
    measured.update({h: {k: results[h][k] for k in ("top1", "top5", "head", "mid", "tail")} for h in results["heads"]})
    ours = {"format_version": FORMAT_VERSION, "kind": kind, "arch": to_plain(arch),
            "weights": info.get("weights", "model"), "epoch": info.get("epoch"),
            # the evaluation's data / aug for a file without a project config, so evaluate.py reads it back
            "config": run_config or {"data": to_plain(data), "aug": to_plain(aug)},
            "metrics": to_plain(info.get("metrics")), "class_map": to_plain(class_map),
            "class_names": label_names, "train_counts": to_plain(train_counts),
            "source": {"checkpoint": source, "format": info.get("format")}, "commit": git_sha(),
            "evaluation": to_plain(measured)}
    model_config = {"label_names": label_names, CONFIG_KEY: ours,
                    "pretrained_cfg": {"tag": "deit_lt", "license": license}}
    data_config = {"input_size": (3, size, size), "mean": tuple(mean), "std": tuple(std),
                   "interpolation": aug["eval_interpolation"], "crop_pct": aug["eval_crop_ratio"],
                   "crop_mode": "center"}
    out = Path(out_dir)
    save_for_hf(timm_model, out, model_config=model_config, safe_serialization=True, data_config=data_config)
    load_id = f"hf-hub:{hub_id}" if hub_id else f"local-dir:{out}"
    card = model_card(kind=kind, arch=arch, timm_name=timm_name, info=info, results=results, run_config=run_config,
                      data={**data, **aug}, train_counts=train_counts, weights=ours["weights"], load_id=load_id,
                      license=license, source=source, subset=bool((cfg.get("eval") or {}).get("max_samples")))
    atomic_write_text(out / "README.md", card)
    if run_config:
        atomic_write_text(out / "train_config.yaml", yaml.safe_dump(run_config, sort_keys=False))
    return out


# ----------------------------------------------------------------------------- the hub


def check_push(repo_id: str) -> None:
    """ConfigError (one line) when ``--push-to-hub`` cannot work: a malformed id, the hub
    offline, no token. Called before any evaluation."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    from models.hub import hub_offline

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise ConfigError(f"--push-to-hub {repo_id}: not a hub repository id (user/name): {e}") from None
    if hub_offline():
        raise ConfigError(f"--push-to-hub {repo_id}: the Hugging Face hub is offline (HF_HUB_OFFLINE=1); "
                          f"export with --export DIR and upload later (huggingface-cli upload {repo_id} DIR)")
    if get_token() is None:
        raise ConfigError(f"--push-to-hub {repo_id}: no Hugging Face token (set HF_TOKEN or run "
                          f"`huggingface-cli login`)")


def push_folder(folder: str | os.PathLike, repo_id: str) -> str:
    """Upload ``folder`` to ``repo_id`` (created if needed) as timm's ``push_to_hf_hub`` does;
    the token comes from the usual place (HF_TOKEN, the login cache). Returns the commit URL."""
    import timm
    from huggingface_hub import HfApi

    api = HfApi(library_name="timm", library_version=timm.__version__)
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Add DeiT-LT model")
    return str(getattr(info, "commit_url", info))


__all__ = ["timm_architecture", "to_timm", "check_same_prediction", "check_exportable", "export_folder", "model_card", "check_push", "push_folder",
           "in_model_order"]
