"""The sequence machinery of post-training against independent computations: shifted log-probs (the
off-by-one), padding in both layouts, batched generation of prompts of different lengths, the chat
template's loss mask and the word problems' rewards."""
from __future__ import annotations

import math

import pytest
import torch

from core.data.chat import chat_example, prompt_ids, response_text
from core.data.corpus import generate_stories
from core.data.tokenizer import Tokenizer, train_sentencepiece
from core.data.word_problems import (TIERS, correct, extract_answer, generate_problems, is_held_out, lenient_correct,
                                     score, well_formed)
from core.nn.model import Transformer, scaled_config
from core.nn.sampling import sample_responses
from core.nn.sequences import left_pad, masked_mean, right_pad, sequence_logprobs, token_logprobs


def tiny(arch: str = "llama", vocab: int = 40, block: int = 32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(scaled_config(arch, vocab_size=vocab, block_size=block, n_layer=2, n_embd=32, n_head=4)).eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(train_sentencepiece(generate_stories(300, seed=0), 512))


def test_token_logprobs_reads_token_t_from_the_logits_at_t_minus_1():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(7, (2, 5))
    got = token_logprobs(logits, ids)
    assert got.shape == (2, 4)
    for b in range(2):
        for t in range(1, 5):
            expected = logits[b, t - 1].log_softmax(-1)[ids[b, t]]
            assert got[b, t - 1].item() == pytest.approx(expected.item(), abs=1e-6)
            wrong = logits[b, t].log_softmax(-1)[ids[b, t]]  # the off-by-one reading
            if not math.isclose(wrong.item(), expected.item(), abs_tol=1e-6):
                assert got[b, t - 1].item() != pytest.approx(wrong.item(), abs=1e-6)


def test_log_prob_of_a_sequence_equals_the_product_of_its_next_token_probabilities():
    model = tiny()
    ids = torch.tensor([[3, 9, 1, 30, 12, 7]])
    with torch.no_grad():
        total = token_logprobs(model(ids), ids).sum().item()
        by_hand = sum(model(ids[:, :t])[0, -1].log_softmax(-1)[ids[0, t]].item() for t in range(1, 6))
    assert total == pytest.approx(by_hand, abs=1e-5)


def test_padding_layouts_and_masked_mean():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert right_pad([[1, 2, 3], [4]], 9).tolist() == [[1, 2, 3], [4, 9, 9]]
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, m).item() == pytest.approx(2.0)
    assert masked_mean(values, m, dim=1).tolist() == pytest.approx([1.5, 3.0])


@pytest.mark.parametrize("arch", ["llama", "gqa", "mla"])
def test_left_padded_batch_gives_each_row_its_unpadded_logits_and_greedy_continuation(arch):
    model = tiny(arch)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        batched = model(ids, key_mask=mask)
        out = model.generate(ids, 6, temperature=0.0, prompt_mask=mask)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0]
            assert torch.allclose(batched[i, ids.shape[1] - len(p):], alone, atol=1e-5)
            assert out[i, ids.shape[1]:].tolist() == model.generate(torch.tensor([p]), 6, temperature=0.0)[0, len(p):].tolist()


def test_padding_is_refused_by_the_sparse_attention_variants():
    model = tiny("moba")
    ids, mask = left_pad([[1, 2, 3], [4]], 0)
    with pytest.raises(ValueError, match="padded"):
        model(ids, key_mask=mask)


def test_sample_responses_stops_each_row_after_its_stop_token():
    model = tiny()
    out = sample_responses(model, [[1, 2, 3], [4, 5]], n=3, max_new_tokens=10, temperature=1.0, stop_token=7,
                           pad_id=0, generator=torch.Generator().manual_seed(0))
    assert len(out) == 6
    for row in out:
        assert 7 not in row[:-1] and (row[-1] == 7 or len(row) == 10)


