"""Models: ResNet-32 and other teachers, the distilled ViT student, safe and strict checkpoints.

Parity fixtures (``../shared/parity``): the three reference teacher files and the reference
student checkpoint must load through the project's loaders and reproduce the reference's
logits on the stored inputs.
"""
import os

import pytest
import timm
import torch
from torchvision.models import resnet50

from models import (CheckpointMismatchError, UnsafeCheckpointError, build_student, build_teacher,
                    load_any, load_student, load_teacher, resnet32, safe_load, student_arch,
                    student_outputs, teacher_arch_of)
from models.checkpoint import student_from_checkpoint, teacher_from_checkpoint
from models.student import set_fused_attn
from models.teacher import fold_batchnorm


def student_logits(model, x):
    """(cls, dist) logits through the head contract."""
    out = student_outputs(model, x)
    return out["cls"], out["dist"]

TEACHER_FILES = {
    "ldam": ("reference_teacher_ldam_resnet32.pth.tar", "ldam", "normed"),
    "ce": ("reference_teacher_ce_resnet32.pth", "plain", "linear"),
    "paco": ("reference_teacher_paco_resnet32.pth.tar", "paco", "linear"),
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- ResNet-32


def test_resnet32_shapes_params_and_keys():
    model = resnet32(num_classes=10)
    assert n_params(model) == 464_154  # the 0.46M of He et al. / the reference
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64)
    assert torch.allclose(model(x), model.forward_head(feats))
    top = {k.split(".")[0] for k in model.state_dict()}
    assert top == {"conv1", "bn1", "layer1", "layer2", "layer3", "linear"}
    assert not any("shortcut" in k for k in model.state_dict())  # option A has no parameters
    assert model.linear.weight.shape == (10, 64) and model.linear.bias.shape == (10,)

    normed = resnet32(num_classes=100, head="normed")
    assert normed.linear.weight.shape == (64, 100)
    assert "linear.bias" not in normed.state_dict()
    out = normed.eval()(x)
    assert out.shape == (2, 100) and out.abs().max() <= 1 + 1e-6  # cosine similarities


@pytest.mark.parametrize("name", sorted(TEACHER_FILES))
def test_reference_teachers_reproduce_logits(parity_dir, name):
    filename, fmt, head = TEACHER_FILES[name]
    expected = torch.load(parity_dir / "reference_teacher_expected.pt", weights_only=True)
    model, info = load_teacher(parity_dir / filename)
    assert info["format"] == fmt
    assert info["arch"] == {"arch": "resnet32", "num_classes": 10, "head": head}
    assert not model.training
    with torch.no_grad():
        logits = model(expected["input"])
    # The randomised BN statistics of the fixtures make some logits ~4e3 in size, where the
    # float32 spacing alone is 5e-4 (a float64 recomputation differs from the stored float32
    # output by 1.5e-3): atol 1e-5 is met relative to the magnitude, i.e. rtol 1e-5.
    torch.testing.assert_close(logits, expected[f"expected_{name}_resnet32_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TEACHER_FILES))
def test_folded_reference_teachers_keep_their_logits(parity_dir, name):
    expected = torch.load(parity_dir / "reference_teacher_expected.pt", weights_only=True)
    model, _ = load_teacher(parity_dir / TEACHER_FILES[name][0])
    folded, count = fold_batchnorm(model)
    assert count == 31  # every BatchNorm of ResNet-32 follows a conv
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 31  # original intact
    with torch.no_grad():
        logits = folded(expected["input"])
    reference = expected[f"expected_{name}_resnet32_logits"]
    # Folding changes only the rounding (logits up to ~4e3 with the fixtures' random BN stats).
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits.argmax(1), reference.argmax(1))


def test_fold_batchnorm_resnet50_and_untraceable_fallback():
    torch.manual_seed(0)
    model = build_teacher("resnet50", 5).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded, count = fold_batchnorm(model)
    assert count == 53
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)

    class DataDependent(torch.nn.Module):  # torch.fx cannot trace a branch on a tensor value
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    odd = DataDependent()
    same, count = fold_batchnorm(odd)
    assert same is odd and count == 0 and not same.training


