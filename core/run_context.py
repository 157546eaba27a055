"""The run context: everything a module's code needs around its algorithm.

`execute()` builds the config from a preset and overrides, seeds every RNG, calls the module's
`run(config, ctx)`, evaluates the checks against the returned metrics and writes the artifacts:

    <module>/output/<preset>/metrics.json   final metrics (deterministic: no times in it)
    <module>/output/<preset>/<table>.csv    histories logged with ctx.log(...)
    <module>/output/<preset>/*.png          plots saved with ctx.save_figure(...)
    <module>/output/<preset>/model/         the model a run leaves (weights, config, tokenizer)
    <module>/output/<preset>/run.json       config, seed, versions, git commit, wall time, checks
    <module>/checkpoints/<preset>/state.pt  resumable training state (removed once a run completes)
    output/run_index.json                   latest run per module and preset

`<module>/output/<preset>` is a link to the run's own folder under output/.runs/, switched in one
rename when the run completes (core/artifacts.py), so it always holds one whole run. Every file is
written atomically; the index is updated under a file lock so parallel runs do not lose each other's
entries, and read through a validator so a hand-edited index never stops a reader.
"""
from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from core import artifacts
from core.config import ConfigError, apply_overrides, to_dict, validate
from core.distributed import is_main_process, world
from core.paths import ROOT, run_index_path, workdir
from core.plots import close_figure, save_figure
from core.errors import CorruptArtifact, UserError
from core.registry import SEARCH_ROOTS, Module

MODEL_DIR = "model"
"""a run that leaves a model writes it into <run folder>/model/, so weights and metrics swap together"""
VERSIONED_PACKAGES = ("torch", "numpy", "gymnasium", "matplotlib", "pandas", "rich")
RESUME_FREE_FIELDS = ("resume", "checkpoint_every")


class ResumeMismatch(UserError):
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


def output_link(module: Module, preset: str) -> Path:
    """`<module>/output/<preset>`: the latest complete run of `module` at `preset` (a link to its folder)."""
    return workdir() / module.rel_path / "output" / preset


class RunContext:
    def __init__(self, module: Module, preset: str, config: Any, console: Console | None = None,
                 out_dir: Path | None = None):
        self.module, self.preset, self.config = module, preset, config
        self.out_dir = out_dir or output_link(module, preset)
        """where this run writes: its own folder under output/.runs/ until it completes"""
        self.models_dir = self.out_dir / MODEL_DIR
        self.checkpoint_path = workdir() / module.rel_path / "checkpoints" / preset / "state.pt"
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

    def load_checkpoint(self, steps: int) -> tuple[int, dict[str, Any]] | None:
        """With `resume=true` and a checkpoint present: restore history and RNGs and return
        (step, state); otherwise None (start from scratch). `steps` is the run's length: a checkpoint
        must be at a step in [0, steps]. Apply `state` to the model inside `with ctx.restoring(...)`,
        which turns a state that does not fit (missing keys, wrong shapes) into a clear error."""
        if not getattr(self.config, "resume", False):
            return None
        if not self.checkpoint_path.exists():
            self.console.print(f"[yellow]resume: no checkpoint at {self.checkpoint_path}; starting from scratch[/]")
            return None
        saved = artifacts.load_checkpoint(self.checkpoint_path)
        if problem := _checkpoint_problem(saved, steps):
            raise artifacts.CorruptArtifact(f"{self.checkpoint_path}: not a checkpoint of this run ({problem}); "
                                            f"delete it or rerun without resume=true")
        if saved["config"] != self._comparable_config():
            diff = sorted(k for k, v in self._comparable_config().items() if saved["config"].get(k) != v)
            raise ResumeMismatch(f"{self.checkpoint_path} was written with a different config "
                                 f"(differs in: {', '.join(diff) or 'fields'}); rerun without resume=true")
        with self.restoring():
            rng = dict(saved["rng"], numpy=_numpy_state(saved["rng"]["numpy"]))
            set_global_rng_state(rng)
        self.tables = saved["tables"]
        self.resumed_from = saved["step"]
        self.console.print(f"[cyan]resumed from {self.checkpoint_path} at step {saved['step']}[/]")
        return saved["step"], saved["state"]

    @contextlib.contextmanager
    def restoring(self, *optimizers: torch.optim.Optimizer) -> Iterator[None]:
        """Wrap the code that applies a checkpoint's state: a missing key, a wrong type or a tensor
        whose shape does not match the current model becomes one error naming the file (exit 2).
        Optimizer state is checked against its parameters' shapes, which torch does not check."""
        try:
            yield
            for opt in optimizers:
                for param, state in opt.state.items():
                    for name, value in state.items():
                        if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                            raise ValueError(f"optimizer state {name!r} has shape {tuple(value.shape)}, "
                                             f"its parameter {tuple(param.shape)}")
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise artifacts.CorruptArtifact(f"{self.checkpoint_path}: does not fit this run's model "
                                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); delete it or rerun "
                                            f"without resume=true") from None


