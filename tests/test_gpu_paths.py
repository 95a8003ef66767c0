"""GPU-only costs and failures, caught on a CPU (issue "GPU in one shot"):

- FSDP2 under bf16 reduces gradients in fp32 (engine/device.py's FSDP plugin), shown on 2 gloo
  processes against an fp32 DDP twin (``-k fsdp2_reduces_in_fp32``);
- the teacher's step makes no host syncs and no host-device copies: run on the ``meta`` device,
  where any copy from the host or any read of a value shows (``-k teacher_step_has_no_host_copies``);
- SAM's perturbation and the EMA update are a few ``torch._foreach_*`` calls, bit-identical to
  the per-tensor arithmetic;
- ``train.dist_timeout_min`` reaches the process group, ``train.tf32`` sets TF32 on CUDA only.
"""
from __future__ import annotations

import json
from collections import Counter
from datetime import timedelta

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from test_train import ROOT, run

aten = torch.ops.aten


# ----------------------------------------------------------------------------- FSDP2 reduction


def test_fsdp2_reduces_in_fp32_policy_from_the_plugin(monkeypatch):
    """The plugin build_accelerator hands accelerate for `fsdp_version: 2` + bf16 (what
    `accelerate launch --config_file configs/accelerate/fsdp_*_bf16.yaml` sets)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from engine.device import fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    plugin = fsdp_plugin(None)
    plugin.set_mixed_precision("bf16")  # what AcceleratorState then does: it keeps a given policy
    policy = plugin.mixed_precision_policy
    assert type(policy).__name__ == "MixedPrecisionPolicy"
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == \
        (torch.bfloat16, torch.float32, torch.bfloat16)
    # accelerate's own policy, which this replaces, reduces in bf16
    default = FullyShardedDataParallelPlugin()
    default.set_mixed_precision("bf16")
    assert default.mixed_precision_policy.reduce_dtype == torch.bfloat16
    assert fsdp_plugin("fp16").mixed_precision_policy.reduce_dtype == torch.float32
    assert fsdp_plugin("no") is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert fsdp_plugin("bf16") is None


def test_fsdp2_reduces_in_fp32_two_gloo_processes(tmp_path):
    """fully_shard with that policy, 4 accumulated micro-batches per rank: gradients and
    weights equal those of a DDP twin computing in bf16 and reducing in fp32; a bf16
    reduction (accelerate's policy) differs."""
    report_path = tmp_path / "reduce.json"
    run([str(ROOT / "tests" / "workers" / "fsdp2_reduce.py"), str(report_path)],
        launch=["--multi_gpu", "--num_processes", "2"])
    r = json.loads(report_path.read_text())
    assert r["world"] == 2
    assert r["policy"]["reduce_dtype"] == "torch.float32"
    assert r["fp32_reduce"]["grad_max_rel_diff"] < 1e-6 and r["fp32_reduce"]["weight_max_diff"] < 1e-7
    assert r["bf16_reduce"]["grad_max_rel_diff"] > 1e-4  # bf16 accumulation and reduction round
    assert r["bf16_reduce"]["weight_max_diff"] > 1e-6


# ----------------------------------------------------------------------------- host copies


class HostTraffic(TorchDispatchMode):
    """Counts host syncs (a value read back: ``_local_scalar_dense``) and copies that change
    device. On the ``meta`` device a value cannot be read: a dummy 0 stands in and it is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.seen["host sync (_local_scalar_dense)"] += 1
            return False if args[0].dtype == torch.bool else 0
        out = func(*args, **kwargs)
        if func is aten._to_copy.default and args[0].device != out.device:
            self.seen[f"copy {args[0].device} -> {out.device} (_to_copy)"] += 1
        elif func is aten.copy_.default and args[0].device != args[1].device:
            self.seen[f"copy {args[1].device} -> {args[0].device} (copy_)"] += 1
        return out


@pytest.mark.parametrize("loss", ["ldam", "paco"])
def test_teacher_step_has_no_host_copies(loss):
    """train_teacher.py's model, criterion and optimiser (SAM), built as main() builds them on
    the accelerator's device (here meta), then two SAM steps of train_step with 2 micro-batches."""
    import train_teacher
    from engine.device import build_accelerator
    from losses.drw import drw_weights
    from utils import parse_config

    argv = [f"loss.type={loss}", "optim.sam=true"]
    if loss == "paco":
        argv += ["model.head=linear", "loss.drw_epoch=null", "loss.paco_queue=24", "loss.paco_dim=8"]
    cfg = parse_config(train_teacher.SPEC, argv, validate=train_teacher.validate)[0]
    counts = [20, 10, 5]
    device = torch.device("meta")
    arch, model, criterion, optimizer = train_teacher.build_model_and_loss(cfg, counts, 3, device)
    if loss == "ldam":  # DRW's class weights, moved to the device as main() does
        criterion.weight = drw_weights(counts, 0, 0, 0.9999).to(device)
    accelerator = build_accelerator({"cpu": True, "mixed_precision": "no"})
    model.train()

    def batch():
        images = torch.empty(4, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
        targets = torch.zeros(4, dtype=torch.long, device=device)
        return ([images, images.clone()] if loss == "paco" else images), targets

    with HostTraffic() as traffic:
        for _ in range(2):
            train_teacher.train_step(model, criterion, [batch(), batch()], optimizer, accelerator, sam=True)
    assert dict(traffic.seen) == {}


# ----------------------------------------------------------------------------- foreach


class OpCount(TorchDispatchMode):
    """Counts the ops that run kernels (not allocations, not detach: no launch)."""

    FREE = (aten.detach, aten.empty_like, aten.empty, aten.alias)

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += func.overloadpacket not in self.FREE
        return func(*args, **(kwargs or {}))


def _mlp(layers: int) -> nn.Module:
    torch.manual_seed(layers)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)], nn.BatchNorm1d(8))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturbs_with_foreach_ops_bit_identically(adaptive):
    from losses.sam import SAM

    def step(layers: int):
        model = _mlp(layers)
        model(torch.randn(6, 8)).square().mean().backward()
        sam = SAM(model.parameters(), torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        grads = [p.grad.clone() for p in model.parameters()]
        with OpCount() as first:
            sam.first_step()
        perturbed = [p.detach().clone() for p in model.parameters()]
        with OpCount() as restore:
            sam.restore()
        return first.ops + restore.ops, before, grads, perturbed, list(model.parameters())

    ops_small, *_ = step(2)
    ops_large, before, grads, perturbed, params = step(12)
    assert ops_large == ops_small  # a fixed number of ops, not a few per tensor
    # the per-tensor arithmetic the loop had: e = (|w|^2 if adaptive) * g * rho / (||g'|| + 1e-12)
    norm = torch.stack([((g * w.abs()) if adaptive else g).norm(p=2) for g, w in zip(grads, before)]).norm(p=2)
    scale = 0.3 / (norm + 1e-12)
    for w, g, got, p in zip(before, grads, perturbed, params):
        assert torch.equal(got, w + (w * w if adaptive else 1.0) * g * scale)
        assert torch.equal(p, w)  # restored exactly


def test_ema_updates_with_foreach_ops_bit_identically():
    from models.ema import ModelEma

    def update(layers: int):
        model = _mlp(layers)
        ema = ModelEma(model, decay=0.9)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model[-1].num_batches_tracked += 3
        shadow = {k: v.clone() for k, v in ema.shadow.items()}
        with OpCount() as count:
            ema.update(model, micro_batches=2)
        return count.ops, model, shadow, ema

    ops_small, *_ = update(2)
    ops_large, model, shadow, ema = update(12)
    assert ops_large == ops_small
    decay = 0.9 ** 2
    for key, value in model.state_dict().items():
        expected = (shadow[key].mul_(decay).add_(value, alpha=1.0 - decay)
                    if value.is_floating_point() else value)
        assert torch.equal(ema.shadow[key], expected), key


# ----------------------------------------------------------------------------- timeout, TF32


def test_dist_timeout_reaches_the_process_group_and_tf32_is_cuda_only(monkeypatch):
    import train_student
    from engine import device
    from errors import ConfigError
    from utils import parse_config

    cfg = parse_config(train_student.SPEC, ["distill.type=none"], validate=train_student.validate)[0]
    assert cfg["train"]["dist_timeout_min"] == 30 and cfg["train"]["tf32"] is True
    with pytest.raises(ConfigError, match="train.dist_timeout_min"):
        parse_config(train_student.SPEC, ["distill.type=none", "train.dist_timeout_min=0"],
                     validate=train_student.validate)
    accelerator = device.build_accelerator({"cpu": True, "mixed_precision": "no", "dist_timeout_min": 7})
    assert accelerator.init_handler.timeout == timedelta(minutes=7)

    precision, benchmark = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    try:
        device.set_fast_math(True)  # no CUDA here: nothing changes, CPU numerics stay
        assert torch.get_float32_matmul_precision() == precision and device.fast_math_summary() == ""
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        device.set_fast_math(True)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
        assert device.fast_math_summary() == " | TF32 matmuls, cudnn.benchmark"
        device.set_fast_math(False)
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.benchmark = benchmark


# ----------------------------------------------------------------------------- the GPU check


def _gpu_check(*args: str) -> str:
    import subprocess

    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=60).stdout


