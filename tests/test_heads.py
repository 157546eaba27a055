"""The scalar-head model (core/nn/heads.py): zero at init, a padded batch scores as the unpadded
rows, values equal the head on the backbone's hidden states, and a save/load round trip is exact."""
from __future__ import annotations

import pytest
import torch

from core.artifacts import UserError
from core.nn.heads import HEAD_WEIGHTS, ScalarHeadModel, load_scalar_model, save_scalar_model
from core.nn.model import Transformer, scaled_config
from core.nn.sequences import right_pad


def small_model(seed: int = 0) -> ScalarHeadModel:
    torch.manual_seed(seed)
    model = ScalarHeadModel(Transformer(scaled_config("llama", vocab_size=50, block_size=32, n_layer=2, n_embd=32,
                                                     n_head=4)))
    torch.nn.init.normal_(model.head.weight)
    return model.eval()


def test_the_head_starts_at_zero():
    model = ScalarHeadModel(Transformer(scaled_config("llama", vocab_size=50, block_size=32, n_layer=1, n_embd=16,
                                                     n_head=2)))
    assert torch.equal(model.values(torch.randint(50, (3, 7))), torch.zeros(3, 7))


def test_a_right_padded_batch_scores_each_row_as_alone():
    model = small_model()
    rows = [[1, 5, 9, 4], [7, 3], [2, 8, 8, 6, 1, 3, 3]]
    batch = right_pad(rows, 0)
    lengths = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        padded = model.score(batch, lengths)
        alone = torch.stack([model.values(torch.tensor([r]))[0, -1] for r in rows])
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
    assert padded.std() > 0  # rows differ, so a bug that reads one position for all would show


def test_values_are_the_head_on_the_hidden_states_the_lm_head_reads():
    model = small_model()
    ids = torch.randint(50, (2, 9))
    with torch.no_grad():
        h = model.backbone.hidden(ids)
        torch.testing.assert_close(model.backbone.lm_head(h), model.backbone(ids), rtol=0, atol=0)
        torch.testing.assert_close(model.values(ids), h @ model.head.weight[0] + model.head.bias[0])


def test_lengths_outside_the_batch_are_refused():
    with pytest.raises(ValueError, match="lengths"):
        small_model().score(torch.zeros(2, 4, dtype=torch.long), torch.tensor([0, 3]))


def test_save_and_load_give_the_same_scores(tmp_path):
    model = small_model(3)
    save_scalar_model(model, tmp_path)
    loaded = load_scalar_model(tmp_path).eval()
    ids = torch.randint(50, (2, 6))
    with torch.no_grad():
        assert torch.equal(model.values(ids), loaded.values(ids))
    (tmp_path / HEAD_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match=HEAD_WEIGHTS):
        load_scalar_model(tmp_path)