CHECKPOINT_SCHEMA = {"step": int, "config": dict, "state": dict, "tables": dict, "rng": dict}


def _checkpoint_problem(saved: Any, steps: int) -> str | None:
    """Why a loaded checkpoint is not one `save_checkpoint` wrote for a run of `steps` steps."""
    if not isinstance(saved, dict):
        return f"a {type(saved).__name__}, not a dict"
    for key, kind in CHECKPOINT_SCHEMA.items():
        if key not in saved:
            return f"no {key!r}"
        if not isinstance(saved[key], kind) or isinstance(saved[key], bool):
            return f"{key!r} is a {type(saved[key]).__name__}, not a {kind.__name__}"
    if not 0 <= saved["step"] <= steps:
        return f"step {saved['step']} is outside this run's 0..{steps}"
    if any(not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) for rows in saved["tables"].values()):
        return "'tables' is not a dict of lists of rows"
    if set(saved["rng"]) != {"python", "numpy", "torch"}:
        return "'rng' does not hold the python, numpy and torch states"
    return None


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
    record: dict[str, Any] = field(default_factory=dict)
    """run.json's contents (empty on torchrun ranks other than 0)"""
    index_error: str | None = None
    """why the run index could not be updated, when it could not (the run's folder is complete)"""

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)


def build_config(module: Module, preset: str, overrides: list[str] = (), seed: int | str | None = None) -> Any:
    """The preset with the overrides (and `--seed`) applied, validated against every field's declared
    range and the config's cross-field rules: a bad value stops here, before any work."""
    if preset not in module.presets:
        raise ConfigError(f"module {module.name!r} has no preset {preset!r}; presets: {', '.join(module.presets)}")
    seed_override = [] if seed is None else [f"seed={seed}"]
    return validate(apply_overrides(module.presets[preset], [*overrides, *seed_override]))


def execute(module: Module, preset: str = "toy", overrides: list[str] = (), seed: int | str | None = None,
            threads: int | None = None, console: Console | None = None) -> RunResult:
    """Validate the config, run the module in its own folder, evaluate its checks, write its
    artifacts and make that folder the module's output/<preset> in one rename. An interrupted run
    leaves the previous run's folder as it was (and its checkpoint, if it saves one); a run that
    crashes leaves what it wrote in output/<preset>.crashed/, beside the traceback."""
    config = build_config(module, preset, overrides, seed)
    started = datetime.now(timezone.utc)
    run_id = f"{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    link = output_link(module, preset)
    if world()[1] > 1:  # torchrun: every rank reads what rank 0 writes there; they share the launcher's pid
        staged = artifacts.run_folder(link, "torchrun", os.getppid())
    else:
        staged = artifacts.run_folder(link, run_id, os.getpid())
    if is_main_process():
        prepare_workdir(module, preset, staged)
    ctx = RunContext(module, preset, config, console, out_dir=staged)
    try:
        result = _run_and_record(module, preset, config, ctx, list(overrides), started, run_id, threads)
    except BaseException as exc:
        if is_main_process():
            _set_aside(staged, crashed_folder(module, preset), keep=not isinstance(exc, (UserError, KeyboardInterrupt)))
        raise
    if not is_main_process():
        return result
    artifacts.commit_run_folder(link, staged)
    result.out_dir = link
    try:
        _update_index(module, preset, link, result.record)
    except (OSError, UserError) as exc:
        result.index_error = str(exc)
    ctx.checkpoint_path.unlink(missing_ok=True)
    return result


def crashed_folder(module: Module, preset: str) -> Path:
    """Where a run that raised an internal error leaves what it wrote, and the traceback."""
    return output_link(module, preset).with_name(f"{preset}.crashed")


MIN_FREE_BYTES = 64 * 2**20
"""a run does not start on a disk with less room than this: it would fail at its end, after the compute"""


