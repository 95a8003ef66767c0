"""Starting from weights, teachers by timm name, teacher input normalisation.

* ``init_student_from`` / ``init_teacher_from`` (models/checkpoint.py): a fresh model takes
  what fits from a checkpoint (another grid: pos_embed resampled; another class count: heads
  reset), with a report naming everything that was not loaded as is;
* ``load_named_teacher``: timm / torchvision state dicts for a timm name, strictly;
* ``DistillationLoss(renormalize=...)`` and ``teacher_normalization`` (models/teacher.py).
"""
import argparse
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from data.transforms import NORMALIZATION
from errors import CheckpointError, CheckpointMismatchError, ConfigError
from losses.distillation import DistillationLoss
from models.checkpoint import (init_student_from, init_teacher_from, load_named_teacher,
                               make_checkpoint, write_safetensors)
from models.paco import build_paco
from models.student import build_student, student_arch
from models.teacher import build_teacher, teacher_normalization, teacher_renormalization

DIMS = dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)
HEAD_KEYS = ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]


def dataset(num_classes):
    return SimpleNamespace(class_map=None, train_counts=[10] * num_classes,
                           class_names=[f"c{i}" for i in range(num_classes)])


def student(num_classes, img_size=32, patch_size=4, **dims):
    torch.manual_seed(num_classes * 1000 + img_size)
    arch = student_arch("tiny_test", num_classes, img_size=img_size, patch_size=patch_size,
                        **{**DIMS, **dims})
    return build_student(arch)


def save_student(model, path, num_classes):
    payload = make_checkpoint("student", model.student_arch, model.state_dict(), epoch=3,
                              config={}, metrics={}, dataset=dataset(num_classes))
    if str(path).endswith(".safetensors"):
        write_safetensors(payload, path)
    else:
        torch.save(payload, path)
    return path


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- students


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_student_from_other_grid_and_classes_then_trains(tmp_path, suffix):
    src = student(5, img_size=32)  # 8x8 grid, 5 classes
    path = save_student(src, tmp_path / f"src{suffix}", 5)
    model = student(10, img_size=48)  # 12x12 grid, 10 classes
    fresh = clone_state(model)

    report = init_student_from(model, path)

    assert report["source"] == str(path) and report["format"] == "project"
    assert report["resized"] == ["pos_embed"]
    assert report["reset"] == HEAD_KEYS
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["pos_embed"]["file_grid"] == [8, 8] and report["pos_embed"]["model_grid"] == [12, 12]
    assert model.pos_embed.shape == (1, 2 + 12 * 12, 48)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[12, 12], old_size=[8, 8],
                                      num_prefix_tokens=2)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    state = model.state_dict()
    for key, value in src.state_dict().items():
        if key == "pos_embed":
            continue
        if key in HEAD_KEYS:  # another class count: the fresh init is kept
            assert torch.equal(state[key], fresh[key]), key
        else:
            assert torch.equal(state[key], value), key

    # one training step on a random batch
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 48, 48), torch.randint(0, 10, (4,))
    out = model(x)
    assert out["cls"].shape == out["dist"].shape == (4, 10)
    loss = F.cross_entropy(out["cls"], y) + F.cross_entropy(out["dist"], y)
    loss.backward()
    assert torch.isfinite(loss) and model.pos_embed.grad is not None
    before = model.head.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.head.weight.detach())


