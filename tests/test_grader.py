"""The offline grader (learning/grader.py): claims made in order inside one clause, negation and
swapped roles, misconceptions, lemmas, typos and synonyms (Chinese and English), the prose factor
that fails a pasted list of terms, and Chinese answers graded against Chinese claims."""
from __future__ import annotations

import pytest
from fsrs import Rating

from core.contract import Question
from learning.grader import (MAX_ANSWER_CHARS, SynonymError, Synonyms, default_synonyms, grade, grade_question,
                             suggested_rating, tokenize)

MDP_KEY_POINTS = ["discount factor", "Markov property", "terminal state"]
ROLES = ["actor -> picks | chooses | selects -> action", "critic -> estimates | learns -> V | value"]


def test_hits_and_misses_name_the_key_points_and_the_matched_text():
    answer = "The Markov property says that the future depends only on the present state. Rewards arrive over time."
    result = grade(answer, MDP_KEY_POINTS)
    assert [h.key_point for h in result.hits] == ["Markov property"]
    assert result.hits[0].span == "Markov property"
    assert result.misses == ("discount factor", "terminal state")
    assert result.score == pytest.approx(1 / 3)
    assert result.suggested == Rating.Hard


def test_every_span_is_text_from_the_answer():
    answer = "Episodes end in a TERMINAL   state; gamma, the discount factor, weighs the later rewards less."
    result = grade(answer, MDP_KEY_POINTS)
    assert {h.key_point for h in result.hits} == {"discount factor", "terminal state"}
    for hit in result.hits:
        assert hit.span in answer
    assert next(h.span for h in result.hits if h.key_point == "terminal state") == "TERMINAL   state"


@pytest.mark.parametrize("typed, key_point", [
    ("it lowers the varience", "lower variance"),        # a typo, and lowers ~ lower
    ("there is some variace in it", "variance"),
    ("TD uses bootstraping for its targets", "bootstrapping"),
    ("the Markv property holds", "Markov property"),
    ("the rewards that it collects", "reward"),           # plural
    ("the policies that we sampled", "policy -> sample"),  # lemmas: policies = policy, sampled = sample
    ("it is clipping the ratio", "clipped -> ratio"),      # clipping = clipped
    ("lamda controls it", "lambda"),
])
def test_word_forms_and_small_typos_still_hit(typed, key_point):
    assert grade(typed, [key_point]).score == 1.0


@pytest.mark.parametrize("typed, key_point", [
    ("the mean is zero", "median"),                                  # a different word, not a typo
    ("lambda = 1 gives the TD error", "lambda = 0 -> TD error"),     # numbers are facts: 1 is not 0
    ("it is a KV cache", "KL divergence"),                           # short words must be equal
    ("it keeps the value", "deep -> value"),
    ("the estimate is biased", "unbiased estimate"),                 # a negating prefix is no typo
    ("this is an off-policy method", "on-policy"),
])
def test_different_words_do_not_hit(typed, key_point):
    assert grade(typed, [key_point]).score == 0.0


@pytest.mark.parametrize("typed, key_point", [
    ("这是偏差和方差的权衡", "bias vs variance"),                   # Chinese answer, English key point
    ("我们用价值函数作为基线", "value function -> baseline"),
    ("我们用 γ 来折扣", "discount factor"),                        # a Greek letter for its name
    ("它惩罚与参考策略的 KL 散度", "KL divergence"),
    ("this is the value function V(s)", "价值函数"),                # English answer, Chinese key point
    ("there is bias and variance", "偏差 与 方差"),
    ("GRPO drops the critic", "group relative policy optimization"),
    ("PPO clips the probability ratio", "近端策略优化 -> 裁剪"),
])
def test_synonyms_match_in_both_directions(typed, key_point):
    assert grade(typed, [key_point]).score == 1.0, grade(typed, [key_point])


