"""A transformer with a scalar head: the reward model and the critic of RLHF.

Reward model (Ouyang et al. 2022, InstructGPT, §3.5; Stiennon et al. 2020): the sft model with its
unembedding replaced by a linear layer to one number, read at the last token of (prompt, response):

    r_theta(x, y) = w^T h_L(x, y)[last real token] + b

Critic (the value model of PPO-RLHF): the same network read at every position, V(s_t) = w^T h_t + b,
the expected return of the response from token t on.

On a right-padded batch a causal model's states at real tokens never see the pads that follow, so
reading position `length - 1` gives the score of the unpadded sequence (tests/test_heads.py checks it
to float precision). The backbone is a plain core Transformer (its LM head kept and unused, tied to
the embedding by default, so it costs nothing), saved with save_model; the head sits beside it in
its own safetensors file.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from core.artifacts import UserError, atomic_write
from core.nn.model import Transformer, load_model, save_model

HEAD_WEIGHTS = "scalar_head.safetensors"


class ScalarHeadModel(nn.Module):
    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.n_embd, 1)
        # a zero head: every score starts at exactly 0, so neither a reward nor a value starts biased
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def values(self, ids: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T): the head read at every position (the critic's V(s_t))."""
        return self.head(self.backbone.hidden(ids, key_mask=key_mask)).squeeze(-1)

    def score(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) right-padded ids, (B,) real lengths -> (B,): the head at each row's last real token."""
        if bool((lengths < 1).any()) or bool((lengths > ids.shape[1]).any()):
            raise ValueError(f"lengths must lie in [1, {ids.shape[1]}], got {lengths.tolist()}")
        return self.values(ids).gather(1, (lengths - 1).long().unsqueeze(1)).squeeze(1)


def save_scalar_model(model: ScalarHeadModel, directory: str | Path) -> Path:
    """The backbone as save_model writes it, and the head beside it, atomically."""
    from safetensors.torch import save

    directory = Path(directory)
    save_model(model.backbone, directory)
    head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    atomic_write(directory / HEAD_WEIGHTS, lambda f: f.write(save(head, metadata={"format": "pt"})))
    return directory


def load_scalar_model(directory: str | Path) -> ScalarHeadModel:
    """The model save_scalar_model wrote; a missing or corrupt file is a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    model = ScalarHeadModel(load_model(directory))
    path = directory / HEAD_WEIGHTS
    try:
        model.head.load_state_dict(load_file(str(path)))
    except (OSError, SafetensorError, RuntimeError) as exc:
        raise UserError(f"{path}: not a readable scalar head ({exc})") from None
    return model
