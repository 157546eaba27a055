"""Interview briefs: a spoken answer per module, from its brief.toml (the timed text), its manifest
(metrics and their meanings), its question bank (the follow-ups) and the learner's latest run
(found through the run index).

All wording lives in learning/templates/: brief.md.j2 (one module), index.md.j2 (the run-status table),
briefs.html.j2 (one offline page) and labels.toml (every fixed heading, in each language). The
templates use StrictUndefined, and a brief.toml's ran_aloud sentences fail the same way, so a run that
lacks a metric the manifest declares fails loudly instead of printing a blank.

A brief in another language than the manifest's (Chinese) quotes the metric meanings and check whys
from brief.toml's translation tables and the follow-up questions from the bank's Chinese fields. Where
one is missing it quotes the English and says so in one line at the top: never a silent mix.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from jinja2 import Environment, FileSystemLoader, StrictUndefined, UndefinedError, select_autoescape
from markdown_it import MarkdownIt

from core.artifacts import atomic_write_text
from core.config import to_dict
from core.contract import LANGS, MANIFEST_LANG, SECTION_SECONDS, Question, parse_brief_text
from core.errors import UserError
from core.paths import workdir
from core.registry import Module, Registry
from core.run_context import latest_run, read_run_index
from learning.grader import readable_claim
from learning.questions import load_bank

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Typical interview pace: ~150 English words or ~240 Chinese characters a minute.
WORDS_PER_SECOND = 2.5
HANZI_PER_SECOND = 4.0
_HANZI = re.compile(r"[\u4e00-\u9fff]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['.-][A-Za-z0-9]+)*")

RUN_SECTION_SECONDS = 60
FOLLOW_UP_COUNT = 3
FORMATS = ("md", "html")


class BriefError(UserError, ValueError):
    """A brief that cannot be made (unknown preset, a run that does not fill the template)."""


class OutputError(UserError):
    """A place the briefs cannot be written to; the message names it and says why."""


def check_output(path: Path, folder: bool = False) -> Path:
    """Raise OutputError unless a file (or, with `folder`, files in a folder) can be written at `path`:
    checked before anything is rendered, so a typo in --out costs nothing. What is checked: the path
    is not a folder (a file) or a file (a folder), its nearest existing parent is a folder, and that
    folder is writable."""
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise OutputError(f"{path}: is {'a file' if folder else 'a folder'}; give the path of a {kind} to write")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write the {kind} there: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write the {kind} there: {parent} is not writable")
    return path


def write_text(path: Path, text: str) -> Path:
    """atomic_write_text, with what the file system refuses reported as OutputError naming the file."""
    try:
        return atomic_write_text(path, text)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write it: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else "")) from None


def format_number(value: Any) -> str:
    """Numbers as the brief quotes them: floats to 4 significant digits, lists item by item.
    Anything else goes through str(), so a StrictUndefined (a missing metric) raises here."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(format_number, value))
    if value is None:  # run.json stores NaN and inf as null
        return "—"
    return str(value)


def format_when(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def table_cell(text: str) -> str:
    """Free text inside a Markdown table row: a pipe would start a new column."""
    return " ".join(str(text).split()).replace("|", "\\|")


class _RunMetrics(dict):
    """A run's metrics as a ran_aloud text's placeholders see them: a metric the run lacks raises
    UndefinedError, as it would in a template, so brief_for names it with the command for a new run."""

    def __missing__(self, name: str) -> Any:
        raise UndefinedError(f"the run has no metric {name!r}")


class _NoValue:
    """A metric run.json stores as null (NaN or inf): said as a dash, whatever its format spec."""

    def __format__(self, spec: str) -> str:
        return "—"


def say_aloud(template: str, metrics: dict[str, Any]) -> str:
    """brief.toml's ran_aloud with the run's numbers put in: {name:format spec}, as str.format."""
    return template.format_map(_RunMetrics({k: _NoValue() if v is None else v for k, v in metrics.items()}))


_env = Environment(
    loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, keep_trailing_newline=True,
    trim_blocks=True, lstrip_blocks=True,
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False, default=False),
)
_env.filters.update(num=format_number, when=format_when, cell=table_cell, aloud=say_aloud)
# raw HTML in a brief's text is shown as text, not interpreted: the page stays well-formed
_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")


@functools.cache
def labels(lang: str) -> dict[str, str]:
    if lang not in LANGS:
        raise BriefError(f"unknown language {lang!r}; choose one of {', '.join(LANGS)}")
    return tomllib.loads((TEMPLATES / "labels.toml").read_text(encoding="utf-8"))[lang]


# --- the run a brief quotes ---------------------------------------------------------------------
@dataclass
class LatestRun:
    preset: str
    requested: bool
    """the preset was asked for (--preset), not chosen as the most recent one"""
    record: dict[str, Any] | None
    """run.json, or None when this preset has not run yet"""
    out_dir: str | None
    """the run's output folder, relative to the work dir"""


