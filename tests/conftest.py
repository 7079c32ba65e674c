"""Shared pytest set-up: offline everything, few threads, the embedded corpus path."""
import os
from pathlib import Path

import pytest

# Before any test imports wandb / datasets / transformers: never touch the network.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return ROOT / "data" / "shakespeare.jsonl.gz"
