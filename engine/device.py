"""The Accelerator of a run (device, precision, processes) and the CPU thread count.

accelerate chooses the device (CUDA, MPS, XPU) unless ``train.cpu=true`` forces the CPU; on a
machine with none of them the Accelerator is made with ``cpu=True``, which is what makes a
``--multi_gpu`` launch on CPUs one gloo process group instead of independent processes. ``train.mixed_precision`` null leaves the precision to ``accelerate launch`` (flag or
config file). ``precision_summary`` says what actually runs: accelerate treats fp16 on a CPU
as fp32 (no autocast, no loss scaling), and the start-up line says so.
"""
from __future__ import annotations

import os

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


def build_accelerator(train_cfg: dict, log_with=None, project_dir=None):
    """An Accelerator for the run. Gradient accumulation is done by the training steps
    themselves (they know the window, including a last partial one), so accelerate's is 1.

    ``log_with`` / ``project_dir``: experiment trackers and their folder, as
    ``engine.trackers.accelerator_kwargs(cfg)`` gives them; None leaves them out."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    set_cpu_threads()
    kwargs = {}
    if log_with:
        kwargs["log_with"] = log_with
    if project_dir is not None:
        kwargs["project_dir"] = str(project_dir)
    if train_cfg.get("mixed_precision") is not None:
        kwargs["mixed_precision"] = train_cfg["mixed_precision"]
    if train_cfg.get("cpu") or not accelerator_available():
        kwargs["cpu"] = True
    accelerator = Accelerator(
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        **kwargs,
    )
    scale = os.environ.get(CPU_SCALER_ENV)
    if scale and accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=float(scale))
        accelerator.native_amp = True  # accelerate's unscale/step paths check this flag
    return accelerator


def precision_summary(accelerator) -> str:
    """What runs, in words: 'fp16 (loss scaling)', 'bf16 autocast', 'fp32', or 'fp32 (fp16
    requested: accelerate runs fp16 on a CPU as fp32)'."""
    mp = accelerator.mixed_precision
    if mp == "fp16":
        if accelerator.scaler is not None:
            return "fp16 autocast with loss scaling"
        return "fp32 (fp16 requested: accelerate runs fp16 on a CPU as fp32, without loss scaling)"
    if mp == "bf16":
        return "bf16 autocast" if accelerator.native_amp else "fp32 (bf16 not available here)"
    return "fp32"
