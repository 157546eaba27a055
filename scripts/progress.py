#!/usr/bin/env python
"""Where you are on the 14-day roadmap, what is done, which level checkpoints pass and what each level
still lacks: computed from your run index (output/run_index.json), drill history (output/progress.db)
and latest smoke report.

    python scripts/progress.py                      # today's day and its items, every day, the levels
    python scripts/progress.py --day 5              # the items of day 5
    python scripts/progress.py --module gae         # only the days that name gae
    python scripts/progress.py --start 2026-03-01   # count day 1 from this date
    python scripts/progress.py --json               # the whole report as JSON

Day 1 is the date of your first drill review or your earliest run still in the run index, whichever
is earlier (the headline says which); --start overrides it. For every level not reached, the report
says what it still lacks: the runs not made or failing, and per mastery criterion how many questions
are short of it and why (never answered, answered but not rated, rated low, graded low), with their ids
(all of them in --json, under each criterion's "questions"). Nothing is written. A bad row in the
progress database is reported in one warning line and left out.
Exit status (core/cli.py): 0 shown, 2 bad input (unknown day or module, a bad date, a --db file that
is not a Finetune progress database, a roadmap that names something that does not exist), 3 an
internal error (traceback in output/crash/progress.log), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.markup import escape  # noqa: E402

from core.cli import Console, Parser, crash_log, guard, path_argument  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.registry import discover  # noqa: E402
from learning.roadmap import print_progress, progress_report  # noqa: E402

console = Console()
err = Console(stderr=True)



def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--day", type=int, metavar="N", help="show the items of day N")
    p.add_argument("--module", metavar="NAME", help="only the days that name this module")
    p.add_argument("--start", type=date.fromisoformat, metavar="YYYY-MM-DD",
                   help="the date of day 1 (default: your first run or drill review)")
    p.add_argument("--db", type=path_argument, metavar="PATH", help="progress database (default: output/progress.db)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py (every bad-data error of the report is a UserError)."""
    return guard(lambda: show(sys.argv[1:] if argv is None else argv),
                 crash_log=crash_log("progress"))


def show(argv: list[str]) -> int:
    args = parse_args(argv)
    registry = discover()
    for broken in registry.broken:  # their questions and runs are left out of the report
        err.print(f"[yellow]skipping broken module manifest[/] {broken.path}: {escape(broken.error)}", soft_wrap=True)
    if args.module is not None:
        registry.get(args.module)  # UnknownModule, with close matches
    report = progress_report(registry, args.db, datetime.now(timezone.utc), args.start)
    if args.day is not None and not 1 <= args.day <= report["days_total"]:  # the day count is the roadmap's rule
        raise UserError(f"unknown day {args.day}: the roadmap has days 1-{report['days_total']}")
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_progress(report, console, args.day, args.module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
