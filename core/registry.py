"""Module discovery and validation.

Every `module.py` under `pre_train/` and `post_train/` defines `MODULE = Module(...)`. The registry
imports each one, checks it against the contract (DESIGN.md) and keeps going when one is broken:
a broken manifest is reported with its path and the rest still list.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.checks import Check
from core.config import ConfigError, undeclared, validate as validate_config
from core.contract import BriefTextError, parse_brief_text
from core.contract import BankError, parse_bank
from core.contract import BugsError, PlantedBug, parse_bugs
from core.errors import UserError
from core.paths import ROOT

SEARCH_ROOTS = ("pre_train", "post_train")
REQUIRED_PRESETS = ("toy", "default")


@dataclass
class Module:
    name: str
    category: str
    title: str
    summary: str
    presets: dict[str, Any]
    """preset name -> an instance of the module's Config dataclass"""
    run: Callable[[Any, Any], dict[str, float]]
    """run(config, ctx) -> metrics; reports every key of `metrics`"""
    metrics: dict[str, str]
    """metric name -> what it measures"""
    checks: list[Check]
    depends: tuple[str, ...] = ()
    threads: int | None = None
    """torch CPU threads the module runs with unless --threads says otherwise (None: one for a toy run,
    the idle cores otherwise: core/run_context.default_threads). Tiny networks run faster on one
    thread, and then results do not depend on the core count."""
    produces_lm: bool = False
    """the run leaves a causal LM in models/<preset>/ (core/nn/model.save_model + its tokenizer): the
    eval module puts every such model on its leaderboard, so a new stage adds a row by saying so here"""
    interview_weight: int = 3
    """how much interviewers for LLM/RLHF roles weigh the topic, 1..5: 5 asked in nearly every such
    interview (attention, tokenizers, pretraining, SFT, PPO, GRPO), 4 often, 3 regularly or as the
    ground a 5 stands on (the value when undeclared), 2 as background, 1 rarely. The 14-day roadmap
    (learning/roadmap.py) shares out its days by these weights and drills weight/5 of a module's
    deeper questions."""
    interview_outcome: str = ""
    """what the learner can say or do once the module is studied, in a sentence or two: its roadmap
    day's outcome (the summary stands in while it is empty)"""
    path: Path = field(default=ROOT)
    """the module's folder; set by the registry"""

    @property
    def config_class(self) -> type:
        return type(self.presets["default"])

    @property
    def rel_path(self) -> Path:
        return self.path.relative_to(ROOT)

    @property
    def bugs(self) -> list[PlantedBug]:
        """The plausible bugs planted by core/planted_bugs.py (bugs.toml; the registry validated it)."""
        return parse_bugs(self.path / "bugs.toml", self.name)


@dataclass
class BrokenModule:
    path: Path
    error: str


class UnknownModule(UserError, LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        self.suggestions = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"unknown module {name!r}.{hint} Known modules: {', '.join(known)}")


def _import_manifest(path: Path, root: Path) -> Any:
    """Import `root/a/b/module.py` as `a.b.module`; the folders are namespace packages, so a
    module's `from .code.x import ...` resolves inside its own folder."""
    dotted = ".".join(path.relative_to(root).with_suffix("").parts)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(dotted)