def test_gpu_check_plan_fits_its_budget_with_train_step_first():
    plan = json.loads(_gpu_check("--plan"))
    names = [s["name"] for s in plan["steps"]]
    assert plan["budget_s"] <= 480 and sum(s["cap_s"] for s in plan["steps"]) <= plan["budget_s"]
    assert names[:3] == ["env", "data", "train_step"]
    assert names.index("student_bf16_fsdp") < names.index("student_bf16_compile_ddp") < \
        names.index("evaluate_compiled")
    # the steps the check runs, in its order: every `step NAME` call of the script
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    for name in names:
        assert f"step {name} " in script or f"_run {name} " in script, name
    smaller = json.loads(_gpu_check("--plan", "--budget", "300"))
    assert smaller["budget_s"] == 300 and sum(s["cap_s"] for s in smaller["steps"]) <= 300


def test_gpu_check_device_command_installs_the_wheels_and_writes_under_out():
    cmd = _gpu_check("--device-command").strip()
    assert len(cmd) <= 2000 and "\n" not in cmd
    assert "pip install" in cmd and "--no-index --no-deps" in cmd and "--target" in cmd
    assert cmd.index("PYTHONPATH=") < cmd.index("preflight") < cmd.index("bash bench/gpu_check.sh")
    assert "--out $OUT/gpu_check.json" in cmd and "--logs-tar $OUT/" in cmd
    assert "NCCL with several GPUs stays untested" in _gpu_check("--help")


