from core.checks import Check
from core.registry import Module

from .code.peft import Config, run

MODULE = Module(
    name="peft",
    category="alignment",
    title="LoRA and QLoRA: low-rank adapters on a frozen (4-bit NF4) base, against full SFT",
    summary="LoRA and QLoRA fine-tuning of the nanogpt base on the sft run's own conversations, scored on its "
            "held-out problems next to full SFT; identity at init, merged = unmerged, the adapter saved alone and "
            "reloaded, trainable share, weight bytes fp32 vs NF4, NF4 vs uniform int4 reconstruction error.",
    depends=("sft",),
    interview_weight=5,
    interview_outcome="Write h = W0 x + (alpha / r) B A x, say why B starts at zero and why merging costs no "
                      "latency; explain NF4, block-wise absmax and double quantisation, and quote your run's "
                      "trainable share, bytes and held-out gap to full SFT.",
    presets={
        "toy": Config(qlora=False, steps=100, batch_size=16, lr=1e-2),
        "default": Config(ablation=True),
    },
    run=run,
    produces_lm=True,
    # threads: torch's default, every core: the default preset's three fine-tunings of 300 steps at sft's size
    # need both cores of a 2-core machine to stay within 10 minutes
    metrics={
        "base_lenient": "held-out share the pretrained base answers right however phrased (from the sft run)",
        "sft_accuracy": "full SFT's held-out accuracy, right and stated as 'The answer is N.' (from the sft run)",
        "sft_lenient": "full SFT's held-out share right however phrased (from the sft run)",
        "lora_accuracy": "held-out accuracy of the merged LoRA model, right and stated as 'The answer is N.' (greedy)",
        "lora_lenient": "held-out share the merged LoRA model answers right however phrased",
        "lora_format": "share of the LoRA model's held-out answers that end in 'The answer is N.'",
        "lora_gap": "sft_lenient - lora_lenient: how far LoRA ends below full SFT on the same problems",
        "qlora_accuracy": "held-out accuracy of the QLoRA model (NF4 base dequantised on the fly + adapter)",
        "qlora_lenient": "held-out share the QLoRA model answers right however phrased",
        "qlora_format": "share of the QLoRA model's held-out answers that end in 'The answer is N.'",
        "qlora_gap": "sft_lenient - qlora_lenient",
        "qlora_cost": "lora_lenient - qlora_lenient: what the 4-bit base costs (negative: QLoRA ended higher)",
        "qlora_loss_ratio": "qlora_loss / lora_loss: what the 4-bit base costs in the loss both adapters minimise",
        "frozen_embedding_lenient": "held-out share right however phrased of LoRA trained with the whole embedding "
                                    "frozen (the ablation; empty when it is off)",
        "base_loss": "the base model's response-token loss on the held-out problems' worked solutions (nats)",
        "sft_loss": "full SFT model's response-token loss on the same held-out solutions (nats)",
        "lora_loss": "LoRA model's response-token loss on the same held-out solutions (nats)",
        "qlora_loss": "QLoRA model's response-token loss on the same held-out solutions (nats)",
        "frozen_embedding_loss": "held-out loss of LoRA trained with the whole embedding frozen (the ablation)",
        "nf4_base_loss": "the base with its adapted weights in NF4 (before any training): what 4 bits cost",
        "init_max_abs_diff": "largest |logit difference| between the LoRA model at init and its base",
        "merge_max_abs_diff": "largest |logit difference| between the merged and the unmerged trained LoRA model",
        "reload_max_abs_diff": "largest |logit difference| between the trained LoRA model and a fresh one that "
                               "loaded the saved adapter files",
        "new_tokens": "tokens of the fine-tuning conversations that the pretraining data never contains: their "
                      "embedding rows train with the adapters",
        "trainable_params": "parameters LoRA trains: A and B of every adapted projection, and the new tokens' rows",
        "trainable_share": "trainable / all parameters of the LoRA model",
        "adapter_file_bytes": "size of the adapter files (safetensors: A and B, and the new tokens' rows)",
        "adapted_bytes_fp32": "bytes of the adapted weight matrices in fp32, from the tensors",
        "adapted_bytes_nf4": "bytes of the same matrices in NF4: packed codes + double-quantised scales",
        "nf4_bits_per_weight": "8 * adapted_bytes_nf4 / number of adapted weights",
        "model_bytes_fp32": "bytes of every weight of the base model in fp32",
        "model_bytes_qlora": "bytes of the QLoRA model's weights: NF4 matrices, fp32 embedding and norms, adapters",
        "nf4_mse_normal": "mean squared error of NF4 (as stored) on N(0, 1) samples, blocks of 64",
        "int4_mse_normal": "mean squared error of uniform int4 (fp32 scales) on the same samples",
        "nf4_mse_weights": "NF4's mean squared error on the base's adapted weight matrices",
        "int4_mse_weights": "uniform int4's mean squared error on the same matrices",
    },
    checks=[
        Check("init_max_abs_diff", "<=", 0.0, why="B = 0: the LoRA model computes its base's logits bit for bit"),
        Check("merge_max_abs_diff", "<", 1e-4,
              why="W0 + (alpha / r) B A computes what the two paths compute, up to float rounding"),
        Check("reload_max_abs_diff", "<=", 0.0,
              why="the adapter files alone (A, B, the new tokens' rows), loaded on the base, reproduce the "
                  "trained model bit for bit"),
        Check("nf4_mse_normal", "<", ref="int4_mse_normal",
              why="NF4's levels sit at quantiles of N(0, 1): on normal weights it beats evenly spaced int4"),
        Check("nf4_bits_per_weight", "<", 4.5,
              why="4-bit codes plus double-quantised scales: below the 4.5 bits that fp32 absmax scales would cost"),
        Check("trainable_share", "<", 0.2, why="only the adapters train, a small share of the model"),
        Check("lora_lenient", ">", ref="base_lenient", why="LoRA fine-tuning beats the base on the held-out problems"),
        Check("lora_loss", "<", 1.0, presets=("toy",),
              why="the base scores about 9 nats per held-out response token (it never saw the chat template); "
                  "with the embedding frozen LoRA stalls near 1.5 (the new tokens cannot be emitted); "
                  "below 1 it learned"),
        Check("lora_loss", "<", ref="frozen_embedding_loss", presets=("default",), when=lambda cfg: cfg.ablation,
              why="training the new tokens' rows is what lets LoRA learn the task (same run, same batches)"),
        Check("qlora_loss_ratio", "<", 1.1, presets=("default",), when=lambda cfg: cfg.qlora,
              why="the 4-bit base costs little: QLoRA's held-out response loss ends within 10% of LoRA's on the "
                  "fp32 base (same adapter, data and batches); NF4 with wrong scales or codes would not. The loss, a "
                  "mean over every response token, rather than the greedy right/wrong rate of 300 problems"),
    ],
)
