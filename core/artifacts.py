"""Atomic artifact writing, run folders swapped in one rename, safe checkpoint loading.

Every file is written to a temporary sibling, flushed to disk and renamed over the target, so a
crash mid-write leaves the previous version intact (rename is atomic on POSIX filesystems). The
temporary name carries the writer's pid, so `sweep_leftovers` can remove what a killed process left.

A run writes into its own folder, `output/.runs/<preset>-<run id>/`; `output/<preset>` is a symbolic
link to the latest complete one, replaced in one rename when a run finishes. A reader therefore sees
the previous run or the new one, never a mixture, whatever moment a run is killed at.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from core.errors import CorruptArtifact, UserError  # noqa: F401 - the names modules import from here


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone creates 0600 files


TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.([A-Za-z0-9_]{8}|link)\.tmp$")  # .NAME.PID.XXXXXXXX.tmp (mkstemp's)


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def copy_shipped(weights: Path) -> bool:
    """Fill a pretrained model's cache folder (weights.parent) from its shipped copy, the folder of the same name
    under SHIPPED_PRETRAINED (core/paths.py), if one ships; the weights file is written last, since its presence
    is what marks the folder complete. True if it did."""
    from core.paths import SHIPPED_PRETRAINED

    shipped = SHIPPED_PRETRAINED / weights.parent.name
    if not (shipped / weights.name).is_file():
        return False
    for source in sorted(shipped.iterdir(), key=lambda f: f.name == weights.name):
        data = source.read_bytes()
        atomic_write(weights.parent / source.name, lambda f: f.write(data))
    return True


def unreadable_pretrained(weights: Path, what: str, exc: Exception) -> UserError:
    """The error for a pretrained model's weights that do not load. Deleting the cached file pretrains again, or
    copies the shipped file again (copy_shipped): if the cached file is the shipped one, it is the shipped file
    that is damaged, and the error names it."""
    from core.paths import SHIPPED_PRETRAINED

    shipped, damaged = SHIPPED_PRETRAINED / weights.parent.name / weights.name, False
    with contextlib.suppress(OSError):
        damaged = shipped.read_bytes() == weights.read_bytes()
    if damaged:
        return UserError(f"{shipped}: not a readable {what} ({exc}); restore it from the repository "
                         f"(git checkout -- {shipped}), then delete {weights}")
    return UserError(f"{weights}: not a readable {what} ({exc}); delete it to pretrain again")


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite_or_none(obj: Any) -> Any:
    """JSON has no NaN/inf; store them as null rather than writing invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    normalised = json.loads(json.dumps(data, default=_json_default))
    return atomic_write_text(path, json.dumps(_finite_or_none(normalised), indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptArtifact(f"{path}: not valid JSON ({exc})") from None


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with `weights_only=True`: tensors and plain Python containers only, no code."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CorruptArtifact(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock, for read-modify-write of files shared by concurrent runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# --- run folders --------------------------------------------------------------------------------
RUNS = ".runs"
_RUN_NAME = re.compile(r"-pid(\d+)$")  # a run folder's name ends in its writer's pid


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def run_folder(link: Path, run_id: str, owner: int) -> Path:
    """The folder a run writes into, `<link's folder>/.runs/<link name>-<run_id>-pid<owner>/`: the pid
    in its name tells a sweep whether the process it belongs to still lives."""
    return link.parent / RUNS / f"{link.name}-{run_id}-pid{owner}"


def commit_run_folder(link: Path, staged: Path) -> None:
    """Make `link` point at `staged` with one rename, then remove the run folder it pointed at."""
    previous = link.resolve() if link.is_symlink() else None
    if link.exists() and not link.is_symlink():  # a real folder (an older layout): move it aside first
        aside = link.parent / RUNS / f"{link.name}-replaced-pid{os.getpid()}"
        link.rename(aside)
        previous = aside
    tmp_link = link.parent / f".{link.name}.{os.getpid()}.link{TMP_SUFFIX}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(staged.relative_to(link.parent))
    os.replace(tmp_link, link)
    if previous is not None and previous != staged.resolve() and previous.parent.name == RUNS:
        shutil.rmtree(previous, ignore_errors=True)


def sweep_leftovers(roots: list[Path]) -> list[Path]:
    """Remove what killed processes left under `roots`: temporary files of atomic writes and run
    folders that no link points at, whose writer is gone. Returns what it removed."""
    removed = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            here = Path(folder)
            for name in [*files, *(d for d in dirs if (here / d).is_symlink())]:
                match = _TMP_NAME.match(name)
                if match and not process_alive(int(match.group(1))):
                    (here / name).unlink(missing_ok=True)
                    removed.append(here / name)
            if here.name == RUNS:
                linked = {p.resolve() for p in here.parent.iterdir() if p.is_symlink()}
                for run in map(here.joinpath, list(dirs)):
                    writer = _RUN_NAME.search(run.name)
                    if run.resolve() not in linked and not (writer and process_alive(int(writer.group(1)))):
                        shutil.rmtree(run, ignore_errors=True)
                        removed.append(run)
                dirs.clear()  # a run folder is finished or swept whole
    return removed
