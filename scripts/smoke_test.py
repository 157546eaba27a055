"""Smoke-test modules: `--help` and a preset run of each in its own process, a JSON report, regressions.

    python scripts/smoke_test.py                               # every module, toy preset
    python scripts/smoke_test.py --modules mdp,gae --jobs 2
    python scripts/smoke_test.py --preset default --timeout 1800
    python scripts/smoke_test.py --allow-fail                  # report only: exit 0 whatever happens

Runs go to a temporary work dir, so the learner's own runs and run index are untouched. The report
goes to output/smoke_reports/smoke_<UTC time>.json and latest.json (schema: learning/smoke.py).
A session must cover at least one module: latest.json is never replaced by an empty report.
Regressions are judged against a baseline (learning/smoke.py says which: --baseline FILE, else the one
pinned with --set-baseline, else the newest report in which every module passed, from a clean tree).
Exit status (core/cli.py): 0 every module PASS and no regression against the baseline, 1
otherwise (0 with --allow-fail), 2 bad input (an unknown module, an empty --modules, a preset a
module lacks, a bad number), 3 an internal error (traceback in output/crash/smoke_test.log),
130 interrupted (no report written).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.cli import Console, INTERRUPTED, Parser, crash_log, guard, path_argument  # noqa: E402
from core.registry import Module, Registry, discover  # noqa: E402
from learning import smoke  # noqa: E402

STATUS_STYLE = {"PASS": "green", "CHECK_FAILED": "yellow", "FAIL": "red", "TIMEOUT": "magenta"}
ERROR_TAIL_LINES = 5

console = Console()
err = Console(stderr=True)


def number(kind: type, low: float = 0.0, strict: bool = True) -> Any:
    """An argparse type: a finite number > low (or >= low when not strict); nan and inf are refused."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


def positive(kind: type) -> Any:
    return number(kind)


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = smoke.Options()
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", help="comma-separated module names (default: every module)")
    p.add_argument("--preset", default="toy", help="preset to run (default: toy)")
    p.add_argument("--timeout", type=positive(float), default=defaults.timeout_s, metavar="S",
                   help=f"seconds each phase of a module may take (default: {defaults.timeout_s:g})")
    p.add_argument("--jobs", type=positive(int), default=defaults.jobs, metavar="N",
                   help="modules run in parallel (default: 1; durations are compared only between equal --jobs)")
    p.add_argument("--allow-fail", action="store_true", help="report only: exit 0 on failures and regressions")
    p.add_argument("--baseline", type=path_argument, metavar="FILE",
                   help="compare with this report (default: the pinned baseline, else the newest report in "
                        "which every module passed, from a clean git tree)")
    p.add_argument("--set-baseline", action="store_true",
                   help="pin this session's report as the baseline of its preset")
    not_negative = number(float, strict=False)
    p.add_argument("--metric-rtol", type=not_negative, default=defaults.metric_rtol,
                   help=f"relative move of a metric that counts as a regression (default: {defaults.metric_rtol:g})")
    p.add_argument("--metric-atol", type=not_negative, default=defaults.metric_atol,
                   help=f"absolute floor of that tolerance (default: {defaults.metric_atol:g})")
    p.add_argument("--slowdown", type=positive(float), default=defaults.slowdown,
                   help=f"run phase this many times slower is a regression (default: {defaults.slowdown:g})")
    p.add_argument("--min-seconds", type=not_negative, default=defaults.min_seconds,
                   help="durations below this count as this long when comparing, so noise is ignored "
                        f"(default: {defaults.min_seconds:g})")
    return p.parse_args(argv)


def select_modules(registry: Registry, names_arg: str | None, preset: str) -> list[Module]:
    """The modules asked for, in the order named (every module, in registry order, without
    --modules); raises UnknownModule, or SmokeError for a preset a module lacks or a selection of no
    module (a session must cover one: an empty report would replace latest.json)."""
    if names_arg is None:
        modules = list(registry.modules.values())
        if not modules:
            raise smoke.SmokeError(f"no module to smoke-test: every module manifest is broken "
                                   f"({len(registry.broken)}; python run.py --list says why)")
    else:
        names = [n.strip() for n in names_arg.split(",") if n.strip()]
        if not names:
            raise smoke.SmokeError(f"--modules {names_arg!r} names no module: give comma-separated names "
                                   f"(e.g. --modules mdp,gae), or leave it out to run every module")
        modules = [registry.get(n) for n in dict.fromkeys(names)]
    lacking = [m.name for m in modules if preset not in m.presets]
    if lacking:
        raise smoke.SmokeError(f"preset {preset!r} does not exist for {', '.join(lacking)} "
                               f"(their presets: {', '.join(sorted({p for m in modules for p in m.presets}))})")
    return modules


