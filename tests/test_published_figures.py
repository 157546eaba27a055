"""Every figure a README publishes comes from a recorded run (core/results.py, assets/results/):
a code change that moves a result makes this fail until the record and the README are refreshed
(python scripts/record_results.py --module NAME --run, then python scripts/check_figures.py)."""
from __future__ import annotations

import json

import pytest

from core import results
from core.paths import ROOT
from core.registry import discover
from core.results import figures, is_recorded, load_record, unrecorded_figures

REGISTRY = discover()
MODULES = sorted(REGISTRY.modules)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_has_a_record_of_its_toy_and_default_runs(name):
    record = load_record(name)
    assert record is not None, f"no assets/results/{name}.json: python scripts/record_results.py --module {name} --run"
    assert {"toy", "default"} <= set(record["runs"])


def test_every_readme_quotes_only_recorded_figures():
    problems = unrecorded_figures(REGISTRY)  # every module's README and README.md
    assert not problems, "figures no recorded run gives (README: line figure, ...); see python scripts/check_figures.py\n" + \
        "\n".join(f"{path.relative_to(ROOT)}: " + ", ".join(f"{line} {fig}" for line, fig in bad)
                  for path, bad in problems.items())


def test_the_figure_scanner_reads_the_forms_a_readme_uses():
    text = ("V 0.542, return −27.3 in 22 368 steps (1.7e-6), 2.56M params, 97.3% of 6.8 min at the end 0.25. "
            "S&B §4.1–4.3, eq. 6.5 / 12.6, Example 7.1")
    assert [f for _, f in figures(text)] == ["0.542", "−27.3", "22 368", "1.7e-6", "2.56M", "97.3%", "6.8 min", "0.25"]
    recorded = [0.54203, -27.31, 22368, 1.74e-6, 2_561_000, 0.9731, 408.0, 0.25]
    assert all(is_recorded(f, recorded) for _, f in figures(text))
    assert not is_recorded("0.543", recorded) and not is_recorded("27.3", recorded)  # sign and last digit matter
    assert not is_recorded("0.0004", [0.4466]) and is_recorded("0.4k", [400.0])   # a unit only where it is written
    assert [f for _, f in figures("<!-- not results: 0.99 (gamma) -->gamma 0.99, V 0.542")] == ["0.542"]


def test_a_corrupt_record_is_one_clear_error_naming_its_file(tmp_path, monkeypatch, capsys):
    from scripts import check_figures
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    for text in ("{not json", "[1, 2]", '{"runs": {"default": 3}}'):
        (tmp_path / "mdp.json").write_text(text)
        assert check_figures.main(["--module", "mdp"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "mdp.json" in err and err.startswith("error: ")


def test_a_benchmark_record_is_quotable_by_the_modules_it_names_only(tmp_path, monkeypatch, capsys):
    """benchmarks/*.py --record: the README of a module the record names may quote its rows, another
    module's README may not; a corrupt benchmark record is one clear error naming its file."""
    from scripts import check_figures
    monkeypatch.setattr(results, "BENCHMARKS_DIR", tmp_path)
    path = results.record_benchmark("decode", "python benchmarks/decode.py --record", ["attention"],
                                    [{"attention": "GQA", "context": 4096, "vs_mha": 1.5234}])
    record = json.loads(path.read_text())
    assert record["modules"] == ["attention"] and record["command"].endswith("--record") and "commit" in record
    attention, mdp = REGISTRY.get("attention"), REGISTRY.get("mdp")
    assert is_recorded("1.52", results.quotable([attention])) and not is_recorded("1.52", results.quotable([mdp]))
    path.write_text('{"rows": []}')  # no "modules"
    assert check_figures.main(["--module", "attention"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decode.json" in err and err.startswith("error: ")


def test_record_results_keeps_the_record_when_the_latest_run_is_another_seed(run_module, tmp_path, monkeypatch):
    from scripts import record_results
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "results").mkdir()
    kept = {"seed": 0, "overrides": [], "status": "passed", "metrics": {"v_start": 0.5}}
    results.record_path("mdp").write_text(json.dumps({"module": "mdp", "runs": {"toy": kept}}))
    run_module("mdp", "toy", seed=5)  # the latest toy run is seed 5, not the preset's 0
    assert record_results.main(["--module", "mdp"]) == 2  # toy: wrong seed; default: never run
    assert load_record("mdp")["runs"] == {"toy": kept}
    assert record_results.main(["--module", "mdp", "--missing"]) == 2  # only default is asked for
    assert load_record("mdp")["runs"] == {"toy": kept}
