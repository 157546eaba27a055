"""core/data/preferences.py: preference pairs are deterministic, split like the word problems, ordered
by the word problems' own verifiers, mixed by the weights, and give length no clue to the preference."""
from __future__ import annotations

import re

import numpy as np
import pytest

from core.data.preferences import KINDS, PreferencePair, generate_pairs, off_topic_reply
from core.data.word_problems import TIERS, correct, generate_problems, is_held_out, lenient_correct, well_formed

STEP = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


@pytest.fixture(scope="module")
def mixed() -> list[PreferencePair]:
    return generate_pairs(2000, TIERS, seed=0, split="train")


@pytest.fixture(scope="module")
def by_kind() -> dict[str, list[PreferencePair]]:
    return {kind: generate_pairs(2000, TIERS, seed=0, split="train", weights={kind: 1.0}) for kind in KINDS}


def test_same_seed_same_pairs_another_seed_others_and_a_longer_list_extends_a_shorter():
    first = generate_pairs(200, TIERS, seed=3, split="train")
    assert first == generate_pairs(200, TIERS, seed=3, split="train")
    assert generate_pairs(300, TIERS, seed=3, split="train")[:200] == first
    other = generate_pairs(200, TIERS, seed=4, split="train")
    assert len({p.prompt for p in first} & {p.prompt for p in other}) < 20  # other problems
    assert sum(a != b for a, b in zip(first, other)) == 200


def test_held_out_prompts_are_word_problems_held_out_questions_and_never_training_prompts():
    train, held = set(), set()
    for seed in range(20):
        train |= {p.prompt for p in generate_pairs(200, TIERS, seed, "train")}
        held |= {p.prompt for p in generate_pairs(100, TIERS, seed, "held_out")}
    assert len(train) > 3500 and len(held) > 1700  # many seeds, few repeats
    assert not train & held
    assert all(is_held_out(q, 0.2) for q in held) and not any(is_held_out(q, 0.2) for q in train)
    problems = generate_problems(100, TIERS, 5, "held_out")
    assert [p.prompt for p in generate_pairs(100, TIERS, 5, "held_out")] == [p.question for p in problems]


def test_every_pair_is_a_distinct_prompt_answered_by_its_worked_solution(mixed):
    assert len(set(mixed)) == len({p.prompt for p in mixed}) == 2000
    solutions = {p.question: p for p in generate_problems(2000, TIERS, 0, "train")}
    for pair in mixed:
        assert pair.chosen == solutions[pair.prompt].solution and pair.answer == solutions[pair.prompt].answer
        assert pair.chosen != pair.rejected and pair.kind in KINDS


def test_correct_pairs_differ_by_one_slipped_step_in_the_same_template(by_kind):
    slips, carried = [], 0
    for pair in by_kind["correct"]:
        assert correct(pair.chosen, pair.answer) == 1.0 and correct(pair.rejected, pair.answer) == 0.0
        assert well_formed(pair.chosen) == well_formed(pair.rejected) == 1.0
        assert re.sub(r"\d+", "#", pair.rejected) == re.sub(r"\d+", "#", pair.chosen)
        steps = [tuple(map(int, (x, y, z))) + (op,) for x, op, y, z in STEP.findall(pair.rejected)]
        wrong = [z - (x + y if op == "+" else x - y) for x, y, z, op in steps]
        assert sum(w != 0 for w in wrong) == 1 and sum(wrong) in (-2, -1, 1, 2)
        assert all(later[0] == earlier[2] for earlier, later in zip(steps, steps[1:]))  # the slip is carried
        final = int(pair.rejected.split()[-1].rstrip("."))
        assert final == steps[-1][2] == pair.answer + sum(wrong) >= 0
        slips.append(sum(wrong))
        carried += len(steps) == 2 and wrong[0] != 0
    assert set(slips) == {-2, -1, 1, 2} and carried > 100  # slips either way, some in the first of two steps


def test_format_pairs_keep_the_right_number_and_drop_only_the_answer_sentence(by_kind):
    plain = 0
    for pair in by_kind["format"]:
        assert well_formed(pair.chosen) == 1.0 and well_formed(pair.rejected) == 0.0
        assert correct(pair.chosen, pair.answer) == 1.0 and correct(pair.rejected, pair.answer) == 0.0
        assert lenient_correct(pair.chosen, pair.answer) == lenient_correct(pair.rejected, pair.answer) == 1.0
        steps = pair.chosen.removesuffix(f" The answer is {pair.answer}.")
        assert pair.rejected == steps or pair.rejected.startswith(steps + " So ")
        plain += pair.rejected != steps
    assert 900 < plain < 1100  # the plain sentence and the bare step, half each


def test_on_topic_pairs_reject_a_story_sentence_that_answers_nothing(by_kind):
    for pair in by_kind["on_topic"]:
        assert correct(pair.chosen, pair.answer) == 1.0 and correct(pair.rejected, pair.answer) == 0.0
        assert well_formed(pair.rejected) == 0.0 and lenient_correct(pair.rejected, pair.answer) == 0.0
        assert not re.search(r"\d", pair.rejected) and pair.rejected[-1] in ".!?"
    assert len({p.rejected for p in by_kind["on_topic"]}) > 1000
    # the one story sentence with a digit ("She was 7 years old.") is the length of no solution; asked
    # for its length, the reply is still another sentence
    assert not any(re.search(r"\d", off_topic_reply(np.random.default_rng(i), 20)) for i in range(100))


@pytest.mark.parametrize("weights", [None, {"correct": 0.6, "format": 0.3, "on_topic": 0.1},
                                     {"format": 2, "on_topic": 2}])
def test_kind_mix_follows_the_weights(weights):
    pairs = generate_pairs(2000, TIERS, seed=1, split="train", weights=weights)
    given = dict.fromkeys(KINDS, 1.0) if weights is None else weights
    for kind in KINDS:
        share = sum(p.kind == kind for p in pairs) / len(pairs)
        expected = given.get(kind, 0) / sum(given.values())
        assert share == pytest.approx(expected, abs=0.035)  # ~3 standard errors at n = 2000
        assert (share == 0) == (expected == 0)


@pytest.mark.parametrize("weights", [{"correct": 1, "style": 1}, {"correct": -1, "format": 2}, {"correct": 0},
                                     {"correct": float("nan")}])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="kinds|weights"):
        generate_pairs(10, TIERS, seed=0, split="train", weights=weights)


@pytest.mark.parametrize("kind, mean_gap, longer_wins", [("correct", (-0.1, 0.1), (0.47, 0.53)),
                                                         ("format", (5.5, 7.5), (0.47, 0.53)),
                                                         ("on_topic", (-1.0, 0.0), (0.39, 0.46))])
def test_length_is_no_clue_to_the_preferred_reply(by_kind, kind, mean_gap, longer_wins):
    """The table in preferences.py's docstring: len(chosen) - len(rejected), and the pairwise accuracy
    of a reward that prefers the longer reply (a tie counts one half)."""
    gap = np.array([len(p.chosen) - len(p.rejected) for p in by_kind[kind]])
    assert mean_gap[0] < gap.mean() < mean_gap[1]
    assert longer_wins[0] < np.mean((gap > 0) + 0.5 * (gap == 0)) < longer_wins[1]
