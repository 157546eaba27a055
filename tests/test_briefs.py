"""Interview briefs: the learner's own numbers appear, missing ones fail loudly, both languages
render (every module, from its recorded runs; Chinese whole or saying which parts are English), the
export writes every module (Markdown and one well-formed offline HTML page)."""
from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from jinja2 import UndefinedError

from core import artifacts
from core.contract import LANGS, MANIFEST_LANG, SECTION_SECONDS, BriefTextError, aloud_metrics, parse_brief_text
from core.registry import discover
from core.results import load_record
from core.run_context import execute, latest_run
from learning import briefs
from learning.briefs import (RUN_SECTION_SECONDS, BriefError, LatestRun, brief_for, find_latest_run, follow_up_questions,
                             format_number, labels, localize, render_brief, say_aloud, speaking_seconds,
                             table_cell)
from learning.grader import readable_claim
from learning.questions import load_bank

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import export_interview_briefs  # noqa: E402
import interview_brief  # noqa: E402


@pytest.fixture(scope="module")
def mdp_run_workdir(registry, tmp_path_factory) -> Path:
    """A work dir holding one fixture run, made once for this file (a run takes seconds)."""
    folder = tmp_path_factory.mktemp("briefs_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_WORKDIR", str(folder))
        execute(registry.get("mdp"), "toy", ["eval_episodes=200"])
    return folder


@pytest.fixture
def ran(mdp_run_workdir, workdir) -> Path:
    """The work dir of this test, with a private copy of the fixture run in it."""
    shutil.copytree(mdp_run_workdir, workdir, dirs_exist_ok=True)
    return workdir


def test_the_brief_quotes_the_numbers_of_the_latest_run(registry, ran):
    mdp = registry.get("mdp")
    record = latest_run("mdp", "toy")
    brief = brief_for(mdp, "en").markdown

    assert "I ran `python run.py --module mdp --toy --set eval_episodes=200` on" in brief
    passed = sum(c["passed"] for c in record["checks"])
    assert f"passed {passed} of {len(record['checks'])} checks" in brief
    assert "`eval_episodes` = 200 (preset: 2000)" in brief, "the field changed from the preset, with both values"
    for name, value in record["metrics"].items():
        assert f"| `{name}` | {format_number(value)} | " in brief
    success = record["metrics"]["success_rate"]
    assert success * 200 == round(success * 200) and f"| `success_rate` | {format_number(success)} |" in brief
    for check in record["checks"]:
        verdict = "PASS" if check["passed"] else "FAIL"
        assert (f"| {verdict} | `{check['check']}` | {format_number(check['actual'])} | "
                f"{format_number(check['target'])} |") in brief
    for plot in ("values_policy.png", "convergence.png", "success_vs_gamma.png"):
        assert f"- `post_train/rl_basics/mdp/output/toy/{plot}`" in brief
    for label in ("Definition · 30 s", "How it works · 60 s", "What I ran and what it showed · 60 s",
                  "Engineering pitfalls · 30 s"):
        assert label in brief
    m = record["metrics"]
    assert (f"> **In two sentences:** Value iteration and policy iteration agreed on V* to within "
            f"{m['vi_pi_max_abs_diff']:.1e}, and the greedy policy's value at the start is {m['v_start']:.3f}. Played "
            f"in the real environment it reached the goal in {m['success_rate']:.1%} of the episodes, against "
            f"{m['success_rate_model']:.1%} predicted by the model and {m['random_success_rate']:.1%} for a random "
            "policy.\n") in brief, "the two spoken sentences, from this run's numbers"


def test_ran_aloud_fills_in_the_run_numbers_and_a_missing_one_raises():
    metrics = {"accuracy": 0.3277, "steps": 40, "kl": None}
    assert say_aloud("{accuracy:.1%} after {steps} steps, KL {kl:.3f}", metrics) == "32.8% after 40 steps, KL —"
    with pytest.raises(UndefinedError, match="no metric 'reward'"):
        say_aloud("{reward:.2f}", metrics)


def test_key_points_read_as_claims():
    assert readable_claim("critic -> estimates | learns -> V | value") == "critic → estimates / learns → V / value"
    assert readable_claim("A2C -> waits for -> all envs") == "A2C → waits for → all envs"


def test_numbers_are_quoted_to_four_significant_digits():
    assert format_number(0.741) == "0.741"
    assert format_number(8.25367552081957e-12) == "8.254e-12"
    assert format_number(637) == "637" and format_number(True) == "true"
    assert format_number([0.5, 0.99, 1]) == "0.5, 0.99, 1"
    assert format_number(None) == "—", "run.json stores NaN/inf as null"


