"""Shared pytest set-up: the repository root on sys.path and the parity fixture folder."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARITY = ROOT.parent / "shared" / "parity"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Keep the suite light on 2 cores and offline: no hub look-ups, few threads per process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    assert PARITY.is_dir(), f"parity fixtures not found at {PARITY} (../shared beside the repo)"
    return PARITY


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    assert SHARED_DATA.is_dir(), f"shared data not found at {SHARED_DATA}"
    return SHARED_DATA

# One thread per test process: the machine has 2 cores and tests launch subprocesses too;
# oversubscribed torch thread pools slow CPU forward passes by an order of magnitude.
import torch  # noqa: E402

torch.set_num_threads(1)
