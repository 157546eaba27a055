"""Speculative decoding: a small draft model proposes, the target model verifies, and the output is
distributed exactly as the target's own samples.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding" (Algorithm 1);
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling". With p the
target's and q the draft's next-token distributions at the same context:

    draft      x_1 .. x_gamma ~ q, one after another (gamma cheap draft forwards)
    verify     p_1 .. p_{gamma+1} from ONE target forward over [context, x_1 .. x_gamma]
    accept     x_i with probability min(1, p_i(x_i) / q_i(x_i)), in order, until the first rejection
    resample   the first rejected position from  p'(x) = max(0, p(x) - q(x)) / sum_x' max(0, p(x') - q(x'))
    bonus      when all gamma are accepted, one more token from p_{gamma+1}

Why the output is p: P(out = x) = q(x) min(1, p(x)/q(x)) + (1 - beta) p'(x) = min(p, q)(x) + max(0, p - q)(x)
= p(x), where beta = sum_x min(p(x), q(x)) is the chance of accepting at that position (Leviathan,
Theorem 3.5; Appendix A.1). With beta ~ alpha at every position (their i.i.d. assumption), one target
call yields on average
    E[tokens per target call] = (1 - alpha^(gamma + 1)) / (1 - alpha)                              (eq. 1)

Both models keep a contiguous KV cache (core/nn/model.init_cache). A rejected draft is rolled back by
moving the position back: the stale entries beyond it are overwritten by the next write and never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.nn.model import Transformer


def acceptance_probability(p_x: Tensor, q_x: Tensor) -> Tensor:
    """min(1, p(x) / q(x)) of a drafted token x (q(x) > 0: the draft sampled it)."""
    return (p_x / q_x).clamp(max=1.0)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """p'(x) = max(0, p(x) - q(x)), normalised over the last dimension."""
    residual = (p - q).clamp(min=0.0)
    return residual / residual.sum(-1, keepdim=True)


def accept_drafts(p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Leviathan Algorithm 1 on B rows at once: p (B, gamma + 1, V) the target's distributions, q (B, gamma, V)
    the draft's, drafted (B, gamma). -> (accepted count n (B,), the token that follows the n accepted ones
    (B,): a residual sample at the first rejected position, or the bonus token from p_{gamma+1})."""
    B, gamma = drafted.shape
    p_x = p[:, :gamma].gather(-1, drafted[..., None])[..., 0]
    q_x = q.gather(-1, drafted[..., None])[..., 0]
    u = torch.rand(B, gamma, generator=generator, dtype=p.dtype, device=p.device)
    accepted = u < acceptance_probability(p_x, q_x)
    n_accepted = accepted.int().cumprod(-1).sum(-1)  # accepted before the first rejection
    rows = torch.arange(B, device=p.device)
    at = n_accepted.clamp(max=gamma - 1)
    residual = residual_distribution(p[rows, at], q[rows, at])
    follow = torch.where((n_accepted < gamma)[:, None], residual, p[rows, gamma])
    return n_accepted, torch.multinomial(follow, 1, generator=generator)[:, 0]


def overlap(p: Tensor, q: Tensor) -> Tensor:
    """beta = sum_x min(p(x), q(x)): the probability of accepting a draft from q where the target is p."""
    return torch.minimum(p, q).sum(-1)


class CachedModel:
    """A model, its contiguous KV cache for B rows and how many positions of it are valid."""

    def __init__(self, model: Transformer, batch: int, max_len: int | None = None):
        self.model = model
        self.caches = model.init_cache(batch, max_len)
        self.cached = 0

    @classmethod
    def after_prefix(cls, model: Transformer, prefix: list[int], rows: int, max_len: int) -> CachedModel:
        """rows copies of the cache of one prefill of `prefix`: rows that share a prompt compute it once."""
        one = cls(model, 1, max_len)
        if prefix:
            one.feed(torch.tensor([prefix]), 1.0)
        state = cls(model, 0, max_len)
        state.caches = [{name: t.expand(rows, *t.shape[1:]).clone() for name, t in cache.items()} for cache in one.caches]
        state.cached = one.cached
        return state

    def feed(self, tokens: Tensor, temperature: float) -> Tensor:
        """Run tokens (B, T) at positions cached .. cached + T - 1 -> next-token distributions (B, T, V)."""
        logits = self.model(tokens, self.caches, pos=self.cached)
        self.cached += tokens.shape[1]
        return (logits.float() / temperature).softmax(-1)


@torch.no_grad()
def speculative_iteration(target: CachedModel, draft: CachedModel, tokens: Tensor, gamma: int, temperature: float,
                          generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One draft-and-verify round for B rows of one length: tokens (B, L) the context (its last token not
    yet in either cache). -> (drafted (B, gamma), n accepted (B,), next token (B,), beta (B, gamma)).
    The caches are left valid up to the context plus the accepted drafts (the caller must give every row
    the same acceptance to continue with them: one row, or a fresh cache per round)."""
    draft_probs = []
    pending = tokens[:, draft.cached:]
    drafted = []
    for _ in range(gamma):
        q = draft.feed(pending, temperature)[:, -1]
        pending = torch.multinomial(q, 1, generator=generator)
        draft_probs.append(q)
        drafted.append(pending)
    drafted = torch.cat(drafted, dim=1)
    q = torch.stack(draft_probs, dim=1)
    start = target.cached
    p = target.feed(torch.cat([tokens[:, start:], drafted], dim=1), temperature)[:, -(gamma + 1):]
    n_accepted, next_token = accept_drafts(p, q, drafted, generator)
    return drafted, n_accepted, next_token, overlap(p[:, :gamma], q)


