"""Pieces of both training loops: loaders, windows of micro-batches, the once-per-step
bookkeeping, and the weights a checkpoint stores.

``StepMonitor.after_step`` is the one host synchronisation of an optimiser step: it checks
the loss terms for NaN/inf on every process, sees a SIGTERM received by any process, and reads
the running loss for the progress bar, all in one all-reduce and one copy to the host.
"""
from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import multiprocessing
import signal
import threading
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from data import build_datasets, build_train_sampler, build_transform
from data.transforms import uses_device_feed
from engine import trackers
from engine.seeding import SeededDataset, SeededSampler
from errors import ConfigError, NonFiniteLossError


def steps_per_epoch(num_batches: int, accum: int, max_steps: int | None) -> int:
    """Optimiser updates per epoch: accumulation windows of ``accum`` micro-batches, the last
    one possibly shorter (the reference steps on it too), capped by ``max_steps``."""
    steps = max(1, math.ceil(num_batches / accum))
    return min(steps, max_steps) if max_steps else steps


def windows(data_loader, accum: int, num_steps: int, start_step: int = 0) -> Iterator[tuple[int, list]]:
    """``(step, [micro-batch, ...])`` for the optimiser steps ``start_step .. num_steps - 1``:
    ``accum`` micro-batches each, fewer in an epoch's last window; a resumed epoch skips the
    micro-batches of the steps already done."""
    if start_step:
        from accelerate import skip_first_batches
        data_loader = skip_first_batches(data_loader, start_step * accum)
    batches = iter(data_loader)
    for step in range(start_step, num_steps):
        window = list(itertools.islice(batches, accum))
        if not window:
            return
        yield step, window


def epoch_fraction(step: int, accum: int, num_batches: int, num_steps: int,
                   last_at_end: bool = False) -> float:
    """Where optimiser step ``step`` sits inside its epoch, for the lr schedule: its first
    micro-batch's index over the epoch's micro-batches, as the reference's
    ``epoch + i / len(data_loader)`` (with a step cap, over the capped steps).

    ``last_at_end``: the epoch's last window at its last micro-batch instead, ``(len - 1) / len``:
    the reference steps its scheduler again at the epoch's last micro-batch, before that
    micro-batch's update (LT ``engine.py:L77-80``; docs/recipe.md section 11, item 3)."""
    total = min(num_batches, num_steps * accum)
    if last_at_end and (step + 1) * accum >= total:
        return (total - 1) / total
    return step * accum / total


def run_banner(accelerator, train_cfg: dict, accum: int, num_batches: int, lr_text: str) -> str:
    """The start-up line: git commit, processes, device, the precision that actually runs, the
    effective batch and its factors, optimiser steps per epoch, the lr."""
    from engine.device import precision_summary
    from utils import git_sha

    world, batch = accelerator.num_processes, train_cfg["batch_size"]
    steps = steps_per_epoch(num_batches, accum, train_cfg["max_steps_per_epoch"])
    return (f"git {git_sha()} | processes {world} | device {accelerator.device} | precision "
            f"{precision_summary(accelerator)} | effective batch {batch * world * accum} ({batch} x "
            f"{world} processes x {accum} accumulation) | {steps} optimiser steps/epoch | {lr_text}")


def no_sync(accelerator, model, sync: bool):
    """The context for one micro-batch's backward: gradients are reduced across processes only
    when ``sync`` (the window's last micro-batch). DDP and FSDP1 through accelerate's
    ``no_sync``; FSDP2 modules through ``set_requires_gradient_sync``."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        @contextlib.contextmanager
        def fsdp2_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp2_no_sync()
    return accelerator.no_sync(model)


def skipped_term(accelerator, optimizer, skipped: bool | None = None) -> dict[str, torch.Tensor]:
    """Under fp16 loss scaling, ``{"skipped": 1.0 or 0.0}``: whether the GradScaler skipped this
    update on an overflowed gradient (its mean over an epoch is the skipped share, in log.txt).
    Empty without a scaler."""
    if accelerator.scaler is None:
        return {}
    if skipped is None:
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
    return {"skipped": torch.full((), float(skipped), device=accelerator.device)}  # a fill, no host copy


def loss_scale_record(accelerator) -> dict:
    """``{"loss_scale": current scale}`` under fp16 loss scaling, for the epoch's log line."""
    return {} if accelerator.scaler is None else {"loss_scale": float(accelerator.scaler.get_scale())}


