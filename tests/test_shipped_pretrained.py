"""The pretrained models in assets/pretrained/ are what this code pretrains, and a first run copies them instead of
pretraining (core/paths.py SHIPPED_PRETRAINED, scripts/pretrain_shape_models.py)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from core import paths
from core.artifacts import UserError
from scripts.pretrain_shape_models import shipped_models

pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = shipped_models()


def test_every_shipped_folder_is_a_model_a_module_loads():
    shipped = sorted(f.name for f in paths.SHIPPED_PRETRAINED.iterdir())
    assert shipped == sorted(m.cache_dir(m.cfg).name for m in MODELS)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.cache_dir(m.cfg).name)
def test_the_shipped_model_is_what_this_code_pretrains(model, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_PRETRAINED_CACHE", str(tmp_path))
    monkeypatch.setattr(paths, "SHIPPED_PRETRAINED", tmp_path / "nothing ships")
    said = []
    model.load(model.cfg, say=said.append)
    assert said and said[0].startswith("no pretrained"), "the model was not pretrained here"
    fresh = model.cache_dir(model.cfg)
    shipped = paths.ROOT / "assets" / "pretrained" / fresh.name
    assert sorted(f.name for f in fresh.iterdir()) == sorted(f.name for f in shipped.iterdir())
    for f in shipped.iterdir():
        if f.suffix == ".safetensors":
            ours, theirs = load_file(str(fresh / f.name)), load_file(str(f))
            assert ours.keys() == theirs.keys()
            for name in ours:  # bit for bit on this machine; a tolerance for another CPU's float rounding
                assert (ours[name] - theirs[name]).abs().max() <= 1e-4 * theirs[name].abs().max(), name
        elif f.suffix == ".json":
            ours, theirs = json.loads((fresh / f.name).read_text()), json.loads(f.read_text())
            assert ours["config"] == theirs["config"]
            for key in set(ours) - {"config"}:
                assert ours[key] == pytest.approx(theirs[key], abs=0.01), key
        else:
            assert (fresh / f.name).read_bytes() == f.read_bytes(), f.name


def test_a_first_run_copies_the_shipped_model_instead_of_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_PRETRAINED_CACHE", str(tmp_path))
    for model in MODELS:
        said = []
        model.load(model.cfg, say=said.append)
        assert not said, f"pretrained instead of copied: {said}"
        folder = model.cache_dir(model.cfg)
        shipped = paths.SHIPPED_PRETRAINED / folder.name
        assert all((folder / f.name).read_bytes() == f.read_bytes() for f in shipped.iterdir())


@pytest.mark.parametrize("model", MODELS[1::2], ids=lambda m: type(m.cfg).__name__)
def test_a_damaged_shipped_copy_is_named_not_the_cache_that_repeats_it(model, tmp_path, monkeypatch):
    """Deleting the cached file would only copy the damaged shipped one again: the error names the shipped file."""
    name = model.cache_dir(model.cfg).name
    shipped = tmp_path / "shipped"
    (shipped / name).mkdir(parents=True)
    for f in (paths.SHIPPED_PRETRAINED / name).iterdir():
        (shipped / name / f.name).write_bytes(f.read_bytes())
    weights = next(f for f in (shipped / name).iterdir() if f.suffix == ".safetensors")
    weights.write_bytes(b"a truncated checkout")
    monkeypatch.setattr(paths, "SHIPPED_PRETRAINED", shipped)
    monkeypatch.setenv("FINETUNE_PRETRAINED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=f"{weights}: not a readable .*git checkout"):
        model.load(model.cfg, say=lambda _: None)
    (tmp_path / "cache" / name / weights.name).write_bytes(b"damaged in the cache only")
    with pytest.raises(UserError, match="cache.*delete it to pretrain again"):
        model.load(model.cfg, say=lambda _: None)
