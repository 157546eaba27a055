"""Recorded results: the key figures of a module's runs, kept small in the repository so that every
figure the docs publish comes from a run of the current code.

    assets/results/<module>.json   {"module", "runs": {"default": RUN, "toy": RUN, "default@seed1": RUN, ...}}
    RUN                            seed, commit, wall time, threads, config, metrics, timings and the
                                   run's small CSV tables (at most MAX_TABLE_ROWS rows each)
    assets/results/benchmarks/<benchmark>.json
                                   {"benchmark", "command", "modules", "commit", "dirty", "recorded_at",
                                    "rows": [...]}: one side-by-side measurement of benchmarks/<benchmark>.py,
                                   quotable by the READMEs of the modules it names

scripts/record_results.py writes the module records from runs in the work dir; a benchmark writes its
own with `--record`. tests/test_published_figures.py reads
every README and fails on a published figure that no record holds (`unrecorded`).

A published figure is a number written with a decimal point (0.542, −27.3, 1.7e-6, 2.56M) or with
digit groups (22 368, 150,000). It is recorded when some number of the records that README may quote
gives that text when rounded to the same precision, directly or in the unit written after it (a
percentage of a fraction, minutes of seconds, k, M, G). Integers like "500" or "4×4" are not figures: they are too
often sizes and settings to tell apart. A number that is a setting or a cited value rather than a
result goes in the README's `<!-- not results: ... -->` comment, which says where it comes from.
Section and equation references (§4.1, eq. 3.14) are not figures, and the generated planted-bugs
section and grading table are not scanned (TESTED_BLOCK: tests hold their figures instead).
"""
from __future__ import annotations

import csv
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from core import artifacts
from core.paths import ROOT
from core.registry import Module, Registry
from core.run_context import git_state

RESULTS_DIR = ROOT / "assets" / "results"
BENCHMARKS_DIR = RESULTS_DIR / "benchmarks"
MAX_TABLE_ROWS = 60
"""CSV tables up to this many rows are kept in a record (sweeps, per-seed tables); learning curves are not"""
UNIT_SCALES = {"": (1.0,), "%": (100.0, 1.0), "min": (1 / 60, 1.0), "k": (1e-3,), "M": (1e-6,), "G": (1e-9,)}
"""how a recorded number may be quoted: itself, a percentage of a fraction, minutes of seconds, k, M, G"""

FIGURE = re.compile(r"(?<![\w.\-−])(?P<sign>[-−]?)"
                    r"(?P<body>\d{1,3}(?:[ ,]\d{3})+(?!\d|\.\d)|\d+\.\d+(?:e[-+−]?\d+)?)"
                    r"(?P<unit>[kMG](?!\w)|%|\s?min\b)?(?!\w|\.\d)")
NOT_RESULTS = re.compile(r"<!--\s*not results:(.*?)-->", re.S)
TESTED_BLOCK = re.compile(r"<!-- BEGIN (planted-bugs|grading-table)\b.*?<!-- END \1 -->", re.S)
"""generated blocks whose figures are held by a test rather than by a record: the "what goes wrong"
section quotes runs with a bug planted (each bug caught: tests/test_planted_bugs.py), the README's
grading table is the grader measured on the labelled set (equal to the live measurement:
tests/test_grading_set.py)"""
REFERENCE = re.compile(r"(?:§|\b(?:eq|Eq|ch|Ch|Sec|Section|Table|Fig|Figure|Appendix|App|Alg|Algorithm|Exercise|Ex|"
                       r"Example)\.?)\s?\d+(?:\.\d+)*(?:\s?(?:[–-]|/|,|and)\s?\d+(?:\.\d+)*)*")
"""section, equation, figure and chapter references ("S&B §4.1–4.3", "eq. 3.14"): numbers, not figures"""


def record_path(module: str) -> Path:
    return RESULTS_DIR / f"{module}.json"


