"""The from-scratch byte-level BPE (pre_train/llm/tokenizer/code/bpe.py), the shared sentencepiece
tokenizer (core/data/tokenizer.py) and the tokenizer module's toy run."""
from __future__ import annotations

import pytest

from conftest import read_metrics
from core.data.corpus import generate_stories
from core.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, trained_model_path
from core.paths import workdir
from pre_train.llm.tokenizer.code.bpe import PRETOKENIZE, ByteBPE, learn_merges, merge

FIRST_ID = 256 + len(SPECIAL_TOKENS)
TRICKY = ["", " ", "  two  spaces\n\n\ttab", "naïve café, 北京, emoji 🙂!", "x_y__z 1234567 don't",
          "<|user|>Hi<|end|><|assistant|>Hello<eos>", "<eos<|end|>>", "\u00a0nbsp\u2009thin"]


def test_textbook_example_reproduces_the_merges_worked_by_hand():
    """Sennrich et al. 2016's corpus {low: 5, lower: 2, newest: 6, widest: 3}, on bytes, without the
    </w> marker; ties go to the pair with the smaller ids. By hand:
      1. es 9 (ties st 9; e < s)       2. es+t 9           3. lo 7 (ties ow 7; l < o)   4. lo+w 7
      5. ew 6 (ties ne, w+est; e < n < w)                  6. n+ew 6                    7. new+est 6
      8. d+est 3 (ties id, wi; d < i < w)                  9. i+dest 3                 10. w+idest 3
     11. er 2 (ties low+e; e < low, a merged id > 255)    12. low+er 2; then every word is one token."""
    merges = learn_merges({b"low": 5, b"lower": 2, b"newest": 6, b"widest": 3}, n_merges=100, first_id=FIRST_ID)
    tokens = ByteBPE(merges).vocab[FIRST_ID:]
    assert tokens == [b"es", b"est", b"lo", b"low", b"ew", b"new", b"newest", b"dest", b"idest", b"widest",
                      b"er", b"lower"]
    assert merges[:4] == [(ord("e"), ord("s")), (FIRST_ID, ord("t")), (ord("l"), ord("o")), (FIRST_ID + 2, ord("w"))]


def test_merge_replaces_non_overlapping_pairs_left_to_right():
    assert merge([1, 1, 1, 2, 1, 1], (1, 1), 9) == [9, 1, 2, 9]
    assert merge([1, 2], (2, 1), 9) == [1, 2]


@pytest.fixture(scope="module")
def bpe():
    return ByteBPE.train(generate_stories(150, seed=0) + ["<eos>" * 20 + " <|user|><|user|>"], vocab_size=600)


def test_pretokenizer_covers_every_character():
    for text in TRICKY:
        assert "".join(PRETOKENIZE.findall(text)) == text


def test_round_trip_is_exact_on_unseen_and_odd_text(bpe):
    for text in TRICKY:
        assert bpe.decode(bpe.encode(text)) == text


def test_special_tokens_are_single_ids_never_made_by_merges(bpe):
    for k, special in enumerate(SPECIAL_TOKENS):
        assert bpe.encode(special) == [256 + k]
        assert bpe.encode(f"a{special}b").count(256 + k) == 1
    merged = bpe.vocab[bpe.first_merge_id:]
    assert not any(b"<eos>" in t or b"<|user|>" in t for t in merged)


def test_encoding_by_lowest_rank_equals_applying_every_merge_in_training_order(bpe):
    """The naive reference: run the whole merge list, in order, over each pre-token's bytes."""
    text = generate_stories(3, seed=9)[2]
    reference = []
    for piece in PRETOKENIZE.findall(text):
        tokens = list(piece.encode())
        for rank, pair in enumerate(bpe.merges):
            tokens = merge(tokens, pair, bpe.first_merge_id + rank)
        reference += tokens
    assert bpe.encode(text) == reference
    assert len(reference) < len(text.encode()) / 2  # the merges do compress


def test_vocab_size_is_exact_and_save_load_keeps_the_encoding(bpe, tmp_path):
    assert bpe.vocab_size == 600 and len(bpe.merges) == 600 - FIRST_ID
    text = generate_stories(1, seed=5)[0]
    assert ByteBPE.load(bpe.save(tmp_path / "bpe.json")).encode(text) == bpe.encode(text)


def test_load_tokenizer_trains_on_demand_once_and_says_so(workdir):
    said = []
    tok = load_tokenizer(vocab_size=512, say=said.append)
    assert len(said) == 1 and "training" in said[0] and tok.vocab_size == 512
    assert load_tokenizer(vocab_size=512, say=said.append).encode("Once upon a time") == tok.encode("Once upon a time")
    assert len(said) == 1  # cached: not trained again
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.encode(s) for s in SPECIAL_TOKENS] == [[tok.special_ids[s]] for s in SPECIAL_TOKENS]
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3


def test_toy_run_passes_its_checks_and_becomes_the_shared_tokenizer(run_module):
    result = run_module("tokenizer", "toy")
    assert result.passed, [c for c in result.checks if not c["passed"]]
    metrics = read_metrics(result)
    assert metrics["bpe_vocab_size"] == metrics["spm_vocab_size"] == 1024
    assert (result.out_dir / "segmentations.md").read_text().count("bpe (") == 5

    path = trained_model_path("toy", vocab_size=1024)
    assert path == workdir() / "pre_train/llm/tokenizer/output/toy/model/spm.model"
    assert trained_model_path("toy", vocab_size=4096) is None
    said = []
    text = "Lily and Tom went to the park."
    assert load_tokenizer(1024, say=said.append).encode(text) == Tokenizer(path).encode(text) and not said
