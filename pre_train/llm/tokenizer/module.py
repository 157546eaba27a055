from core.checks import Check
from core.registry import Module

from .code.tokenizer import Config, run

MODULE = Module(
    name="tokenizer",
    category="llm",
    title="Tokenizers: byte-level BPE from scratch vs sentencepiece BPE",
    summary="Train a from-scratch byte-level BPE and a sentencepiece BPE on the same story corpus, "
            "compare compression, vocabulary use and segmentations, and keep the sentencepiece model "
            "as the tokenizer of every later LLM module.",
    interview_weight=5,
    interview_outcome="Train BPE by hand on a five-word corpus (count pairs, merge the most frequent, repeat), say "
                      "why starting from bytes leaves nothing out of vocabulary, and quote your run's bytes per "
                      "token for both tokenizers.",
    presets={
        "toy": Config(n_stories=300, val_fraction=0.1, vocab_size=1024, vocab_sweep=(384, 512, 768)),
        "default": Config(),
    },
    run=run,
    metrics={
        "bpe_bytes_per_token": "validation UTF-8 bytes per token, from-scratch BPE",
        "spm_bytes_per_token": "validation UTF-8 bytes per token, sentencepiece BPE",
        "bpe_vocab_use": "fraction of the from-scratch vocabulary that occurs on validation",
        "spm_vocab_use": "fraction of the sentencepiece vocabulary that occurs on validation",
        "bpe_vocab_size": "ids in the from-scratch vocabulary (bytes + specials + merges)",
        "spm_vocab_size": "ids in the sentencepiece vocabulary",
        "bpe_roundtrip_fraction": "fraction of validation stories with decode(encode(d)) == d, from scratch",
        "spm_roundtrip_fraction": "fraction of validation stories with decode(encode(d)) == d, sentencepiece",
        "bpe_special_single_fraction": "fraction of special tokens that are one id, alone and inside text (from scratch)",
        "spm_special_single_fraction": "fraction of special tokens that are one id, alone and inside text (sentencepiece)",
        "boundary_agreement": "mean Jaccard overlap of the two tokenizers' token boundaries on validation",
        "smallest_vocab_bpe_bytes_per_token": "from-scratch bytes per token at the smallest vocab of the sweep",
        "compression_ratio_bpe_to_spm": "bpe_bytes_per_token / spm_bytes_per_token",
    },
    checks=[
        Check("bpe_roundtrip_fraction", ">=", 1.0, why="byte-level BPE is lossless: every validation story comes back exactly"),
        Check("spm_roundtrip_fraction", ">=", 1.0, why="identity normalisation + byte fallback make sentencepiece lossless too"),
        Check("bpe_special_single_fraction", ">=", 1.0, why="chat markers and <eos> are atomic ids, never split by merges"),
        Check("spm_special_single_fraction", ">=", 1.0, why="user-defined symbols are atomic ids in sentencepiece"),
        Check("bpe_bytes_per_token", ">", 2.5, why="merges compress: raw bytes give 1.0, a BPE that never merges at encode time too"),
        Check("spm_bytes_per_token", ">", 2.5, why="sentencepiece compresses the same text as well"),
        Check("bpe_bytes_per_token", ">", ref="smallest_vocab_bpe_bytes_per_token",
              why="more merges, shorter sequences: compression grows with the vocabulary"),
        Check("compression_ratio_bpe_to_spm", ">", 0.9, why="two independent BPE implementations on the same text and budget compress alike"),
        Check("compression_ratio_bpe_to_spm", "<", 1.1, why="two independent BPE implementations on the same text and budget compress alike"),
    ],
)