def print_progress(name: str, entry: dict[str, Any]) -> None:
    style = STATUS_STYLE[entry["status"]]
    console.print(f"  {name:<24} [{style}]{entry['status']:<12}[/] help {entry['help']['duration_s']:5.1f} s"
                  f"   run {entry['run']['duration_s']:6.1f} s")


def print_summary(report: dict[str, Any], path: Path) -> None:
    regressions = report["comparison"]["regressions"]
    table = Table(title=f"smoke test, preset {report['preset']}")
    for col, justify in (("module", "left"), ("status", "left"), ("help s", "right"), ("run s", "right"),
                         ("checks", "right"), ("regressions", "right")):
        table.add_column(col, justify=justify)
    for name, entry in report["modules"].items():
        passed = sum(c["passed"] for c in entry["checks"])
        mine = sum(r["module"] == name for r in regressions)
        table.add_row(name, f"[{STATUS_STYLE[entry['status']]}]{entry['status']}[/]",
                      f"{entry['help']['duration_s']:.1f}", f"{entry['run']['duration_s']:.1f}",
                      f"{passed}/{len(entry['checks'])}", f"[red]{mine}[/]" if mine else "0")
    console.print(table)

    for name, entry in report["modules"].items():
        if entry["status"] != "PASS":
            help_broke = entry["help"]["exit_code"] != 0 or entry["help"]["timed_out"]
            phase = entry["help"] if help_broke else entry["run"]
            console.print(f"[{STATUS_STYLE[entry['status']]}]{entry['status']}[/] {name}: {escape(entry['reason'])}")
            for line in phase["stderr_tail"].splitlines()[-ERROR_TAIL_LINES:]:
                console.print(f"    [dim]{escape(line)}[/]")
    for broken in report["broken_manifests"]:
        console.print(f"[red]broken module manifest[/] {broken['path']}: {escape(broken['error'])}")

    comparison = report["comparison"]
    if comparison["previous"]:
        console.print(f"compared with {comparison['previous']} ({comparison['previous_created_at']})")
    for note in comparison["notes"]:
        console.print(f"[dim]note: {escape(note)}[/]")
    if regressions:
        console.print(f"[bold red]{len(regressions)} regression(s):[/]")
        for r in regressions:
            console.print(f"  [red]{r['kind']:<9}[/] {escape(r['message'])}")
    else:
        console.print("no regressions" if comparison["previous"] else "no regression check (no baseline)")
    console.print(f"report: {path}  (and {path.parent / smoke.LATEST})")


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: smoke_test(sys.argv[1:] if argv is None else argv),
                 crash_log=crash_log("smoke_test"),
                 interrupted="interrupted: no report written")


def smoke_test(argv: list[str]) -> int:
    args = parse_args(argv)
    registry = discover()
    modules = select_modules(registry, args.modules, args.preset)
    options = smoke.Options(modules=None if args.modules is None else [m.name for m in modules],
                            timeout_s=args.timeout, jobs=args.jobs, metric_rtol=args.metric_rtol,
                            metric_atol=args.metric_atol, slowdown=args.slowdown, min_seconds=args.min_seconds)
    previous, notes = smoke.find_previous(args.preset, args.baseline)
    console.print(f"smoke test: {len(modules)} module(s), preset {args.preset}, timeout {args.timeout:g} s, "
                  f"{args.jobs} at a time (runs in a temporary work dir)")
    try:
        entries = smoke.run_modules(modules, args.preset, args.timeout, args.jobs, on_done=print_progress)
    except (KeyboardInterrupt, smoke.SmokeInterrupted):
        err.print("[yellow]interrupted:[/] running modules were stopped; no report written")
        return INTERRUPTED
    broken = registry.broken if args.modules is None else []
    report = smoke.build_report(entries, args.preset, options, previous, notes, broken)
    path = smoke.write_report(report)
    print_summary(report, path)
    if args.set_baseline:
        console.print(f"pinned {path.name} as the baseline of preset {args.preset}: "
                      f"{smoke.pin_baseline(path, args.preset)}")
    summary = report["summary"]
    verdict = "[green]ok[/]" if summary["ok"] else "[red]NOT OK[/]"
    console.print(f"{verdict}: {summary['PASS']}/{summary['modules']} PASS, {summary['regressions']} regression(s), "
                  f"{summary['broken_manifests']} broken manifest(s)"
                  + (" (--allow-fail: exit 0)" if args.allow_fail and not summary["ok"] else ""))
    return 0 if summary["ok"] or args.allow_fail else 1


if __name__ == "__main__":
    sys.exit(main())
