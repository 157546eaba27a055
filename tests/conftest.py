"""Shared fixtures: every test that runs a module writes into a temporary work dir, never into
the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.registry import discover
from core.run_context import RunResult, execute

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core (make test runs -n auto): a module that keeps torch's default thread count
    # would otherwise run 2 threads per worker on 2 cores, and tiny ops slow down badly when oversubscribed
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def registry():
    return discover()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FINETUNE_WORKDIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def run_module(registry, workdir):
    """run_module("mdp", "toy", ["gamma=0.9"], seed=1) -> RunResult, artifacts under a tmp dir."""
    def _run(name: str, preset: str = "toy", overrides: list[str] = (), seed: int | None = None) -> RunResult:
        return execute(registry.get(name), preset, list(overrides), seed)
    return _run


def read_metrics(result: RunResult) -> dict:
    return json.loads((result.out_dir / "metrics.json").read_text())


@dataclass
class Chain:
    """The toy post-training chain (nanogpt -> sft -> grpo) built once per test process by the
    command a new user types, from an empty work dir: its output and the folder it filled."""
    folder: Path
    returncode: int
    output: str

    def copy_to(self, workdir: Path) -> None:
        """Give `workdir` the chain's runs and models, so a module downstream of it starts at once."""
        shutil.copytree(self.folder, workdir, dirs_exist_ok=True, symlinks=True)  # output/<preset> links stay links


TOY_CHAIN_GROUP = pytest.mark.xdist_group("toy_chain")
"""make test runs `--dist loadgroup`: every test that needs the toy chain runs on one worker, which
builds the chain once (a session fixture is per worker: two workers would build it twice)"""


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks into node ids
def pytest_collection_modifyitems(items):
    for item in items:
        if "toy_chain" in getattr(item, "fixturenames", ()):
            item.add_marker(TOY_CHAIN_GROUP)


@pytest.fixture(scope="session")
def toy_chain(tmp_path_factory, request) -> Chain:
    if getattr(request.config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        _claim_the_toy_chain(tmp_path_factory.getbasetemp().parent)
    folder = tmp_path_factory.mktemp("toy_chain")
    threads = ["--threads", str(torch.get_num_threads())]  # 1 under xdist, like the rest of the worker
    proc = subprocess.run([sys.executable, "run.py", "--module", "grpo", "--toy", *threads], cwd=Path(__file__).parent.parent,
                          env={**os.environ, "FINETUNE_WORKDIR": str(folder)}, capture_output=True, text=True,
                          timeout=900)
    return Chain(folder, proc.returncode, proc.stdout + proc.stderr)


def _claim_the_toy_chain(run_root: Path) -> None:  # run_root: the folder the workers' temp dirs share
    """Under --dist loadgroup one worker builds the chain; a second builder means the grouping broke
    (as pytest 9.2 with pytest-xdist 3.8 does, silently: xdist#1386) and the suite runs the chain twice."""
    worker = os.environ["PYTEST_XDIST_WORKER"]
    try:
        fd = os.open(run_root / "toy_chain.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        other = (run_root / "toy_chain.claimed").read_text()
        pytest.fail(f"worker {worker} needs the toy chain that {other} built: --dist loadgroup is not grouping "
                    f"the xdist_group('toy_chain') tests (check the pytest / pytest-xdist versions)")
    with os.fdopen(fd, "w") as claim:
        claim.write(worker)
