"""ML building blocks, data: the generated TinyStories-like corpus and its token bins (corpus.py) and
the sentencepiece tokenizer every LLM module loads (tokenizer.py), the arithmetic word problems with
verifiable answers of the post-training modules (word_problems.py), their chat format (chat.py) and
the preference pairs built from them (preferences.py)."""
