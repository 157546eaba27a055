"""The offline grader: which key points an answer hits, with typos, synonyms (Chinese and English),
punctuation and case; and that real model answers score high while wrong answers score low."""
from __future__ import annotations

import pytest
from fsrs import Rating

from learning.grader import SynonymError, Synonyms, default_synonyms, grade, suggested_rating
from learning.questions import all_questions

MDP_KEY_POINTS = ["discount factor", "Markov property", "terminal state"]


@pytest.fixture(scope="module")
def bank(registry):
    return {q.id: q for q in all_questions(registry)}


def test_hits_and_misses_name_the_key_points_and_the_matched_text():
    answer = "The Markov property: the future depends only on the present state. Rewards arrive over time."
    result = grade(answer, MDP_KEY_POINTS)
    assert [h.key_point for h in result.hits] == ["Markov property"]
    assert result.hits[0].span == "Markov property"
    assert result.misses == ("discount factor", "terminal state")
    assert result.score == pytest.approx(1 / 3)
    assert result.suggested == Rating.Hard


def test_every_span_is_text_from_the_answer():
    answer = "Episodes end in a TERMINAL   state; gamma, the discount factor, weighs later rewards less."
    result = grade(answer, MDP_KEY_POINTS)
    assert {h.key_point for h in result.hits} == {"discount factor", "terminal state"}
    for hit in result.hits:
        assert hit.span in answer
    assert next(h.span for h in result.hits if h.key_point == "terminal state") == "TERMINAL   state"


@pytest.mark.parametrize("typed, key_point", [
    ("it lowers the varience", "lower variance"),
    ("there is some bais", "bias"),
    ("TD uses bootstraping", "bootstrapping"),
    ("the Markv property holds", "Markov property"),
    ("the rewards it collects", "reward"),       # plural
    ("lamda controls it", "lambda"),
])
def test_small_typos_still_hit(typed, key_point):
    assert grade(typed, [key_point]).score == 1.0


@pytest.mark.parametrize("typed, key_point", [
    ("the mean is zero", "median"),              # different word, not a typo
    ("lambda = 1 gives the TD error", "lambda=0: TD error"),   # numbers are facts: 1 is not 0
    ("a KV cache", "KL divergence"),             # short words must be equal
])
def test_different_words_do_not_hit(typed, key_point):
    assert grade(typed, [key_point]).score == 0.0


@pytest.mark.parametrize("typed, key_point", [
    ("偏差和方差的权衡", "bias vs variance"),                 # Chinese answer, English key point
    ("用 价值函数 作为基线", "value function as baseline"),
    ("我们用 γ 来折扣", "discount factor"),                 # Greek letter for its name
    ("它惩罚与参考策略的 KL 散度", "KL divergence"),
    ("价 值 函 数", "value function"),                     # spaces inside Chinese text are ignored
    ("the value function V(s)", "价值函数"),                # English answer, Chinese key point
    ("bias and variance", "偏差与方差"),
    ("GRPO drops the critic", "group relative policy optimization"),
    ("PPO clips the probability ratio", "近端策略优化 裁剪"),
])
def test_synonyms_match_in_both_directions(typed, key_point):
    assert grade(typed, [key_point]).score == 1.0, grade(typed, [key_point])


def test_chinese_key_points_without_synonyms_match_by_character_pairs():
    key_point = "经验风险最小化"
    assert grade("训练时做的是经验风险的最小化", [key_point]).score == 1.0   # 5 of its 6 character pairs
    assert grade("风险很小", [key_point]).score == 0.0


@pytest.mark.parametrize("typed", ["KV-Cache!!!", "kv cache", "(KV) — cache.", "ＫＶ　ＣＡＣＨＥ"])
def test_case_punctuation_width_and_spacing_do_not_matter(typed):
    assert grade(typed, ["KV cache"]).score == 1.0


def test_a_phrase_may_be_reordered_within_a_short_window_but_not_scattered():
    assert grade("the variance gets lower", ["lower variance"]).score == 1.0
    scattered = "lower " + " ".join(["filler"] * 30) + " variance"
    assert grade(scattered, ["lower variance"]).score == 0.0


def test_longer_key_points_need_two_thirds_of_their_words():
    key_point = "trace grows with revisits quickly"   # units: trace, grow, revisit, quickly
    assert grade("the trace grows on revisits", [key_point]).score == 1.0   # 3 of 4
    assert grade("the trace grows", [key_point]).score == 0.0               # 2 of 4


@pytest.mark.parametrize("answer", ["", "   \n\t ", "?!"])
def test_an_empty_answer_scores_zero(answer):
    result = grade(answer, MDP_KEY_POINTS)
    assert result.score == 0.0 and not result.hits
    assert result.misses == tuple(MDP_KEY_POINTS)
    assert result.suggested == Rating.Again


@pytest.mark.parametrize("score, rating", [(0.0, Rating.Again), (0.3, Rating.Again), (1 / 3, Rating.Hard),
                                           (0.5, Rating.Hard), (2 / 3, Rating.Good), (0.89, Rating.Good),
                                           (0.9, Rating.Easy), (1.0, Rating.Easy)])
def test_score_to_suggested_rating(score, rating):
    assert suggested_rating(score) == rating


def test_model_answers_hit_their_own_key_points(bank):
    assert grade(bank["mdp-definition"].answer, bank["mdp-definition"].key_points).score == 1.0
    td_vs_mc = bank["td_learning-td-vs-mc"]
    assert grade(td_vs_mc.answer, td_vs_mc.key_points).score >= 0.75


def test_a_wrong_answer_scores_low(bank):
    off_topic = ("Attention computes softmax(Q K^T / sqrt(d_k)) V; the scaling keeps the logits' variance "
                 "near one so the softmax does not saturate. Multi-head attention runs several heads in parallel.")
    for qid in ("mdp-definition", "gae-definition", "td_learning-sarsa-vs-qlearning", "advantage-reward-to-go"):
        assert grade(off_topic, bank[qid].key_points).score <= 0.25, qid
    # a real answer to another question of the same field
    assert grade(bank["mdp-definition"].answer, bank["td_learning-sarsa-vs-qlearning"].key_points).score <= 0.25


def test_a_brief_chinese_answer_to_a_real_question(bank):
    question = bank["td_learning-td-vs-mc"]
    answer = "MC 无偏但方差高 (high variance)；TD 有偏但方差低 (low variance)。TD 可以在线、从不完整的回合 (incomplete episodes) 学习。"
    result = grade(answer, question.key_points)
    assert {h.key_point for h in result.hits} == {"MC unbiased, high variance", "TD biased, low variance",
                                                  "online, incomplete episodes"}
    assert result.misses == ("certainty equivalence",)
    assert result.suggested == Rating.Good


def test_across_the_bank_model_answers_beat_answers_to_other_modules(registry):
    """Holds every bank, including later ones, to key points a grader can find in the model answer."""
    questions = all_questions(registry)
    own = [grade(q.answer, q.key_points).score for q in questions]
    others = [grade(next(o for o in questions[i + 1:] + questions if o.module != q.module).answer,
                    q.key_points).score for i, q in enumerate(questions)]
    assert sum(own) / len(own) >= 0.7
    assert sum(others) / len(others) <= 0.15


def test_synonym_groups_load_and_refuse_duplicates():
    synonyms = default_synonyms()
    assert len({id(g) for g in synonyms.group_of.values()}) >= 60
    with pytest.raises(SynonymError, match="two groups"):
        Synonyms([["bias", "偏差"], ["Bias", "有偏"]])
    with pytest.raises(SynonymError, match="two or more"):
        Synonyms([["bias"]])
