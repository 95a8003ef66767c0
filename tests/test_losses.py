"""Losses: DRW class weights, LDAM, the DeiT-LT distillation loss (against the reference's
fixtures), and SAM (perturbation, base step, resume, BatchNorm freezing)."""
import copy
import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from losses import (SAM, DistillationLoss, LDAMLoss, class_balanced_weights, disable_running_stats,
                    distillation_terms, drw_weights, enable_running_stats, ldam_margins, rho_for_epoch)


# ----------------------------------------------------------------------------- DRW weights


def test_class_weights_match_reference(parity_dir):
    fixtures = json.loads((parity_dir / "class_weights.json").read_text())
    for name, case in fixtures.items():
        for beta, key in ((case["beta"], "weights"), (0.999, "weights_beta_0.999")):
            weights = class_balanced_weights(case["cls_num_list"], beta)
            assert weights.dtype == torch.float32
            torch.testing.assert_close(weights.double(), torch.tensor(case[key], dtype=torch.float64),
                                       rtol=1e-6, atol=0, msg=f"{name} beta={beta}")
            assert math.isclose(weights.sum().item(), len(case["cls_num_list"]), rel_tol=1e-5)


def test_drw_weights_switch_on_at_drw_epoch():
    counts = [100, 10, 1]
    assert drw_weights(counts, epoch=159, drw_epoch=160) is None  # unweighted before DRW
    assert torch.equal(drw_weights(counts, epoch=160, drw_epoch=160), class_balanced_weights(counts))
    assert drw_weights(counts, epoch=500, drw_epoch=None) is None


@pytest.mark.parametrize("script", ["train_student", "train_teacher"])
def test_both_scripts_schedule_drw_with_the_one_predicate(script, monkeypatch, capsys):
    """--print-schedule asks losses.drw.drw_active, as the loops do through drw_weights: a change
    of the DRW rule is one edit there (here: DRW on odd epochs only)."""
    import importlib

    from utils import split_spec

    module = importlib.import_module(script)
    cfg = split_spec(module.SPEC)[0]
    cfg["train"]["epochs"] = 4
    monkeypatch.setattr(module, "drw_active", lambda epoch, drw_epoch: epoch % 2 == 1)
    module.print_schedule(cfg)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [line["drw"] for line in lines] == [False, True, False, True]


# ----------------------------------------------------------------------------- LDAM


def test_ldam_margins_and_loss_by_hand():
    counts = [100, 10, 1]
    margins = ldam_margins(counts, max_m=0.5)
    # n^(-1/4) = 0.3162, 0.5623, 1.0; scaled so the largest is 0.5
    torch.testing.assert_close(margins, torch.tensor([0.5 * 100 ** -0.25, 0.5 * 10 ** -0.25, 0.5]))
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    targets = torch.tensor([0, 2])
    s = 30.0

    def sample_loss(z, y, m):
        z = [s * (v - (m if c == y else 0.0)) for c, v in enumerate(z)]
        return -(z[y] - math.log(sum(math.exp(v) for v in z)))

    m0, m2 = 0.5 * 100 ** -0.25, 0.5
    l0 = sample_loss([1.0, 0.0, -1.0], 0, m0)
    l1 = sample_loss([0.5, 0.5, 0.5], 2, m2)
    loss = LDAMLoss(counts, max_m=0.5, s=s)
    assert math.isclose(loss(logits, targets).item(), (l0 + l1) / 2, rel_tol=1e-5)
    # DRW: a settable per-class weight, PyTorch's weighted mean
    w = torch.tensor([0.2, 0.8, 2.0])
    loss.weight = w
    assert math.isclose(loss(logits, targets).item(), (0.2 * l0 + 2.0 * l1) / 2.2, rel_tol=1e-5)


# ----------------------------------------------------------------------------- distillation


def _cases(parity_dir):
    return torch.load(parity_dir / "distillation_cases.pt", weights_only=True)