def validate(module: Any, path: Path) -> list[str]:
    """Contract violations of one manifest (empty when it is valid)."""
    if not isinstance(module, Module):
        return [f"MODULE must be a core.registry.Module, got {type(module).__name__}"]
    folder = path.parent
    errors = []
    if module.category != folder.parent.name:
        errors.append(f"category {module.category!r} does not match its folder {folder.parent.name!r}")
    for required in ("README.md", "questions.toml", "brief.toml", "bugs.toml"):
        if not (folder / required).is_file():
            errors.append(f"missing {required}")
    if (folder / "questions.toml").is_file():
        errors.extend(_validate_questions(folder / "questions.toml", module.name))
    if (folder / "brief.toml").is_file():
        try:
            parse_brief_text(folder / "brief.toml", module.metrics, [c.describe() for c in module.checks])
        except BriefTextError as exc:
            errors.append(f"brief.toml: {exc}")
    if (folder / "bugs.toml").is_file():
        errors.extend(_validate_bugs(folder / "bugs.toml", module))
    for preset in REQUIRED_PRESETS:
        if preset not in module.presets:
            errors.append(f"missing preset {preset!r}")
    classes = {type(p) for p in module.presets.values()}
    if len(classes) != 1 or not all(dataclasses.is_dataclass(p) for p in module.presets.values()):
        errors.append("presets must all be instances of one dataclass")
    else:
        cls = classes.pop()
        if "seed" not in {f.name for f in dataclasses.fields(cls)}:
            errors.append("the config dataclass needs a `seed: int` field")
        if undeclared(cls):
            errors.append(f"config fields that do not declare their valid values: {', '.join(undeclared(cls))}")
        for preset_name, preset in module.presets.items():
            try:
                validate_config(preset)
            except ConfigError as exc:
                errors.append(f"preset {preset_name!r} is not valid: {exc}")
    if type(module.interview_weight) is not int or not 1 <= module.interview_weight <= 5:
        errors.append(f"interview_weight must be an int in 1..5, got {module.interview_weight!r}")
    if not isinstance(module.interview_outcome, str):
        errors.append(f"interview_outcome must be text, got {type(module.interview_outcome).__name__}")
    for check in module.checks:
        for name in filter(None, (check.metric, check.ref)):
            if name not in module.metrics:
                errors.append(f"check {check.describe()!r} names {name!r}, which is not a reported metric")
        for preset in check.presets or ():
            if preset not in module.presets:
                errors.append(f"check {check.describe()!r} names unknown preset {preset!r}")
    return errors


def _validate_questions(path: Path, module_name: str) -> list[str]:
    try:
        parse_bank(path, module_name)
    except BankError as exc:
        return [f"questions.toml: {exc}"]
    return []


def _validate_bugs(path: Path, module: Module) -> list[str]:
    try:
        bugs = parse_bugs(path, module.name)
    except BugsError as exc:
        return [f"bugs.toml: {exc}"]
    toy_checks = {c.metric for c in module.checks if c.presets is None or "toy" in c.presets}
    return [f"bugs.toml: bug {bug.id!r} names check {metric!r}, which is not a check of the toy preset"
            for bug in bugs for kind, metric in bug.catchers() if kind == "check" and metric not in toy_checks]


@dataclass
class Registry:
    modules: dict[str, Module]
    broken: list[BrokenModule]

    def get(self, name: str) -> Module:
        if name not in self.modules:
            raise UnknownModule(name, sorted(self.modules))
        return self.modules[name]


def discover(root: Path = ROOT) -> Registry:
    modules: dict[str, Module] = {}
    broken: list[BrokenModule] = []
    manifests = sorted(p for top in SEARCH_ROOTS for p in (root / top).rglob("module.py"))
    for path in manifests:
        try:
            manifest = getattr(_import_manifest(path, root), "MODULE", None)
        except Exception:
            broken.append(BrokenModule(path, "import failed:\n" + traceback.format_exc(limit=-3)))
            continue
        if manifest is None:
            broken.append(BrokenModule(path, "module.py defines no MODULE"))
            continue
        try:
            errors = validate(manifest, path)
        except Exception:  # e.g. a config annotation that names something never imported
            errors = ["validation failed:\n" + traceback.format_exc(limit=-3)]
        if not errors and manifest.name in modules:
            errors = [f"name {manifest.name!r} already used by {modules[manifest.name].path}"]
        if errors:
            broken.append(BrokenModule(path, "; ".join(errors)))
            continue
        manifest.path = path.parent
        modules[manifest.name] = manifest
    for module in list(modules.values()):
        unknown = [d for d in module.depends if d not in modules]
        if unknown:
            broken.append(BrokenModule(module.path / "module.py", f"depends on unknown modules {unknown}"))
            del modules[module.name]
    return Registry(dict(sorted(modules.items())), broken)
