"""An inference engine over the shared transformer: a paged KV cache and continuous batching, in one file.

PagedAttention (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention", SOSP; the vLLM engine). A contiguous KV cache reserves block_size positions per request
up front, because the output length is unknown: most of that memory never holds a token. Here the cache
is a pool of fixed-size physical blocks, handed out one at a time as a sequence grows, like pages of
virtual memory:

    token at position p of a sequence  ->  physical block  table[p // B],  slot  p % B        (B = kv_block_size)
    per layer:  K_pool, V_pool  of shape  (num_kv_blocks, n_kv_head, B, head_dim)

so at most B - 1 slots of each sequence's last block are empty (waste ~ (B / 2) / length, against
1 - length / block_size for the contiguous reservation). Blocks carry reference counts: n samples of one
prompt (`add_request(..., n)`) share the prompt's blocks after a single prefill (fork), and the first
sample to write into a shared block copies it first (copy-on-write), so nothing a sibling reads changes.

Attention of a decode batch gathers each sequence's blocks into a padded (B, n_kv_head, L_max, head_dim)
view with a key mask: a CPU teaching version of the paged kernel. vLLM's CUDA kernel never builds that
copy: each thread block walks its sequence's block table and reads the K/V blocks where they lie.

Continuous batching (Yu et al. 2022, "Orca", OSDI: iteration-level scheduling). The scheduler decides
again before every step: sequences that finished leave at once, waiting ones join (prefill) while
`max_running` and the free blocks allow, first come first served. When the pool runs dry during decode,
the newest running sequence is preempted by recomputation (vLLM): its blocks are freed, it goes back to
the front of the queue, and its prompt plus the tokens it has generated are prefilled again later.

Sequences in one decode batch sit at different positions, so RoPE is applied with one position per row:
the layer's own cos/sin tables indexed by a position tensor (core/nn/attention.apply_rope). The engine
runs on the model's own weights (no copies); its greedy tokens equal `Transformer.generate`'s one prompt
at a time (tests/test_inference.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from core.nn.attention import apply_rope
from core.nn.fused import fused_linear
from core.nn.model import Transformer, sample_next


# ------------------------------------------------------------------------------------- requests

@dataclass
class SamplingParams:
    max_tokens: int = 64
    """new tokens at most"""
    temperature: float = 1.0
    """0 = greedy"""
    top_p: float = 1.0
    """nucleus sampling mass; 1.0 = no filter"""
    stop_token_ids: tuple[int, ...] = ()
    """emitting one ends the sequence (finish_reason "stop"); the stop token is appended to output_ids"""
    seed: int | None = None
    """seed of the sequence's own torch.Generator; None = a fresh nondeterministic one. The j-th of n
    samples of one request (and the i-th prompt of `Engine.generate`) gets seed + j (seed + i)"""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class QueueFull(Exception):
    """add_request while max_waiting sequences already wait (a server answers 429)."""


class PromptTooLong(ValueError):
    """An empty prompt, or one whose len + max_tokens does not fit the model's context (or the KV pool)."""


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    params: SamplingParams
    finish_reason: str | None = None
    """None while waiting or running; "stop", "length" or "abort" once finished"""
    block_table: list[int] = field(default_factory=list)
    """physical KV blocks holding this sequence's positions 0, B, 2B, ... (B = kv_block_size)"""
    num_cached: int = 0
    """tokens whose K/V are in the blocks: every token but the newest, which the next step feeds"""
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


# ---------------------------------------------------------------------------------- block manager