@pytest.mark.parametrize("index", range(8))
def test_distillation_reference_cases(parity_dir, index):
    cases = _cases(parity_dir)
    assert len(cases) == 8
    case = cases[index]
    # Mixup batches use timm's SoftTargetCrossEntropy; the no-mixup DRW phase plain CE on hard
    # labels. The base term is never class-weighted; `weighted` re-weights the DIST term only.
    base_criterion = SoftTargetCrossEntropy() if case["soft_targets"] else nn.CrossEntropyLoss()
    loss, base_term, distill_term = distillation_terms(
        case["cls_logits"], case["dist_logits"], case["teacher_logits"], case["targets"], base_criterion,
        case["distillation_type"], case["alpha"], case["tau"],
        class_weights=case["class_weights"] if case["weighted"] else None)
    for got, key in ((loss, "expected_loss"), (base_term, "expected_base_term"),
                     (distill_term, "expected_distillation_term")):
        torch.testing.assert_close(got, case[key].float(), rtol=1e-5, atol=1e-6, msg=key)


class RecordingTeacher(nn.Module):
    """Returns fixed logits (or a function of the input) and records what it was given."""

    def __init__(self, logits=None, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 3)
        self.logits = logits
        self.seen = None
        self.grad_enabled = None

    def forward(self, x):
        self.seen = x
        self.grad_enabled = torch.is_grad_enabled()
        out = self.conv(x).mean((2, 3))
        return out if self.logits is None else self.logits


def test_teacher_sees_resized_input_without_antialias():
    torch.manual_seed(0)
    teacher = RecordingTeacher()
    loss_fn = DistillationLoss(SoftTargetCrossEntropy(), teacher, "hard", 0.5, 1.0, teacher_input_size=32)
    inputs = torch.randn(2, 3, 224, 224)
    targets = F.one_hot(torch.tensor([0, 3]), 4).float()
    outputs = {"cls": torch.randn(2, 4, requires_grad=True), "dist": torch.randn(2, 4, requires_grad=True)}
    loss, parts = loss_fn(inputs, outputs, targets)
    expected = F.interpolate(inputs, size=(32, 32), mode="bicubic", align_corners=False, antialias=False)
    assert teacher.seen.shape == (2, 3, 32, 32)
    torch.testing.assert_close(teacher.seen, expected, rtol=0, atol=0)
    antialiased = F.interpolate(inputs, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert (teacher.seen - antialiased).abs().max() > 0.5  # the torchvision default would differ
    assert teacher.seen.is_contiguous(memory_format=torch.channels_last)
    assert teacher.grad_enabled is False and not teacher.training
    assert set(parts) == {"base", "distill", "teacher_logit_max"}
    torch.testing.assert_close(loss, parts["base"] + parts["distill"])
    loss.backward()  # gradients reach the student heads, not the teacher
    assert outputs["dist"].grad is not None and teacher.conv.weight.grad is None
    # same size: no resize at all
    loss_fn(expected, outputs, targets)
    torch.testing.assert_close(teacher.seen, expected, rtol=0, atol=0)
    # loss.train() never puts the teacher in training mode
    loss_fn.train()
    assert not teacher.training


def test_teacher_fp32_argmaxes_fp32_logits_under_bf16_autocast():
    # A linear teacher whose two logits differ by less than bf16's spacing at 1.0 (2^-7):
    # under bf16 autocast they tie and argmax takes class 0; in fp32 class 1 wins.
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 3, bias=False))
    with torch.no_grad():
        teacher[1].weight.zero_()
        teacher[1].weight[0, 0] = 1.0
        teacher[1].weight[1, 0] = teacher[1].weight[1, 1] = 1.0
        teacher[1].weight[2, 2] = 1.0
    inputs = torch.zeros(6, 3, 2, 2)
    inputs[:, 0, 0, 0] = 1.0
    inputs[:, 0, 0, 1] = torch.linspace(5e-4, 3e-3, 6)  # class 1's margin over class 0
    inputs[:, 0, 1, 0] = 0.5
    fp32_targets = teacher(inputs).argmax(1)
    assert fp32_targets.tolist() == [1] * 6
    outputs = {"cls": torch.randn(6, 3), "dist": torch.randn(6, 3)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def run(**kwargs):
        loss_fn = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", 0.5, 1.0, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = loss_fn.teacher_logits(inputs)
            _, parts = loss_fn(inputs, outputs, labels)
            reference = teacher(inputs.contiguous(memory_format=torch.channels_last))
        return logits, parts, reference

    # default: the reference's autocast teacher, exactly (bf16 logits, the ties go to class 0)
    logits, parts, reference = run()
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, reference)
    assert logits.argmax(1).tolist() == [0] * 6
    torch.testing.assert_close(parts["distill"], 0.5 * F.cross_entropy(outputs["dist"], logits.float().argmax(1)))
    # teacher_fp32: fp32 logits, equal to the fp32 forward, and the fp32 argmax as hard targets
    logits, parts, _ = run(teacher_fp32=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, teacher(inputs), rtol=0, atol=0)
    torch.testing.assert_close(parts["distill"], 0.5 * F.cross_entropy(outputs["dist"], fp32_targets))