def test_chat_template_masks_the_prompt_and_keeps_the_end_token_in_the_loss(tok):
    ids, mask = chat_example(tok, "Tell me a story.", "Once upon a time.")
    prompt = prompt_ids(tok, "Tell me a story.")
    end = tok.special_ids["<|end|>"]
    assert ids[:len(prompt)] == prompt and prompt[-1] == tok.special_ids["<|assistant|>"]
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids[-1] == end and mask[-1] == 1
    assert response_text(tok, ids[len(prompt):]) == "Once upon a time."


def test_word_problems_are_deterministic_disjoint_and_solved_by_their_solutions():
    train = generate_problems(300, TIERS, seed=0, split="train")
    held = generate_problems(100, TIERS, seed=0, split="held_out")
    assert train == generate_problems(300, TIERS, seed=0, split="train")
    assert not {p.question for p in train} & {p.question for p in held}
    assert all(not is_held_out(p.question, 0.2) for p in train) and all(is_held_out(p.question, 0.2) for p in held)
    assert {p.tier for p in train} == set(TIERS)
    for p in train + held:
        assert correct(p.solution, p.answer) == 1.0 and well_formed(p.solution) == 1.0
        assert eval(p.solution.split(". ")[-2].split(" = ")[0]) == p.answer  # the last worked step


def test_rewards_parse_the_final_answer_only_when_stated():
    assert extract_answer("3 + 4 = 7. The answer is 7.") == 7
    assert extract_answer("3 + 4 = 7.") is None
    assert correct("The answer is 7.", 7) == 1.0 and correct("The answer is 8.", 7) == 0.0
    assert well_formed("The answer is 7.") == 1.0 and well_formed("The answer is 7. And more") == 0.0
    two = generate_problems(2, (1,), 0, "train")
    assert score([f"So she had {two[0].answer}.", "The answer is -1."], two) == {"accuracy": 0.0, "lenient": 0.5,
                                                                                  "format": 0.5}
    assert lenient_correct(two[0].plain_solution, two[0].answer) == 1.0 and correct(two[0].plain_solution, two[0].answer) == 0.0


def test_rollout_mask_covers_the_response_and_nothing_of_the_prompt(tok):
    from core.data.word_problems import generate_problems
    from core.rl.group_policy import collect_rollout

    model = tiny(vocab=tok.vocab_size, block=96)
    problems = generate_problems(3, TIERS, seed=0, split="train")
    rollout = collect_rollout(model, tok, problems, group_size=2, max_new_tokens=6, temperature=1.0,
                              format_reward=0.0, generator=torch.Generator().manual_seed(0))
    assert rollout.rewards.shape == (3, 2) and rollout.response_mask.shape[0] == 6
    for row in range(6):
        prompt = prompt_ids(tok, problems[row // 2].question)
        assert rollout.ids[row, :len(prompt)].tolist() == prompt
        mask = rollout.response_mask[row]
        assert mask[:len(prompt) - 1].sum() == 0           # column j holds token j + 1: the prompt's tokens
        assert mask[len(prompt) - 1] == 1                   # the first response token
        ones = mask.nonzero().flatten()
        assert ones.tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + len(ones)))  # contiguous
        assert 1 <= len(ones) <= 6


def test_sequence_logprobs_sum_the_response_tokens_only_read_from_the_logits_before_them():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 9, 3, 0, 0]])       # prompt 5 6 | response 7 8; prompt 5 | 9 3
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    logits = torch.randn(2, 5, 11)
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 1, 7] + logp[0, 2, 8], logp[1, 0, 9] + logp[1, 1, 3]])
    assert torch.allclose(sequence_logprobs(logits, ids, response), expected)
    assert torch.allclose(sequence_logprobs(logits, ids, response, mean=True), expected / 2)
    # logits after the response (at pads) change nothing
    logits[0, 3:] += 100.0
    logits[1, 2:] += 100.0
    assert torch.allclose(sequence_logprobs(logits, ids, response), expected)