def run_record(run_json: Path) -> dict[str, Any]:
    """The part of one run worth keeping: what produced it and the figures it gave."""
    run = artifacts.read_json(run_json)
    tables = {}
    for name in run.get("artifacts", []):
        if name.endswith(".csv") and (run_json.parent / name).exists():
            with open(run_json.parent / name, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            if len(rows) <= MAX_TABLE_ROWS:
                tables[name] = rows
    return {"preset": run["preset"], "seed": run["seed"], "overrides": run["overrides"],
            "commit": run["git"]["commit"], "dirty": run["git"]["dirty"], "started_at": run["started_at"],
            "wall_time_s": run["wall_time_s"], "threads": run["threads"], "status": run["status"],
            "config": run["config"], "metrics": run["metrics"], "timings": run["timings"], "tables": tables}


def load_record(module: str) -> dict[str, Any] | None:
    """The module's record, None if it has none; CorruptArtifact (naming the file) if it is not one."""
    path = record_path(module)
    if not path.exists():
        return None
    record = artifacts.read_json(path)
    if not (isinstance(record, dict) and isinstance(record.get("runs"), dict)
            and all(isinstance(run, dict) for run in record["runs"].values())):
        raise artifacts.CorruptArtifact(f"{path}: not a results record (expected {{\"runs\": {{key: run}}}}); "
                                        f"rewrite it with python scripts/record_results.py --module {module} --run")
    return record


def record_benchmark(name: str, command: str, modules: list[str], rows: list[dict[str, Any]]) -> Path:
    """Write benchmarks/<name>.py's measurement (its printed table as rows of numbers) as the record
    the READMEs of `modules` may quote; atomically, replacing the previous one."""
    return artifacts.write_json(BENCHMARKS_DIR / f"{name}.json", {
        "benchmark": name, "command": command, "modules": modules, **git_state(),
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows})


def benchmark_records(module: str) -> list[dict[str, Any]]:
    """The benchmark records that name `module`; CorruptArtifact (naming the file) for one that is not one."""
    found = []
    for path in sorted(BENCHMARKS_DIR.glob("*.json")):
        record = artifacts.read_json(path)
        if not (isinstance(record, dict) and isinstance(record.get("modules"), list) and "rows" in record):
            raise artifacts.CorruptArtifact(f"{path}: not a benchmark record (expected \"modules\" and \"rows\"); "
                                            f"rewrite it with python benchmarks/{path.stem}.py --record")
        if module in record["modules"]:
            found.append(record)
    return found


def numbers(value: Any) -> Iterator[float]:
    """Every finite number inside a record (CSV cells are strings: those that parse count)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield float(value)
    elif isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return
        if math.isfinite(parsed):
            yield parsed
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from numbers(item)


def figures(markdown: str) -> Iterator[tuple[int, str]]:
    """(line number, figure text) of every published figure, outside the `not results` comments."""
    exempt = set()
    for match in NOT_RESULTS.finditer(markdown):
        exempt |= {_normalise(m.group(0)) for m in FIGURE.finditer(match.group(1))}
    text = markdown
    for skipped in (NOT_RESULTS, TESTED_BLOCK):
        text = skipped.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = REFERENCE.sub(" ", text)
    for line_no, line in enumerate(text.splitlines(), 1):
        for match in FIGURE.finditer(line):
            if _normalise(match.group(0)) not in exempt:
                yield line_no, match.group(0)


def _normalise(figure: str) -> str:
    return figure.replace("−", "-").replace(",", "").replace(" ", "")


def is_recorded(figure: str, values: Iterable[float]) -> bool:
    match = FIGURE.fullmatch(figure)
    body, negative = _normalise(match["body"]), bool(match["sign"])
    scales = UNIT_SCALES[(match["unit"] or "").strip()]
    if "e" in body:
        digits = len(body.split("e")[0].split(".")[1])
        target = _exponent(body)
        def formats(v: float) -> str:
            return _exponent(f"{v:.{digits}e}")
    else:
        digits = len(body.split(".")[1]) if "." in body else 0
        target = body
        def formats(v: float) -> str:
            return f"{v:.{digits}f}"
    return any((v < 0) == negative and formats(abs(v) * scale) == target for v in values for scale in scales)


def _exponent(text: str) -> str:
    """1.7e-06, 1.7e-6 and 1.7e−6 read the same."""
    mantissa, exponent = text.replace("−", "-").split("e")
    return f"{mantissa}e{int(exponent)}"


def unrecorded(markdown: str, values: list[float]) -> list[tuple[int, str]]:
    """Published figures of `markdown` that no recorded value gives."""
    return [(line, fig) for line, fig in figures(markdown) if not is_recorded(fig, values)]


def _with_upstream(module: Module, registry: Registry) -> list[Module]:
    found = [module]
    for dep in module.depends:
        found += [m for m in _with_upstream(registry.get(dep), registry) if m not in found]
    return found


def quotable(modules: Iterable[Module]) -> list[float]:
    """What a text about these modules may quote: their records, the benchmark records that name them
    and their checks' thresholds."""
    values: list[float] = []
    for m in modules:
        values += numbers(load_record(m.name))
        values += numbers([b["rows"] for b in benchmark_records(m.name)])
        values += [c.value for c in m.checks if c.value is not None]
    return values


def unrecorded_figures(registry: Registry, modules: Iterable[str] | None = None) -> dict[Path, list[tuple[int, str]]]:
    """{README: [(line, figure)]} of figures no record gives. A module README may quote its own records
    and its upstream's; a line of the top README those of the modules it names in backticks (`ppo`),
    or any record when it names none. `modules`: only these modules' READMEs (None: all, and the top one)."""
    problems = {}
    names = list(registry.modules) if modules is None else list(modules)
    for name in names:
        module = registry.get(name)
        path = module.path / "README.md"
        problems[path] = unrecorded(path.read_text(encoding="utf-8"), quotable(_with_upstream(module, registry)))
    if modules is None:
        path, every, bad = ROOT / "README.md", quotable(registry.modules.values()), []
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for line_no, fig in figures(text):  # the whole text: its not-results comment applies to every line
            named = [registry.modules[n] for n in re.findall(r"`(\w+)`", lines[line_no - 1]) if n in registry.modules]
            values = quotable(u for m in named for u in _with_upstream(m, registry)) if named else every
            if not is_recorded(fig, values):
                bad.append((line_no, fig))
        problems[path] = bad
    return {path: bad for path, bad in problems.items() if bad}