def test_class_map_hard_and_soft():
    torch.manual_seed(0)
    teacher_logits = torch.randn(6, 4)
    class_map = [2, 0, 3, 1]  # class_map[teacher_label] = student_label
    cls_logits, dist_logits = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    inputs = torch.randn(6, 3, 8, 8)
    weights = torch.tensor([0.5, 1.0, 1.5, 2.0])

    hard = DistillationLoss(nn.CrossEntropyLoss(), RecordingTeacher(teacher_logits), "hard", 0.5, 1.0,
                            class_map=class_map)
    _, parts = hard(inputs, {"cls": cls_logits, "dist": dist_logits}, labels, class_weights=weights)
    mapped = torch.tensor(class_map)[teacher_logits.argmax(1)]
    expected = 0.5 * F.cross_entropy(dist_logits, mapped, weight=weights)
    torch.testing.assert_close(parts["distill"], expected)

    soft = DistillationLoss(nn.CrossEntropyLoss(), RecordingTeacher(teacher_logits), "soft", 0.5, 2.0,
                            class_map=class_map)
    _, parts = soft(inputs, {"cls": cls_logits, "dist": dist_logits}, labels)
    permuted = torch.zeros_like(teacher_logits)
    for teacher_label, student_label in enumerate(class_map):
        permuted[:, student_label] = teacher_logits[:, teacher_label]
    T = 2.0
    kl = (F.softmax(permuted / T, 1) * (F.log_softmax(permuted / T, 1) - F.log_softmax(dist_logits / T, 1))).sum()
    torch.testing.assert_close(parts["distill"], 0.5 * kl * T * T / dist_logits.numel())
    with pytest.raises(ValueError, match="permutation"):
        DistillationLoss(nn.CrossEntropyLoss(), RecordingTeacher(), "hard", 0.5, 1.0, class_map=[0, 0, 1, 2])


def test_distillation_none_needs_no_teacher_and_bad_settings_raise():
    torch.manual_seed(0)
    cls_logits, dist_logits = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    loss_fn = DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 1.0)
    loss, parts = loss_fn(torch.randn(4, 3, 8, 8), {"cls": cls_logits, "dist": dist_logits}, labels)
    torch.testing.assert_close(parts["distill"], 0.5 * F.cross_entropy(dist_logits, labels))
    for kwargs in (dict(distillation_type="medium"), dict(alpha=1.5), dict(alpha=-0.1), dict(tau=0.0),
                   dict(distillation_type="hard", teacher=None), dict(distillation_type="soft", teacher=None)):
        args = dict(base_criterion=nn.CrossEntropyLoss(), teacher=RecordingTeacher(), distillation_type="hard",
                    alpha=0.5, tau=1.0)
        args.update(kwargs)
        with pytest.raises(ValueError):
            DistillationLoss(**args)
    with pytest.raises(ValueError, match="soft"):
        distillation_terms(cls_logits, dist_logits, torch.randn(4, 3), labels, nn.CrossEntropyLoss(), "soft",
                           0.5, 1.0, class_weights=torch.ones(3))


def test_distillation_types_and_ranges_are_defined_once():
    """train_student's distill.type choices and its alpha / tau checks are the loss's own."""
    import train_student
    from errors import ConfigError
    from losses.distillation import DISTILLATION_TYPES
    from utils import parse_config

    assert train_student.SPEC["distill"]["type"][2] is DISTILLATION_TYPES
    for override, message in (("distill.alpha=1.5", "distill.alpha: must be in [0, 1]"),
                              ("distill.tau=0", "distill.tau: must be > 0")):
        with pytest.raises(ConfigError, match=re.escape(message) + ".*got"):
            parse_config(train_student.SPEC, ["distill.type=none", override], validate=train_student.validate)
    with pytest.raises(ValueError, match="distillation tau: must be > 0"):
        DistillationLoss(nn.CrossEntropyLoss(), None, "none", 0.5, 0.0)