def find_latest_run(module: Module, preset: str | None = None) -> LatestRun:
    """The latest run at `preset`; without one, the latest run of whichever preset ran most
    recently (by the index's finished_at), and `toy` when nothing has run yet."""
    entries = read_run_index().get(module.name, {})
    if preset is not None and preset not in module.presets:
        raise BriefError(f"module {module.name!r} has no preset {preset!r}; presets: {', '.join(module.presets)}")
    chosen = preset
    if chosen is None:
        ran = [p for p in module.presets if p in entries]
        chosen = max(ran, key=lambda p: datetime.fromisoformat(entries[p]["finished_at"])) if ran else "toy"
    record = latest_run(module.name, chosen)
    out_dir = entries[chosen]["out_dir"] if record is not None else None
    return LatestRun(chosen, preset is not None, record, out_dir)


def run_command(module_name: str, preset: str, overrides: Iterable[str] = (), seed: int | None = None) -> str:
    """The run.py command line that produces such a run."""
    words = ["python", "run.py", "--module", module_name, "--toy" if preset == "toy" else f"--preset {preset}"]
    words += [f"--set {shlex.quote(o)}" for o in overrides]
    words += [f"--seed {seed}"] if seed is not None else []
    return " ".join(words)


def _as_json(value: Any) -> Any:
    """The form run.json stores values in (tuples as lists), so presets and runs compare equal."""
    return json.loads(json.dumps(value, default=str))


def config_facts(module: Module, preset: str, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple]]:
    """What a brief says about a run's config, out of all its fields: (1) the fields whose values
    differ between the module's presets, i.e. what makes this preset this preset (its size knobs),
    with the run's values; (2) every field the learner changed from the preset: (run value,
    preset value)."""
    presets = [_as_json(to_dict(p)) for p in module.presets.values()]
    shipped = _as_json(to_dict(module.presets[preset]))
    distinctive = {k: v for k, v in config.items() if len({json.dumps(p.get(k)) for p in presets}) > 1}
    changed = {k: (v, shipped[k]) for k, v in config.items() if k in shipped and shipped[k] != v}
    return distinctive, changed


def _reproducing_command(module: Module, latest: LatestRun) -> str:
    record = latest.record
    if record is None:
        return run_command(module.name, latest.preset)
    seed_was_set = record["seed"] != module.presets[latest.preset].seed
    seed_in_overrides = any(o.split("=", 1)[0].strip() == "seed" for o in record["overrides"])
    return run_command(module.name, latest.preset, record["overrides"],
                       record["seed"] if seed_was_set and not seed_in_overrides else None)


def follow_up_questions(module: Module, count: int = FOLLOW_UP_COUNT) -> list[Question]:
    """The deepest questions first (level 3 design/trade-off, then 2, then 1), ties in bank order:
    the follow-ups an interviewer asks after a good first answer."""
    return sorted(load_bank(module), key=lambda q: -q.level)[:count]


# --- rendering ----------------------------------------------------------------------------------
@dataclass
class Localized:
    """What a brief quotes from the manifest, the run and the bank, in the brief's language."""
    checks: list[dict[str, Any]]
    """the run's checks, each with its `why` translated"""
    meanings: dict[str, str]
    """metric name -> what it measures"""
    follow_ups: list[dict[str, Any]]
    """id, level, q and key_points (readable claims) of each follow-up question"""
    english: dict[str, list[str]]
    """the parts left in English for want of a translation: kind (check, metric, question,
    key_points) -> their names, in the order the brief shows them"""


def localize(module: Module, lang: str, text: dict[str, Any], record: dict[str, Any] | None) -> Localized:
    """The module's English texts in `lang`: brief.toml's translation tables for the metric meanings
    and the check whys (keyed by metric name and by the check as run.json names it), the bank's Chinese
    fields for the questions. A run older than its manifest may hold a check no table translates."""
    english: dict[str, list[str]] = {}

    def say(kind: str, name: str, source: Any, translated: Any) -> Any:
        if lang == MANIFEST_LANG:
            return source
        if not translated:
            english.setdefault(kind, []).append(name)
        return translated or source

    whys, metric_meanings = text.get("checks", {}), text.get("metrics", {})  # absent in MANIFEST_LANG
    checks = [{**c, "why": say("check", c["check"], c["why"], whys.get(c["check"]))}
              for c in (record["checks"] if record else [])]
    meanings = {name: say("metric", name, meaning, metric_meanings.get(name))
                for name, meaning in module.metrics.items()}
    in_chinese = lang == "zh"  # the bank's only translation (core/contract.Question)
    follow_ups = [{"id": q.id, "level": q.level,
                   "q": say("question", q.id, q.q, q.q_zh if in_chinese else None),
                   "key_points": [readable_claim(k) for k in say("key_points", q.id, q.key_points,
                                                                 q.key_points_zh if in_chinese else None)]}
                  for q in follow_up_questions(module)]
    return Localized(checks, meanings, follow_ups, english)