def prepare_workdir(module: Module, preset: str, staged: Path) -> None:
    """Before any compute: remove what killed runs left behind, check that the run can write its
    folder, its checkpoint and the run index, and create its folder."""
    root = workdir()
    artifacts.sweep_leftovers([root / "output", *(root / top for top in SEARCH_ROOTS)])
    checkpoints = root / module.rel_path / "checkpoints" / preset
    for folder in (run_index_path().parent, checkpoints):
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{folder}: not writable; the run could not save its results there "
                            f"(FINETUNE_WORKDIR moves the work dir)")
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"{root}: only {free / 2**20:.0f} MiB free; a run needs at least {MIN_FREE_BYTES // 2**20} MiB")
    staged.mkdir(parents=True, exist_ok=True)


def _set_aside(staged: Path, crashed: Path, keep: bool) -> None:
    """Drop an unfinished run's folder, or keep it as `crashed` (replacing an older one) for a bug report."""
    with contextlib.suppress(OSError):
        if keep:
            shutil.rmtree(crashed, ignore_errors=True)
            staged.rename(crashed)
        else:
            shutil.rmtree(staged)


def default_threads(preset: str) -> int:
    """Torch threads for a module that declares none, when --threads is not given. A toy run gets one:
    its matmuls are too small to split well, and a second thread that has to wait for a core another
    job holds stalls every step (nanogpt's toy: 320 s on torch's default threads beside another job,
    25 s on one). A larger preset gets the cores nobody else is using: os.cpu_count() minus the
    one-minute load average, rounded, at least 1 (torch's own default, every core, assumes an idle
    machine). The run records the count it used (run.json "threads")."""
    if preset == "toy":
        return 1
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def _run_and_record(module: Module, preset: str, config: Any, ctx: RunContext, overrides: list[str],
                    started: datetime, run_id: str, threads: int | None) -> RunResult:
    seed_everything(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or module.threads or default_threads(preset))
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
    result = RunResult(module.name, preset, config, metrics, checks, ctx.timings, wall, ctx.out_dir)
    if not ctx.is_main:  # a torchrun rank other than 0: same metrics, rank 0 writes them
        return result

    for table, rows in ctx.tables.items():
        artifacts.write_csv(ctx.out_dir / f"{table}.csv", rows)
    artifacts.write_json(ctx.out_dir / "metrics.json", metrics)
    result.record = {
        "run_id": run_id, "module": module.name, "preset": preset, "config": to_dict(config),
        "overrides": overrides, "seed": config.seed, "started_at": started.isoformat(),
        "wall_time_s": round(wall, 3), "threads": used_threads,
        "resumed_from_step": ctx.resumed_from, "status": "passed" if result.passed else "checks_failed",
        "checks": checks, "timings": ctx.timings,
        "checks_skipped": skipped, "metrics": metrics,
        "artifacts": sorted({*ctx.files, *(f"{t}.csv" for t in ctx.tables), "metrics.json"}),
        "versions": versions(), "git": git_state(),
    }
    artifacts.write_json(ctx.out_dir / "run.json", result.record)
    return result


INDEX_ENTRY = {"run_id": str, "finished_at": str, "wall_time_s": (int, float), "status": str,
               "checks_passed": int, "checks_total": int, "out_dir": str}
RUN_STATUSES = ("passed", "checks_failed")


def _update_index(module: Module, preset: str, out_dir: Path, record: dict[str, Any]) -> None:
    """Record the run as the latest of its module and preset. An index that is not valid JSON, or
    holds entries of the wrong shape, is kept beside it as run_index.json.corrupt and rebuilt from
    its valid entries."""
    index_path = run_index_path()
    with artifacts.locked(index_path.with_suffix(".lock")):
        index, problems = _read_index(index_path)
        if problems:
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(index_path, index_path.with_name(index_path.name + ".corrupt"))
            _warn(f"{index_path}: rewritten without its unreadable entries (the old file is {index_path.name}.corrupt)")
        index.setdefault(module.name, {})[preset] = {
            "run_id": record["run_id"], "finished_at": datetime.now(timezone.utc).isoformat(),
            "wall_time_s": record["wall_time_s"], "status": record["status"],
            "checks_passed": sum(c["passed"] for c in record["checks"]),
            "checks_total": len(record["checks"]),
            "out_dir": str(out_dir.relative_to(workdir())),
        }
        artifacts.write_json(index_path, index)


