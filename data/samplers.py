"""Training samplers: DeiT's repeated-augmentation sampler, or a plain shuffling one.

``RASampler`` follows DeiT's ``samplers.RASampler`` (each index ``num_repeats`` times in a row,
strided across ranks so every rank sees a different augmentation of the same image; epoch
length rounded down to a multiple of 256 over all ranks) with two deliberate changes:
- the order depends on ``seed + epoch`` and the training script must call ``set_epoch`` every
  epoch, also on one process (docs/recipe.md section 7, bug 1: the reference's non-distributed runs
  skip ``set_epoch`` and replay epoch 0's order forever);
- a dataset of fewer than 256 images would give an empty epoch; it uses
  ``ceil(len / num_replicas)`` samples per rank instead, so tiny test sets still train.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler
from errors import DataError


class RASampler(Sampler[int]):
    """Repeated augmentation across ``num_replicas`` ranks; deterministic given (seed, epoch)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 num_repeats: int = 3, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise DataError(f"rank {rank} is outside [0, {num_replicas})")
        if num_repeats < 1:
            raise DataError(f"num_repeats must be >= 1, got {num_repeats}")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0
        n = len(dataset)
        self.num_samples = int(math.ceil(n * num_repeats / num_replicas))
        self.total_size = self.num_samples * num_replicas
        if n >= 256:
            self.num_selected_samples = int(math.floor(n // 256 * 256 / num_replicas))
        else:
            self.num_selected_samples = int(math.ceil(n / num_replicas))

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        indices = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        indices = torch.repeat_interleave(indices, repeats=self.num_repeats, dim=0).tolist()
        indices += indices[: self.total_size - len(indices)]  # pad to split evenly
        indices = indices[self.rank: self.total_size: self.num_replicas]
        return iter(indices[: self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def build_train_sampler(dataset, aug_cfg: dict, num_replicas: int, rank: int, seed: int) -> Sampler:
    """``RASampler`` when ``aug.repeated_aug`` (the reference's default), else
    ``DistributedSampler(shuffle=True)``; both need ``set_epoch(epoch)`` every epoch."""
    if aug_cfg["repeated_aug"]:
        return RASampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         num_repeats=int(aug_cfg["ra_repeats"]), seed=seed)
    return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
