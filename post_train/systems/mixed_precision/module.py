from core.checks import Check
from core.registry import Module

from .code.mixed_precision import Config, run

MODULE = Module(
    name="mixed_precision",
    category="systems",
    title="Mixed precision: fp32 vs bf16 autocast vs fp16 with a dynamic loss scaler",
    summary="The same small transformer, initial weights and batches trained in fp32, bf16 autocast, fp16 autocast "
            "with a dynamic loss scaler written here (checked step by step against torch.amp.GradScaler on the same "
            "gradients) and bf16 weights without an fp32 master copy; fp16 underflow of the gradients measured "
            "element by element without and with the loss scale; final loss and ms/step of each.",
    interview_weight=4,
    interview_outcome="Say what bf16 and fp16 keep and lose (range vs precision), why fp16 needs loss scaling and how "
                      "the dynamic scaler moves S, why the master weights and the optimizer stay fp32, and quote your "
                      "run's underflow share without and with scaling and the bf16 / fp16 loss against fp32.",
    presets={
        "toy": Config(n_stories=300, steps=60, batch_size=8, warmup=5, growth_interval=20, inject_inf_step=30,
                      log_every=5, eval_batches=4, gpu_bench_steps=10),
        "default": Config(),
    },
    run=run,
    threads=1,  # a 2-layer, 64-wide model: a second thread only adds synchronisation, and timings stay comparable
    metrics={
        "unigram_entropy": "entropy of the training-token frequencies (nats): the loss of a context-blind model",
        "initial_val_loss": "val cross-entropy of the shared untrained initial model (about ln vocab_size)",
        "val_loss_fp32": "val cross-entropy after training in fp32",
        "val_loss_bf16": "val cross-entropy after training with bf16 autocast (fp32 weights and optimizer)",
        "val_loss_fp16": "val cross-entropy after training with fp16 autocast and the dynamic loss scaler",
        "val_loss_bf16_pure": "val cross-entropy after training with the weights themselves in bf16 (no fp32 master)",
        "bf16_rel_diff": "|val_loss_bf16 - val_loss_fp32| / val_loss_fp32",
        "fp16_rel_diff": "|val_loss_fp16 - val_loss_fp32| / val_loss_fp32",
        "bf16_pure_rel_diff": "(val_loss_bf16_pure - val_loss_fp32) / val_loss_fp32 (signed: the cost of no master copy)",
        "fp16_grad_norm_ratio": "median over the steps both took of the fp16 arm's unscaled gradient norm / the fp32 "
                                "arm's on the same batch (1 when the scale is removed before the norm is read)",
        "skipped_steps": "fp16 steps the loss scaler skipped (inf/nan gradient), the injected one included",
        "scale_growths": "times the loss scale grew after growth_interval clean steps",
        "final_log2_scale": "log2 of the loss scale S at the end of the run",
        "injected_inf_skipped": "1 if the step with the injected inf gradient was skipped and left every weight "
                                "bit-identical, else 0",
        "injected_inf_scale_ratio": "loss scale after the injected-inf step / before it (backoff: 0.5)",
        "gradscaler_scale_mismatches": "steps where torch.amp.GradScaler, fed the same scaled gradients, held a "
                                       "different scale from ours",
        "gradscaler_skip_mismatches": "steps where GradScaler's skip decision differed from ours",
        "gradscaler_norm_max_rel_diff": "largest relative difference between GradScaler's unscaled gradient norm "
                                        "and ours, over the steps both took",
        "underflow_micro": "share of the activation-gradient elements (attention and FFN outputs) nonzero in an fp32 "
                           "backward that are exactly 0 in an fp16-autocast backward, for a training-sized batch "
                           "without loss scaling (one val batch, the trained fp32 model)",
        "underflow": "the same share when that batch is one of accum_micro_batches micro-batches of a "
                     "gradient-accumulated batch (its loss divided by that count), without loss scaling",
        "underflow_scaled": "the same with the loss multiplied by the scaler's initial scale S",
        "underflow_params": "the same share for the parameter gradients of the accumulated micro-batch, no scaling",
        "underflow_params_scaled": "the same for the parameter gradients with the loss scale",
        "cast_underflow": "share of the nonzero fp32 activation gradients of the accumulated micro-batch that a plain "
                          "cast to fp16 turns into 0 (magnitude at most 2^-25)",
        "scaled_nonfinite": "inf/nan gradient elements in the scaled fp16 backward of the accumulated micro-batch "
                            "(0: that S does not overflow)",
        "bf16_lost_update_share": "of the weight elements a bf16-autocast step changed (fp32 master), the share "
                                  "whose update would vanish if the weights were stored in bf16; mean over the "
                                  "measured steps",
        "bf16_lost_update_share_last": "the same at the last step (smallest learning rate)",
        "bf16_pure_unchanged_share": "share of the weight elements a step of the bf16-weights arm left exactly "
                                     "unchanged, mean over the measured steps",
    },
    checks=[
        Check("val_loss_fp32", "<", ref="unigram_entropy",
              why="the fp32 reference learns from the context: the precisions are compared after real training"),
        Check("bf16_rel_diff", "<", 0.02,
              why="bf16 autocast with fp32 weights ends within 2% of fp32's val loss on the same batches"),
        Check("fp16_rel_diff", "<", 0.02,
              why="fp16 autocast with the dynamic loss scaler ends within 2% of fp32's val loss"),
        Check("bf16_pure_rel_diff", ">", 0.015,
              why="without the fp32 master copy the same bf16 recipe ends measurably worse (toy seeds 0-2: 2.9-3.2%): "
                  "the updates that round away are real"),
        Check("injected_inf_skipped", "==", 1,
              why="an inf gradient makes the scaler skip the step: no weight moves"),
        Check("injected_inf_scale_ratio", "==", 0.5,
              why="...and halve the scale (backoff 0.5)"),
        Check("gradscaler_scale_mismatches", "==", 0,
              why="torch.amp.GradScaler, fed the same scaled gradients, holds the same scale at every step"),
        Check("gradscaler_skip_mismatches", "==", 0,
              why="...and skips exactly the same steps"),
        Check("gradscaler_norm_max_rel_diff", "<", 1e-6,
              why="...and unscales to the same gradient norm"),
        Check("scale_growths", ">=", 1,
              why="the scale grew at least once after growth_interval clean steps, so the agreement covers growth"),
        Check("fp16_grad_norm_ratio", ">", 0.8,
              why="the optimizer and the clip see the true gradient: its norm is fp32's, not S times it"),
        Check("fp16_grad_norm_ratio", "<", 1.25,
              why="...from above too (a loss scaled twice or never unscaled reads S times too large)"),
        Check("underflow", ">", 0.01, presets=("toy",),
              why="without scaling, fp16 flushes over 1% of the accumulated micro-batch's nonzero activation gradients "
                  "to 0 (an fp32 backward flushes none)"),
        Check("underflow", ">", 0.2, presets=("default",),
              why="...over a fifth of them once the model is trained (its gradients are smaller)"),
        Check("underflow_scaled", "<", 0.001,
              why="with the loss scale almost none is lost"),
        Check("scaled_nonfinite", "==", 0,
              why="...and that scale overflows nowhere in the batch's backward"),
    ],
)