def _read_index(path: Path) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """(the valid entries, one line per unreadable part) of a run index."""
    if not path.exists():
        return {}, []
    try:
        raw = artifacts.read_json(path)
    except (CorruptArtifact, OSError) as exc:
        return {}, [f"{exc}; ignored"]
    if not isinstance(raw, dict):
        return {}, [f"{path}: a JSON {type(raw).__name__}, not an object of modules; ignored"]
    index, problems = {}, []
    for module, presets in raw.items():
        if not isinstance(presets, dict):
            problems.append(f"{path}: entry {module!r} is not an object of presets; skipped")
            continue
        for preset, entry in presets.items():
            if problem := _entry_problem(entry):
                problems.append(f"{path}: entry {module}/{preset} {problem}; skipped")
            else:
                index.setdefault(module, {})[preset] = entry
    return index, problems


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return "is not an object"
    for key, kind in INDEX_ENTRY.items():
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"has no valid {key!r}"
    if entry["status"] not in RUN_STATUSES:
        return f"has status {entry['status']!r}"
    try:
        if datetime.fromisoformat(entry["finished_at"]).tzinfo is None:
            return "has a finished_at without a time zone"
    except ValueError:
        return "has a finished_at that is not an ISO time"
    out = Path(entry["out_dir"])
    if out.is_absolute() or ".." in out.parts:
        return "has an out_dir outside the work dir"
    return None


_warned: set[str] = set()


def _warn(message: str) -> None:
    """One warning line on stderr, once per process (readers of the index are called often)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def read_run_index() -> dict[str, dict[str, dict[str, Any]]]:
    """The run index's valid entries (module -> preset -> entry); what cannot be read is reported
    on stderr once and skipped, so a hand-edited or corrupt index never stops a reader."""
    index, problems = _read_index(run_index_path())
    for problem in problems:
        _warn(problem)
    return index


def latest_run(module: str, preset: str) -> dict[str, Any] | None:
    """run.json of the latest run of `module` at `preset`, found through the index."""
    entry = read_run_index().get(module, {}).get(preset)
    if entry is None:
        return None
    run_json = workdir() / entry["out_dir"] / "run.json"
    if not run_json.exists():
        return None
    record = artifacts.read_json(run_json)
    kinds = {"run_id": str, "status": str, "config": dict, "metrics": dict, "checks": list, "seed": int}
    if not isinstance(record, dict) or any(not isinstance(record.get(k), kind) for k, kind in kinds.items()):
        raise CorruptArtifact(f"{run_json}: not a run record (needs {', '.join(kinds)}); rerun the module to replace it")
    return record


def upstream_models(ctx: RunContext, name: str) -> Path:
    """The model/ folder of the latest run of module `name` at this run's preset: see upstream_run."""
    return upstream_run(ctx, name)[0]


def upstream_run(ctx: RunContext, name: str) -> tuple[Path, Path]:
    """(model/, run folder) of the latest run of module `name` at this run's preset (the chain
    nanogpt -> sft -> grpo), found through the run index. When there is none, that module runs first,
    in this process and quietly, and one line says so; a fresh upstream run whose checks fail stops
    here (exit 2) rather than handing a broken model on. The caller's RNG state is left as it was."""
    from core.registry import discover  # the registry imports every module: only when a chain needs it

    upstream = discover().get(name)
    preset = ctx.preset if ctx.preset in upstream.presets else "default"
    entry = read_run_index().get(name, {}).get(preset)
    link = output_link(upstream, preset)
    folders = (link / MODEL_DIR, link)
    if entry is not None and folders[0].is_dir():
        if entry.get("status") != "passed":
            ctx.say(f"note: the latest {name} run at preset {preset} did not pass all its checks; using it anyway")
        return folders
    why = "none is in the run index" if entry is None else f"the indexed run's {folders[0]} is gone"
    announce = Console(stderr=True).print if ctx.is_main else (lambda *_, **__: None)  # shown at any depth of a chain
    announce(f"{ctx.module.name} needs a {name} model at preset {preset} and {why}: "
             f"building it first (python run.py --module {name} --preset {preset})", markup=False, highlight=False)
    rng = global_rng_state()
    result = execute(upstream, preset, console=Console(quiet=True))
    set_global_rng_state(rng)
    failed = [c["check"] for c in result.checks if not c["passed"]]
    if failed:
        raise UserError(f"the {name} run built for {ctx.module.name} failed its checks ({', '.join(failed)}); "
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
