"""The grader measured on the labelled grading set (learning/grading_set/): the set's shape, the floor
of its ranking quality and per-kind scores, and that the README's table is the current measurement."""
from __future__ import annotations

import re
import sys
from collections import Counter

import pytest

from core.paths import ROOT
from learning import grading_set
from learning.grader import grade_question
from learning.questions import all_questions

sys.path.insert(0, str(ROOT / "scripts"))
import grading_eval  # noqa: E402

WRITTEN_KINDS = {"paraphrase", "chinese", "partial", "wrong", "wrong_zh", "keywords"}
# The floors below sit under what the grader measures (scripts/grading_eval.py: AUC 0.977 tuning, 0.982
# held out; model answers 1.00; wrong, keyword and pasted answers at most 0.07) with room for a noisy
# rewording of a bank, and far above what the first grader reached (key points pasted: 1.00) or what
# the answer's length alone gives (AUC 0.86: the baseline row of the table).
AUC_FLOOR_TUNE = AUC_FLOOR_HOLDOUT = 0.95
MODEL_FLOOR = 0.95
BAD_CEILING = 0.15
BANK_MODEL_FLOOR = 0.97


@pytest.fixture(scope="module")
def bank(registry):
    return {q.id: q for q in all_questions(registry)}


@pytest.fixture(scope="module")
def measured():
    return grading_eval.evaluate()


def test_the_set_covers_every_module_with_every_kind_and_holds_one_question_out_of_each(bank, registry):
    items = grading_set.load(bank)
    questions = {i.question.id: i for i in items}
    assert len(questions) >= 60
    assert {i.question.module for i in items} == set(registry.modules)
    kinds = Counter((i.question.id, i.kind) for i in items)
    for qid in questions:
        assert {k for (q, k) in kinds if q == qid} >= WRITTEN_KINDS, qid
    held_out = Counter(i.question.module for i in questions.values() if i.split == "holdout")
    assert held_out == Counter({m: 1 for m in registry.modules})


def test_a_malformed_entry_is_refused_with_its_file(tmp_path, bank):
    (tmp_path / "x.toml").write_text('[[question]]\nid = "mdp-definition"\nsplit = "tune"\n'
                                     '[[question.answer]]\nkind = "wrong"\nlabel = 1.0\ntext = "x"\n')
    with pytest.raises(grading_set.GradingSetError, match=r"x\.toml.*'wrong' with label 1\.0"):
        grading_set.load(bank, tmp_path)
    (tmp_path / "x.toml").write_text('[[question]]\nid = "no-such-question"\nsplit = "tune"\n')
    with pytest.raises(grading_set.GradingSetError, match="no such question"):
        grading_set.load(bank, tmp_path)


def test_auc_is_the_share_of_correctly_ordered_pairs():
    assert grading_set.auc([(0.9, 1.0), (0.1, 0.0)]) == 1.0
    assert grading_set.auc([(0.1, 1.0), (0.9, 0.0)]) == 0.0
    assert grading_set.auc([(0.5, 1.0), (0.5, 0.0), (0.7, 0.5)]) == 0.5     # a tie is half; partial left out
    assert grading_set.auc([(0.8, 1.0), (0.2, 1.0), (0.5, 0.0)]) == 0.5


def test_the_grader_ranks_acceptable_answers_above_wrong_stuffed_and_negated_ones(measured):
    m, _ = measured
    assert m.auc["tune"] >= AUC_FLOOR_TUNE and m.auc["holdout"] >= AUC_FLOOR_HOLDOUT, m.auc
    mean = {kind: by_split["all"] for kind, by_split in m.mean.items()}
    for bad in ("wrong", "wrong_zh", "keywords", "pasted key points"):
        for good in ("model", "paraphrase", "chinese"):
            assert mean[good] > mean[bad], (good, bad, mean)
    assert mean["model"] >= MODEL_FLOOR and max(mean[b] for b in ("wrong", "keywords", "pasted key points")) <= BAD_CEILING


def test_the_readme_shows_the_current_measurement(measured):
    m, timing = measured
    table = grading_eval.markdown(m, timing)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- BEGIN grading-table\b.*?-->\n(.*?)<!-- END grading-table -->", readme, re.S)
    assert block, "README.md has no grading-table block"
    rows = [line for line in block.group(1).splitlines() if line.startswith("|")]
    assert rows == [line for line in table.splitlines() if line.startswith("|")], \
        "README.md's grading table is stale: paste `python scripts/grading_eval.py --markdown` into its block"


def test_across_the_bank_model_answers_make_their_claims_and_pasted_key_points_do_not_pass(bank):
    """Holds every bank, later ones too, to claims a grader finds in the model answer, in both languages."""
    questions = list(bank.values())
    own = [grade_question(q.answer, q).score for q in questions]
    own_zh = [grade_question(q.answer_zh, q).score for q in questions]
    pasted = [grade_question(", ".join(q.key_points), q).score for q in questions]
    others = [grade_question(next(o for o in questions[i + 1:] + questions if o.module != q.module).answer, q).score
              for i, q in enumerate(questions)]
    assert sum(own) / len(own) >= BANK_MODEL_FLOOR and sum(own_zh) / len(own_zh) >= BANK_MODEL_FLOOR
    assert sum(pasted) / len(pasted) <= BAD_CEILING and sum(others) / len(others) <= 0.1