def test_paco_loader_keeps_query_encoder_and_linear(parity_dir):
    raw = safe_load(parity_dir / "reference_teacher_paco_resnet32.pth.tar")["state_dict"]
    model, info = load_teacher(parity_dir / "reference_teacher_paco_resnet32.pth.tar")
    dropped = set(info["dropped_keys"])
    assert {"queue", "queue_l", "queue_ptr", "linear_k.weight", "encoder_q.fc.0.weight"} <= dropped
    assert all(k.startswith(("encoder_k.", "linear_k.", "queue", "encoder_q.fc.")) for k in dropped)
    torch.testing.assert_close(model.linear.weight, raw["module.linear.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.layer3[4].bn2.running_var,
                               raw["module.encoder_q.layer3.4.bn2.running_var"], rtol=0, atol=0)


def test_teacher_fixture_needs_bn_statistics(parity_dir):
    """A loader that dropped the BN buffers would fail the parity comparison."""
    expected = torch.load(parity_dir / "reference_teacher_expected.pt", weights_only=True)
    model, _ = load_teacher(parity_dir / "reference_teacher_ce_resnet32.pth")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
    with torch.no_grad():
        logits = model(expected["input"])
    assert not torch.allclose(logits, expected["expected_ce_resnet32_logits"], rtol=1e-3, atol=1e-3)


def test_strict_loading_names_missing_unexpected_and_shapes(parity_dir, tmp_path):
    state = dict(safe_load(parity_dir / "reference_teacher_ce_resnet32.pth")["model"])
    del state["layer2.1.bn1.running_mean"]
    state["layer9.extra.weight"] = torch.zeros(3)
    state["layer1.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        load_teacher(tmp_path / "broken.pth")
    message = str(err.value)
    assert "layer2.1.bn1.running_mean" in message and "missing" in message
    assert "layer9.extra.weight" in message and "unexpected" in message
    assert "layer1.0.conv1.weight" in message and "(16, 16, 1, 1)" in message and "(16, 16, 3, 3)" in message


def test_teacher_project_round_trip_and_ldam_prefix(tmp_path):
    torch.manual_seed(0)
    model = build_teacher("resnet32", 7, head="normed").eval()
    ckpt = {"kind": "teacher", "arch": teacher_arch_of(model), "model": model.state_dict(),
            "class_map": list(range(7))[::-1], "config": {"optim": {"lr": 0.1}}, "metrics": {"acc1": 1.0}}
    torch.save(ckpt, tmp_path / "teacher.pth")
    loaded, info = load_teacher(tmp_path / "teacher.pth")
    assert info["format"] == "project" and info["arch"] == {"arch": "resnet32", "num_classes": 7, "head": "normed"}
    assert info["class_map"] == list(range(7))[::-1]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # LDAM-style with DataParallel prefixes
    ldam = {"epoch": 3, "arch": "resnet32", "best_acc1": 1.0,
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    loaded, info = teacher_from_checkpoint(ldam)
    assert info["format"] == "ldam" and info["arch"]["head"] == "normed"
    # load_any dispatches by content
    loaded, info = load_any(tmp_path / "teacher.pth")
    assert info["kind"] == "teacher"


def test_resnet50_teacher_layout_and_paco_mapping():
    with torch.device("meta"):  # layout only: no memory, no init cost
        normed = build_teacher("resnet50", 5, head="normed")
        reference_keys = set(resnet50(num_classes=5).state_dict())
    assert normed.fc.weight.shape == (2048, 5)  # the reference ImageNet LDAM teachers' fc
    assert set(normed.state_dict()) == reference_keys - {"fc.bias"}

    torch.manual_seed(0)
    model = build_teacher("resnet50", 5).eval()
    assert set(model.state_dict()) == reference_keys
    # PaCo's MoCo layout around a ResNet-50: encoder_q backbone + projection fc, and the
    # classifier `linear`, which must land in torchvision's `fc`.
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    moco = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    moco.update({f"module.encoder_k.{k}": v for k, v in list(backbone.items())[:3]})
    moco.update({"module.encoder_q.fc.0.weight": torch.zeros(8, 2048),
                 "module.linear.weight": model.fc.weight, "module.linear.bias": model.fc.bias,
                 "module.linear_k.weight": model.fc.weight, "module.linear_k.bias": model.fc.bias,
                 "module.queue": torch.zeros(16, 8)})
    loaded, info = teacher_from_checkpoint({"state_dict": moco})
    assert info["format"] == "paco"
    assert info["arch"] == {"arch": "resnet50", "num_classes": 5, "head": "linear"}
    assert "encoder_q.fc.0.weight" in info["dropped_keys"] and "queue" in info["dropped_keys"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 2048)
        torch.testing.assert_close(loaded(x), model.fc(feats))


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_timm_teacher_keeps_timm_keys(name):
    torch.manual_seed(0)
    model = build_teacher(name, 6).eval()
    plain = timm.create_model(name, num_classes=6, pretrained=False)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, plain.get_classifier().in_features)
        assert torch.allclose(model(x), model.forward_head(feats))
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(x), plain.eval()(x))
    normed = build_teacher(name, 6, head="normed")
    assert normed.get_classifier().weight.shape == (plain.get_classifier().in_features, 6)
    assert build_teacher(**teacher_arch_of(normed)).teacher_arch == normed.teacher_arch
    with pytest.raises(ValueError):
        build_teacher("not_a_model_name", 6)


# ----------------------------------------------------------------------------- checkpoints


def test_reference_student_checkpoint_loads_safely_and_reproduces(parity_dir):
    ckpt = safe_load(parity_dir / "reference_student_checkpoint.pth")  # weights_only=True inside
    assert ckpt["args"].model == "deit_base_distilled_patch16_224"
    expected = torch.load(parity_dir / "reference_student_expected.pt", weights_only=True)
    model, info = load_student(parity_dir / "reference_student_checkpoint.pth")
    arch = expected["architecture"]
    assert info["format"] == "reference" and info["kind"] == "student"
    assert {k: info["arch"][k] for k in arch} == arch
    assert info["epoch"] == 1199 and info["metrics"]["best_acc_avg"] == 87.5
    assert info["args"]["output_dir"] == "deit_out_c10lt/run"
    assert info["args"]["cls_num_list"][0] == 5000 and type(info["args"]["cls_num_list"][0]) is int
    assert info["class_map"] is None
    assert not model.training
    with torch.no_grad():
        cls_logits, dist_logits = student_logits(model, expected["input"])
    torch.testing.assert_close(cls_logits, expected["expected_cls_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(dist_logits, expected["expected_dist_logits"], rtol=0, atol=1e-5)
    _, info = load_any(parity_dir / "reference_student_checkpoint.pth")
    assert info["kind"] == "student"


class _Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile", [True, False])
def test_safe_load_refuses_code_execution(tmp_path, zipfile):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _Malicious(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_load(path)
    assert "system" in str(err.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_any(path)
    assert not marker.exists()


def test_safe_load_accepts_the_plain_types_of_this_numpy(tmp_path):
    import argparse
    import pathlib

    import numpy as np
    args = argparse.Namespace(out=pathlib.PosixPath("a/b"), lr=np.float64(1.5), n=np.int64(3),
                              flag=np.bool_(True), pure=pathlib.PurePosixPath("c"))
    torch.save({"args": args, "acc": np.float32(2.5)}, tmp_path / "ok.pth")
    loaded = safe_load(tmp_path / "ok.pth")
    assert vars(loaded["args"]) == vars(args) and loaded["acc"] == np.float32(2.5)


def test_safe_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        safe_load(tmp_path / "nope.pth")


def test_student_project_round_trip(tmp_path):
    torch.manual_seed(0)
    arch = student_arch("deit_tiny_distilled_patch16_224", 5, img_size=32, patch_size=4, depth=2)
    model = build_student(arch).eval()
    ema = build_student(arch).eval()
    ckpt = {"kind": "student", "arch": arch, "model": model.state_dict(), "model_ema": ema.state_dict(),
            "class_map": [4, 3, 2, 1, 0], "config": {"optim": {"lr": 5e-4}}, "metrics": {"acc1_avg": 12.5},
            "epoch": 7}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    x = torch.randn(2, 3, 32, 32)
    loaded, info = load_student(tmp_path / "checkpoint.pth")
    assert info["format"] == "project" and info["arch"] == arch and info["epoch"] == 7
    assert info["class_map"] == [4, 3, 2, 1, 0] and info["metrics"] == {"acc1_avg": 12.5}
    with torch.no_grad():
        for a, b in zip(student_logits(loaded, x), student_logits(model, x)):
            assert torch.equal(a, b)
        loaded_ema, info = load_student(tmp_path / "checkpoint.pth", ema=True)
        assert info["weights"] == "model_ema"
        assert torch.equal(student_logits(loaded_ema, x)[0], student_logits(ema, x)[0])
    with pytest.raises(ValueError, match="classes"):
        load_student(tmp_path / "checkpoint.pth", num_classes=10)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if k != "dist_token"}
    with pytest.raises(CheckpointMismatchError, match="dist_token"):
        student_from_checkpoint(ckpt)


# ----------------------------------------------------------------------------- student


def test_student_arch_resolution_and_errors():
    arch = student_arch("deit_small_distilled_patch16_224", 100)
    assert arch == {"name": "deit_small_distilled_patch16_224", "num_classes": 100, "img_size": 224,
                    "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0}
    cpu = student_arch("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=4, depth=6)
    assert (cpu["embed_dim"], cpu["num_heads"], cpu["depth"], cpu["patch_size"]) == (192, 3, 6, 4)
    assert student_arch(**cpu) == cpu  # a stored dict re-validates
    with pytest.raises(ValueError, match="divisible by patch_size"):
        student_arch("deit_tiny_distilled_patch16_224", 10, img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        student_arch("deit_tiny_distilled_patch16_224", 10, embed_dim=100)
    with pytest.raises(ValueError, match="must be given"):
        student_arch("my_vit", 10)
    with pytest.raises(ValueError, match="num_classes"):
        student_arch("deit_tiny_distilled_patch16_224", 0)


def test_student_param_counts_match_timm():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        tiny = build_student(student_arch("deit_tiny_distilled_patch16_224", 1000))
        reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
        small = build_student(student_arch("deit_small_distilled_patch16_224", 1000))
        base = build_student(student_arch("deit_base_distilled_patch16_224", 1000))
    assert n_params(tiny) == n_params(reference)
    assert {k: v.shape for k, v in tiny.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert tiny.norm.eps == 1e-6 and tiny.blocks[0].attn.qkv.bias is not None
    assert round(n_params(small) / 1e6, 1) == 22.4
    assert round(n_params(base) / 1e6, 1) == 87.3


def test_patch4_student_logits_in_train_and_eval():
    torch.manual_seed(0)
    arch = student_arch("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=4, depth=6)
    model = build_student(arch, drop_path_rate=0.1)
    assert model.pos_embed.shape == (1, 64 + 2, 192)
    x = torch.randn(3, 3, 32, 32)
    for train in (True, False):
        model.train(train)
        cls_logits, dist_logits = student_logits(model, x)
        assert cls_logits.shape == dist_logits.shape == (3, 10)
        assert not torch.allclose(cls_logits, dist_logits)
    # the reported prediction ('avg', DistilledStudent.combine) equals what a plain timm
    # VisionTransformerDistilled with the same weights predicts in eval mode (the heads' mean)
    plain = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10,
                              img_size=32, patch_size=4, depth=1).eval()
    ours = build_student(student_arch("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=4,
                                      depth=1)).eval()
    ours.load_state_dict(plain.state_dict(), strict=True)
    out = student_outputs(ours, x)
    assert list(out) == ["cls", "dist", "avg"]
    torch.testing.assert_close(out["avg"], plain(x))


def test_fused_attention_equals_plain_formula():
    torch.manual_seed(0)
    arch = student_arch("deit_tiny_distilled_patch16_224", 10, img_size=32, patch_size=4, depth=2)
    model = build_student(arch, fused_attn=True).eval()
    assert all(block.attn.fused_attn for block in model.blocks)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fused = student_logits(model, x)
        set_fused_attn(model, False)
        assert not any(block.attn.fused_attn for block in model.blocks)
        plain = student_logits(model, x)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_teacher_arch_round_trip():
    model = build_teacher("resnet32", 3)
    rebuilt = build_teacher(**teacher_arch_of(model))
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    with pytest.raises(ValueError):
        build_teacher("resnet32", 3, head="cosine")
