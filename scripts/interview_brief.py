#!/usr/bin/env python
"""The spoken interview brief of one module, quoting your own latest run.

    python scripts/interview_brief.py --module gae                    # Chinese, latest run of any preset
    python scripts/interview_brief.py --module gae --lang en --preset toy --out gae_brief.md

Sections, each timed for speaking: definition (30 s), how it works (60 s), what I ran and what it
showed (60 s: two sentences to say aloud from the run's numbers, then config, checks, final metrics
and plots of the latest run, found through the run index), engineering pitfalls (30 s), one
comparison answer, three follow-up questions from the module's bank. A Chinese brief names, in one
line, any part still in English for want of a translation. With no run yet it says so and prints the
command that makes one (exit 0).
Exit status (core/cli.py): 0 brief written, 2 bad input (unknown module or preset, unreadable run, an
--out path that cannot be written: checked before the brief is made), 3 an internal error (traceback
in output/crash/interview_brief.log), 130 interrupted.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.markdown import Markdown  # noqa: E402

from core.cli import Console, Parser, crash_log, guard, path_argument  # noqa: E402
from core.contract import LANGS  # noqa: E402
from core.registry import discover  # noqa: E402
from learning.briefs import brief_for, check_output, write_text  # noqa: E402



def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: write_brief(argv), crash_log=crash_log("interview_brief"))


def write_brief(argv: list[str] | None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", required=True, metavar="NAME", help="the module (python run.py --list)")
    parser.add_argument("--preset", help="quote the latest run of this preset (default: the most recent run)")
    parser.add_argument("--lang", choices=LANGS, default="zh", help="language of the brief (default: zh)")
    parser.add_argument("--out", type=path_argument, metavar="FILE", help="write the Markdown here instead of printing it")
    args = parser.parse_args(argv)
    err = Console(stderr=True)

    if args.out:
        check_output(args.out)  # before any work: a typo in --out costs nothing
    registry = discover()
    brief = brief_for(registry.get(args.module), args.lang, args.preset).markdown
    if args.out:
        write_text(args.out, brief)
        err.print(f"wrote {args.out}", highlight=False, soft_wrap=True)
    elif sys.stdout.isatty():
        Console().print(Markdown(brief))
    else:
        sys.stdout.write(brief)
    return 0


if __name__ == "__main__":
    sys.exit(main())
