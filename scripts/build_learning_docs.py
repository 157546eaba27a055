#!/usr/bin/env python
"""Render learning/ROADMAP_14_DAYS.md and learning/LEVEL_CHECKPOINTS.md: the roadmap derived from the
registry by the rules of learning/roadmap.toml, the levels of learning/levels.toml (templates:
learning/templates/roadmap.md.j2, checkpoints.md.j2).

    python scripts/build_learning_docs.py            # write both files
    python scripts/build_learning_docs.py --check    # write nothing; exit 1 if a committed file is stale

Every module, preset, README section and question level the days and levels name must resolve against
the registry and the question banks, and every level must ask only for what the days schedule;
otherwise nothing is written. Modules whose category no track of roadmap.toml names are on no day:
they are listed as a reminder.
Exit status (core/cli.py): 0 written (or up to date), 1 --check found a stale file, 2 a reference does
not resolve (nothing is written), 3 an internal error (traceback in output/crash/build_learning_docs.log),
130 interrupted.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from core.artifacts import atomic_write_text  # noqa: E402
from core.cli import Console, Parser, crash_log, guard  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.registry import discover  # noqa: E402
from learning.roadmap import load_rules, not_on_roadmap, plan, rendered_docs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: build(argv), crash_log=crash_log("build_learning_docs"))


def build(argv: list[str] | None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    args = parser.parse_args(argv)
    err = Console(stderr=True)

    registry = discover()
    try:
        docs = rendered_docs(registry)
    except UserError as exc:  # RoadmapError, BankError: a reference that does not resolve
        raise UserError(f"{exc}; nothing was written") from None
    missing = not_on_roadmap(plan(registry, load_rules()), registry)
    if missing:
        err.print(f"[yellow]on no roadmap day yet:[/] {', '.join(missing)} (name their categories in a track "
                  f"of learning/roadmap.toml)", highlight=False, soft_wrap=True)
    stale = [path for path, text in docs.items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    for path in stale:
        relative = path.relative_to(ROOT)
        if args.check:
            err.print(f"stale: {relative} differs from what its TOML generates; run "
                      f"python scripts/build_learning_docs.py", highlight=False, soft_wrap=True)
        else:
            atomic_write_text(path, docs[path])
            print(f"wrote {relative}")
    if not stale:
        print("learning docs are up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
