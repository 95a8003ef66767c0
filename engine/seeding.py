"""Seeds: the run's, each optimiser step's, and each training image's.

Every augmentation, mixup/cutmix and drop-path draw comes from an RNG seeded by (run seed,
epoch, step or position), so a run resumed in the middle of an epoch sees exactly the images,
augmentations and masks of an uninterrupted run, whatever the number of data-loader workers,
and no RNG state needs saving.
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (model initialisation)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed torch, numpy and random for one optimisation step of one process.

    timm's Mixup draws from numpy's global RNG and drop path from torch's; seeding them per
    step makes a resumed run continue exactly (no RNG state to save or restore).
    """
    s = derive_seed(seed, epoch, step, rank, 1)
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


class SeededSampler(Sampler):
    """Wrap an index sampler so it yields ``(index, item_seed)`` pairs.

    The item seed depends on (seed, epoch, rank, position), not on which worker loads it.
    """

    def __init__(self, sampler: Sampler, seed: int, rank: int = 0) -> None:
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            yield int(index), derive_seed(self.seed, self.epoch, self.rank, position, 2)

    def __len__(self) -> int:
        return len(self.sampler)


class SeededDataset(Dataset):
    """Index with ``(index, item_seed)``: the item's transforms draw from RNGs seeded with
    ``item_seed``.

    In a data-loader worker the global RNGs are the worker's own and are simply reseeded. In
    the main process (``data.num_workers=0``) they are also the training loop's (mixup, drop
    path, seeded per step by ``step_seed``): their state is saved and restored around the
    item, so loading never changes what the loop draws next.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:
            seed_everything(seed)
            return self.dataset[index]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            seed_everything(seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
