"""ML building blocks, neural networks: the Llama-style transformer family (model.py), its attention
variants (attention.py), RMSNorm (norm.py), dense and mixture-of-experts FFNs (moe.py), and the
optimiser groups and learning-rate schedule every LM training loop shares (training.py)."""