def test_follow_ups_are_the_three_highest_level_questions_in_bank_order(registry, ran):
    mdp = registry.get("mdp")
    bank = load_bank(mdp)
    chosen = follow_up_questions(mdp)
    top = sorted({q.level for q in bank}, reverse=True)
    expected = [q for level in top for q in bank if q.level == level][:3]
    assert chosen == expected
    brief = brief_for(mdp, "en").markdown
    for i, q in enumerate(chosen, 1):
        assert f"{i}. **{q.q}** (level {q.level}, `{q.id}`)\n   - key points: " \
               f"{'; '.join(map(readable_claim, q.key_points))}\n" in brief


def test_without_a_run_the_brief_says_so_and_gives_the_command(workdir, capsys):
    assert interview_brief.main(["--module", "gae", "--lang", "en"]) == 0
    out = capsys.readouterr().out
    assert "There is no run of this module yet" in out
    assert "```\npython run.py --module gae --toy\n```" in out
    assert interview_brief.main(["--module", "gae", "--lang", "en", "--preset", "default"]) == 0
    out = capsys.readouterr().out
    assert "There is no `default` run of this module yet" in out
    assert "python run.py --module gae --preset default" in out


def test_out_writes_the_same_brief_to_a_file(registry, ran, capsys):
    assert interview_brief.main(["--module", "mdp", "--out", str(ran / "b" / "mdp.md")]) == 0
    assert (ran / "b" / "mdp.md").read_text(encoding="utf-8") == brief_for(registry.get("mdp"), "zh").markdown


def test_a_metric_missing_from_the_run_raises(registry, ran, capsys):
    mdp = registry.get("mdp")
    latest = find_latest_run(mdp)
    del latest.record["metrics"]["success_rate"]
    with pytest.raises(UndefinedError, match="success_rate"):
        render_brief(mdp, "en", latest)

    artifacts.write_json(ran / latest.out_dir / "run.json", latest.record)  # a run older than its manifest
    with pytest.raises(BriefError, match="python run.py --module mdp --toy"):
        brief_for(mdp, "en")
    assert interview_brief.main(["--module", "mdp"]) == 2
    assert "success_rate" in capsys.readouterr().err


def test_timings_are_quoted_when_the_run_has_them_and_older_runs_still_render(registry, ran):
    mdp = registry.get("mdp")
    latest = find_latest_run(mdp)
    assert latest.record["timings"] == {}, "mdp measures no speed"
    assert "Speed and memory" not in render_brief(mdp, "en", latest)
    latest.record["timings"] = {"tokens_per_s": 5286.4, "mfu": 0.4866}
    assert "`tokens_per_s` = 5286, `mfu` = 0.4866" in render_brief(mdp, "en", latest)
    del latest.record["timings"]  # a run.json written before timings existed
    assert "Speed and memory" not in render_brief(mdp, "en", latest)


def test_both_languages_render_from_the_same_sources(registry, ran):
    mdp = registry.get("mdp")
    assert set(labels("zh")) == set(labels("en")), "every label exists in both languages"
    record = latest_run("mdp", "toy")
    for lang in LANGS:
        text = parse_brief_text(mdp.path / "brief.toml")[lang]
        brief = brief_for(mdp, lang).markdown
        assert labels(lang)["what_i_ran"] in brief and text["definition"] in brief and text["comparison_q"] in brief
        assert all(p in brief for p in text["pitfalls"])
        assert format_number(record["metrics"]["v_start"]) in brief
    assert "定义 · 30 秒" in brief_for(mdp, "zh").markdown


def test_every_modules_brief_text_fits_its_speaking_time(registry):
    for module in registry.modules.values():
        for lang, text in parse_brief_text(module.path / "brief.toml").items():
            for key, budget in SECTION_SECONDS.items():
                said = " ".join(text[key]) if isinstance(text[key], list) else text[key]
                assert speaking_seconds(said) <= 1.2 * budget, f"{module.name} [{lang}] {key}: longer than {budget} s"
    assert speaking_seconds("one two three four five") == pytest.approx(2.0)
    assert speaking_seconds("价值迭代 TD") == pytest.approx(1.4)


REGISTRY = discover()


def recorded_run(module, preset: str) -> LatestRun:
    """The module's recorded run at `preset` (assets/results: the metrics of a real run) as run.json
    holds it, its checks evaluated on those metrics by the manifest."""
    run = load_record(module.name)["runs"][preset]
    assert run["overrides"] == [], "a recorded run is the preset as shipped"
    config = module.presets[preset]
    record = {**run, "run_id": f"recorded-{preset}", "artifacts": [],
              "checks": [c.evaluate(run["metrics"]) for c in module.checks if c.applies(preset, config)],
              "checks_skipped": [c.describe() for c in module.checks if not c.applies(preset, config)]}
    return LatestRun(preset, True, record, f"{module.rel_path.as_posix()}/output/{preset}")


