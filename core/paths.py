"""Where things live. Generated files go under the work dir, which is the repository root unless
FINETUNE_WORKDIR points elsewhere (tests use that to keep the checkout clean)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def workdir() -> Path:
    return Path(os.environ.get("FINETUNE_WORKDIR", ROOT)).resolve()


def run_index_path() -> Path:
    return workdir() / "output" / "run_index.json"


def pretrained_cache() -> Path:
    """Frozen models pretrained on first use and shared by several modules (the shape world's vision
    encoder and decoder): output/pretrained under the work dir, or FINETUNE_PRETRAINED_CACHE (tests
    point every work dir at one folder, so the models are pretrained once per test session)."""
    return Path(os.environ.get("FINETUNE_PRETRAINED_CACHE", workdir() / "output" / "pretrained")).resolve()
