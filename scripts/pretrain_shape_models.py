#!/usr/bin/env python
"""Pretrain the frozen shape-world models the vision-language modules start from into assets/pretrained/.

    python scripts/pretrain_shape_models.py      # pretrain the ones missing there (delete a folder to redo it)

What ships (core/paths.py SHIPPED_PRETRAINED) is what this code pretrains: the vision encoder and the decoder that
blip2 and flamingo load (the core defaults) and the ones llava loads (its ENCODER and DECODER), each in the folder
its cache would use, so a first run copies them instead of spending a minute pretraining. A test pretrains each
again and compares (tests/test_shipped_pretrained.py). Exit status (core/cli.py): 0 done, 2 bad input, 3 an
internal error (traceback in output/crash/pretrain_shape_models.log), 130 interrupted.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import paths  # noqa: E402
from core.cli import Parser, crash_log, guard  # noqa: E402
from core.nn import shape_lm, vision  # noqa: E402


class Shipped(NamedTuple):
    load: Callable
    """load_vision_encoder or load_shape_lm: pretrains into the cache when the folder is missing"""
    cache_dir: Callable
    """the cache folder of a config (its name is the shipped folder's)"""
    cfg: object


def shipped_models() -> list[Shipped]:
    from pre_train.vlm.llava.code.llava import DECODER, ENCODER  # a script may read a module; core may not

    return [Shipped(vision.load_vision_encoder, vision.cache_dir, vision.VisionConfig()),
            Shipped(vision.load_vision_encoder, vision.cache_dir, ENCODER),
            Shipped(shape_lm.load_shape_lm, shape_lm.cache_dir, shape_lm.ShapeLMConfig()),
            Shipped(shape_lm.load_shape_lm, shape_lm.cache_dir, DECODER)]


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: write(argv), crash_log=crash_log("pretrain_shape_models"))


def write(argv: list[str] | None) -> int:
    Parser(description=__doc__.splitlines()[0]).parse_args(argv)
    # the loaders pretrain into the cache: point the cache at the shipped folder itself
    os.environ["FINETUNE_PRETRAINED_CACHE"] = str(paths.SHIPPED_PRETRAINED)
    for model in shipped_models():
        folder = model.cache_dir(model.cfg)
        model.load(model.cfg, say=print)
        print(f"{folder.relative_to(ROOT)}: " + ", ".join(sorted(f.name for f in folder.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
