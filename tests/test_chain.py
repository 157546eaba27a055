"""The headline command from an empty work dir: `python run.py --module grpo --toy` finds no sft and no
nanogpt model, builds both (saying so, one line each), then runs GRPO and shows what changed."""
from __future__ import annotations

import json


def test_grpo_toy_builds_its_whole_chain_and_shows_the_change(toy_chain):
    out = toy_chain.output  # the fixture fails, with the output's tail, unless the command exited 0
    assert "grpo needs a sft model at preset toy and none is in the run index" in out
    assert "sft needs a nanogpt model at preset toy and none is in the run index" in out
    assert "built nanogpt (toy)" in out and "built sft (toy)" in out
    assert "held-out accuracy" in out and "before:" in out and "after:" in out
    index = json.loads((toy_chain.folder / "output" / "run_index.json").read_text())
    assert {name: index[name]["toy"]["status"] for name in ("nanogpt", "sft", "grpo")} == dict.fromkeys(
        ("nanogpt", "sft", "grpo"), "passed")
    for rel in ("pre_train/llm/nanogpt", "post_train/alignment/sft", "post_train/alignment/grpo"):
        models = toy_chain.folder / rel / "output" / "toy" / "model"
        assert (models / "model.safetensors").is_file() and (models / "tokenizer.model").is_file()


def test_a_chained_run_reuses_the_upstream_it_finds(toy_chain, run_module, workdir, capsys):
    toy_chain.copy_to(workdir)
    result = run_module("eval", "toy")
    assert "building it first" not in capsys.readouterr().err
    assert result.metrics["models"] == 3  # nanogpt, sft, grpo: gspo has not run here