def test_chinese_is_segmented_into_words_and_matched_by_their_characters():
    tokens = tokenize("经验风险最小化")
    assert [t.text for t in tokens] == list("经验风险最小化")
    assert [t.word for t in tokens] == [True, False, True, False, True, False, False]   # jieba: 经验 风险 最小化
    # a key point's word matches however jieba splits the answer around it
    assert grade("切断自举会让目标变得稳定", ["自举"]).score == 1.0
    assert grade("这是一个上界", ["上界"]).score == 1.0 and grade("这是一个下界", ["上界"]).score == 0.0
    # ...but a word is not found inside a longer one: 稳定 is not in 不稳定, 正 is not in 修正
    assert grade("训练变得不稳定了", ["训练 -> 稳定"]).score == 0.0
    assert grade("修正项是负的", ["修正项 -> 正"]).score == 0.0
    assert grade("训练时做的是经验风险的最小化", ["经验风险 -> 最小化"]).score == 1.0
    assert grade("风险很小", ["经验风险 -> 最小化"]).score == 0.0


@pytest.mark.parametrize("typed", ["it is the KV-Cache!!!", "it is the kv cache", "it is the (KV) — cache.",
                                   "ｉｔ ｉｓ ｔｈｅ ＫＶ　ＣＡＣＨＥ"])
def test_case_punctuation_width_and_spacing_do_not_matter(typed):
    assert grade(typed, ["KV cache"]).score == 1.0


def test_a_phrasing_may_be_reordered_within_a_short_window_but_not_scattered():
    assert grade("the variance gets lower", ["lower variance"]).score == 1.0
    scattered = "it is lower " + " ".join(["filler"] * 30) + " in variance"
    assert grade(scattered, ["lower variance"]).score == 0.0


def test_a_claim_is_made_in_its_order_inside_one_clause():
    assert grade("The actor picks the actions and the critic estimates V.", ROLES).score == 1.0
    swapped = grade("The critic picks the actions and the actor estimates V.", ROLES,
                    misconceptions=["critic -> picks | chooses -> action"])
    assert swapped.score == 0.0 and not swapped.hits
    assert [m.key_point for m in swapped.misconceptions] == ["critic -> picks | chooses -> action"]
    # across a clause boundary the parts do not join; across the commas of one clause they do
    assert grade("We have an actor. Picking the best action is hard.", ROLES[:1]).score == 0.0
    assert grade("We have an actor, but picking the best action is hard.", ROLES[:1]).score == 0.0
    assert grade("The actor, which is the policy network, picks an action in each state it visits.",
                 ROLES[:1]).score == 1.0
    # a negation counts from the item the claim starts in: not from an earlier one
    assert grade("It is not exact, but GAE reduces variance.", ["GAE -> reduces -> variance"]).score == 1.0
    assert grade("If you do not normalise, GAE reduces variance.", ["GAE -> reduces -> variance"]).score == 1.0


def test_a_passive_clause_may_name_the_parts_in_reverse_order():
    assert grade("V is estimated by the critic, while the actions are chosen by the actor.", ROLES).score == 1.0
    assert grade("V is what the critic estimates.", ROLES[1:]).score == 0.0   # not passive: order kept


@pytest.mark.parametrize("answer", [
    "GAE does not reduce variance.", "GAE doesn't reduce the variance at all.", "GAE never reduces variance.",
    "GAE 并不降低方差。", "GAE 不会降低方差",
])
def test_a_negated_claim_is_contradicted_not_made(answer):
    result = grade(answer, ["GAE -> reduces | 降低 -> variance"])
    assert result.score == 0.0 and not result.hits
    assert [c.key_point for c in result.contradicted] == ["GAE -> reduces | 降低 -> variance"]


def test_negation_is_counted_against_the_key_points_own():
    key_point = "truncation -> not | never -> terminal state"
    assert grade("A truncation is not a terminal state.", [key_point]).score == 1.0
    assert grade("A truncation is a terminal state.", [key_point]).score == 0.0
    assert grade("A truncation is not never a terminal state.", [key_point]).score == 0.0   # double negation
    assert grade("GAE not only reduces variance but also trades bias.", ["GAE -> reduces -> variance"]).score == 1.0
    # a negation in another clause does not touch the claim
    assert grade("It is not exact, but GAE reduces variance.", ["GAE -> reduces -> variance"]).score == 1.0


