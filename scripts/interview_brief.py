#!/usr/bin/env python
"""The spoken interview brief of one module, quoting your own latest run.

    python scripts/interview_brief.py --module gae                    # Chinese, latest run of any preset
    python scripts/interview_brief.py --module gae --lang en --preset toy --out gae_brief.md

Sections, each timed for speaking: definition (30 s), how it works (60 s), what I ran and what it
showed (60 s: config, final metrics, checks, plots of the latest run, found through the run index),
engineering pitfalls (30 s), one comparison answer, three follow-up questions from the module's
bank. With no run yet it says so and prints the command that makes one (exit 0).
Exit status: 0 brief written, 2 bad input (unknown module or preset, unreadable run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.markdown import Markdown  # noqa: E402

from core.artifacts import CorruptArtifact, atomic_write_text  # noqa: E402
from core.contract import LANGS  # noqa: E402
from core.registry import UnknownModule, discover  # noqa: E402
from learning.briefs import BriefError, brief_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", required=True, metavar="NAME", help="the module (python run.py --list)")
    parser.add_argument("--preset", help="quote the latest run of this preset (default: the most recent run)")
    parser.add_argument("--lang", choices=LANGS, default="zh", help="language of the brief (default: zh)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the Markdown here instead of printing it")
    args = parser.parse_args(argv)
    err = Console(stderr=True)

    registry = discover()
    try:
        brief = brief_for(registry.get(args.module), args.lang, args.preset).markdown
    except (UnknownModule, BriefError, CorruptArtifact) as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    if args.out:
        atomic_write_text(args.out, brief)
        err.print(f"wrote {args.out}", highlight=False, soft_wrap=True)
    elif sys.stdout.isatty():
        Console().print(Markdown(brief))
    else:
        sys.stdout.write(brief)
    return 0


if __name__ == "__main__":
    sys.exit(main())