@pytest.mark.parametrize("img_size", [32, 48])
@pytest.mark.parametrize("container", ["state_dict_module", "bare_safetensors", "model"])
def test_student_from_plain_timm_vit(tmp_path, img_size, container):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, num_classes=7, qkv_bias=True, **DIMS)
    sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    if container == "state_dict_module":
        path = tmp_path / "vit.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1}, path)
    elif container == "model":
        path = tmp_path / "vit.pth"
        torch.save({"model": sd}, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = student(10, img_size=img_size)
    fresh = clone_state(model)

    report = init_student_from(model, path)

    assert report["format"] == "timm"
    assert report["resized"] == ["pos_embed"]  # 1 prefix position in the file, 2 in the model
    assert report["reset"] == ["head.weight", "head.bias"]  # 7 classes vs 10
    assert sorted(report["missing"]) == ["dist_token", "head_dist.bias", "head_dist.weight"]
    assert report["unexpected"] == []
    assert report["pos_embed"]["file_prefix_tokens"] == 1
    assert report["pos_embed"]["kept_model_positions"] == ["dist"]
    grid = img_size // 4
    pe = model.pos_embed.detach()
    assert pe.shape == (1, 2 + grid * grid, 48)
    expected = resample_abs_pos_embed(sd["pos_embed"], new_size=[grid, grid], old_size=[8, 8],
                                      num_prefix_tokens=1)
    torch.testing.assert_close(pe[:, 0], expected[:, 0], rtol=0, atol=0)  # cls position
    assert torch.equal(pe[:, 1], fresh["pos_embed"][:, 1])  # the model's own dist position
    torch.testing.assert_close(pe[:, 2:], expected[:, 1:], rtol=0, atol=1e-6)
    assert torch.equal(model.dist_token.detach(), fresh["dist_token"])
    assert torch.equal(model.cls_token.detach(), sd["cls_token"])
    assert torch.equal(model.blocks[1].mlp.fc2.weight.detach(), sd["blocks.1.mlp.fc2.weight"])
    assert torch.isfinite(model(torch.randn(2, 3, img_size, img_size))["dist"]).all()


def test_student_from_reference_file_and_its_ema(tmp_path):
    src, ema = student(10), student(10, depth=2)
    torch.nn.init.normal_(ema.head.weight)
    path = tmp_path / "reference.pth"
    args = argparse.Namespace(model="deit_small_distilled_patch16_224", input_size=32)
    torch.save({"model": src.state_dict(), "model_ema": ema.state_dict(), "epoch": 4, "args": args}, path)

    model = student(10)
    report = init_student_from(model, path)
    assert report["format"] == "reference" and report["weights"] == "model"
    assert report["resized"] == [] and report["reset"] == [] and report["missing"] == []
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())

    report = init_student_from(model, path, ema=True)
    assert report["weights"] == "model_ema"
    assert torch.equal(model.head.weight, ema.head.weight)


def test_student_head_reset_options(tmp_path):
    src = student(10)
    path = save_student(src, tmp_path / "src.pth", 10)
    model = student(10)
    fresh = clone_state(model)
    report = init_student_from(model, path, reset_heads=True)  # same count, other class order
    assert report["reset"] == HEAD_KEYS
    assert torch.equal(model.head.weight, fresh["head.weight"])
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight: file \(10, 48\) vs model \(3, 48\)"):
        init_student_from(student(3), path, reset_heads=False)


def test_student_refuses_patch_size_width_and_foreign_files(tmp_path):
    path = save_student(student(10, img_size=32, patch_size=8), tmp_path / "p8.pth", 10)
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight: file \(48, 3, 8, 8\) vs "
                                              r"model \(48, 3, 4, 4\)"):
        init_student_from(student(10), path)
    wide = save_student(student(10, embed_dim=96, num_heads=3), tmp_path / "wide.pth", 10)
    with pytest.raises(CheckpointError, match=r"pos_embed: file \(1, 66, 96\) vs model \(1, 66, 48\)"):
        init_student_from(student(10), wide)

    teacher = build_teacher("resnet32", 10)
    tpath = tmp_path / "teacher.pth"
    torch.save(make_checkpoint("teacher", {"arch": "resnet32", "num_classes": 10, "head": "normed"},
                               teacher.state_dict(), epoch=0, config={}, metrics={},
                               dataset=dataset(10)), tpath)
    with pytest.raises(CheckpointError, match="'teacher' checkpoint, not a student"):
        init_student_from(student(10), tpath)
    bare = tmp_path / "cnn.pth"
    torch.save(teacher.state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a ViT checkpoint"):
        init_student_from(student(10), bare)


# ----------------------------------------------------------------------------- teachers


def save_teacher(model, path, arch):
    torch.save(make_checkpoint("teacher", arch, model.state_dict(), epoch=0, config={}, metrics={},
                               dataset=dataset(arch["num_classes"])), path)
    return path


def test_teacher_from_other_classes_and_head_type(tmp_path):
    torch.manual_seed(0)
    arch = {"arch": "resnet32", "num_classes": 10, "head": "linear"}
    src = build_teacher(**arch)
    path = save_teacher(src, tmp_path / "t.pth", arch)

    model = build_teacher("resnet32", 5, head="linear")
    fresh = clone_state(model)
    report = init_teacher_from(model, path)
    assert report["format"] == "project" and report["source"] == str(path)
    assert report["reset"] == ["linear.weight", "linear.bias"]
    assert report["missing"] == [] and report["unexpected"] == []
    assert torch.equal(model.linear.weight, fresh["linear.weight"])
    assert torch.equal(model.layer3[4].conv2.weight, src.layer3[4].conv2.weight)

    # same class count, another head type (LDAM's normed head): reset too
    normed = build_teacher("resnet32", 10, head="normed")
    report = init_teacher_from(normed, path)
    assert report["reset"] == ["linear.weight"] and report["unexpected"] == ["linear.bias"]

    # same classes: everything loads; LDAM-style file with module. prefixes
    ldam = tmp_path / "ldam.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()},
                "arch": "resnet32", "epoch": 3, "best_acc1": 50.0}, ldam)
    same = build_teacher("resnet32", 10, head="linear")
    report = init_teacher_from(same, ldam)
    assert report["format"] == "ldam" and report["reset"] == [] and report["missing"] == []
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(same.eval()(x), src.eval()(x))

    wrong = build_teacher("resnet50", 10)
    with pytest.raises(CheckpointMismatchError, match=r"conv1\.weight: file \(16, 3, 3, 3\)"):
        init_teacher_from(wrong, path)


