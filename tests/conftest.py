"""Shared fixtures: every test that runs a module writes into a temporary work dir, never into
the checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
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


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's default of every core only adds synchronisation on a shared machine.
    A test file asks for it with pytestmark = pytest.mark.usefixtures("one_thread")."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def registry():
    return discover()


@pytest.fixture(scope="session")
def pretrained_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of pretrained frozen models for the session (core/paths.py): the vision encoder and
    the shape-world decoder that the vision-language modules load are pretrained once, not in every
    test's work dir."""
    return tmp_path_factory.mktemp("pretrained")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pretrained_cache: Path) -> Path:
    monkeypatch.setenv("FINETUNE_WORKDIR", str(tmp_path))
    monkeypatch.setenv("FINETUNE_PRETRAINED_CACHE", str(pretrained_cache))
    return tmp_path


@pytest.fixture
def run_module(registry, workdir):
    """run_module("mdp", "toy", ["gamma=0.9"], seed=1) -> RunResult, artifacts under a tmp dir."""
    def _run(name: str, preset: str = "toy", overrides: list[str] = (), seed: int | None = None) -> RunResult:
        return execute(registry.get(name), preset, list(overrides), seed)
    return _run


def read_metrics(result: RunResult) -> dict:
    return json.loads((result.out_dir / "metrics.json").read_text())


# --- the toy post-training chain --------------------------------------------------------------------
@dataclass
class Chain:
    """The toy post-training chain (nanogpt -> sft -> grpo), built once per test session by the
    command a new user types, from an empty work dir: the folder it filled and its output."""
    folder: Path
    output: str

    def copy_to(self, workdir: Path) -> None:
        """Give `workdir` the chain's runs and models, so a module downstream of it starts at once."""
        shutil.copytree(self.folder, workdir, dirs_exist_ok=True, symlinks=True)  # output/<preset> links stay links


CHAIN_MODULE = "grpo"
"""the chain is `run.py --module grpo --toy` from an empty work dir: grpo's toy run after its upstream's"""
CHAIN_TIMEOUT_S = 900


def pytest_configure(config):
    config.addinivalue_line("markers", "toy_chain: the test asks for the toy_chain fixture while it runs "
                                       "(request.getfixturevalue), so it runs last, like the fixture's other users")


def needs_toy_chain(item: pytest.Item) -> bool:
    return "toy_chain" in getattr(item, "fixturenames", ()) or item.get_closest_marker("toy_chain") is not None


def pytest_collection_modifyitems(items):
    """The toy chain's users run last (a stable sort: every xdist worker collects the same order), so
    the rest of the suite runs while the chain builds in the background."""
    items.sort(key=needs_toy_chain)


def _chain_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this session that every xdist worker sees: the parent of the workers' temp dirs."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if hasattr(config, "workerinput") else base) / "toy_chain"


_build: tuple[subprocess.Popen, threading.Thread] | None = None
"""the chain build, in the one process of the session that started it"""


def _start_building(folder: Path) -> None:
    """Start the chain's command in the background into folder/work, unless a process of this
    session already did; when it ends, folder/returncode holds its exit status."""
    global _build
    try:
        folder.mkdir()  # the claim: exactly one process (xdist worker) of the session creates it
    except FileExistsError:
        return
    # under xdist one thread, like the worker (top of this file); else each module's own choice, as in make demo,
    # so that a test rerunning a chain module in this process uses the chain's thread count
    threads = ["--threads", "1"] if os.environ.get("PYTEST_XDIST_WORKER") else []
    with open(folder / "output.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "run.py", "--module", CHAIN_MODULE, "--toy", *threads],
                                cwd=Path(__file__).parent.parent, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "FINETUNE_WORKDIR": str(folder / "work")})

    def record_the_end():
        try:
            status = str(proc.wait(timeout=CHAIN_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"timed out after {CHAIN_TIMEOUT_S} s"
        (folder / "returncode.tmp").write_text(status)
        os.replace(folder / "returncode.tmp", folder / "returncode")  # readers never see it half-written

    _build = proc, threading.Thread(target=record_the_end, daemon=True)
    _build[1].start()


@pytest.fixture(scope="session", autouse=True)
def _toy_chain_starts_with_the_session(request, tmp_path_factory):
    """When a collected test needs the toy chain, its build starts with the session's first test."""
    if any(needs_toy_chain(item) for item in request.session.items):
        _start_building(_chain_dir(request.config, tmp_path_factory))


def pytest_sessionfinish(session, exitstatus):
    """The process that builds the chain stays until it is built: another worker may be waiting for it."""
    if _build is not None:
        proc, waiter = _build
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            proc.kill()
        waiter.join()


@pytest.fixture(scope="session")
def toy_chain(request, tmp_path_factory) -> Chain:
    folder = _chain_dir(request.config, tmp_path_factory)
    _start_building(folder)  # already under way when the test was collected as a user of the chain
    deadline = time.monotonic() + CHAIN_TIMEOUT_S + 60
    while not (folder / "returncode").exists():
        if time.monotonic() > deadline:
            pytest.fail(f"no end of the toy chain build in {folder}: the process that started it died")
        time.sleep(1)
    status, output = (folder / "returncode").read_text(), (folder / "output.log").read_text()
    if status != "0":
        pytest.fail(f"the toy chain (run.py --module {CHAIN_MODULE} --toy) failed: exit status {status}\n{output[-3000:]}")
    return Chain(folder / "work", output)