def test_preflight_stops_with_one_line_on_a_version_mismatch(tmp_path, capsys):
    import sys
    import zipfile

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    def wheel(name: str, version: str, requires: str = "") -> None:
        with zipfile.ZipFile(tmp_path / f"{name}-{version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{name}-{version}.dist-info/METADATA",
                        f"Name: {name}\nVersion: {version}\n{requires}")

    wheel("datasets", "0.0.1")  # not the datasets Python imports
    args = type("Args", (), {"wheels": str(tmp_path), "out": str(tmp_path / "p.json")})
    assert gpu_check.preflight(args) == 4
    assert "datasets-0.0.1-py3-none-any.whl is carried but Python finds datasets" in capsys.readouterr().out
    (tmp_path / "datasets-0.0.1-py3-none-any.whl").unlink()
    import pyarrow

    wheel("tqdm", __import__("importlib.metadata").metadata.version("tqdm"),
          f"Requires-Dist: pyarrow>{pyarrow.__version__}\n")  # a requirement the install misses
    assert gpu_check.preflight(args) == 4
    assert f"requires pyarrow>{pyarrow.__version__}, found {pyarrow.__version__}" in capsys.readouterr().out


def test_step_bookkeeping_makes_no_host_copies():
    """The fp16 'skipped' term and StepMonitor's preemption flag are filled on the device."""
    import types

    from engine import loop

    device = torch.device("meta")
    with HostTraffic() as traffic:
        term = loop.skipped_term(types.SimpleNamespace(scaler=object(), device=device), None, skipped=True)
        flag = torch.empty(3, device=device).new_full((1,), 1.0)  # as StepMonitor.after_step
    assert term["skipped"].device == device and flag.device == device
    assert dict(traffic.seen) == {}
    assert "new_full((1,), float(self.preemption.requested))" in (ROOT / "engine" / "loop.py").read_text()