class BlockManager:
    """The physical KV blocks: a free list and a reference count per block (vLLM's block allocator)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.filled = [0] * num_blocks
        """slots of each block that hold a token (the KV-waste measurement reads them)"""
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out block 0 first

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self) -> int:
        if not self.free_ids:
            raise RuntimeError("out of KV blocks: the scheduler should have preempted a sequence first")
        block = self.free_ids.pop()
        self.ref_count[block], self.filled[block] = 1, 0
        return block

    def allocate_for(self, num_tokens: int) -> list[int]:
        """A fresh table for a prompt of num_tokens tokens (prefill), its blocks marked filled."""
        table = [self.allocate() for _ in range(self.blocks_for(num_tokens))]
        for i, block in enumerate(table):
            self.filled[block] = min(self.block_size, num_tokens - i * self.block_size)
        return table

    def fork(self, table: list[int]) -> list[int]:
        """A second table over the same blocks (one more reference to each)."""
        for block in table:
            self.ref_count[block] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        for block in table:
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free_ids.append(block)
        table.clear()

    def blocks_to_write(self, table: list[int], pos: int) -> int:
        """New blocks that writing position pos takes: 1 at a block boundary or into a shared block."""
        index = pos // self.block_size
        return 1 if index == len(table) or self.ref_count[table[index]] > 1 else 0

    def slot_to_write(self, table: list[int], pos: int) -> tuple[int, int, int | None]:
        """(block, offset, copy_from) for writing position pos: a block is appended at a boundary; a
        shared block is first replaced by a private copy (copy_from names the block to copy)."""
        index, offset = divmod(pos, self.block_size)
        copy_from = None
        if index == len(table):
            table.append(self.allocate())
        elif self.ref_count[table[index]] > 1:  # copy-on-write: the siblings keep the original
            copy_from = table[index]
            self.ref_count[copy_from] -= 1
            table[index] = self.allocate()
            self.filled[table[index]] = offset  # the copy holds this sequence's tokens before pos
        block = table[index]
        self.filled[block] = max(self.filled[block], offset + 1)
        return block, offset, copy_from

    def slots_in_use(self) -> tuple[int, int]:
        """(allocated slots, slots holding a token), each block counted once however many share it."""
        used = [b for b in range(self.num_blocks) if self.ref_count[b] > 0]
        return len(used) * self.block_size, sum(self.filled[b] for b in used)


class PagedKVCache:
    """The block pools of every layer: K and V of shape (n_layer, num_blocks, n_kv_head, B, head_dim)."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        attn = model.blocks[0].attn
        activations = model.norm.weight  # the hidden states' dtype and device (the linear layers may be int8)
        shape = (len(model.blocks), num_blocks, attn.n_kv_head, block_size, attn.head_dim)
        self.k = torch.zeros(shape, dtype=activations.dtype, device=activations.device)
        self.v = torch.zeros(shape, dtype=activations.dtype, device=activations.device)

    def write(self, layer: int, blocks: Tensor, offsets: Tensor, k: Tensor, v: Tensor) -> None:
        """k, v (N, n_kv_head, head_dim) of N tokens go to slot offsets[i] of block blocks[i]."""
        self.k[layer, blocks, :, offsets] = k
        self.v[layer, blocks, :, offsets] = v

    def gather(self, layer: int, tables: Tensor) -> tuple[Tensor, Tensor]:
        """tables (B, n) block ids -> K, V (B, n_kv_head, n * block_size, head_dim): each row's blocks
        laid end to end (what the CUDA kernel reads in place, copied here)."""
        def laid_out(pool: Tensor) -> Tensor:
            blocks = pool[layer, tables]  # (B, n, H_kv, bs, hd)
            return blocks.permute(0, 2, 1, 3, 4).flatten(2, 3)
        return laid_out(self.k), laid_out(self.v)

    def copy_block(self, src: int, dst: int) -> None:
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


# ------------------------------------------------------------------------------------------ engine

