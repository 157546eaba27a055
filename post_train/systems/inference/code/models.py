"""The models `run.py --chat` and `run.py --serve` can serve: the language models the learner's own runs
left behind, found through the run index (core/run_context.py), never downloaded.

A module whose manifest says `produces_lm=True` leaves `<module>/output/<preset>/model/` (weights, config
and its tokenizer). Every such module that has a finished run with a saved model is servable, at each
preset it ran; the base is the stage no other language-model stage comes before (nanogpt), every later one
(sft, grpo, dpo, ...) is aligned. Without `--model`, the newest aligned model by finish time is served.

    servable_models()                      newest first
    choose_model("grpo") / ("grpo:toy")    a name, or a name and its preset
    load(servable)                         (Transformer in eval mode, its Tokenizer)
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from core.data.tokenizer import Tokenizer
from core.errors import UserError
from core.nn.model import MODEL_WEIGHTS, Transformer, load_model
from core.registry import Module, discover
from core.run_context import MODEL_DIR, output_link, read_run_index

FIRST_STEP = "python run.py --module sft --toy"
"""what to run when nothing is servable: the chat model, which trains its base first"""


@dataclass(frozen=True)
class ServableModel:
    name: str
    """the module that trained it: the model id clients send ("grpo")"""
    preset: str
    folder: Path
    """its model/ folder: weights, model_config.json, tokenizer.model"""
    finished_at: datetime
    aligned: bool
    """post-trained after the base (it knows the chat template); False for the pretrained base"""

    @property
    def model_id(self) -> str:
        """"grpo:toy": the name with its preset, which a client may also send"""
        return f"{self.name}:{self.preset}"

    def answers_to(self, requested: str) -> bool:
        return requested in (self.name, self.model_id)


def _base_names(lm_modules: dict[str, Module]) -> set[str]:
    """The language-model stages that no other language-model stage comes before."""
    return {name for name, m in lm_modules.items() if not any(d in lm_modules for d in m.depends)}


def servable_models() -> list[ServableModel]:
    """Every (module, preset) whose latest indexed run left a model, newest first."""
    lm_modules = {m.name: m for m in discover().modules.values() if m.produces_lm}
    bases = _base_names(lm_modules)
    found = []
    for name, runs in read_run_index().items():
        for preset, entry in runs.items():
            folder = output_link(lm_modules[name], preset) / MODEL_DIR if name in lm_modules else None
            if folder is not None and (folder / MODEL_WEIGHTS).is_file():
                found.append(ServableModel(name, preset, folder, datetime.fromisoformat(entry["finished_at"]),
                                           aligned=name not in bases))
    return sorted(found, key=lambda s: s.finished_at, reverse=True)


def choose_model(requested: str | None, say=print) -> ServableModel:
    """The model `--model` names ("grpo" = its newest preset, "grpo:toy"), or without one the newest
    aligned model (the base when it is all there is, which `say` points out). UserError (exit 2) when
    nothing fits, naming what is there."""
    available = servable_models()
    if not available:
        raise UserError(f"no trained language model in the run index yet: train one first ({FIRST_STEP})")
    if requested is None:
        aligned = [s for s in available if s.aligned]
        if aligned:
            return aligned[0]
        say(f"only the pretrained base {available[0].name} is trained: serving it. It continues text and was "
            f"never taught the chat template; for a chat model run {FIRST_STEP}")
        return available[0]
    matches = [s for s in available if s.answers_to(requested)]
    if matches:
        return matches[0]
    names = sorted({s.name for s in available} | {s.model_id for s in available})
    close = difflib.get_close_matches(requested, names, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"no trained model {requested!r}.{hint} Available: {', '.join(names)} "
                    f"(train another with python run.py --module NAME --toy)")


def load(servable: ServableModel) -> tuple[Transformer, Tokenizer]:
    """The model in eval mode and the tokenizer it was trained with (a corrupt file: UserError naming it)."""
    return load_model(servable.folder).eval(), Tokenizer.load(servable.folder)
