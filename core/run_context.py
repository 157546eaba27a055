"""The run context: everything a module's code needs around its algorithm.

`execute()` builds the config from a preset and overrides, seeds every RNG, calls the module's
`run(config, ctx)`, evaluates the checks against the returned metrics and writes the artifacts:

    <module>/output/<preset>/metrics.json   final metrics (deterministic: no times in it)
    <module>/output/<preset>/<table>.csv    histories logged with ctx.log(...)
    <module>/output/<preset>/*.png          plots saved with ctx.save_figure(...)
    <module>/output/<preset>/run.json       config, seed, versions, git commit, wall time, checks
    <module>/checkpoints/<preset>/state.pt  resumable training state (removed once a run completes)
    output/run_index.json                   latest run per module and preset

Every file is written atomically; the index is updated under a file lock so parallel runs do not
lose each other's entries.
"""
from __future__ import annotations

import contextlib
import platform
import random
import subprocess
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from core import artifacts
from core.config import apply_overrides, to_dict
from core.distributed import is_main_process
from core.paths import ROOT, run_index_path, workdir
from core.plots import close_figure, save_figure
from core.registry import Module

VERSIONED_PACKAGES = ("torch", "numpy", "gymnasium", "matplotlib", "pandas", "rich")
RESUME_FREE_FIELDS = ("resume", "checkpoint_every")


class ResumeMismatch(artifacts.UserError):
    """A checkpoint exists but was written with a different config."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def global_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(legacy=False),
            "torch": torch.get_rng_state()}


def set_global_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _to_python(value: Any) -> Any:
    """Checkpoints hold only tensors and plain containers (loadable with weights_only=True)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_python(v) for v in value)
    return value


