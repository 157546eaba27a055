"""The layers of the code base and the direction of their imports (README.md, "Layout").

    platform   core/*.py                    imports nothing first-party but the platform
    blocks     core/nn, core/data, core/rl  the platform and other blocks
    learning   learning/                    the platform and itself (modules are read through the registry)
    module     a folder with module.py      the platform, the blocks and its own folder; never the learning
                                            layer, never another module

Imports are read from the source with `ast` (function-level imports included, since a lazy import is
still a dependency), and there is no import cycle between any two files of core/ and learning/.
The checker runs on the real tree and on a small planted tree that breaks every rule once, so a
checker that stopped seeing violations would fail here too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK_PACKAGES = ("core.nn", "core.data", "core.rl")
ALLOWED = {"platform": {"platform"}, "blocks": {"platform", "blocks"}, "learning": {"platform", "learning"},
           "module": {"platform", "blocks"}}  # plus the module's own folder


def dotted(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_folder(path: Path, root: Path) -> str | None:
    """The dotted name of the module folder (the one holding module.py) that `path` belongs to."""
    for parent in path.parents:
        if parent == root:
            return None
        if (parent / "module.py").exists():
            return dotted(parent / "__init__.py", root)
    return None


def layer_of(name: str, root: Path) -> str | None:
    top = name.split(".")[0]
    if top == "core":
        return "blocks" if any(name == p or name.startswith(p + ".") for p in BLOCK_PACKAGES) else "platform"
    if top == "learning":
        return "learning"
    if top in ("pre_train", "post_train"):
        return "module"
    return None


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted target) of every first-party import in `path`, relative imports resolved. For
    `from pkg import name` the target is pkg.name when that is a file or package, else pkg."""
    package = dotted(path, root) if path.name == "__init__.py" else dotted(path, root).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_file = (root / Path(*sub.split("."))).with_suffix(".py").exists() or (root / Path(*sub.split("."))).is_dir()
                found.append((node.lineno, sub if is_file else base))
    return [(line, name) for line, name in found if layer_of(name, root)]


def source_files(root: Path) -> list[Path]:
    return sorted(p for top in ("core", "learning", "pre_train", "post_train") for p in (root / top).rglob("*.py")
                  if "__pycache__" not in p.parts)


def wrong_way_imports(root: Path) -> list[str]:
    problems = []
    for path in source_files(root):
        name = dotted(path, root)
        layer = layer_of(name, root)
        own = module_folder(path, root) if layer == "module" else None
        if layer == "module" and own is None:
            continue  # pre_train/__init__.py and the like: no code of a module
        for line, target in imports_of(path, root):
            target_layer = layer_of(target, root)
            if layer == "module" and (target == own or target.startswith(own + ".")):
                continue
            if target_layer not in ALLOWED[layer]:
                what = "another module" if layer == "module" and target_layer == "module" else f"the {target_layer} layer"
                problems.append(f"{path.relative_to(root)}:{line}: {layer} imports {target} ({what})")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of more than one file among core/ and learning/ (Tarjan)."""
    files = {dotted(p, root): p for p in source_files(root) if p.parts[len(root.parts)] in ("core", "learning")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        for _, target in imports_of(path, root):
            while target and target not in files:  # `core.nn.model.Transformer` -> core.nn.model
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_every_import_points_down_the_layers():
    assert wrong_way_imports(ROOT) == []


def test_no_import_cycles_in_core_and_learning():
    assert import_cycles(ROOT) == []


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    files = {
        "core/__init__.py": "",
        "core/checks.py": "from core.nn.model import X\n",                      # platform -> blocks
        "core/registry.py": "def f():\n    from learning.briefs import y\n",    # platform -> learning, lazily
        "core/nn/__init__.py": "",
        "core/nn/model.py": "from core.nn import attention\n",
        "core/nn/attention.py": "from core.nn.model import Transformer\n",     # cycle model <-> attention
        "learning/__init__.py": "",
        "learning/briefs.py": "from core.rl import rollouts\n",                # learning -> blocks
        "core/rl/__init__.py": "",
        "core/rl/rollouts.py": "from core.checks import Check\n",
        "post_train/a/module.py": "from .code.a import run\nfrom core.checks import Check\n",
        "post_train/a/code/a.py": "from post_train.b.code.b import f\nfrom learning import briefs\n",
        "post_train/b/module.py": "",
        "post_train/b/code/b.py": "from ..module import MODULE\n",               # own folder: allowed
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = wrong_way_imports(tmp_path)
    assert problems == [
        "core/checks.py:1: platform imports core.nn.model (the blocks layer)",
        "core/registry.py:2: platform imports learning.briefs (the learning layer)",
        "learning/briefs.py:1: learning imports core.rl.rollouts (the blocks layer)",
        "post_train/a/code/a.py:1: module imports post_train.b.code.b (another module)",
        "post_train/a/code/a.py:2: module imports learning.briefs (the learning layer)",
    ]
    assert import_cycles(tmp_path) == [["core.nn.attention", "core.nn.model"]]