def test_paco_teacher_from_plain_teacher(tmp_path):
    torch.manual_seed(0)
    arch = {"arch": "resnet32", "num_classes": 10, "head": "linear"}
    src = build_teacher(**arch)
    path = save_teacher(src, tmp_path / "t.pth", arch)
    paco = build_paco("resnet32", 10, dim=8, K=16)
    report = init_teacher_from(paco, path)
    assert report["reset"] == [] and report["unexpected"] == []
    assert report["missing"] and all(k.startswith("encoder_q.fc.") for k in report["missing"])
    assert torch.equal(paco.encoder_q.conv1.weight, src.conv1.weight)
    assert torch.equal(paco.encoder_k.conv1.weight, src.conv1.weight)
    assert torch.equal(paco.linear.weight, src.linear.weight)
    assert torch.equal(paco.linear_k.weight, src.linear.weight)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(paco.eval()(x), src.eval()(x))


# ----------------------------------------------------------------------------- timm teachers by name


def randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("container", ["bare", "state_dict", "model", "safetensors"])
def test_named_timm_teacher_loads_timm_state_dict(tmp_path, container):
    assert timm.is_model("resnet18")
    torch.manual_seed(0)
    original = randomise_bn(timm.create_model("resnet18", num_classes=10)).eval()
    sd = original.state_dict()
    if container == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "resnet18.pth"
        torch.save(sd if container == "bare" else {container: sd}, path)

    model, info = load_named_teacher("resnet18", 10, str(path), pretrained=False)

    assert info["format"] == "timm" and info["class_map"] is None and info["pretrained"] is False
    assert info["arch"] == {"arch": "resnet18", "num_classes": 10, "head": "linear"}
    assert not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=1e-6)


def test_named_teacher_loads_torchvision_state_dict_without_num_batches_tracked(tmp_path):
    torch.manual_seed(0)
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10)).eval()
    path = tmp_path / "tv.pth"  # old torchvision files have no num_batches_tracked
    torch.save({k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    model, info = load_named_teacher("resnet18", 10, path)
    assert len(info["filled"]) == 20
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tv(x), rtol=0, atol=1e-5)


def test_resnet50_keys_are_torchvisions_and_timms():
    ours = set(build_teacher("resnet50", 10).state_dict())
    assert ours == set(torchvision.models.resnet50(num_classes=10).state_dict())
    assert ours == set(timm.create_model("resnet50", num_classes=10).state_dict())


def test_named_teacher_refuses_wrong_keys_and_bad_requests(tmp_path):
    sd = timm.create_model("resnet18", num_classes=10).state_dict()
    sd["classifier.weight"] = sd.pop("fc.weight")
    path = tmp_path / "wrong.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_named_teacher("resnet18", 10, path)
    assert "fc.weight" in str(e.value) and "classifier.weight" in str(e.value)
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), good)
    with pytest.raises(CheckpointMismatchError, match=r"fc\.weight: file \(10, 512\) vs model \(7, 512\)"):
        load_named_teacher("resnet18", 7, good)
    with pytest.raises(ConfigError, match="not both"):
        load_named_teacher("resnet18", 10, good, pretrained=True)
    with pytest.raises(ConfigError, match="needs a checkpoint or pretrained"):
        load_named_teacher("resnet18", 10, None)
    with pytest.raises(ConfigError, match="timm model name"):
        load_named_teacher("resnet32", 10, None, pretrained=True)


