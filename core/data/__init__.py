"""ML building blocks, data: the generated TinyStories-like corpus and its token bins (corpus.py) and
the sentencepiece tokenizer every LLM module loads (tokenizer.py)."""
