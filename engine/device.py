"""The Accelerator of a run (device, precision, processes) and the CPU thread count.

accelerate chooses the device (CUDA, MPS, XPU) unless ``train.cpu=true`` forces the CPU; on a
machine with none of them the Accelerator is made with ``cpu=True``, which is what makes a
``--multi_gpu`` launch on CPUs one gloo process group instead of independent processes. ``train.mixed_precision`` null leaves the precision to ``accelerate launch`` (flag or
config file). ``precision_summary`` says what actually runs: accelerate treats fp16 on a CPU
as fp32 (no autocast, no loss scaling), and the start-up line says so.

On CUDA also: the process-group timeout (``train.dist_timeout_min``: NCCL's default gives up
after 10 minutes, gloo's after 30), TF32 matmuls and ``cudnn.benchmark`` (``train.tf32``), and
under FSDP a mixed-precision policy that reduces gradients in fp32 (``fsdp_plugin``).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch

# Test hook (CPU only): `DEIT_LT_CPU_GRAD_SCALER=<init scale>` gives an fp16 run on the CPU a
# real torch.amp.GradScaler, so the loss-scaling code paths (skipped steps, scale updates,
# SAM's unscaling) run in CI without a GPU. Unset in normal runs.
CPU_SCALER_ENV = "DEIT_LT_CPU_GRAD_SCALER"


def set_cpu_threads() -> None:
    """Split the CPU cores between the processes launched together on one machine, leaving
    one core to the data-loader workers. ``OMP_NUM_THREADS``, when set, wins.

    Measured on a 2-core machine: a ResNet-32 training step (batch 128, bf16) took 0.6 s with
    1 thread and 15 s with 2 threads while data workers shared the cores; oversubscribed
    OpenMP pools spin and stall, so fewer threads is the safe default.
    """
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    threads = max(1, (os.cpu_count() or 1) // max(1, world) - 1)
    torch.set_num_threads(threads)


def accelerator_available() -> bool:
    """A device accelerate would use instead of the CPU: CUDA, MPS or XPU."""
    from accelerate.utils import is_mps_available, is_xpu_available

    return torch.cuda.is_available() or is_mps_available() or is_xpu_available()


def set_fast_math(tf32: bool) -> None:
    """On CUDA: TF32 matmuls (fp32 runs then use the tensor cores; cuDNN convolutions already
    do) and ``cudnn.benchmark`` (the fastest convolution algorithm for the fixed input sizes).
    Nothing on a CPU, whose numerics stay bit-identical."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.benchmark = bool(tf32)


def fast_math_summary() -> str:
    """' | TF32 matmuls, cudnn.benchmark' when set_fast_math turned them on, else ''."""
    if torch.cuda.is_available() and torch.get_float32_matmul_precision() != "highest":
        return " | TF32 matmuls, cudnn.benchmark" if torch.backends.cudnn.benchmark else " | TF32 matmuls"
    return ""


def fsdp_plugin(mixed_precision: str | None):
    """Under ``accelerate launch`` with an FSDP config, accelerate's FSDP plugin (read from the
    launcher's environment, as accelerate would) with gradients reduced in fp32: accelerate's
    own policy reduces (and, over accumulated micro-batches, sums) them in the autocast dtype,
    where DDP keeps fp32. None without FSDP or mixed precision (accelerate's defaults)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    mixed_precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None:
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=dtype)
    else:
        from torch.distributed.fsdp import MixedPrecision

        policy = MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=dtype)
    plugin.mixed_precision_policy = policy  # accelerate keeps a policy it is given
    return plugin


def build_accelerator(train_cfg: dict, log_with=None, project_dir=None):
    """An Accelerator for the run. Gradient accumulation is done by the training steps
    themselves (they know the window, including a last partial one), so accelerate's is 1.

    ``log_with`` / ``project_dir``: experiment trackers and their folder, as
    ``engine.trackers.accelerator_kwargs(cfg)`` gives them; None leaves them out.
    ``train_cfg`` keys read: mixed_precision, cpu, dist_timeout_min (default 30), tf32
    (default true)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    set_cpu_threads()
    set_fast_math(train_cfg.get("tf32", True))
    kwargs = {}
    if log_with:
        kwargs["log_with"] = log_with
    if project_dir is not None:
        kwargs["project_dir"] = str(project_dir)
    if train_cfg.get("mixed_precision") is not None:
        kwargs["mixed_precision"] = train_cfg["mixed_precision"]
    if train_cfg.get("cpu") or not accelerator_available():
        kwargs["cpu"] = True
    plugin = fsdp_plugin(train_cfg.get("mixed_precision"))
    if plugin is not None:
        kwargs["fsdp_plugin"] = plugin
    timeout = timedelta(minutes=train_cfg.get("dist_timeout_min", 30))
    accelerator = Accelerator(
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False),
                         InitProcessGroupKwargs(timeout=timeout)],
        **kwargs,
    )
    scale = os.environ.get(CPU_SCALER_ENV)
    if scale and accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=float(scale))
        accelerator.native_amp = True  # accelerate's unscale/step paths check this flag
    return accelerator


def precision_summary(accelerator) -> str:
    """What runs, in words: 'fp16 (loss scaling)', 'bf16 autocast', 'fp32', or 'fp32 (fp16
    requested: accelerate runs fp16 on a CPU as fp32)', followed on CUDA by the fast-math
    settings ('... | TF32 matmuls, cudnn.benchmark')."""
    return _precision(accelerator) + fast_math_summary()


def _precision(accelerator) -> str:
    mp = accelerator.mixed_precision
    if mp == "fp16":
        if accelerator.scaler is not None:
            return "fp16 autocast with loss scaling"
        return "fp32 (fp16 requested: accelerate runs fp16 on a CPU as fp32, without loss scaling)"
    if mp == "bf16":
        return "bf16 autocast" if accelerator.native_amp else "fp32 (bf16 not available here)"
    return "fp32"
