"""Shared fixtures: the offline benchmark data beside the repo and deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["servers"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests read the offline copies in ../shared/data unless the caller chose another directory.
os.environ.setdefault("GCACHE_DATA_DIR", str(SHARED_DATA))
# W&B must never try the network from a test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["GCACHE_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"benchmark data directory {path} does not exist (set GCACHE_DATA_DIR)")
    return path