def to_device(batch, device, feed=None):
    """Tensors (or nested lists of them, PaCo's two views) onto ``device``. With ``feed`` (a
    ``DeviceFeed``: ``aug.gpu_feed``), an ``(images, targets)`` batch's uint8 images become the
    normalised, erased float batch there."""
    if feed is not None:
        images, targets = batch
        return [feed(images), targets.to(device, non_blocking=True)]
    if isinstance(batch, (list, tuple)):
        return [to_device(b, device) for b in batch]
    return batch.to(device, non_blocking=True)


class StepMonitor:
    """Once-per-step bookkeeping of an epoch (see the module docstring), plus the optional
    print line and the intermediate / SIGTERM saves.

    ``after_step`` returns True when the loop must stop (preempted; the state is saved). It
    raises NonFiniteLossError naming the epoch, step and term(s) before anything is saved,
    so the last saved state stays intact.
    """

    def __init__(self, cfg: dict, accelerator, preemption, save_fn, epoch: int, num_steps: int) -> None:
        self.cfg, self.accelerator, self.preemption, self.save_fn = cfg, accelerator, preemption, save_fn
        self.epoch, self.num_steps = epoch, num_steps
        self.loss_sum, self.count = 0.0, 0
        self.sums: dict[str, torch.Tensor] = {}  # per-term sums on the device (epoch means)

    def after_step(self, step: int, terms: dict[str, torch.Tensor], lr: float | None = None) -> bool:
        names = list(terms)
        values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
        for name, value in zip(names, values):
            self.sums[name] = self.sums.get(name, 0.0) + value
        flags = torch.cat([(~torch.isfinite(values)).float(),
                           values.new_full((1,), float(self.preemption.requested)),  # no host copy
                           values[:1]]).to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        host = flags.tolist()  # the step's one host synchronisation
        bad = [n for n, f in zip(names, host[:len(names)]) if f > 0]
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.epoch}, step {step}: term(s) {', '.join(bad)} "
                f"(on at least one process). The last saved state is intact; resume from it "
                f"(e.g. with train.mixed_precision=bf16 or a lower lr).")
        self.loss_sum += host[-1] / self.accelerator.num_processes
        self.count += 1
        done = step + 1
        every = self.cfg["log"]["print_every"]
        if every and done % every == 0:
            self.accelerator.print(f"epoch {self.epoch} step {done}/{self.num_steps} loss {self.mean_loss:.4f}")
            trackers.log_step(self.accelerator, {"loss": host[-1] / self.accelerator.num_processes,
                                                 **({"lr": lr} if lr is not None else {})},
                              self.epoch * self.num_steps + done)
        if host[len(names)] > 0:
            self.save_fn(self.epoch, done)
            return True
        save_every = self.cfg["train"]["save_every_steps"]
        if save_every and done % save_every == 0 and done < self.num_steps:
            self.save_fn(self.epoch, done)
        return False

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    def epoch_means(self) -> dict[str, float]:
        """This process's mean of every term over the epoch's steps (one sync, at the end)."""
        return {k: float(v) / max(1, self.count) for k, v in self.sums.items()}