def test_a_claim_made_anywhere_counts_even_if_negated_elsewhere():
    answer = "Some say GAE does not reduce variance. In fact GAE reduces variance."
    result = grade(answer, ["GAE -> reduces -> variance"])
    assert result.score == 1.0 and not result.contradicted


def test_misconceptions_and_contradictions_cost_a_key_point_each():
    key_points = ["clip -> ratio", "advantage -> GAE", "value -> loss"]
    answer = ("In this method we clip the probability ratio, the advantage of each step comes from GAE, and "
              "the value head is trained with its own loss, which makes PPO a hard constraint on the update.")
    assert grade(answer, key_points).score == 1.0
    result = grade(answer, key_points, misconceptions=["PPO -> hard constraint"])
    assert result.score == pytest.approx(2 / 3)
    negated = grade("In this method we clip the ratio, but the advantage does not come from GAE.", key_points)
    assert negated.score == 0.0     # one made, one contradicted: 1 - 1


def test_a_pasted_list_of_terms_does_not_pass():
    question_points = ["ratio -> pi / pi_old", "clip -> [1-eps, 1+eps]", "min -> two terms", "advantage -> GAE"]
    prose = ("The ratio is pi over pi_old. We clip it to [1-eps, 1+eps] and take the min of the two terms, "
             "where the advantage is estimated with GAE.")
    keywords = "ratio pi / pi_old, clip [1-eps, 1+eps], min two terms, advantage GAE"
    assert grade(prose, question_points).score == 1.0
    pasted = grade(keywords, question_points)
    assert len(pasted.hits) >= 3 and pasted.prose < 0.3 and pasted.score < 0.3


def test_a_chinese_answer_is_graded_against_the_chinese_claims():
    question = Question(id="q", module="m", level=1, q="?", answer="", key_points=("critic -> estimates -> V",),
                        key_points_zh=("critic -> 估计 -> 价值",), misconceptions_zh=("critic -> 选择 -> 动作",))
    assert grade_question("critic 是用来估计状态价值的。", question).score == 1.0
    assert grade_question("critic 是用来估计状态价值的。", question).lang == "zh"
    wrong = grade_question("critic 负责选择动作，也估计价值。", question)
    assert wrong.score == 0.0 and wrong.misconceptions
    assert grade_question("The critic estimates V for us.", question).lang == "en"


@pytest.mark.parametrize("answer", ["", "   \n\t ", "?!"])
def test_an_empty_answer_scores_zero(answer):
    result = grade(answer, MDP_KEY_POINTS)
    assert result.score == 0.0 and not result.hits
    assert result.misses == tuple(MDP_KEY_POINTS)
    assert result.suggested == Rating.Again


def test_the_longest_answer_is_graded_and_a_longer_one_refused():
    answer = ("The discount factor weighs later rewards less and the episode ends in a terminal state. " * 300)
    answer = answer[:MAX_ANSWER_CHARS]
    assert grade(answer, MDP_KEY_POINTS).score == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="20,000"):
        grade(answer + "x", MDP_KEY_POINTS)


@pytest.mark.parametrize("score, rating", [(0.0, Rating.Again), (0.3, Rating.Again), (1 / 3, Rating.Hard),
                                           (0.5, Rating.Hard), (2 / 3, Rating.Good), (0.89, Rating.Good),
                                           (0.9, Rating.Easy), (1.0, Rating.Easy)])
def test_score_to_suggested_rating(score, rating):
    assert suggested_rating(score) == rating


def test_synonym_groups_load_and_refuse_duplicates():
    synonyms = default_synonyms()
    assert len({id(g) for g in synonyms.group_of.values()}) >= 60
    with pytest.raises(SynonymError, match="two groups"):
        Synonyms([["bias", "偏差"], ["Bias", "有偏"]])
    with pytest.raises(SynonymError, match="two or more"):
        Synonyms([["bias"]])
