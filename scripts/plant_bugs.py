#!/usr/bin/env python
"""Plant every listed bug of a module in a scratch copy and require its checks and tests to catch it.

    python scripts/plant_bugs.py                         # every bug of every module
    python scripts/plant_bugs.py --module ppo            # one module (repeat --module for more)
    python scripts/plant_bugs.py --module ppo --bug gae-no-done-mask
    python scripts/plant_bugs.py --jobs 4

The bugs are listed in each module's bugs.toml (what they are and how you would see them: the
module README's "What goes wrong" section). The checkout is never changed. A chained module (sft,
grpo, ...) gets its upstream toy runs built once, unmutated, under <work dir>/output/planted_bugs/.
Exit status (core/cli.py): 0 every bug caught by every catcher it names, 1 a survivor, 2 bad input
(an unknown module or bug, --jobs < 1), 3 an internal error (traceback in output/crash/plant_bugs.log),
130 interrupted.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.cli import Console, Parser, crash_log, guard  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.paths import workdir  # noqa: E402
from core.planted_bugs import build_upstream, hunt_all  # noqa: E402
from core.registry import discover  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: plant(argv), crash_log=crash_log("plant_bugs"))


def plant(argv: list[str] | None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", default=[], help="module name (repeatable; default: all)")
    parser.add_argument("--bug", action="append", default=[], help="bug id (repeatable; default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="bugs hunted side by side")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    console = Console()

    registry = discover()
    modules = [registry.get(name) for name in args.module] or list(registry.modules.values())
    jobs = [(m, b) for m in modules for b in m.bugs if not args.bug or b.id in args.bug]
    unknown = set(args.bug) - {b.id for _, b in jobs}
    if unknown or not jobs:
        raise UserError(f"no such bug in {', '.join(m.name for m in modules) or 'any module'}: "
                        f"{', '.join(sorted(unknown)) or '(no bug selected)'}")

    upstream_root = workdir() / "output" / "planted_bugs" / "upstream"
    upstream = {m.name: build_upstream(m, upstream_root) for m in {m.name: m for m, _ in jobs}.values()}
    started = time.perf_counter()
    hunts = hunt_all([(m, b, upstream[m.name]) for m, b in jobs], args.jobs)

    table = Table(title=f"planted bugs: {sum(h.caught for h in hunts)}/{len(hunts)} caught "
                        f"({time.perf_counter() - started:.0f} s)")
    for column in ("module", "bug", "catcher", "verdict"):
        table.add_column(column, overflow="fold")
    for (module, bug), found in zip(jobs, hunts):
        for verdict in found.verdicts:
            mark = "[green]caught[/]" if verdict.caught else "[red]SURVIVED[/]"
            table.add_row(module.name, bug.id, verdict.catcher, f"{mark} {escape(verdict.detail)}")
    console.print(table)
    return 0 if all(h.caught for h in hunts) else 1


if __name__ == "__main__":
    sys.exit(main())