class Engine:
    """Paged KV cache + continuous batching over a core/ Transformer (MHA/GQA/MQA attention; other
    attention variants -> a ValueError naming the arch). NOT thread-safe: one thread calls it."""

    def __init__(self, model: Transformer, *, kv_block_size: int = 16, num_kv_blocks: int | None = None,
                 max_running: int = 16, max_waiting: int = 64):
        cfg = model.cfg
        if cfg.attention != "gqa":
            raise ValueError(f"the engine pages MHA/GQA/MQA caches (attention='gqa'); attention={cfg.attention!r} "
                             f"keeps other tensors per token")
        if kv_block_size < 1 or max_running < 1 or max_waiting < 1:
            raise ValueError("kv_block_size, max_running and max_waiting must be at least 1")
        self.model = model
        self.kv_block_size = kv_block_size
        self.num_kv_blocks = num_kv_blocks or max_running * -(-cfg.block_size // kv_block_size)
        self.max_running, self.max_waiting = max_running, max_waiting
        self.blocks = BlockManager(self.num_kv_blocks, kv_block_size)
        self.cache = PagedKVCache(model, self.num_kv_blocks, kv_block_size)
        self.waiting: deque[list[Sequence]] = deque()
        """groups of sequences that share one prefill (the n samples of a request), oldest first"""
        self.running: list[Sequence] = []
        """in order of admission: the last one is preempted first"""
        self._next_id = itertools.count()
        self.decode_steps = 0
        """batched decode forwards so far (one per step that had running sequences)"""
        self.prefills = 0
        """prompts prefilled so far (one per admitted group; a preempted sequence's recompute counts again)"""
        self.prefill_forwards = 0
        """prefill forwards so far: the groups admitted in one step share one"""
        self.preemptions = 0

    # --- the public API ------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return sum(len(group) for group in self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> list[Sequence]:
        """Queue n samples of one prompt; they share the prompt's KV blocks after one prefill."""
        prompt = [int(t) for t in prompt_ids]
        vocab, context = self.model.cfg.vocab_size, self.model.cfg.block_size
        if not prompt:
            raise PromptTooLong("the prompt is empty")
        if len(prompt) + params.max_tokens > context:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the "
                                f"model's context of {context} tokens")
        if self.blocks.blocks_for(len(prompt) + params.max_tokens) > self.num_kv_blocks:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} does not fit the "
                                f"KV pool of {self.num_kv_blocks} blocks of {self.kv_block_size}")
        if not all(0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if not 1 <= n <= self.max_running:
            raise ValueError(f"n must be in [1, max_running={self.max_running}], got {n}")
        if self.num_waiting + n > self.max_waiting:
            raise QueueFull(f"{self.num_waiting} sequences already wait (max_waiting={self.max_waiting})")
        group = []
        for j in range(n):
            generator = torch.Generator(device=self.cache.k.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed + j)
            group.append(Sequence(next(self._next_id), list(prompt), [], params, generator=generator))
        self.waiting.append(group)
        return group

    def step(self) -> list[tuple[Sequence, int]]:
        """One iteration: reserve a KV slot for every running sequence (preempting the newest when the pool
        is dry), admit waiting groups (prefill: their first token) unless something was preempted, then
        one batched decode forward for the sequences that were running. -> (sequence, new token) pairs."""
        made: list[tuple[Sequence, int]] = []
        decode_batch, preempted = self._reserve_decode_slots()
        if not preempted:  # vLLM: no admissions in a step that had to preempt (they would thrash)
            admitted = self._admit()
            if admitted:
                self._prefill(admitted, made)
            if self.waiting and not self.running:  # add_request made sure one sequence alone always fits
                raise RuntimeError(f"{self.num_waiting} sequences wait, none runs, and the next does not fit the "
                                   f"{self.free_blocks} free KV blocks of {self.num_kv_blocks}: blocks were leaked")
        if decode_batch:
            logits = self._decode_forward(decode_batch)
            for seq, row in zip(decode_batch, logits):
                seq.num_cached += 1
                self._append_token(seq, self._sample(seq, row), made)
        return made

    def abort(self, seq_id: int) -> None:
        for seq in self.running:
            if seq.seq_id == seq_id:
                self._finish(seq, "abort")
                return
        for group in self.waiting:
            for seq in group:
                if seq.seq_id == seq_id:
                    group.remove(seq)
                    seq.finish_reason = "abort"
                    if not group:
                        self.waiting.remove(group)
                    return

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Every prompt's output_ids, prompts fed to the queue as it has room (prompt i seeded seed + i)."""
        pending = deque(enumerate(prompts))
        sequences: list[Sequence | None] = [None] * len(prompts)
        while pending or self.has_unfinished():
            while pending and self.num_waiting < self.max_waiting:
                i, prompt = pending.popleft()
                seed = None if params.seed is None else params.seed + i
                sequences[i] = self.add_request(prompt, dataclasses.replace(params, seed=seed))[0]
            self.step()
        return [seq.output_ids for seq in sequences]

    def kv_slots(self) -> tuple[int, int]:
        """(allocated KV slots, slots holding a token) now; shared blocks counted once."""
        return self.blocks.slots_in_use()

    # --- scheduling ----------------------------------------------------------------------------
    def _reserve_decode_slots(self) -> tuple[list[Sequence], bool]:
        """The slot each running sequence writes this step, oldest first; when the pool is dry the newest
        running sequence is preempted (possibly the one asking). -> (decode batch, preempted anything)."""
        batch, preempted, i = [], False, 0
        while i < len(self.running):
            seq = self.running[i]
            while self.blocks.blocks_to_write(seq.block_table, seq.num_cached) > self.blocks.num_free:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    return batch, preempted  # it was the newest: nothing after it is left
            block, offset, copy_from = self.blocks.slot_to_write(seq.block_table, seq.num_cached)
            if copy_from is not None:
                self.cache.copy_block(copy_from, block)
            batch.append(seq)
            i += 1
        return batch, preempted

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the sequence's KV; it is prefilled again (prompt + its tokens)."""
        self.blocks.free(seq.block_table)
        seq.num_cached = 0
        self.waiting.appendleft([seq])  # victims go newest first, so the oldest ends at the front
        self.preemptions += 1

    def _admit(self) -> list[list[Sequence]]:
        """Waiting groups, first come first served, while running slots and free blocks allow; the first
        sequence of each gets the blocks of its prompt (for a recomputed one: prompt + its outputs)."""
        admitted = []
        while self.waiting:
            group = self.waiting[0]
            num_tokens = len(group[0].token_ids)
            if (len(self.running) + len(group) > self.max_running
                    or self.blocks.blocks_for(num_tokens) > self.blocks.num_free):
                break
            self.waiting.popleft()
            group[0].block_table = self.blocks.allocate_for(num_tokens)
            self.running.extend(group)
            admitted.append(group)
        return admitted

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.blocks.free(seq.block_table)
        self.running.remove(seq)

    def _append_token(self, seq: Sequence, token: int, made: list[tuple[Sequence, int]]) -> None:
        seq.output_ids.append(token)
        made.append((seq, token))
        if token in seq.params.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.output_ids) >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _sample(self, seq: Sequence, logits: Tensor) -> int:
        p = seq.params
        top_p = p.top_p if p.top_p < 1 else None
        return int(sample_next(logits[None], p.temperature, None, top_p, seq.generator))

    # --- the forward passes --------------------------------------------------------------------
    @torch.no_grad()
    def _prefill(self, groups: list[list[Sequence]], made: list[tuple[Sequence, int]]) -> None:
        """One forward over the tokens of every group admitted in this step (for a recomputed sequence: prompt +
        its outputs), which writes their K/V into each group's first sequence's blocks; the other samples of a
        group fork those blocks."""
        firsts = [group[0] for group in groups]
        logits = self._prefill_forward([seq.token_ids for seq in firsts], [seq.block_table for seq in firsts])
        self.prefills += len(groups)
        self.prefill_forwards += 1
        for group, row in zip(groups, logits):
            first = group[0]
            for seq in group:
                if seq is not first:
                    seq.block_table = self.blocks.fork(first.block_table)
                seq.num_cached = len(first.token_ids)
            for seq in group:
                self._append_token(seq, self._sample(seq, row), made)

    def _prefill_forward(self, prompts: list[list[int]], tables: list[list[int]]) -> Tensor:
        """Logits (P, vocab) after the last token of each prompt. The prompts are right-padded to the longest:
        under causal attention a prompt's own positions never see its padding, so each row is computed as
        Transformer.forward computes it alone from position 0 (tests/test_inference.py: equal tokens), and only
        the real positions' keys and values are written, into the prompt's blocks."""
        model, device = self.model, self.cache.k.device
        lengths = torch.tensor([len(tokens) for tokens in prompts], device=device)
        ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
        for row, tokens in enumerate(prompts):
            ids[row, :len(tokens)] = torch.tensor(tokens, device=device)
        rows, positions = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).nonzero(as_tuple=True)
        block_size = self.kv_block_size
        blocks = torch.tensor([tables[r][p // block_size] for r, p in zip(rows.tolist(), positions.tolist())],
                              device=device)
        offsets = positions % block_size
        x = model.tok_emb(ids)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.project_qkv(block.attn_norm(x), None, 0)  # RoPE at positions 0 .. T - 1, every row
            real_k, real_v = k.transpose(1, 2)[rows, positions], v.transpose(1, 2)[rows, positions]  # (N, H_kv, hd)
            self.cache.write(layer, blocks, offsets, real_k, real_v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.n_kv_head != attn.n_head)
            x = x + attn.merge_heads(y)
            x = x + block.ffn(block.ffn_norm(x))
        return model.lm_head(model.norm(x[torch.arange(len(prompts), device=device), lengths - 1]))

    @torch.no_grad()
    def _decode_forward(self, batch: list[Sequence]) -> Tensor:
        """One token per sequence, each at its own position -> logits (B, vocab). Every slot was reserved
        by _reserve_decode_slots; the token at position p goes to block table[p // B], slot p % B."""
        model, bs, device = self.model, self.kv_block_size, self.cache.k.device
        B = len(batch)
        positions = torch.tensor([seq.num_cached for seq in batch], device=device)
        blocks = torch.tensor([seq.block_table[seq.num_cached // bs] for seq in batch], device=device)
        offsets = positions % bs
        width = max(len(seq.block_table) for seq in batch)
        # padding entries point at block 0: read, then masked out
        tables = torch.tensor([seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch], device=device)
        key_mask = torch.arange(width * bs, device=device)[None, :] <= positions[:, None]  # (B, L): keys 0 .. p
        x = model.tok_emb(torch.tensor([[seq.token_ids[-1]] for seq in batch], device=device))  # (B, 1, C)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            H, H_kv, hd = attn.n_head, attn.n_kv_head, attn.head_dim
            qkv = fused_linear(block.attn_norm(x), attn.wq, attn.wk, attn.wv).view(B, 1, H + 2 * H_kv, hd).transpose(1, 2)
            qk, v = qkv.split([H + H_kv, H_kv], dim=1)
            # each row rotated by its own position: the layer's tables indexed per row, (B, 1, 1, hd)
            cos, sin = attn.rope.cos[positions][:, None, None, :], attn.rope.sin[positions][:, None, None, :]
            q, k = apply_rope(qk, cos, sin).split([H, H_kv], dim=1)
            self.cache.write(layer, blocks, offsets, k[:, :, 0], v[:, :, 0])
            keys, values = self.cache.gather(layer, tables)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask[:, None, None, :],
                                               enable_gqa=H_kv != H)
            x = x + attn.merge_heads(y)
            x = x + block.ffn(block.ffn_norm(x))
        self.decode_steps += 1
        return model.lm_head(model.norm(x[:, 0]))
