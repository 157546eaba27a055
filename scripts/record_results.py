#!/usr/bin/env python
"""Record the key figures of a module's runs in assets/results/<module>.json (core/results.py).

    python scripts/record_results.py --module ppo                 # the latest toy and default runs in the work dir
    python scripts/record_results.py --module ppo --run           # run them first, then record
    python scripts/record_results.py --all --run                  # every module, chained ones in chain order
    python scripts/record_results.py --module cql --run --seeds 0,1,2   # also default@seed1, default@seed2
    python scripts/record_results.py --module cql --run --seeds 0,1,2 --missing   # only the runs not yet recorded

A record keeps the runs it already had (a refresh with --run re-runs exactly those) and adds the ones
asked for. Runs go to the work dir like any run (FINETUNE_WORKDIR). Every README figure must come from
a record: tests/test_published_figures.py. Exit status (core/cli.py): 0 recorded, 1 a run failed its
checks (its figures are recorded anyway, marked), 2 bad input (an unknown module, a bad --seeds, a
corrupt record or run.json) or no run to record, 3 an internal error (traceback in
output/crash/record_results.log), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.artifacts import write_json  # noqa: E402
from core.cli import Parser, crash_log, guard  # noqa: E402
from core.paths import workdir  # noqa: E402
from core.registry import Module, discover  # noqa: E402
from core.results import load_record, record_path, run_record  # noqa: E402


def variants(module: Module, seeds: list[int], missing: bool = False) -> list[str]:
    """Run keys: "toy", "default", and "default@seedN" for each extra seed; plus those already recorded,
    or, if `missing`, only the asked-for keys the record lacks."""
    keys = ["toy", "default", *(f"default@seed{s}" for s in seeds if s != module.presets["default"].seed)]
    old = load_record(module.name) or {"runs": {}}
    if missing:
        return [k for k in keys if k not in old["runs"]]
    return list(dict.fromkeys([*keys, *old["runs"]]))


def run_variant(module: Module, key: str, threads: int | None) -> int:
    preset, _, seed = key.partition("@seed")
    cmd = [sys.executable, "run.py", "--module", module.name, "--preset", preset, *(["--seed", seed] if seed else []),
           *(["--threads", str(threads)] if threads else [])]
    print("$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def record(module: Module, keys: list[str], run: bool, threads: int | None = None) -> int:
    old = load_record(module.name) or {"runs": {}}
    runs, status = dict(old["runs"]), 0
    for key in keys:
        if run and run_variant(module, key, threads) not in (0, 1):
            print(f"{module.name} {key}: the run did not finish; its record is left as it was", file=sys.stderr)
            status = 2
            continue
        run_json = workdir() / module.rel_path / "output" / key.partition("@")[0] / "run.json"
        if not run_json.exists():
            print(f"{module.name} {key}: no run in {run_json.parent}; run it or pass --run", file=sys.stderr)
            status = 2
            continue
        latest = run_record(run_json)
        wanted_seed = int(key.partition("@seed")[2] or module.presets["default" if "@" in key else key].seed)
        if latest["seed"] != wanted_seed or latest["overrides"]:
            print(f"{module.name} {key}: the latest run has seed {latest['seed']} and overrides "
                  f"{latest['overrides']}; rerun it with --run (the record keeps what it had)", file=sys.stderr)
            status = 2
            continue
        runs[key] = latest
        if runs[key]["status"] != "passed":
            status = max(status, 1)
    write_json(record_path(module.name), {"module": module.name, "runs": dict(sorted(runs.items()))})
    print(f"recorded {module.name}: {', '.join(sorted(runs))} -> {os.path.relpath(record_path(module.name), ROOT)}")
    return status


def chain_order(modules: list[Module]) -> list[Module]:
    """Upstream modules first, so a chained run finds the fresh upstream instead of an old one."""
    names = {m.name: m for m in modules}
    ordered: list[Module] = []
    def visit(m: Module) -> None:
        if m in ordered:
            return
        for dep in m.depends:
            if dep in names:
                visit(names[dep])
        ordered.append(m)
    for m in modules:
        visit(m)
    return ordered


def seed_list(text: str) -> list[int]:
    """--seeds: comma-separated non-negative integers ("" for none)."""
    seeds = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        try:
            seeds.append(int(word))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{word!r} is not an integer (expected e.g. 0,1,2)") from None
        if seeds[-1] < 0:
            raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {word}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py (a corrupt record or run.json is a UserError naming the file)."""
    return guard(lambda: record_all(argv), crash_log=crash_log("record_results"))


def record_all(argv: list[str] | None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", default=[], help="module name (repeatable)")
    parser.add_argument("--all", action="store_true", help="every module")
    parser.add_argument("--run", action="store_true", help="run the presets first")
    parser.add_argument("--seeds", type=seed_list, default=[], help="extra default-preset seeds to record, e.g. 0,1,2")
    parser.add_argument("--missing", action="store_true", help="only the runs the record lacks (with --run: "
                                                               "run just those, keep the rest as recorded)")
    parser.add_argument("--threads", type=int, default=None,
                        help="with --run: torch threads for every run (default: each module's choice)")
    args = parser.parse_args(argv)
    registry = discover()
    modules = list(registry.modules.values()) if args.all else [registry.get(n) for n in args.module]
    if not modules:
        parser.error("name a --module or pass --all")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return max(record(m, variants(m, args.seeds, args.missing), args.run, args.threads) for m in chain_order(modules))


if __name__ == "__main__":
    sys.exit(main())