@dataclass
class SpeculativeStats:
    target_calls: int = 0
    tested: int = 0
    """draft tokens that were put to the accept test (those after a rejection are never tested)"""
    accepted: int = 0
    beta_sum: float = 0.0
    """sum of beta = sum_x min(p, q) over the tested positions: the expected number of acceptances"""
    beta_variance: float = 0.0
    """sum of beta (1 - beta) over the tested positions: the variance of the number of acceptances"""
    new_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.tested, 1)

    @property
    def alpha(self) -> float:
        """mean beta over the tested positions: the theoretical acceptance rate at the contexts met"""
        return self.beta_sum / max(self.tested, 1)

    @property
    def tokens_per_call(self) -> float:
        return self.new_tokens / max(self.target_calls, 1)


@torch.no_grad()
def speculative_generate(target: Transformer, draft: Transformer, prompt: list[int], max_new_tokens: int, gamma: int,
                         temperature: float, generator: torch.Generator, stats: SpeculativeStats) -> list[int]:
    """Sample max_new_tokens continuation tokens of one prompt, distributed as target.generate's samples."""
    block_size = min(target.cfg.block_size, draft.cfg.block_size)
    if len(prompt) + max_new_tokens > block_size:
        raise ValueError(f"prompt + max_new_tokens = {len(prompt) + max_new_tokens} exceeds block_size {block_size}")
    tokens = torch.tensor([prompt])
    target_state, draft_state = CachedModel(target, 1), CachedModel(draft, 1)
    while tokens.shape[1] - len(prompt) < max_new_tokens:
        # the target scores positions up to L - 1 + gamma: near the end of the context, draft fewer
        steps = min(gamma, block_size - tokens.shape[1])
        drafted, n_accepted, next_token, beta = speculative_iteration(
            target_state, draft_state, tokens, steps, temperature, generator)
        n = int(n_accepted[0])
        tested = min(n + 1, steps)
        stats.target_calls += 1
        stats.tested += tested
        stats.accepted += n
        stats.beta_sum += float(beta[0, :tested].sum())
        stats.beta_variance += float((beta[0, :tested] * (1 - beta[0, :tested])).sum())
        stats.new_tokens += n + 1
        length = tokens.shape[1]
        tokens = torch.cat([tokens, drafted[:, :n], next_token[:, None]], dim=1)
        # roll back: valid cache entries are the context and the accepted drafts the model was fed
        target_state.cached = length + n
        draft_state.cached = min(draft_state.cached, length + n)
    return tokens[0, len(prompt):len(prompt) + max_new_tokens].tolist()


@torch.no_grad()
def first_two_tokens(target: Transformer, draft: Transformer, prompt: list[int], n_samples: int, gamma: int,
                     generator: torch.Generator, chunk: int = 1000) -> Tensor:
    """n_samples independent speculative samples (temperature 1) of the first two tokens after a prompt,
    (n_samples, 2), `chunk` rows at a time, the prompt prefilled once per chunk for all its rows. A row that
    accepted a draft has its second token from the same round (the next draft, a residual sample or the
    bonus); a row that rejected at once takes it from a second round, run for all such rows together
    (their contexts, the prompt and their first token, have one length)."""
    pairs = []
    for start in range(0, n_samples, chunk):
        rows = min(chunk, n_samples - start)
        batch = torch.tensor([prompt]).expand(rows, -1)
        max_len = len(prompt) + gamma + 2

        def states(rows_: int, prefix: list[int]) -> tuple[CachedModel, CachedModel]:
            return (CachedModel.after_prefix(target, prefix, rows_, max_len),
                    CachedModel.after_prefix(draft, prefix, rows_, max_len))

        drafted, n_accepted, next_token, _ = speculative_iteration(*states(rows, prompt[:-1]), batch, gamma, 1.0,
                                                                   generator)
        # row r emits drafted[:n_r] and then next_token
        first = torch.where(n_accepted > 0, drafted[:, 0], next_token)
        second = torch.where(n_accepted > 1, drafted[:, min(1, gamma - 1)], next_token)
        rejected_at_once = (n_accepted == 0).nonzero()[:, 0]
        if len(rejected_at_once):
            again = torch.cat([batch[rejected_at_once], first[rejected_at_once, None]], dim=1)
            drafted2, n2, next2, _ = speculative_iteration(*states(len(again), prompt), again, gamma, 1.0, generator)
            second[rejected_at_once] = torch.where(n2 > 0, drafted2[:, 0], next2)
        pairs.append(torch.stack([first, second], dim=1))
    return torch.cat(pairs)