def full_state_dict(accelerator, model) -> dict:
    """The model's full weights for a portable checkpoint, without wrapper prefixes.

    Sharded parameters (FSDP2's DTensors) are gathered with torch's
    ``get_model_state_dict(full_state_dict=True)``; otherwise ``accelerator.get_state_dict``
    (which also gathers FSDP1). A collective: every process must call this.
    """
    from torch.distributed.tensor import DTensor

    from models.student import unwrap

    inner = unwrap(model)
    if any(isinstance(p, DTensor) for p in inner.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def ignore_sigterm(worker_id: int) -> None:
    """Data-loader workers ignore SIGTERM: Slurm, ``docker stop`` and systemd signal the whole
    process group, and a worker that died first would crash the main process before it saves.
    The main process saves at the next step and exits; at its exit ``_kill_data_workers``
    ends the workers (a worker also exits by itself when its parent is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_data_workers() -> None:
    """At the main process's exit: SIGKILL the data-loader workers still alive. Python's own
    exit handler (registered earlier, so it runs after this one) would SIGTERM them, which they
    ignore, and then wait for them forever (persistent workers of a loader left mid-epoch).
    torch's SIGCHLD handler is reset first: it would report each killed worker as a failure."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=5)


atexit.register(_kill_data_workers)  # after multiprocessing's own handler: so it runs before it


def build_loaders(cfg: dict, accelerator, train_transform=None):
    """Datasets and loaders of a training script (the same for teacher and student).

    With ``aug.gpu_feed`` on (``uses_device_feed``) and no ``train_transform`` of the caller's
    own (PaCo's two views stay float), the training batches are uint8 for the script's
    ``DeviceFeed``.
    The train loader is not prepared: its sampler is already rank-aware (repeated
    augmentation), and accelerate must not re-shard it (prepare would split each rank's share
    again). The eval loader is prepared so ``gather_for_metrics`` can drop the padding duplicates.
    """
    tcfg = cfg["train"]
    # The main process builds (and caches) the datasets first; the others then read its cache
    # instead of racing to build the same one (several processes, several nodes).
    with accelerator.main_process_first():
        dataset_train, dataset_val = build_datasets(
            cfg["data"], train_transform or build_transform(
                True, cfg["data"], cfg["aug"], uint8=uses_device_feed(cfg["aug"], accelerator.device)),
            build_transform(False, cfg["data"], cfg["aug"]), verbose=accelerator.is_main_process)
    rank, world = accelerator.process_index, accelerator.num_processes
    sampler = SeededSampler(build_train_sampler(dataset_train, cfg["aug"], world, rank, tcfg["seed"]),
                            tcfg["seed"], rank)
    workers = cfg["data"]["num_workers"]
    kw = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
              persistent_workers=workers > 0, worker_init_fn=ignore_sigterm if workers else None)
    data_loader_train = DataLoader(SeededDataset(dataset_train), sampler=sampler,
                                   batch_size=tcfg["batch_size"], drop_last=tcfg["drop_last"], **kw)
    cap, eval_set = tcfg.get("eval_max_samples"), dataset_val
    if cap is not None and cap < len(dataset_val):  # evenly spaced, as evaluate.py's eval.max_samples
        eval_set = torch.utils.data.Subset(dataset_val, [i * len(dataset_val) // cap for i in range(cap)])
        accelerator.print(f"evaluation during training on {cap} of the {len(dataset_val)} evaluation "
                          f"images (train.eval_max_samples)")
    data_loader_val = DataLoader(eval_set, shuffle=False, **kw,
                                 batch_size=tcfg.get("eval_batch_size") or 2 * tcfg["batch_size"])
    if tcfg["batch_size"] > len(sampler):  # one short batch would train while the banner and lr rule assume more
        raise ConfigError(f"train.batch_size={tcfg['batch_size']} is more than the {len(sampler)} training "
                          f"images each process gets per epoch ({len(dataset_train)} images, {world} "
                          f"process(es)): lower it")
    accelerator.print(f"train: {len(dataset_train)} images, {dataset_train.num_classes} classes, "
                      f"{len(data_loader_train)} batches/epoch/process | eval: {len(dataset_val)} images")
    return dataset_train, dataset_val, sampler, data_loader_train, accelerator.prepare(data_loader_val)
