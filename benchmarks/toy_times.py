"""Wall time of every module's toy preset, each in its own process (imports included), as a table.

    python benchmarks/toy_times.py [--modules mdp,gae] [--threads N]

Runs go to a temporary work dir, so the learner's own latest runs are untouched. The target is
< 30 s per toy preset on 2 CPU cores; this script reports, it does not assert.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.registry import discover  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", help="comma-separated names (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    names = args.modules.split(",") if args.modules else list(discover().modules)
    table = Table(title=f"toy presets on {os.cpu_count()} CPU cores")
    for col, justify in (("module", "left"), ("process s", "right"), ("run s", "right"), ("checks", "left")):
        table.add_column(col, justify=justify)
    total = 0.0
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            cmd = [sys.executable, "run.py", "--module", name, "--toy"]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "FINETUNE_WORKDIR": work})
            elapsed = time.perf_counter() - t0
            total += elapsed
            runs = list(Path(work).rglob(f"*/{name}/output/toy/run.json"))
            record = json.loads(runs[0].read_text()) if runs else None
            status = (f"{sum(c['passed'] for c in record['checks'])}/{len(record['checks'])} passed"
                      if record else f"[red]exit {proc.returncode}[/]")
            table.add_row(name, f"{elapsed:.1f}", f"{record['wall_time_s']:.1f}" if record else "-", status)
    table.add_row("[bold]total[/]", f"{total:.1f}", "", "")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
