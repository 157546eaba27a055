"""Smoke runs of modules, their JSON report, and regression detection against the previous report.

Each module gets two phases, each a `python run.py` subprocess with a timeout:

    help   python run.py --module NAME --help         must exit 0 and write nothing
    run    python run.py --module NAME --preset P     its exit code and run.json give the status

The subprocesses run with FINETUNE_WORKDIR set to a temporary directory made for the session (the
help phase of each module gets its own empty folder in it, so anything appearing there was written
by --help), so the learner's own runs and run index are never touched. The report is written to
`<workdir>/output/smoke_reports/smoke_<UTC time>.json` and copied to `latest.json` in the same folder.

Statuses: PASS (help ok, run exit 0, every check passed), CHECK_FAILED (run exit 1 and its run.json
shows failed checks), TIMEOUT (a phase ran past the timeout; its whole process group is killed),
FAIL (anything else: --help failed or wrote files, the run crashed, bad input, no run.json).

Report schema, version 1 (`validate_report` checks a report against `REPORT_SCHEMA`, which says
the same thing in code; objects may carry extra keys):

    {
      "schema_version": 1,
      "file": "smoke_20260101T120000Z.json",      # the timestamped name (latest.json keeps it too)
      "created_at": "2026-01-01T12:00:00+00:00",  # UTC, ISO 8601
      "preset": "toy",
      "options": {"modules": ["mdp", "gae"] | null (= every module), "timeout_s": 600.0, "jobs": 1,
                  "metric_rtol": 0.05, "metric_atol": 1e-09, "slowdown": 2.0, "min_seconds": 1.0},
      "machine": {"cpu_count": 2, "python": "3.11.7", "platform": "Linux-...", "torch": "2.13.0+cpu",
                  ...other library versions},
      "git": {"commit": "<sha>" | null, "dirty": true | false | null},
      "summary": {"modules": 2, "PASS": 2, "CHECK_FAILED": 0, "FAIL": 0, "TIMEOUT": 0,
                  "broken_manifests": 0, "regressions": 0, "ok": true},
      "modules": {
        "<name>": {
          "status": "PASS" | "CHECK_FAILED" | "FAIL" | "TIMEOUT",
          "reason": null | "why the status is not PASS, in words",
          "category": "rl_basics", "path": "post_train/rl_basics/mdp",
          "help": PHASE + {"files_created": [paths the --help phase wrote, relative; must be empty]},
          "run": PHASE,
          "wall_time_s": 1.8 | null,           # the module's own compute time, from run.json
          "checks": [{"check": "success_rate >= 0.7", "metric": "success_rate", "op": ">=",
                      "actual": 0.741, "target": 0.7, "passed": true, "why": "..."}],  # from run.json
          "metrics": {"success_rate": 0.741, ...}                                      # from run.json
        }
      },
      "broken_manifests": [{"path": "post_train/x/y/module.py", "error": "..."}],  # only with every module
      "comparison": {
        "previous": "smoke_....json" | null,   # the report compared against
        "previous_created_at": "..." | null,
        "notes": ["why a comparison (or its timing part) was skipped, modules without a baseline"],
        "regressions": [{"module": "mdp", "kind": "status" | "check" | "metric" | "slowdown" | "missing",
                         "item": "the check, metric or phase" | null, "previous": ..., "current": ...,
                         "message": "one line"}]
      }
    }

    PHASE = {"command": "python run.py --module mdp --preset toy", "exit_code": 0 (negative: killed
             by that signal), "timed_out": false, "duration_s": 5.1 (wall time of the subprocess,
             interpreter start included), "stdout_tail": "last 40 lines", "stderr_tail": "last 40 lines"}

Regressions are against a baseline report of the same preset and schema version, the first of: the
file given with --baseline; the report pinned with --set-baseline (baseline_<preset>.json); the
newest smoke_*.json of that preset in which every module passed, from a clean git tree (a report of a
broken or uncommitted tree would turn the fix of a bug into "regressions"). The notes say which one
was used. A module that was PASS and is not now (`status`);
a check that passed and now fails (`check`); a metric with |now - before| > max(atol, rtol*|before|)
(`metric`; fixed seeds make metrics repeat exactly on one machine, the tolerance absorbs float
differences across machines); a run phase longer than `slowdown` x max(before, min_seconds)
(`slowdown`; only between reports from the same machine and --jobs, since timings are not comparable
otherwise); a module in the previous report that no longer exists, when every module was run (`missing`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core.artifacts import CorruptArtifact, read_json, write_json
from core.checks import is_number
from core.errors import UserError
from core.paths import ROOT, workdir
from core.registry import BrokenModule, Module
from core.run_context import git_state, versions

SCHEMA_VERSION = 1
STATUSES = ("PASS", "CHECK_FAILED", "FAIL", "TIMEOUT")
REGRESSION_KINDS = ("status", "check", "metric", "slowdown", "missing")
TAIL_LINES = 40
LATEST = "latest.json"


class SmokeError(UserError, ValueError):
    """A smoke session that cannot run as asked (no module selected, a preset a module lacks)."""


def reports_dir() -> Path:
    return workdir() / "output" / "smoke_reports"


@dataclass(frozen=True)
class Options:
    """What a smoke session was asked to do; stored in the report as `options`."""
    modules: list[str] | None = None
    """the names asked for; None: every module in the registry"""
    timeout_s: float = 600.0
    jobs: int = 1
    metric_rtol: float = 0.05
    metric_atol: float = 1e-9
    slowdown: float = 2.0
    min_seconds: float = 1.0
    """run phases are compared as if they took at least this long, so sub-second noise never counts"""


# --- running the phases -------------------------------------------------------------------------
class SmokeInterrupted(Exception):
    """The session was stopped (Ctrl-C) while a module was still to run."""


class Session:
    """One smoke session: a temporary work dir for the subprocesses and the processes now running,
    so that Ctrl-C can kill them (each runs in its own process group and would not see the SIGINT)."""

    def __init__(self, preset: str, timeout_s: float, root: Path):
        self.preset, self.timeout_s, self.root = preset, timeout_s, root
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopped = False

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for proc in self._running:
                _kill_group(proc)

    def run_phase(self, args: list[str], work: Path) -> dict[str, Any]:
        env = {**os.environ, "FINETUNE_WORKDIR": str(work), "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        with self._lock:
            if self._stopped:
                raise SmokeInterrupted
            proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    encoding="utf-8", errors="replace", start_new_session=True)
            self._running.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()  # what it printed before the kill
            timed_out = True
        finally:
            with self._lock:
                self._running.discard(proc)
        if self._stopped:
            raise SmokeInterrupted
        return {"command": " ".join(["python", "run.py", *args]), "exit_code": proc.returncode,
                "timed_out": timed_out, "duration_s": round(time.perf_counter() - started, 3),
                "stdout_tail": _tail(stdout), "stderr_tail": _tail(stderr)}

    def smoke_module(self, module: Module) -> dict[str, Any]:
        help_dir = self.root / "help" / module.name
        help_dir.mkdir(parents=True)
        help_phase = self.run_phase(["--module", module.name, "--help"], help_dir)
        help_phase["files_created"] = sorted(str(p.relative_to(help_dir)) for p in help_dir.rglob("*")
                                             if p.is_file())
        # every run phase shares one folder, like a learner's checkout: a module can find what a
        # module it depends on wrote earlier in the session
        runs_dir = self.root / "runs"
        run_phase = self.run_phase(["--module", module.name, "--preset", self.preset], runs_dir)
        record = _read_optional_json(runs_dir / module.rel_path / "output" / self.preset / "run.json")
        status, reason = classify(help_phase, run_phase, record)
        return {"status": status, "reason": reason, "category": module.category, "path": str(module.rel_path),
                "help": help_phase, "run": run_phase,
                "wall_time_s": record.get("wall_time_s") if record else None,
                "checks": record.get("checks", []) if record else [],
                "metrics": record.get("metrics", {}) if record else {}}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and anything it started (worker processes would keep its pipes open)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-TAIL_LINES:])


def _read_optional_json(path: Path) -> dict[str, Any] | None:
    """run.json is written atomically, so unreadable means foreign; both cases are 'no record'."""
    try:
        return read_json(path) if path.exists() else None
    except CorruptArtifact:
        return None


def classify(help_phase: dict[str, Any], run_phase: dict[str, Any],
             record: dict[str, Any] | None) -> tuple[str, str | None]:
    """(status, reason): the reason says in words why a status is not PASS."""
    for name, phase in (("help", help_phase), ("run", run_phase)):
        if phase["timed_out"]:
            return "TIMEOUT", f"{name} phase timed out after {phase['duration_s']:.1f} s"
    if help_phase["exit_code"] != 0:
        return "FAIL", f"--help exited {help_phase['exit_code']}"
    if help_phase["files_created"]:
        return "FAIL", f"--help wrote files: {', '.join(help_phase['files_created'])}"
    code = run_phase["exit_code"]
    if record is None:
        return "FAIL", f"run exited {code} and left no readable run.json"
    failed = [c["check"] for c in record.get("checks", []) if not c["passed"]]
    if code == 0 and not failed:
        return "PASS", None
    if code == 1 and failed:
        return "CHECK_FAILED", f"{len(failed)} of {len(record['checks'])} checks failed: {'; '.join(failed)}"
    return "FAIL", f"run exited {code} with {len(failed)} failed checks in run.json"


def run_modules(modules: list[Module], preset: str, timeout_s: float, jobs: int = 1,
                on_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, dict[str, Any]]:
    """Smoke-run `modules` (`jobs` at a time); entries come back in the order of `modules`."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="finetune-smoke-") as tmp:
        session = Session(preset, timeout_s, Path(tmp))
        pool = ThreadPoolExecutor(max_workers=jobs)
        futures = {pool.submit(session.smoke_module, m): m.name for m in modules}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if on_done:
                    on_done(futures[future], results[futures[future]])
        except BaseException:
            session.stop()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return {m.name: results[m.name] for m in modules}


