"""Planted bugs: proof that a module's checks and tests can fail.

Each bug in a module's bugs.toml (format: core/contract.py) is planted in a scratch copy of the
repository, its `find` text replaced by the wrong version, and every catcher the bug names runs in
that copy:

    check:<metric>     the module's toy preset runs; that check must fail
    test:<node id>     that pytest test runs; it must fail

A bug that a catcher lets through is a survivor: that check or test cannot tell the broken
algorithm from the right one. A mutated run that crashes is not a catch either (a plausible bug
runs and gives wrong numbers; a crash means the planted text is wrong).

`scripts/plant_bugs.py` runs every catcher a bug names. The test suite runs the quickest sufficient
proof (`sufficient_catchers`): a bug's tests when it names any, its checks otherwise. A check catcher
costs a whole toy run, and most bugs name a targeted test beside the check, so this keeps the suite's
planted-bug part to about half its time while every bug is still proven caught on every commit.

The checkout is never touched. The copy runs with PYTHONPATH set to itself, ahead of the editable
install, and with one torch thread per process, so hunts run side by side on a small machine. Each
run is forked from a process with torch already imported (core/preloaded.py): ~4 s less per run.
"""
from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from xml.etree import ElementTree

from core import preloaded
from core.artifacts import read_json
from core.contract import PLANTED_ENV, PlantedBug
from core.paths import ROOT, pretrained_cache
from core.registry import Module

COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info",
                                     "output", "checkpoints", "*.png")
"""what the scratch copy leaves out: generated files and environments (the copy is ~3 MB)"""
CATCHER_TIMEOUT_S = 900


@dataclass(frozen=True)
class Verdict:
    catcher: str
    caught: bool
    detail: str
    """what the catcher saw: the failed check's value, the failing test, or why it did not catch"""


@dataclass(frozen=True)
class Hunt:
    bug: PlantedBug
    verdicts: tuple[Verdict, ...]

    @property
    def caught(self) -> bool:
        return all(v.caught for v in self.verdicts)


def plant(bug: PlantedBug, tree: Path) -> None:
    """Replace the bug's `find` text by its wrong version in `tree` (a copy of the repository)."""
    path = tree / bug.file
    text = path.read_text(encoding="utf-8")
    if text.count(bug.find) != 1:
        raise ValueError(f"{bug.module}/{bug.id}: `find` occurs {text.count(bug.find)} times in {bug.file}")
    mutated = text.replace(bug.find, bug.replace)
    if path.suffix == ".py":
        compile(mutated, str(path), "exec")  # a planted bug must still be Python
    path.write_text(mutated, encoding="utf-8")


def sufficient_catchers(bug: PlantedBug) -> tuple[str, ...]:
    """The catchers that prove `bug` caught most cheaply: its tests (one pytest process of targeted
    tests), or its checks (a toy run) when it names no test."""
    tests = tuple(c for c in bug.caught_by if c.startswith("test:"))
    return tests or bug.caught_by


def hunt(module: Module, bug: PlantedBug, upstream: Path | None = None, only: tuple[str, ...] | None = None) -> Hunt:
    """Plant `bug` in a scratch copy and run every catcher it names, or those of `only` (a subset, e.g.
    sufficient_catchers(bug)). `upstream`: a work dir holding the toy runs of the modules this one depends
    on (copied in, so a chained module starts at once)."""
    catchers = bug.caught_by if only is None else only
    with tempfile.TemporaryDirectory(prefix=f"planted-{module.name}-") as tmp:
        tree, work = Path(tmp) / "repo", Path(tmp) / "work"
        shutil.copytree(ROOT, tree, ignore=COPY_IGNORE)
        plant(bug, tree)
        if upstream is not None:
            shutil.copytree(upstream, work, dirs_exist_ok=True, symlinks=True)
        shutil.rmtree(work / module.rel_path / "output" / "toy", ignore_errors=True)  # no stale run.json
        work.mkdir(exist_ok=True)
        env = {**os.environ, "FINETUNE_WORKDIR": str(work), "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
               PLANTED_ENV: f"{module.name}/{bug.id}"}
        if not bug.file.startswith("core/"):
            # the frozen pretrained models (core/paths.py) are built by core/ code only: a bug planted
            # elsewhere cannot change them, so the copy reads the launcher's cache instead of pretraining
            env["FINETUNE_PRETRAINED_CACHE"] = str(pretrained_cache())
        found: dict[str, Verdict] = {}
        named = [c.split(":", 1) for c in catchers]
        checks = [target for kind, target in named if kind == "check"]
        tests = [target for kind, target in named if kind == "test"]
        if checks:  # one toy run answers every check catcher
            found.update(_toy_verdicts(module, checks, tree, work, env))
        if tests:   # one pytest process runs every test catcher
            found.update(_test_verdicts(tests, tree, env, Path(tmp)))
    return Hunt(bug, tuple(found[catcher] for catcher in catchers))


