"""inference: the engine's greedy tokens equal Transformer.generate's (prompts of different lengths in one
continuous batch, MHA/GQA/MQA, a dense and an MoE FFN, a pool so small that sequences are preempted), n > 1
samples that fork a prompt's blocks and copy on write, the block manager's slots and reference counts,
requests that are refused; the KV-waste formulas by hand and against the engine's counts; one speculative
step's output distribution enumerated exactly, the batched accept rule sampled, speculative decoding's
cache rollback, the chi-square test of its samples; int8 per-channel quantisation. The toy preset's
determinism is covered in tests/test_modules.py."""
from __future__ import annotations

import copy

import pytest
import torch

from core.nn.model import ModelConfig, Transformer
from post_train.systems.inference.code.engine import (
    BlockManager, Engine, PromptTooLong, QueueFull, SamplingParams,
)
from post_train.systems.inference.code.inference import (
    Request, chi_square, chi_square_pvalue, exact_two_token_bins, paged_waste_formula, recompute_generate, run_engine,
    static_batching, static_waste_formula,
)
from post_train.systems.inference.code.quantize import Int8Linear, quantize_model, quantize_rows, stored_bytes
from post_train.systems.inference.code.speculative import (
    SpeculativeStats, acceptance_probability, accept_drafts, first_two_tokens, residual_distribution,
    speculative_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def tiny_model(seed: int = 0, scale: float = 5.0, **overrides) -> Transformer:
    """A random model whose logits are far from flat (weights x 5), so greedy ties are not an issue."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                ffn_hidden=64, n_experts=4, moe_top_k=2, moe_hidden=32), **overrides})
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


LENGTHS = (3, 9, 17, 5, 30, 1, 12)


def reference(model, prompts, max_tokens):
    """Transformer.generate one prompt at a time: the contiguous cache."""
    return [model.generate(torch.tensor([p]), max_tokens, temperature=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("arch", [dict(n_kv_head=2), dict(n_kv_head=4), dict(n_kv_head=1), dict(ffn="moe")],
                         ids=["gqa", "mha", "mqa", "moe"])
def test_greedy_paged_continuous_batch_equals_generate_one_prompt_at_a_time(arch):
    """Seven prompts of 1 to 30 tokens through 3 running slots: sequences join and leave between steps,
    every decode batch mixes positions (per-row RoPE, per-row slots), blocks of 4 cut every prompt unevenly."""
    model = tiny_model(**arch)
    prompts = prompts_of(LENGTHS)
    engine = Engine(model, kv_block_size=4, max_running=3)
    assert engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0)) == reference(model, prompts, 20)
    assert engine.free_blocks == engine.num_kv_blocks, "a block was not returned"
    assert engine.prefills == len(prompts) and engine.preemptions == 0
    assert engine.prefill_forwards < engine.prefills, "the prompts admitted in one step share one padded forward"


def test_preempted_sequences_are_recomputed_to_the_same_tokens():
    """14 blocks of 4 slots for 5 running sequences of up to 50 tokens: the pool runs dry, the newest
    sequences are preempted and prefilled again with their outputs, and the tokens do not change."""
    model = tiny_model()
    prompts = prompts_of(LENGTHS)
    engine = Engine(model, kv_block_size=4, num_kv_blocks=14, max_running=5)
    assert engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0)) == reference(model, prompts, 20)
    assert engine.preemptions > 0
    assert engine.prefills == len(prompts) + engine.preemptions
    assert engine.free_blocks == engine.num_kv_blocks


def test_n_greedy_samples_fork_the_prompt_and_each_equals_the_single_continuation():
    model = tiny_model()
    prompt = prompts_of([10])[0]  # 10 tokens in blocks of 4: the last prompt block is shared and half full
    engine = Engine(model, kv_block_size=4)
    samples = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0), n=3)
    engine.step()  # one prefill for the three: they share its 3 blocks
    assert engine.prefills == 1 and engine.num_kv_blocks - engine.free_blocks == 3
    assert len({tuple(s.block_table) for s in samples}) == 1
    while engine.has_unfinished():
        engine.step()
    assert [s.output_ids for s in samples] == reference(model, [prompt], 12) * 3
    assert engine.free_blocks == engine.num_kv_blocks


def test_copy_on_write_keeps_diverging_siblings_apart():
    """Two sampled children of one prompt write different tokens into the shared last block. Each must
    equal the same sample drawn without sharing (two separate requests, seeds s and s + 1, same batch)."""
    model = tiny_model()
    prompt = prompts_of([10])[0]
    params = SamplingParams(max_tokens=15, temperature=1.0, seed=7)
    shared = Engine(model, kv_block_size=4)
    forked = shared.add_request(prompt, params, n=2)
    apart = Engine(model, kv_block_size=4)
    alone = [apart.add_request(prompt, SamplingParams(max_tokens=15, temperature=1.0, seed=7 + j))[0] for j in range(2)]
    while shared.has_unfinished() or apart.has_unfinished():
        shared.step()
        apart.step()
    assert forked[0].output_ids != forked[1].output_ids, "the two samples should diverge (else the test proves nothing)"
    assert [s.output_ids for s in forked] == [s.output_ids for s in alone]
    assert shared.free_blocks == shared.num_kv_blocks


def test_block_manager_slots_refcounts_and_copy_on_write():
    blocks = BlockManager(num_blocks=6, block_size=4)
    table = blocks.allocate_for(6)  # positions 0-5: two blocks, the second half full
    assert len(table) == 2 and blocks.num_free == 4 and blocks.slots_in_use() == (8, 6)
    assert blocks.slot_to_write(table, 6) == (table[1], 2, None)  # block 6 // 4 = 1, slot 6 % 4 = 2
    assert blocks.slots_in_use() == (8, 7)
    assert blocks.blocks_to_write(table, 7) == 0 and blocks.blocks_to_write(table, 8) == 1
    child = blocks.fork(table)
    assert [blocks.ref_count[b] for b in table] == [2, 2] and blocks.slots_in_use() == (8, 7)
    assert blocks.blocks_to_write(child, 7) == 1  # writing into a shared block takes a copy
    shared = child[1]
    block, offset, copy_from = blocks.slot_to_write(child, 7)
    assert (offset, copy_from) == (3, shared) and block != shared and child[1] == block
    assert blocks.ref_count[shared] == 1 and blocks.ref_count[child[0]] == 2
    assert blocks.slot_to_write(child, 8) == (child[2], 0, None)  # a boundary: a new block
    blocks.free(table)
    blocks.free(child)
    assert blocks.num_free == 6 and blocks.slots_in_use() == (0, 0)


def test_abort_frees_blocks_and_finishes_waiting_and_running_sequences():
    model = tiny_model()
    engine = Engine(model, kv_block_size=4, max_running=1)
    first, = engine.add_request(prompts_of([9])[0], SamplingParams(max_tokens=30, temperature=0))
    second, = engine.add_request(prompts_of([5])[0], SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1 and engine.free_blocks < engine.num_kv_blocks
    engine.abort(second.seq_id)
    engine.abort(first.seq_id)
    engine.abort(12345)  # unknown: nothing happens
    assert (first.finish_reason, second.finish_reason) == ("abort", "abort")
    assert not engine.has_unfinished() and engine.free_blocks == engine.num_kv_blocks
    assert engine.step() == []


def test_stop_tokens_end_a_sequence_and_are_kept():
    model = tiny_model()
    prompt = prompts_of([6])[0]
    greedy = reference(model, [prompt], 20)[0]
    stop = greedy[4]
    seq, = (engine := Engine(model, kv_block_size=4)).add_request(
        prompt, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop,)))
    while engine.has_unfinished():
        engine.step()
    assert seq.output_ids == greedy[:greedy.index(stop) + 1] and seq.finish_reason == "stop"


def test_a_seeded_sample_equals_generate_with_the_same_generator():
    model = tiny_model()
    prompt = prompts_of([8])[0]
    engine = Engine(model, kv_block_size=4)
    out = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=3))[0]
    expected = model.generate(torch.tensor([prompt]), 20, temperature=0.8, top_p=0.9,
                              generator=torch.Generator().manual_seed(3))[0, len(prompt):].tolist()
    assert out == expected


def test_refused_requests():
    model = tiny_model()
    engine = Engine(model, kv_block_size=4, max_running=2, max_waiting=2)
    with pytest.raises(PromptTooLong, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(PromptTooLong, match="context of 64"):
        engine.add_request([1] * 40, SamplingParams(max_tokens=25))
    with pytest.raises(PromptTooLong, match="KV pool"):
        Engine(model, kv_block_size=4, num_kv_blocks=3).add_request([1] * 10, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="n must be"):
        engine.add_request([1], SamplingParams(max_tokens=8), n=3)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    engine.add_request([1], SamplingParams(max_tokens=8), n=2)
    with pytest.raises(QueueFull):
        engine.add_request([2], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="attention='mla'"):
        Engine(tiny_model(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))


# --- KV waste and batching --------------------------------------------------------------------------------
def test_waste_formulas_by_hand():
    """A prompt of 3 and 4 generated tokens: cached lengths 3, 4, 5 over its three running steps. Blocks of 2
    allocate 4, 4, 6 slots for 12 tokens; a context of 8 reserves 24 slots (mean length 4)."""
    requests, outputs = [Request([1, 2, 3], 4)], [[5, 6, 7, 8]]
    assert paged_waste_formula(requests, outputs, 2) == pytest.approx(1 - 12 / 14)
    assert static_waste_formula(requests, outputs, 8) == pytest.approx(1 - 4 / 8)
    assert paged_waste_formula(requests, outputs, 1) == 0.0


def test_the_engines_counted_slots_equal_the_formulas_and_static_batches_their_steps():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    requests = [Request(p, int(torch.randint(1, 25, (), generator=g))) for p in prompts_of((3, 9, 17, 5, 30, 1, 12, 8))]
    run = run_engine(model, requests, stop_id=VOCAB - 1, kv_block_size=4, max_running=3)
    assert run.leaked_blocks == 0
    assert 1 - run.filled_slots / run.allocated_slots == pytest.approx(paged_waste_formula(requests, run.outputs, 4), abs=1e-12)
    assert 1 - run.filled_slots / (run.running_steps * 64) == pytest.approx(static_waste_formula(requests, run.outputs, 64),
                                                                          abs=1e-12)
    outputs, steps, _ = static_batching(model, requests, VOCAB - 1, pad_id=0, batch_size=3)
    assert outputs == run.outputs
    assert steps == sum(max(len(o) for o in run.outputs[i:i + 3]) - 1 for i in range(0, len(requests), 3))
    assert run.decode_steps < steps


def test_recomputing_the_prefix_gives_the_cached_tokens():
    model = tiny_model()
    idx = torch.tensor(prompts_of((6, 6)))
    tokens, positions = recompute_generate(model, idx, 10)
    assert torch.equal(tokens, model.generate(idx, 10, temperature=0))
    assert positions == 10 * 6 + 10 * 9 // 2


# --- speculative decoding ---------------------------------------------------------------------------------
HAND_P = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
HAND_Q = torch.tensor([0.1, 0.6, 0.1, 0.2], dtype=torch.float64)


@pytest.mark.parametrize("p, q", [(HAND_P, HAND_Q), (HAND_Q, HAND_P), (HAND_P, HAND_P)], ids=["p-q", "q-p", "equal"])
def test_one_speculative_step_outputs_the_target_distribution_exactly(p, q):
    """Enumerate: the draft proposes y ~ q, kept with min(1, p(y)/q(y)), else a residual sample:
    P(out = x) = sum_y q(y) [1{y = x} a(y) + (1 - a(y)) p'(x)] must be p(x)."""
    support = q > 0
    keep = torch.zeros_like(q)
    keep[support] = acceptance_probability(p[support], q[support])
    rejected = float((q * (1 - keep)).sum())
    residual = residual_distribution(p, q) if rejected > 0 else torch.zeros_like(p)
    out = q * keep + rejected * residual
    assert torch.allclose(out, p, atol=1e-12)


def test_accept_drafts_sampled_on_many_rows_is_distributed_as_p():
    """gamma = 1, 40000 rows: drafts from q, the accept rule, then the first output token's frequencies
    against p by chi-square (a fixed seed)."""
    g = torch.Generator().manual_seed(0)
    rows = 40_000
    p = HAND_P.float().expand(rows, 2, 4).clone()
    q = HAND_Q.float().expand(rows, 1, 4).clone()
    drafted = torch.multinomial(q[:, 0], 1, generator=g)
    n_accepted, next_token = accept_drafts(p, q, drafted, g)
    out = torch.where(n_accepted > 0, drafted[:, 0], next_token)
    counts = torch.bincount(out, minlength=4).double()
    expected = rows * HAND_P[:3]
    stat = float(((counts[:3] - expected) ** 2 / expected).sum())
    assert counts[3] == 0 and chi_square_pvalue(stat, 2) > 1e-3
    assert n_accepted.double().mean() == pytest.approx(float(torch.minimum(HAND_P, HAND_Q).sum()), abs=0.01)


def test_all_drafts_accepted_gives_the_bonus_token_and_a_zero_probability_draft_is_rejected():
    g = torch.Generator().manual_seed(0)
    one_hot = torch.eye(4)
    # p equals q at both drafted positions: both accepted, then the bonus from p_3 (token 3 for certain)
    p = torch.stack([one_hot[1], one_hot[2], one_hot[3]])[None]
    n, token = accept_drafts(p, p[:, :2], torch.tensor([[1, 2]]), g)
    assert (int(n[0]), int(token[0])) == (2, 3)
    # the target gives the draft's first token probability 0: rejected at once, the residual is p itself
    q = torch.stack([one_hot[0], one_hot[2]])[None]
    n, token = accept_drafts(p, q, torch.tensor([[0, 2]]), g)
    assert (int(n[0]), int(token[0])) == (0, 1)


def test_speculative_decoding_at_a_near_zero_temperature_is_the_targets_greedy_decoding():
    """At temperature 1e-3 p and q are one-hot on their argmax: a draft is accepted iff it is the target's
    greedy token. Any error in rolling the caches back after a rejection changes the tokens."""
    target = tiny_model(0)
    draft = copy.deepcopy(target)
    draft.blocks = torch.nn.ModuleList(draft.blocks[:1])  # the target without its last layer: agrees sometimes
    for prompt in prompts_of((5, 11)):
        for gamma in (1, 3):
            stats = SpeculativeStats()
            out = speculative_generate(target, draft, prompt, 30, gamma, 1e-3, torch.Generator().manual_seed(0), stats)
            assert out == reference(target, [prompt], 30)[0]
            assert 0 < stats.accepted < stats.tested and stats.tokens_per_call > 1


def test_a_draft_equal_to_the_target_is_always_accepted():
    target = tiny_model(0)
    stats = SpeculativeStats()
    speculative_generate(target, target, prompts_of((5,))[0], 40, 4, 1.0, torch.Generator().manual_seed(0), stats)
    assert stats.accepted == stats.tested and stats.alpha == pytest.approx(1.0, abs=1e-4)
    assert stats.target_calls == 8 and stats.tokens_per_call == 5  # 40 tokens in rounds of gamma + 1


def test_speculative_samples_pass_the_chi_square_test_against_the_target():
    """The module's test on tiny models: 4000 speculative samples of the first two tokens."""
    target, draft = tiny_model(0, scale=2.5), tiny_model(1, scale=2.5, n_layer=1)  # flatter: many bins
    prompt = prompts_of((7,))[0]
    probs = exact_two_token_bins(target, prompt, 4000)
    pairs = first_two_tokens(target, draft, prompt, 4000, 2, torch.Generator().manual_seed(0), chunk=1500)
    stat, dof = chi_square(pairs, probs)
    assert dof >= 10 and chi_square_pvalue(stat, dof) > 1e-3


def test_chi_square_pvalue_matches_known_quantiles():
    assert chi_square_pvalue(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert chi_square_pvalue(18.307038, 10) == pytest.approx(0.05, abs=1e-6)


# --- int8 ---------------------------------------------------------------------------------------------------
def test_per_channel_scales_bound_each_rows_error_by_its_own_absmax():
    weight = torch.tensor([[1.0, -0.5, 0.25], [0.012, 0.02, -0.005]])
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (2, 1)
    assert q[0].tolist() == [127, -64, 32] and q[1].tolist() == [76, 127, -32]  # 0.012 / (0.02 / 127) = 76.2
    error = (weight - q.float() * scale).abs()
    assert (error <= weight.abs().amax(1, keepdim=True) / 254 + 1e-9).all()


def test_the_int8_model_stores_a_quarter_of_the_bytes_and_keeps_the_logits():
    model = tiny_model(scale=1.0)
    quantized = quantize_model(model)
    assert type(model.lm_head) is torch.nn.Linear, "the original model is left as it was"
    assert quantized.tok_emb.head is quantized.lm_head and isinstance(quantized.blocks[0].attn.wq, Int8Linear)
    assert stored_bytes(quantized) < 0.3 * stored_bytes(model)
    idx = torch.tensor(prompts_of((20,)))
    with torch.no_grad():
        reference_logits, logits = model(idx), quantized(idx)
    assert (logits - reference_logits).abs().max() < 0.05 * reference_logits.abs().max()
    engine = Engine(quantized, kv_block_size=4)  # the engine runs on the quantised layers as they are
    assert len(engine.generate(prompts_of((4, 9)), SamplingParams(max_tokens=5, temperature=0))[1]) == 5