def english_note(lang: str, english: dict[str, list[str]]) -> str:
    """The one line that says which parts of a brief are still in English ("" when none are)."""
    if not english:
        return ""
    t = labels(lang)
    parts = [t[f"english_{kind}"].format(names=t["list_sep"].join(f"`{name}`" for name in names))
             for kind, names in english.items()]
    return t["still_english"].format(parts=t["item_sep"].join(parts))


def render_brief(module: Module, lang: str, latest: LatestRun) -> str:
    """The Markdown brief; raises jinja2.UndefinedError when the run lacks something the
    template or the ran_aloud sentences quote (e.g. a metric the manifest declares but the run
    did not report)."""
    record = latest.record
    distinctive, changed = config_facts(module, latest.preset, record["config"]) if record else ({}, {})
    plots = [f"{latest.out_dir}/{name}" for name in record["artifacts"] if name.endswith(".png")] if record else []
    text = parse_brief_text(module.path / "brief.toml")[lang]
    local = localize(module, lang, text, record)
    return _env.get_template("brief.md.j2").render(
        t=labels(lang), module=module, readme=(module.rel_path / "README.md").as_posix(), text=text,
        title=text.get("title", module.title),  # brief.toml translates module.py's title (contract: required)
        seconds={**SECTION_SECONDS, "what_i_ran": RUN_SECTION_SECONDS},
        preset=latest.preset, requested_preset=latest.requested, run=record,
        command=_reproducing_command(module, latest), distinctive=distinctive, changed=changed,
        plots=plots, checks=local.checks, meanings=local.meanings, follow_ups=local.follow_ups,
        english_note=english_note(lang, local.english),
    )


@dataclass
class ModuleBrief:
    module: Module
    latest: LatestRun
    markdown: str


def brief_for(module: Module, lang: str, preset: str | None = None) -> ModuleBrief:
    """The brief of `module` from its latest run; BriefError (with the command that makes a fresh
    run) when that run cannot fill the template."""
    latest = find_latest_run(module, preset)
    try:
        return ModuleBrief(module, latest, render_brief(module, lang, latest))
    except UndefinedError as exc:
        raise BriefError(f"{module.name}: the latest {latest.preset} run ({latest.record['run_id']}) cannot fill the "
                         f"brief: {exc}. If the module changed since that run, run it again: "
                         f"{run_command(module.name, latest.preset)}") from exc


def render_index(briefs: list[ModuleBrief], lang: str, link: Callable[[str], str]) -> str:
    rows = [{"name": b.module.name, "preset": b.latest.preset, "run": b.latest.record, "link": link(b.module.name)}
            for b in briefs]
    return _env.get_template("index.md.j2").render(
        t=labels(lang), rows=rows, generated=datetime.now(timezone.utc).isoformat())


def render_html(briefs: list[ModuleBrief], lang: str) -> str:
    """One page that opens offline: the index (links jump to the briefs below) and each brief,
    with its run's plots embedded as base64 data URIs."""
    sections = [{"name": b.module.name, "html": _markdown.render(b.markdown), "plots": _embedded_plots(b.latest)}
                for b in briefs]
    index_html = _markdown.render(render_index(briefs, lang, link=lambda name: f"#{name}"))
    return _env.get_template("briefs.html.j2").render(t=labels(lang), lang=lang, index_html=index_html,
                                                      sections=sections)


def _embedded_plots(latest: LatestRun) -> list[dict[str, str]]:
    if latest.record is None:
        return []
    plots = []
    for name in latest.record["artifacts"]:
        path = workdir() / latest.out_dir / name
        if name.endswith(".png") and path.is_file():  # a plot deleted since the run is only listed
            plots.append({"path": f"{latest.out_dir}/{name}", "base64": base64.b64encode(path.read_bytes()).decode()})
    return plots


def export_briefs(registry: Registry, out_dir: Path, lang: str, formats: Iterable[str]) -> list[Path]:
    """Every module's brief as <name>.md plus index.md ("md"), and/or one briefs.html ("html").
    All briefs are rendered before anything is written, so a failing one leaves the folder as it was;
    a folder that cannot be written is reported (OutputError) before anything is rendered."""
    check_output(out_dir, folder=True)
    briefs = [brief_for(module, lang) for module in registry.modules.values()]
    written = []
    if "md" in formats:
        written += [write_text(out_dir / f"{b.module.name}.md", b.markdown) for b in briefs]
        index = render_index(briefs, lang, link=lambda name: f"{name}.md")
        written.append(write_text(out_dir / "index.md", index))
    if "html" in formats:
        written.append(write_text(out_dir / "briefs.html", render_html(briefs, lang)))
    return written


def speaking_seconds(text: str) -> float:
    """Rough time to say `text` aloud; Chinese characters and Latin words are counted separately,
    so Chinese text with English terms in it is estimated too."""
    return len(_HANZI.findall(text)) / HANZI_PER_SECOND + len(_WORD.findall(text)) / WORDS_PER_SECOND