def _run(argv: list[str], tree: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """`python *argv` in the copy: (exit status or None on a timeout, the last lines of the output)."""
    status, output = preloaded.run(argv, tree, env, CATCHER_TIMEOUT_S)
    if status is None:
        return None, f"timed out after {CATCHER_TIMEOUT_S} s"
    return status, " | ".join(output.strip().splitlines()[-3:])


def _toy_verdicts(module: Module, metrics: list[str], tree: Path, work: Path, env: dict[str, str]) -> dict[str, Verdict]:
    status, tail = _run(["run.py", "--module", module.name, "--toy"], tree, env)
    run_json = work / module.rel_path / "output" / "toy" / "run.json"
    checks = read_json(run_json)["checks"] if run_json.exists() else None
    verdicts = {}
    for metric in metrics:
        name = f"check:{metric}"
        if checks is None:
            verdicts[name] = Verdict(name, False, f"the toy run crashed (exit {status}): {tail}")
            continue
        results = [c for c in checks if c["metric"] == metric]
        failed = [c for c in results if not c["passed"]]
        if not results:
            verdicts[name] = Verdict(name, False, f"no check on {metric!r} ran in the toy preset")
        elif failed:
            verdicts[name] = Verdict(name, True, "; ".join(
                f"{c['metric']} = {_fmt(c['actual'])}, needs {c['op']} {_fmt(c['target'])}" for c in failed))
        else:
            verdicts[name] = Verdict(name, False, "survived: " + "; ".join(
                f"{c['metric']} = {_fmt(c['actual'])} passes {c['op']} {_fmt(c['target'])}" for c in results))
    return verdicts


def _test_verdicts(nodes: list[str], tree: Path, env: dict[str, str], tmp: Path) -> dict[str, Verdict]:
    report = tmp / "junit.xml"
    status, tail = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                         str(tmp / "pytest"), f"--junitxml={report}", *nodes], tree, env)
    outcomes = _junit_outcomes(report) if report.exists() else {}
    verdicts = {}
    for node in nodes:
        name, outcome = f"test:{node}", _outcome(outcomes, *_junit_key(node))
        if outcome == "failed":
            verdicts[name] = Verdict(name, True, "the test fails")
        elif outcome == "passed":
            verdicts[name] = Verdict(name, False, "survived: the test passes with the bug planted")
        else:
            verdicts[name] = Verdict(name, False, f"the test did not run ({outcome or 'not collected'}; "
                                                  f"pytest exit {status}): {tail}")
    return verdicts


def _junit_key(node: str) -> tuple[str, str]:
    """tests/test_x.py::TestA::test_b[1] -> ("tests.test_x.TestA", "test_b[1]"), junit's naming."""
    path, *names = node.split("::")
    return ".".join([path.removesuffix(".py").replace("/", "."), *names[:-1]]), names[-1]


def _outcome(outcomes: dict[tuple[str, str], str], classname: str, name: str) -> str | None:
    """The node's outcome; a node without [params] stands for all its parametrised cases (failed if one fails)."""
    cases = [o for (c, n), o in outcomes.items() if c == classname and (n == name or n.startswith(name + "["))]
    for outcome in ("failed", "error", "passed", "skipped"):
        if outcome in cases:
            return outcome
    return None


def _junit_outcomes(report: Path) -> dict[tuple[str, str], str]:
    """(classname, name) -> passed / failed / error / skipped, from a pytest --junitxml report."""
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds
                   else "skipped" if "skipped" in kinds else "passed")
        outcomes[(case.get("classname", ""), case.get("name", ""))] = outcome
    return outcomes


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def hunt_all(jobs: Iterable[tuple[Module, PlantedBug, Path | None]], workers: int) -> list[Hunt]:
    """Hunt many bugs side by side (each in its own copy and processes); results in input order."""
    jobs = list(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: hunt(*job), jobs))


def build_upstream(module: Module, folder: Path) -> Path | None:
    """A work dir with the toy runs of `module`'s upstream modules, built from the unmutated checkout
    (once; later calls find them through that dir's run index). None for a module without upstream."""
    if not module.depends:
        return None
    env = {**os.environ, "FINETUNE_WORKDIR": str(folder), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    for name in module.depends:
        index = folder / "output" / "run_index.json"
        if index.exists() and "toy" in read_json(index).get(name, {}):
            continue
        proc = subprocess.run([sys.executable, "run.py", "--module", name, "--toy"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=CATCHER_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"building {name} (toy) for {module.name}'s planted bugs failed:\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return folder


def _diff_lines(find: str, replace: str) -> list[str]:
    """The change as diff lines (unchanged lines as context), dedented together."""
    before, after = find.splitlines(), replace.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in before + after if line.strip()), default=0)
    lines = difflib.unified_diff([line[indent:] for line in before], [line[indent:] for line in after],
                                 lineterm="", n=1000)
    return [line for line in lines if not line.startswith(("---", "+++", "@@"))]


def render_section(module: Module) -> str:
    """The README section "What goes wrong and how you would see it", from the module's bugs.toml."""
    lines = [f"Each bug below is planted by `python scripts/plant_bugs.py --module {module.name}` in a scratch "
             f"copy of the repository, and every check and test named under it must fail. The suite "
             f"(`tests/test_planted_bugs.py`) plants each bug on every run and fails if it survives its tests "
             f"(its checks, for a bug no test names).", ""]
    for i, bug in enumerate(module.bugs, 1):
        diff = ["```diff", f"# {bug.file}", *_diff_lines(bug.find, bug.replace), "```"]
        caught = ", ".join(f"check `{t}` (toy run)" if k == "check" else f"test `{t}`" for k, t in bug.catchers())
        lines += [f"**{i}. {bug.title}.** {bug.symptom.strip()}", "", *diff, "", f"Caught by: {caught}.", ""]
    return "\n".join(lines).rstrip() + "\n"