def sentences(text: str, lang: str) -> int:
    return text.count("。") if lang == "zh" else len(re.findall(r"[.!?](?=\s|$)", text))


@pytest.mark.parametrize("name", sorted(REGISTRY.modules))
def test_every_module_briefs_in_both_languages_from_its_recorded_runs(name):
    module = REGISTRY.get(name)
    texts = parse_brief_text(module.path / "brief.toml")
    quoted = {lang: aloud_metrics(texts[lang]["ran_aloud"]) for lang in LANGS}
    assert len(set(quoted["en"])) >= 2, "the headline result and what it is compared against"
    assert set(quoted["zh"]) == set(quoted["en"]), "both languages say the same numbers"
    for preset in ("toy", "default"):
        latest = recorded_run(module, preset)
        for lang in LANGS:
            brief = render_brief(module, lang, latest)
            assert brief.startswith(f"# {name} — {texts[lang].get('title', module.title)}\n")
            aloud = say_aloud(texts[lang]["ran_aloud"], latest.record["metrics"])
            assert f"> **{labels(lang)['aloud']}** {aloud}\n" in brief
            assert sentences(aloud, lang) == 2, aloud
            assert speaking_seconds(aloud) <= RUN_SECTION_SECONDS / 2, f"{name} [{lang}]: {speaking_seconds(aloud):.0f} s"
            local = localize(module, lang, texts[lang], latest.record)
            whys = [c["why"] for c in local.checks]
            for check, why in zip(latest.record["checks"], whys):
                assert f"| `{check['check']}` | {format_number(check['actual'])} | {format_number(check['target'])} " \
                       f"| {table_cell(why)} |" in brief
            for metric, meaning in local.meanings.items():
                value = format_number(latest.record["metrics"][metric])
                assert f"| `{metric}` | {value} | {table_cell(meaning)} |" in brief
            if lang == MANIFEST_LANG:
                assert whys == [c["why"] for c in latest.record["checks"]] and local.meanings == module.metrics
                continue
            assert local.meanings == texts[lang]["metrics"]
            assert whys == [texts[lang]["checks"][c["check"]] for c in latest.record["checks"]]
            chosen = follow_up_questions(module)
            assert local.english == {kind: names for kind, names in (
                ("question", [q.id for q in chosen if not q.q_zh]),
                ("key_points", [q.id for q in chosen if not q.key_points_zh])) if names}, \
                "only bank questions not yet translated are English, and the brief says which"
            assert (labels(lang)["still_english"].split("{")[0] in brief) == bool(local.english)


@pytest.mark.parametrize("name", sorted(REGISTRY.modules))
def test_every_module_translates_each_metric_and_check(name):
    module = REGISTRY.get(name)
    parse_brief_text(module.path / "brief.toml", module.metrics, [c.describe() for c in module.checks])


def test_the_contract_names_each_missing_stale_or_unquotable_translation(registry, tmp_path):
    mdp = registry.get("mdp")
    text = (mdp.path / "brief.toml").read_text(encoding="utf-8")
    text = re.sub(r"\nsuccess_z = .*", "", text)                                   # a metric left untranslated
    text = text.replace('"success_rate >= 0.7" =', '"success_rate >= 0.75" =')      # a check whose threshold moved
    text = text.replace("{v_start:.3f}。", "{v_begin:.3f}。")                       # a metric renamed in zh only
    (tmp_path / "brief.toml").write_text(text, encoding="utf-8")
    parse_brief_text(tmp_path / "brief.toml")  # well-formed: the names are checked against a module only
    with pytest.raises(BriefTextError) as error:
        parse_brief_text(tmp_path / "brief.toml", mdp.metrics, [c.describe() for c in mdp.checks])
    problems = str(error.value).split(": ", 1)[1].split("; ")
    assert problems == ["[zh] ran_aloud quotes v_begin, which the module does not report",
                        "[zh.metrics] lacks success_z",
                        "[zh.checks] lacks success_rate >= 0.7",
                        "[zh.checks] translates success_rate >= 0.75, which the module does not have"]

    section = 'definition = "d"\nhow_it_works = "h"\npitfalls = ["p"]\ncomparison_q = "c?"\ncomparison = "c"\n'
    (tmp_path / "brief.toml").write_text(f'[en]\n{section}ran_aloud = "no numbers"\n'
                                         f'[zh]\n{section}ran_aloud = "{{a.b}} {{0}}"\ntitle = 3\n[zh.metrics]\nloss = ""\n')
    with pytest.raises(BriefTextError) as error:
        parse_brief_text(tmp_path / "brief.toml")
    assert str(error.value).split(": ", 1)[1].split("; ") == [
        "[zh] lacks checks", "[zh] ran_aloud placeholders must be metric names: {a.b}, {0}",
        "[zh] title must be a non-empty string", "[zh.metrics] must map each name to a non-empty string",
        "[en] ran_aloud quotes no metric: it is said from the run's numbers ({metric:.3f})"]


