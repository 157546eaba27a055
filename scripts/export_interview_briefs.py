#!/usr/bin/env python
"""Every module's interview brief, as Markdown files with an index and/or one offline HTML page.

    python scripts/export_interview_briefs.py                          # output/briefs/<module>.md + index.md
    python scripts/export_interview_briefs.py --format html --lang en  # output/briefs/briefs.html
    python scripts/export_interview_briefs.py --out DIR --format both

The HTML page is self-contained (inline CSS, plots embedded as data URIs): a run-status table
(module, preset, when, checks passed, wall time) and every brief with its latest plots.
Exit status (core/cli.py): 0 written, 2 bad input (a run that cannot fill its brief, an unreadable
run, an --out folder that cannot be written; nothing is written then), 3 an internal error
(traceback in output/crash/export_interview_briefs.log), 130 interrupted.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from core.cli import Console, Parser, crash_log, guard, path_argument  # noqa: E402
from core.contract import LANGS  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.paths import workdir  # noqa: E402
from core.registry import discover  # noqa: E402
from learning.briefs import FORMATS, OutputError, export_briefs  # noqa: E402



def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: export(argv),
                 crash_log=crash_log("export_interview_briefs"))


def export(argv: list[str] | None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=path_argument, metavar="DIR",
                        help="output folder (default: output/briefs/ in the work dir)")
    parser.add_argument("--format", choices=(*FORMATS, "both"), default="md", help="what to write (default: md)")
    parser.add_argument("--lang", choices=LANGS, default="zh", help="language of the briefs (default: zh)")
    args = parser.parse_args(argv)
    err = Console(stderr=True)

    registry = discover()
    for broken in registry.broken:
        err.print(f"[yellow]skipped broken module manifest[/] {broken.path}: {broken.error}",
                  highlight=False, soft_wrap=True)
    out_dir = args.out or workdir() / "output" / "briefs"
    formats = FORMATS if args.format == "both" else (args.format,)
    try:
        written = export_briefs(registry, out_dir, args.lang, formats)
    except OutputError:
        raise  # the folder or a file in it refused the write: the message says which
    except UserError as exc:  # raised while rendering, before any file is written
        raise UserError(f"{exc}; nothing was written") from None
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