# --- the report ---------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), **versions()}


def build_report(entries: dict[str, dict[str, Any]], preset: str, options: Options, previous: dict[str, Any] | None,
                 notes: list[str], broken: list[BrokenModule] = ()) -> dict[str, Any]:
    """The report of a session (all but `file`, which `write_report` adds), compared with `previous`."""
    report = {
        "schema_version": SCHEMA_VERSION, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": preset, "options": asdict(options), "machine": machine_info(), "git": git_state(),
        "modules": entries,
        "broken_manifests": [{"path": str(_relative(b.path)), "error": b.error} for b in broken],
    }
    regressions, compare_notes = compare(previous, report) if previous else ([], [])
    statuses = [entry["status"] for entry in entries.values()]
    counts = {status: statuses.count(status) for status in STATUSES}
    report["summary"] = {
        "modules": len(statuses), **counts, "broken_manifests": len(broken), "regressions": len(regressions),
        "ok": counts["PASS"] == len(statuses) and not broken and not regressions,
    }
    report["comparison"] = {
        "previous": previous.get("file") if previous else None,
        "previous_created_at": previous.get("created_at") if previous else None,
        "notes": notes + compare_notes, "regressions": regressions,
    }
    return report


def _relative(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def write_report(report: dict[str, Any]) -> Path:
    """Write smoke_<UTC time>.json and latest.json (both atomically); returns the first. A report of
    zero modules is refused (SmokeError): it would replace latest.json with a report of nothing."""
    if not report["modules"]:
        raise SmokeError("a smoke report that covers no module is not written (it would replace "
                         f"{LATEST} with a report of nothing)")
    folder = reports_dir()
    created = datetime.fromisoformat(report["created_at"])
    stem = f"smoke_{created:%Y%m%dT%H%M%SZ}"
    name, n = f"{stem}.json", 1
    while (folder / name).exists():  # two sessions within a second
        n += 1
        name = f"{stem}_{n}.json"
    report["file"] = name
    in_order = {"schema_version": report["schema_version"], "file": name, **report}
    path = write_json(folder / name, in_order)
    write_json(folder / LATEST, in_order)
    return path


def pinned_baseline_path(preset: str) -> Path:
    return reports_dir() / f"baseline_{preset}.json"


def pin_baseline(report_path: Path, preset: str) -> Path:
    """--set-baseline: this session's report becomes the baseline of `preset` until pinned again."""
    return write_json(pinned_baseline_path(preset), read_json(report_path))


def _usable(path: Path, preset: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the report at `path`, None) if it can be compared with a session of `preset`; else (None, why)."""
    try:
        report = read_json(path)
    except CorruptArtifact as exc:
        return None, str(exc)
    except OSError as exc:  # missing, a folder, unreadable
        return None, f"cannot read it ({exc.strerror or exc})"
    if not isinstance(report, dict) or report.get("preset") != preset:
        return None, f"{path.name} is not a report of preset {preset!r}"
    if report.get("schema_version") != SCHEMA_VERSION:
        return None, f"{path.name} has schema_version {report.get('schema_version')!r}, this is {SCHEMA_VERSION}"
    errors = validate_report(report)
    return (None, f"{path.name} does not match the report schema ({errors[0]})") if errors else (report, None)


def _passed_on_a_clean_tree(report: dict[str, Any]) -> bool:
    summary = report["summary"]
    return (summary["PASS"] == summary["modules"] and not summary["broken_manifests"]
            and report["git"]["dirty"] is False)


def find_previous(preset: str, baseline: Path | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The baseline to compare a session of `preset` against (see the module docstring for the
    order) and notes that say which one it is and what was skipped. A --baseline file that cannot
    be used is bad input (SmokeError)."""
    if baseline is not None:
        report, why = _usable(baseline, preset)
        if report is None:
            raise SmokeError(f"--baseline {baseline}: {why}")
        return report, [f"baseline: {baseline} (--baseline)"]
    pinned = pinned_baseline_path(preset)
    if pinned.exists():
        report, why = _usable(pinned, preset)
        if report is not None:
            return report, [f"baseline: {report['file']}, pinned with --set-baseline ({pinned.name})"]
        notes = [f"skipped the pinned baseline: {why}"]
    else:
        notes = []
    skipped = 0
    for path in sorted(reports_dir().glob("smoke_*.json"), reverse=True):
        report, why = _usable(path, preset)
        if report is None:
            if why and "is not a report of preset" not in why:
                notes.append(f"skipped {why}")
            continue
        if not _passed_on_a_clean_tree(report):
            skipped += 1
            continue
        return report, notes + [f"baseline: {path.name}, the newest report of preset {preset!r} in which every "
                                f"module passed, from a clean tree" + (f" ({skipped} newer ones did not qualify)"
                                                                        if skipped else "")]
    notes.append(f"no report of preset {preset!r} in which every module passed on a clean tree"
                 + (f" ({skipped} did not qualify)" if skipped else "")
                 + ": nothing to compare with (pin one with --set-baseline, or give --baseline FILE)")
    return None, notes


# --- regressions ----------------------------------------------------------------------------------
def _regression(module: str, kind: str, item: str | None, previous: Any, current: Any, message: str) -> dict:
    return {"module": module, "kind": kind, "item": item, "previous": previous, "current": current,
            "message": message}


def metric_moved(before: Any, now: Any, rtol: float, atol: float) -> bool:
    if is_number(before) and is_number(now):
        return abs(now - before) > max(atol, rtol * abs(before))
    return before != now  # a number that became null (NaN/inf), or a non-numeric value that changed


def compare(previous: dict[str, Any], current: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """(regressions, notes) of `current` against `previous`, with the tolerances in current's options."""
    opts = current["options"]
    if previous.get("schema_version") != current["schema_version"]:
        return [], [f"previous report has schema_version {previous.get('schema_version')!r}, this is "
                    f"{current['schema_version']}: not compared"]
    if previous.get("preset") != current["preset"]:
        return [], [f"previous report is for preset {previous.get('preset')!r}: not compared"]
    notes = []
    same_timing_basis = (previous["options"]["jobs"] == opts["jobs"]
                         and _timing_machine(previous) == _timing_machine(current))
    if not same_timing_basis:
        notes.append("previous report ran on another machine or with other --jobs: durations not compared")
    regressions = []
    for name, now in current["modules"].items():
        before = previous["modules"].get(name)
        if before is None:
            notes.append(f"{name}: not in the previous report, no baseline")
            continue
        regressions += _module_regressions(name, before, now, opts, same_timing_basis)
    if opts["modules"] is None:
        for name in previous["modules"].keys() - current["modules"].keys():
            regressions.append(_regression(name, "missing", None, previous["modules"][name]["status"], None,
                                           f"{name} was in the previous report and is no longer a module"))
    return regressions, notes


def _timing_machine(report: dict[str, Any]) -> tuple:
    return report["machine"].get("cpu_count"), report["machine"].get("platform")


def _module_regressions(name: str, before: dict, now: dict, opts: dict, compare_time: bool) -> list[dict]:
    found = []
    if before["status"] == "PASS" and now["status"] != "PASS":
        found.append(_regression(name, "status", None, "PASS", now["status"],
                                 f"{name} was PASS, now {now['status']}: {now['reason']}"))
    passed_before = {c["check"] for c in before["checks"] if c["passed"]}
    for check in now["checks"]:
        if check["check"] in passed_before and not check["passed"]:
            found.append(_regression(name, "check", check["check"], True, False,
                                     f"{name}: check `{check['check']}` passed before, fails now "
                                     f"(actual {check['actual']}, target {check['target']})"))
    for metric, value in now["metrics"].items():
        if metric in before["metrics"] and metric_moved(before["metrics"][metric], value,
                                                        opts["metric_rtol"], opts["metric_atol"]):
            found.append(_regression(name, "metric", metric, before["metrics"][metric], value,
                                     f"{name}: metric {metric} moved {before['metrics'][metric]} -> {value} "
                                     f"(rtol {opts['metric_rtol']}, atol {opts['metric_atol']})"))
    ran_both = not before["run"]["timed_out"] and not now["run"]["timed_out"]
    if compare_time and ran_both:
        was, took = before["run"]["duration_s"], now["run"]["duration_s"]
        if took > opts["slowdown"] * max(was, opts["min_seconds"]):
            found.append(_regression(name, "slowdown", "run", was, took,
                                     f"{name}: run phase took {took:.1f} s, was {was:.1f} s "
                                     f"(> {opts['slowdown']:g}x)"))
    return found


# --- schema check ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ListOf:
    item: Any


@dataclass(frozen=True)
class MapOf:
    value: Any


@dataclass(frozen=True)
class OneOf:
    choices: tuple


NUMBER = (int, float)
MAYBE_NUMBER = (int, float, type(None))
MAYBE_STR = (str, type(None))
PHASE_SCHEMA = {"command": str, "exit_code": int, "timed_out": bool, "duration_s": NUMBER,
                "stdout_tail": str, "stderr_tail": str}
CHECK_SCHEMA = {"check": str, "metric": str, "op": str, "actual": MAYBE_NUMBER, "target": MAYBE_NUMBER,
                "passed": bool}
MODULE_SCHEMA = {
    "status": OneOf(STATUSES), "reason": MAYBE_STR, "category": str, "path": str,
    "help": {**PHASE_SCHEMA, "files_created": ListOf(str)}, "run": PHASE_SCHEMA,
    "wall_time_s": MAYBE_NUMBER, "checks": ListOf(CHECK_SCHEMA), "metrics": dict,
}
REGRESSION_SCHEMA = {"module": str, "kind": OneOf(REGRESSION_KINDS), "item": MAYBE_STR,
                     "previous": object, "current": object, "message": str}
REPORT_SCHEMA = {
    "schema_version": OneOf((SCHEMA_VERSION,)), "file": str, "created_at": str, "preset": str,
    "options": {"modules": (list, type(None)), "timeout_s": NUMBER, "jobs": int, "metric_rtol": NUMBER,
                "metric_atol": NUMBER, "slowdown": NUMBER, "min_seconds": NUMBER},
    "machine": {"cpu_count": (int, type(None)), "python": str, "platform": str, "torch": MAYBE_STR},
    "git": {"commit": MAYBE_STR, "dirty": (bool, type(None))},
    "summary": {"modules": int, **{s: int for s in STATUSES}, "broken_manifests": int, "regressions": int,
                "ok": bool},
    "modules": MapOf(MODULE_SCHEMA),
    "broken_manifests": ListOf({"path": str, "error": str}),
    "comparison": {"previous": MAYBE_STR, "previous_created_at": MAYBE_STR, "notes": ListOf(str),
                   "regressions": ListOf(REGRESSION_SCHEMA)},
}


def validate_report(report: Any, schema: Any = None, where: str = "report") -> list[str]:
    """Every place where `report` departs from REPORT_SCHEMA (empty: it conforms)."""
    schema = REPORT_SCHEMA if schema is None else schema
    if isinstance(schema, dict):
        if not isinstance(report, dict):
            return [f"{where}: expected an object, got {type(report).__name__}"]
        return [error for key, sub in schema.items()
                for error in ([f"{where}: missing {key!r}"] if key not in report
                              else validate_report(report[key], sub, f"{where}.{key}"))]
    if isinstance(schema, ListOf):
        if not isinstance(report, list):
            return [f"{where}: expected a list, got {type(report).__name__}"]
        return [e for i, item in enumerate(report) for e in validate_report(item, schema.item, f"{where}[{i}]")]
    if isinstance(schema, MapOf):
        if not isinstance(report, dict):
            return [f"{where}: expected an object, got {type(report).__name__}"]
        return [e for key, value in report.items() for e in validate_report(value, schema.value, f"{where}.{key}")]
    if isinstance(schema, OneOf):
        return [] if report in schema.choices else [f"{where}: {report!r} is not one of {list(schema.choices)}"]
    if not isinstance(report, schema):
        return [f"{where}: expected {_type_names(schema)}, got {type(report).__name__}"]
    return []


def _type_names(types: type | tuple) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
