#!/usr/bin/env python
"""List the README figures that no recorded run gives (rules: core/results.py).

    python scripts/check_figures.py                  # every module README and README.md
    python scripts/check_figures.py --module ppo     # one module's README (repeatable)

Each figure is shown with its line, so it can be refreshed from the record (assets/results/), or,
when it is a setting or a cited value rather than a result, listed in the README's
<!-- not results: ... --> comment with its source. Exit status (core/cli.py): 0 none, 1 some, 2 bad
input (an unknown module, a corrupt record), 3 an internal error (traceback in
output/crash/check_figures.log), 130 interrupted.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.cli import Parser, crash_log, guard  # noqa: E402
from core.registry import discover  # noqa: E402
from core.results import unrecorded_figures  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: check(argv), crash_log=crash_log("check_figures"))


def check(argv: list[str] | None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", default=None, help="module name (repeatable; default: all)")
    args = parser.parse_args(argv)
    registry = discover()
    problems = unrecorded_figures(registry, args.module)  # UnknownModule, CorruptArtifact: UserErrors
    for path, bad in problems.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        print(f"{path.relative_to(ROOT)}: {len(bad)} unrecorded")
        for line_no, figure in bad:
            print(f"  {line_no:4d} {figure:>10}  {lines[line_no - 1].strip()[:150]}")
    if not problems:
        print("every README figure is in a record")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