class RunContext:
    def __init__(self, module: Module, preset: str, config: Any, console: Console | None = None):
        self.module, self.preset, self.config = module, preset, config
        base = workdir() / module.rel_path
        self.out_dir = base / "output" / preset
        self.models_dir = base / "models" / preset
        self.checkpoint_path = base / "checkpoints" / preset / "state.pt"
        self.console = console or Console(stderr=True)
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.timings: dict[str, float] = {}
        self.files: list[str] = []
        self.resumed_from: int | None = None
        self.is_main = is_main_process()
        """False on torchrun ranks other than 0: they compute, rank 0 alone writes"""

    # --- logging -------------------------------------------------------------------------------
    def log(self, table: str = "history", **row: Any) -> None:
        """Append one row to a history table, written as <table>.csv at the end of the run."""
        self.tables.setdefault(table, []).append({k: _to_python(v) for k, v in row.items()})

    def measure(self, **values: float) -> None:
        """Record measurements that differ from run to run (tokens/s, MFU, peak memory): they go to
        run.json under "timings" (run.py prints them, briefs quote them), never into metrics.json,
        which must repeat exactly for the same seed."""
        self.timings.update(values)

    def say(self, message: str) -> None:
        if not self.is_main:
            return
        self.console.print(message, markup=False, highlight=False)  # "[nan, nan]" is text, not markup

    @contextlib.contextmanager
    def progress(self) -> Iterator[Progress]:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True,
                      disable=not self.console.is_terminal) as bar:
            yield bar

    def track(self, iterable: Iterable[Any], description: str, total: int | None = None) -> Iterator[Any]:
        """A rich progress bar over a loop (shown only on a terminal)."""
        with self.progress() as bar:
            yield from bar.track(iterable, total=total, description=description)

    # --- artifacts ------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Path for an extra artifact in this run's output folder (recorded in run.json)."""
        self.files.append(name)
        return self.out_dir / name

    def save_figure(self, fig: Any, name: str) -> Path:
        path = self.path(name)
        if self.is_main:
            return save_figure(fig, path)
        close_figure(fig)
        return path

    # --- checkpoint / resume --------------------------------------------------------------------
    def _comparable_config(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on: all but those that do not change the results."""
        return {k: v for k, v in to_dict(self.config).items() if k not in RESUME_FREE_FIELDS}

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        """Save `state` plus the logged history and global RNG states; `step` is the number of
        completed iterations, so a resumed loop starts at `step`. Only rank 0 writes."""
        if not self.is_main:
            return
        artifacts.save_checkpoint(self.checkpoint_path, {
            "step": step, "config": self._comparable_config(), "state": _to_python(state),
            "tables": self.tables, "rng": _to_python(global_rng_state()),
        })

    def load_checkpoint(self) -> tuple[int, dict[str, Any]] | None:
        """With `resume=true` and a checkpoint present: restore history and RNGs and return
        (step, state); otherwise None (start from scratch)."""
        if not getattr(self.config, "resume", False):
            return None
        if not self.checkpoint_path.exists():
            self.console.print(f"[yellow]resume: no checkpoint at {self.checkpoint_path}; starting from scratch[/]")
            return None
        saved = artifacts.load_checkpoint(self.checkpoint_path)
        if saved.get("config") != self._comparable_config():
            diff = sorted(k for k, v in self._comparable_config().items() if saved.get("config", {}).get(k) != v)
            raise ResumeMismatch(f"{self.checkpoint_path} was written with a different config "
                                 f"(differs in: {', '.join(diff) or 'fields'}); rerun without resume=true")
        self.tables = saved["tables"]
        rng = saved["rng"]
        rng["numpy"] = _numpy_state(rng["numpy"])
        set_global_rng_state(rng)
        self.resumed_from = saved["step"]
        self.console.print(f"[cyan]resumed from {self.checkpoint_path} at step {saved['step']}[/]")
        return saved["step"], saved["state"]


def _numpy_state(value: Any) -> Any:
    """Undo `_to_python` for a numpy RNG state (its key array was stored as a tensor)."""
    if isinstance(value, dict):
        return {k: _numpy_state(v) for k, v in value.items()}
    return value.numpy() if isinstance(value, torch.Tensor) else value


def generator_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def set_generator_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


# --- executing a module ---------------------------------------------------------------------------
@dataclass
class RunResult:
    module: str
    preset: str
    config: Any
    metrics: dict[str, Any]
    checks: list[dict[str, Any]]
    timings: dict[str, float]
    """measurements that vary from run to run (speed, memory); in run.json, not metrics.json"""
    wall_time_s: float
    out_dir: Path

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


def build_config(module: Module, preset: str, overrides: list[str] = (), seed: int | None = None) -> Any:
    if preset not in module.presets:
        raise KeyError(f"module {module.name!r} has no preset {preset!r}; presets: {', '.join(module.presets)}")
    config = apply_overrides(module.presets[preset], list(overrides))
    return replace(config, seed=seed) if seed is not None else config


def execute(module: Module, preset: str = "toy", overrides: list[str] = (), seed: int | None = None,
            threads: int | None = None, console: Console | None = None) -> RunResult:
    config = build_config(module, preset, overrides, seed)
    ctx = RunContext(module, preset, config, console)
    seed_everything(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or module.threads or previous_threads)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    try:
        metrics = module.run(config, ctx)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    wall = time.perf_counter() - t0

    missing = sorted(set(module.metrics) - set(metrics))
    extra = sorted(set(metrics) - set(module.metrics))
    if missing or extra:
        raise RuntimeError(f"module {module.name!r} reported metrics that do not match its manifest: "
                           f"missing {missing}, undeclared {extra}")
    checks = [c.evaluate(metrics) for c in module.checks if c.applies(preset, config)]
    skipped = [c.describe() for c in module.checks if not c.applies(preset, config)]
    if not ctx.is_main:  # a torchrun rank other than 0: same metrics, rank 0 writes them
        return RunResult(module.name, preset, config, metrics, checks, ctx.timings, wall, ctx.out_dir)

    for table, rows in ctx.tables.items():
        artifacts.write_csv(ctx.out_dir / f"{table}.csv", rows)
    artifacts.write_json(ctx.out_dir / "metrics.json", metrics)
    run_id = f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    status = "passed" if all(c["passed"] for c in checks) else "checks_failed"
    record = {
        "run_id": run_id, "module": module.name, "preset": preset, "config": to_dict(config),
        "overrides": list(overrides), "seed": config.seed, "started_at": started.isoformat(),
        "wall_time_s": round(wall, 3), "threads": used_threads,
        "resumed_from_step": ctx.resumed_from, "status": status, "checks": checks,
        "timings": ctx.timings,
        "checks_skipped": skipped, "metrics": metrics,
        "artifacts": sorted({*ctx.files, *(f"{t}.csv" for t in ctx.tables), "metrics.json"}),
        "versions": versions(), "git": git_state(),
    }
    artifacts.write_json(ctx.out_dir / "run.json", record)
    _update_index(module, preset, ctx.out_dir, record)
    ctx.checkpoint_path.unlink(missing_ok=True)
    return RunResult(module.name, preset, config, metrics, checks, ctx.timings, wall, ctx.out_dir)


def _update_index(module: Module, preset: str, out_dir: Path, record: dict[str, Any]) -> None:
    index_path = run_index_path()
    with artifacts.locked(index_path.with_suffix(".lock")):
        index = read_run_index()
        index.setdefault(module.name, {})[preset] = {
            "run_id": record["run_id"], "finished_at": datetime.now(timezone.utc).isoformat(),
            "wall_time_s": record["wall_time_s"], "status": record["status"],
            "checks_passed": sum(c["passed"] for c in record["checks"]),
            "checks_total": len(record["checks"]),
            "out_dir": str(out_dir.relative_to(workdir())),
        }
        artifacts.write_json(index_path, index)


def read_run_index() -> dict[str, Any]:
    path = run_index_path()
    return artifacts.read_json(path) if path.exists() else {}


def latest_run(module: str, preset: str) -> dict[str, Any] | None:
    """run.json of the latest run of `module` at `preset`, found through the index."""
    entry = read_run_index().get(module, {}).get(preset)
    if entry is None:
        return None
    run_json = workdir() / entry["out_dir"] / "run.json"
    return artifacts.read_json(run_json) if run_json.exists() else None


def upstream_models(ctx: RunContext, name: str) -> Path:
    """The models/ folder of the latest run of module `name` at this run's preset: see upstream_run."""
    return upstream_run(ctx, name)[0]


def upstream_run(ctx: RunContext, name: str) -> tuple[Path, Path]:
    """(models/, output/) folders of the latest run of module `name` at this run's preset (the chain
    nanogpt -> sft -> grpo), found through the run index. When there is none, that module runs first,
    in this process and quietly, and one line says so; a fresh upstream run whose checks fail stops
    here (exit 2) rather than handing a broken model on. The caller's RNG state is left as it was."""
    from core.registry import discover  # the registry imports every module: only when a chain needs it

    upstream = discover().get(name)
    preset = ctx.preset if ctx.preset in upstream.presets else "default"
    entry = read_run_index().get(name, {}).get(preset)
    folders = (workdir() / upstream.rel_path / "models" / preset, workdir() / upstream.rel_path / "output" / preset)
    if entry is not None:
        if entry.get("status") != "passed":
            ctx.say(f"note: the latest {name} run at preset {preset} did not pass all its checks; using it anyway")
        return folders
    announce = Console(stderr=True).print if ctx.is_main else (lambda *_, **__: None)  # shown at any depth of a chain
    announce(f"{ctx.module.name} needs a {name} model at preset {preset} and none is in the run index: "
             f"building it first (python run.py --module {name} --preset {preset})", markup=False, highlight=False)
    rng = global_rng_state()
    result = execute(upstream, preset, console=Console(quiet=True))
    set_global_rng_state(rng)
    failed = [c["check"] for c in result.checks if not c["passed"]]
    if failed:
        raise artifacts.UserError(f"the {name} run built for {ctx.module.name} failed its checks ({', '.join(failed)}); "
                                  f"see {result.out_dir / 'run.json'}")
    announce(f"built {name} ({preset}) in {result.wall_time_s:.1f} s, {len(result.checks)}/{len(result.checks)} checks "
             f"passed", markup=False, highlight=False)
    return folders


def versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return versions


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
