"""nanogpt: gradient accumulation is the big-batch step, DDP under torchrun reproduces the
single-process loss curve, the sample measure, bad batch shapes, and what a toy run leaves behind.
The toy preset's checks, determinism and resume are covered in tests/test_modules.py."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.artifacts import UserError
from core.data.corpus import TokenBins, write_token_bin
from core.nn.model import Transformer, load_model, scaled_config
from core.nn.training import adamw_groups
from core.paths import ROOT
from pre_train.llm.nanogpt.code.nanogpt import Config, check_batch, known_word_fraction, train_step, word_repeat_fraction
from pre_train.llm.nanogpt.module import MODULE

TOY = MODULE.presets["toy"]


def read_column(path, column: str) -> np.ndarray:
    with open(path) as f:
        return np.array([float(row[column]) for row in csv.DictReader(f)])


def tiny_setup(tmp_path, **overrides) -> tuple[TokenBins, Config, Transformer]:
    """Random tokens, the toy config at 8 windows of 16 tokens (with `overrides`), a seeded tiny llama."""
    write_token_bin(np.random.default_rng(0).integers(0, 64, 5000), tmp_path / "train.bin")
    cfg = dataclasses.replace(TOY, batch_size=8, block_size=16, **overrides)
    torch.manual_seed(0)
    model = Transformer(scaled_config("llama", vocab_size=64, block_size=16, n_layer=2, n_embd=32, n_head=4))
    return TokenBins(tmp_path), cfg, model


def train_three_steps(grad_accum: int, tmp_path, dtype: str = "fp32") -> tuple[list[torch.Tensor], list[float]]:
    bins, cfg, model = tiny_setup(tmp_path, grad_accum=grad_accum, dtype=dtype)
    opt = torch.optim.AdamW(adamw_groups(model, 0.1), lr=1e-2)
    batches = torch.Generator().manual_seed(0)
    losses = [train_step(model, model, opt, bins, batches, cfg, rank=0, world=1, device=torch.device("cpu"))[0]
              for _ in range(3)]
    return [p.detach().clone() for p in model.parameters()], losses


def test_gradient_accumulation_takes_the_same_steps_as_one_big_batch(tmp_path):
    whole, whole_losses = train_three_steps(1, tmp_path)
    accumulated, accumulated_losses = train_three_steps(4, tmp_path)
    assert whole_losses == pytest.approx(accumulated_losses, rel=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(whole, accumulated)) < 1e-5


class GradientRecorder:
    """Stands in for the optimizer: keeps the gradients train_step hands to step()."""

    def __init__(self, params):
        self.params, self.grads = list(params), []

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None


def test_accumulated_gradient_is_the_gradient_of_the_big_batch_mean(tmp_path):
    """The gradient itself, not the weights after AdamW steps: Adam divides by sqrt(v), so a gradient
    grad_accum times too large moves the weights almost as the right one does (only eps tells them apart)."""
    grads = {}
    for grad_accum in (1, 4):
        bins, cfg, model = tiny_setup(tmp_path, grad_accum=grad_accum, grad_clip=0.0)
        opt = GradientRecorder(model.parameters())
        train_step(model, model, opt, bins, torch.Generator().manual_seed(0), cfg, rank=0, world=1,
                   device=torch.device("cpu"))
        grads[grad_accum] = opt.grads
    for whole, accumulated in zip(grads[1], grads[4]):
        torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_is_applied_and_stays_close_to_fp32(tmp_path):
    _, fp32 = train_three_steps(1, tmp_path)
    _, bf16 = train_three_steps(1, tmp_path, dtype="bf16")
    # the same weights and batch at step 1: bf16 matmuls round (a gap) but the loss is the same loss
    assert 0 < abs(fp32[0] - bf16[0]) < 0.01 * fp32[0]


def test_batches_that_do_not_split_evenly_are_refused():
    check_batch(dataclasses.replace(TOY, batch_size=16, grad_accum=4), world=2)
    with pytest.raises(UserError, match="batch_size=16"):
        check_batch(dataclasses.replace(TOY, batch_size=16, grad_accum=3), world=1)
    with pytest.raises(UserError, match="batch_size=12"):
        check_batch(dataclasses.replace(TOY, batch_size=12, grad_accum=4), world=2)


def test_word_repeat_fraction_counts_a_word_equal_to_the_one_before():
    assert word_repeat_fraction(["One day, there was was was a cat."]) == 2 / 7
    assert word_repeat_fraction(["Tom ran.", "Tom sat."]) == 0.0  # repeats are counted inside a text only
    assert word_repeat_fraction([",,,,", "one"]) == 0.0


def test_known_word_fraction_counts_words_not_pieces():
    vocabulary = {"the", "cat", "sat"}
    assert known_word_fraction(["The cat sat."], vocabulary) == 1.0
    assert known_word_fraction(["The cat zzq, qqx"], vocabulary) == 0.5
    assert known_word_fraction(["", "!!"], vocabulary) == 0.0


def test_toy_run_writes_samples_a_loadable_model_and_its_speed(run_module):
    result = run_module("nanogpt", "toy", ["steps=30", "eval_every=10", "checkpoint_every=10"])
    samples = (result.out_dir / "samples.txt").read_text()
    assert samples.count("--- ") == TOY.n_samples
    evals = read_column(result.out_dir / "eval.csv", "step")
    assert list(evals) == [0, 10, 20, 30]
    model = load_model(result.out_dir / "model")
    assert model.num_params() == result.metrics["params"]
    timings = json.loads((result.out_dir / "run.json").read_text())["timings"]
    assert timings["tokens_per_s"] > 0 and 0 < timings["mfu"] < 1
    assert timings["train_seconds"] > 0  # what tokens_per_s divides by
    assert "tokens_per_s" not in result.metrics, "speed varies: it stays out of metrics.json"


def test_torchrun_ddp_reproduces_the_single_process_loss_curve(run_module, workdir):
    # with DDP: per rank 2 micro-batches of 4 windows, no_sync on the first; 100 of the toy's 250 steps are
    # enough to compare the curves (its samples need all 250 to pass sample_known_words: exit 1 is allowed)
    overrides = ["grad_accum=2", "steps=100"]
    single = run_module("nanogpt", "toy", overrides)

    ddp_dir = workdir / "ddp"
    env = {**os.environ, "FINETUNE_WORKDIR": str(ddp_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "run.py", "--module", "nanogpt", "--toy", *(a for o in overrides for a in ("--set", o))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("artifacts: ") == 1, "rank 0 alone reports"

    ddp_out = ddp_dir / single.out_dir.relative_to(workdir)
    for table, column in (("train", "loss"), ("eval", "val_loss")):
        ours, theirs = read_column(ddp_out / f"{table}.csv", column), read_column(single.out_dir / f"{table}.csv", column)
        assert len(ours) == len(theirs)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, err_msg=f"{table}.{column}")
    assert read_column(single.out_dir / "train.csv", "loss")[-1] < read_column(single.out_dir / "train.csv", "loss")[0]