def test_a_chinese_brief_says_in_one_line_which_parts_are_still_english(registry, ran, monkeypatch):
    mdp = registry.get("mdp")
    first, second, _ = follow_up_questions(mdp)
    bank = [dataclasses.replace(q, q_zh="今天的题目", key_points_zh=("要点 -> 甲 | 乙",)) for q in load_bank(mdp)]
    monkeypatch.setattr(briefs, "load_bank", lambda module: bank)
    brief = brief_for(mdp, "zh").markdown
    assert "仍是英文" not in brief, "everything has a translation: nothing to say"
    assert f"1. **今天的题目** (等级 {first.level}, `{first.id}`)\n   - 要点: 要点 → 甲 / 乙\n" in brief

    untranslated = {first.id: {"q_zh": "", "key_points_zh": ()}, second.id: {"key_points_zh": ()}}
    monkeypatch.setattr(briefs, "load_bank", lambda module: [dataclasses.replace(q, **untranslated.get(q.id, {}))
                                                             for q in bank])
    latest = find_latest_run(mdp)
    older = next(c for c in latest.record["checks"] if c["check"] == "success_rate >= 0.7")
    older["check"] = "success_rate >= 0.75"  # a run made before the threshold moved: no translation for it
    brief = render_brief(mdp, "zh", latest)
    assert (f"*以下内容还没有中文，仍是英文：检查 `success_rate >= 0.75` 的说明；追问 `{first.id}` 的题目；"
            f"追问 `{first.id}`、`{second.id}` 的要点。*") in brief
    assert f"| {table_cell(older['why'])} |" in brief, "the check's English why"
    assert f"1. **{first.q}** " in brief and "3. **今天的题目** " in brief
    assert "Still in English" not in render_brief(mdp, "en", latest), "English is the source: never a note"


@pytest.mark.parametrize("lang", LANGS)
def test_export_md_writes_one_brief_per_module_and_an_index(registry, ran, lang):
    assert export_interview_briefs.main(["--lang", lang]) == 0
    out = ran / "output" / "briefs"
    assert {p.name for p in out.iterdir()} == {f"{name}.md" for name in registry.modules} | {"index.md"}
    index = (out / "index.md").read_text(encoding="utf-8")
    record = latest_run("mdp", "toy")
    passed = sum(c["passed"] for c in record["checks"])
    assert f"| {passed}/{len(record['checks'])} | {format_number(record['wall_time_s'])} s | [mdp](mdp.md) |" in index
    for name in registry.modules:
        assert f"[{name}]({name}.md)" in index
    assert index.count(labels(lang)["never_run"]) == len(registry.modules) - 1
    assert (out / "mdp.md").read_text(encoding="utf-8") == brief_for(registry.get("mdp"), lang).markdown


class PageStructure(HTMLParser):
    """Open/close balance, section ids, images and tables of an HTML page."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.mismatched: list[str] = []
        self.sections: dict[str, list[str]] = {}
        self.tables = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections[attrs["id"]] = []
        if tag == "img":
            self.sections[next(reversed(self.sections))].append(attrs["src"])
        if tag in ("script", "link") or (attrs.get("src") or "").startswith("http"):
            self.external.append(tag)
        self.tables += tag == "table"
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            self.mismatched.append(tag)


def test_export_html_is_one_well_formed_self_contained_page(registry, ran, tmp_path):
    out = tmp_path / "site"
    assert export_interview_briefs.main(["--format", "html", "--out", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["briefs.html"]
    page = PageStructure()
    page.feed((out / "briefs.html").read_text(encoding="utf-8"))
    page.close()
    assert page.open == [] and page.mismatched == [], "every tag is closed, in order"
    assert set(page.sections) == set(registry.modules), "one section per module"
    assert page.tables >= 3, "the run-status table and the mdp run's check and metric tables"
    assert page.external == [], "nothing to fetch: the page opens offline"
    record = latest_run("mdp", "toy")
    plots = [name for name in record["artifacts"] if name.endswith(".png")]
    assert len(page.sections["mdp"]) == len(plots)
    for src in page.sections["mdp"]:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(page.sections[name] == [] for name in registry.modules if name != "mdp"), "no run, no plots"


def test_an_unknown_module_exits_2_with_a_suggestion(workdir, capsys):
    assert interview_brief.main(["--module", "gea"]) == 2
    err = capsys.readouterr().err
    assert "unknown module 'gea'" in err and "Did you mean: gae" in err
    assert interview_brief.main(["--module", "mdp", "--preset", "huge"]) == 2
    assert "no preset 'huge'; presets: toy, default" in capsys.readouterr().err