def test_distillation_computes_in_float32():
    torch.manual_seed(0)
    cls_logits, dist_logits = torch.randn(4, 3).bfloat16(), torch.randn(4, 3).bfloat16()
    labels = torch.tensor([0, 1, 2, 0])
    loss, _, _ = distillation_terms(cls_logits, dist_logits, torch.randn(4, 3).bfloat16(), labels,
                                    nn.CrossEntropyLoss(), "hard", 0.5, 1.0)
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------- SAM


def _toy_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    return model, x, y


def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_first_step_perturbation_norm(adaptive):
    model, x, y = _toy_problem()
    rho = 0.3
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model, x, y)
    opt.first_step()
    e = [p.detach() - b for p, b in zip(model.parameters(), before)]
    if adaptive:  # ASAM: the perturbation has norm rho in the |w|-rescaled space
        norm = torch.cat([(ei / b.abs()).flatten() for ei, b in zip(e, before)]).norm()
    else:
        norm = torch.cat([ei.flatten() for ei in e]).norm()
    assert math.isclose(norm.item(), rho, rel_tol=1e-4)


def test_sam_second_step_is_base_step_with_perturbed_gradient():
    model, x, y = _toy_problem()
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=2e-4)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kwargs)
    shadow = copy.deepcopy(model)
    reference = torch.optim.SGD(shadow.parameters(), **kwargs)
    for _ in range(3):  # several steps so the momentum buffers matter
        _grads(model, x, y)
        opt.first_step(zero_grad=True)
        perturbed_grads = _grads(model, x, y)
        opt.second_step(zero_grad=True)
        for p, g in zip(shadow.parameters(), perturbed_grads):
            p.grad = g
        reference.step()
        for p, q in zip(model.parameters(), shadow.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # the closure form does the same thing
    closure_model = copy.deepcopy(model)
    closure_opt = SAM(closure_model.parameters(), torch.optim.SGD, rho=0.05, **kwargs)
    closure_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares buffers otherwise
    _grads(model, x, y)
    opt.first_step(zero_grad=True)
    _grads(model, x, y)
    opt.second_step(zero_grad=True)

    def closure():
        loss = F.cross_entropy(closure_model(x), y)
        loss.backward()
        return loss

    closure_opt.step(closure)
    for p, q in zip(model.parameters(), closure_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sam_state_dict_round_trip_and_rho_schedule():
    model, x, y = _toy_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(2):
        _grads(model, x, y)
        opt.first_step(zero_grad=True)
        _grads(model, x, y)
        opt.second_step(zero_grad=True)
    opt.param_groups[0]["rho"] = 0.5
    state = copy.deepcopy(opt.state_dict())
    assert state["param_groups"][0]["rho"] == 0.5 and len(state["state"]) == 4  # momentum buffers

    resumed_model = copy.deepcopy(model)
    resumed = SAM(resumed_model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["rho"] == 0.5
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    for m, o in ((model, opt), (resumed_model, resumed)):
        _grads(m, x, y)
        o.first_step(zero_grad=True)
        _grads(m, x, y)
        o.second_step(zero_grad=True)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    schedule = [[0, 0.05], [5, 0.1], [60, 0.5]]
    assert [rho_for_epoch(schedule, e) for e in (0, 4, 5, 59, 60, 89)] == [0.05, 0.05, 0.1, 0.1, 0.5, 0.5]


def test_disable_running_stats_freezes_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    bn = model[1]
    x = torch.randn(8, 3, 6, 6) + 2.0
    model(x)  # first pass: statistics update
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    disable_running_stats(model)
    assert bn.momentum == 0
    model(x * 3)  # second (perturbed) pass: frozen
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, var, rtol=0, atol=0)
    enable_running_stats(model)
    assert bn.momentum == 0.1
    model(x * 3)
    assert not torch.equal(bn.running_mean, mean)
