"""Where things live. Generated files go under the work dir, which is the repository root unless
FINETUNE_WORKDIR points elsewhere (tests use that to keep the checkout clean)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


SHIPPED_PRETRAINED = ROOT / "assets" / "pretrained"
"""The pretrained frozen models the vision-language modules start from, shipped with the checkout as a real VLM
starts from a downloaded CLIP and LLM: this code pretrained them (python scripts/pretrain_shape_models.py writes
them, and a test pretrains them again and compares), so a first run does not spend a minute pretraining."""


def workdir() -> Path:
    return Path(os.environ.get("FINETUNE_WORKDIR", ROOT)).resolve()


def run_index_path() -> Path:
    return workdir() / "output" / "run_index.json"


def pretrained_cache() -> Path:
    """Frozen models pretrained on first use and shared by several modules (the shape world's vision
    encoder and decoder): output/pretrained under the work dir, or FINETUNE_PRETRAINED_CACHE (tests
    point every work dir at one folder, so the models are pretrained once per test session). A model that
    ships (SHIPPED_PRETRAINED) is copied here instead of pretrained (core/artifacts.py copy_shipped)."""
    return Path(os.environ.get("FINETUNE_PRETRAINED_CACHE", workdir() / "output" / "pretrained")).resolve()
