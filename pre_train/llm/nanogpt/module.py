from core.checks import Check
from core.registry import Module

from .code.nanogpt import Config, run

MODULE = Module(
    name="nanogpt",
    category="llm",
    title="nanoGPT pretraining: AdamW, warmup + cosine, accumulation, bf16, checkpoints, DDP, MFU",
    summary="Pretrain any architecture of the shared transformer family from scratch on generated stories: "
            "val loss against the corpus's unigram entropy, perplexity, decoded samples, tokens/s and MFU "
            "against the fp32 matmul peak measured in the same process; torchrun DDP on CPU (gloo).",
    interview_weight=5,
    interview_outcome="Quote your pretraining run's val loss against the unigram entropy, and its MFU with what "
                      "limits it; explain warmup + cosine, gradient accumulation and why norms and embeddings get "
                      "no weight decay.",
    presets={
        "toy": Config(n_stories=400, vocab_size=512, n_layer=2, n_embd=64, n_head=4, block_size=128, steps=250,
                      batch_size=8, lr=5e-3, warmup=10, eval_every=50, eval_batches=4, checkpoint_every=50,
                      sample_tokens=60),
        "default": Config(),
    },
    run=run,
    produces_lm=True,
    metrics={
        "unigram_entropy": "entropy of the training-token frequencies (nats): the loss of a context-blind model",
        "initial_val_loss": "val cross-entropy of the untrained model (about ln vocab_size)",
        "val_loss": "val cross-entropy (nats per token) after the last step",
        "val_perplexity": "exp(val_loss): the effective number of equally likely next tokens",
        "entropy_gap": "unigram_entropy - val_loss: nats per token the model gets from the context",
        "train_loss_last_10pct": "mean train loss over the last 10% of the steps",
        "sample_known_words": "fraction of the words in the generated samples that occur in the training text",
        "sample_known_words_untrained": "the same for samples of the untrained model (same prompts, same seed)",
        "sample_word_repeats": "fraction of the word-to-word transitions in the samples that repeat the previous word",
        "train_word_repeats": "the same fraction in the training stories",
        "params": "parameter count (a tied embedding counted once)",
        "train_flops_per_token": "training FLOPs per token, 6N + 6 L T n_head (d_qk + d_v) (PaLM App. B)",
        "tokens_trained": "steps x batch_size x block_size",
    },
    checks=[
        Check("val_loss", "<", ref="initial_val_loss", why="the loss decreases from the untrained model's"),
        Check("entropy_gap", ">", 1.0, presets=("toy",),
              why="a clear margin below the unigram entropy: the model uses the context"),
        Check("entropy_gap", ">", 3.0, presets=("default",),
              why="a large margin below the unigram entropy: the model has learned the stories' structure"),
        Check("sample_known_words", ">", 0.85, why="the samples decode to the corpus's words, not byte soup"),
        Check("sample_known_words", ">", ref="sample_known_words_untrained",
              why="the words come from training: the untrained model's samples score lower"),
        Check("sample_word_repeats", "<", 0.1,
              why="the samples do not stutter ('was was was'): the stories repeat a word ~1% of the time"),
    ],
)
