"""ML building blocks, neural networks: the Llama-style transformer family (model.py), its attention
variants (attention.py), RMSNorm (norm.py), dense and mixture-of-experts FFNs (moe.py), the
optimiser groups and learning-rate schedule every LM training loop shares (training.py), padded batches
and their log-probs (sequences.py), LoRA / QLoRA adapters with NF4 weights (lora.py), the DDPM noise
schedule and sampler (ddpm.py), and the shape world's frozen vision encoder (vision.py) and decoder
(shape_lm.py)."""