def test_named_teacher_pretrained_calls_timm_with_pretrained(monkeypatch):
    real, calls, made = timm.create_model, [], []

    def fake(name, pretrained=False, **kwargs):  # no download: a random model stands in
        calls.append((name, pretrained, kwargs))
        model = real(name, pretrained=False, **kwargs)
        if pretrained:
            made.append(model)
        return model

    monkeypatch.setattr(timm, "create_model", fake)
    model, info = load_named_teacher("resnet18", 10, None, pretrained=True)
    assert ("resnet18", True, {"num_classes": 10}) in calls
    assert info["pretrained"] is True and info["format"] == "timm" and info["class_map"] is None
    assert info["classifier"].startswith("fresh")  # resnet18's pretrained weights have 1000 classes
    assert torch.equal(model.fc.weight, made[0].fc.weight)
    assert teacher_normalization(model) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ----------------------------------------------------------------------------- teacher normalisation


class Recorder(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes, self.seen = num_classes, None

    def forward(self, x):
        self.seen = x.detach().clone()
        return torch.zeros(x.shape[0], self.num_classes)


def outputs(batch=4, num_classes=10):
    return {"cls": torch.randn(batch, num_classes), "dist": torch.randn(batch, num_classes)}


@pytest.mark.parametrize("teacher_size", [None, 16])
def test_renormalize_feeds_the_teacher_the_renormalised_batch(teacher_size):
    (fm, fs), (tm, ts) = NORMALIZATION["imagenet"], NORMALIZATION["cifar"]
    teacher = Recorder()
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 0.5, 1.0,
                            teacher_input_size=teacher_size, renormalize=(fm, fs, tm, ts))
    assert {"renorm_from_mean", "renorm_to_std"} <= dict(loss.named_buffers()).keys()
    assert "renorm_to_std" not in loss.state_dict()
    x, y = torch.randn(4, 3, 32, 32) * 2, torch.randint(0, 10, (4,))
    loss(x, outputs(), y)
    resized = x if teacher_size is None else F.interpolate(
        x, size=(teacher_size, teacher_size), mode="bicubic", align_corners=False, antialias=False)

    def view(v):
        return torch.tensor(v).view(1, 3, 1, 1)

    expected = ((resized * view(fs) + view(fm)) - view(tm)) / view(ts)
    torch.testing.assert_close(teacher.seen, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(teacher.seen, resized, atol=1e-2)

    plain = Recorder()
    DistillationLoss(nn.CrossEntropyLoss(), plain, "hard", 0.5, 1.0,
                     teacher_input_size=teacher_size)(x, outputs(), y)
    assert torch.equal(plain.seen, resized)  # without renormalize: the batch as it is


def test_renormalize_is_validated():
    with pytest.raises(ValueError, match="3 floats each"):
        DistillationLoss(nn.CrossEntropyLoss(), Recorder(), "hard", 0.5, 1.0,
                         renormalize=((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    with pytest.raises(ValueError, match="must be > 0"):
        DistillationLoss(nn.CrossEntropyLoss(), Recorder(), "hard", 0.5, 1.0,
                         renormalize=((0.5,) * 3, (0.0,) * 3, (0.5,) * 3, (0.2,) * 3))


def test_teacher_normalization_and_modes():
    imagenet, cifar = NORMALIZATION["imagenet"], NORMALIZATION["cifar"]
    timm_teacher = build_teacher("resnet18", 10)
    assert teacher_normalization(timm_teacher) == imagenet  # timm's pretrained_cfg
    assert teacher_normalization(build_teacher("resnet32", 10)) is None
    trained = {"config": {"aug": {"normalize": "cifar"}}}  # what a project checkpoint stored
    assert teacher_normalization(timm_teacher, trained) == cifar

    assert teacher_renormalization("student", "imagenet", timm_teacher) is None
    assert teacher_renormalization("imagenet", "imagenet") is None
    assert teacher_renormalization("cifar", "imagenet") == (*imagenet, *cifar)
    assert teacher_renormalization("teacher", "imagenet", timm_teacher, trained) == (*imagenet, *cifar)
    with pytest.raises(ConfigError, match="teacher_normalize=teacher"):
        teacher_renormalization("teacher", "imagenet", build_teacher("resnet32", 10), {})
    with pytest.raises(ConfigError, match="must be one of"):
        teacher_renormalization("own", "imagenet")
