"""Atomic artifact writing and safe checkpoint loading.

Every file is written to a temporary sibling, flushed to disk and renamed over the target, so a
crash mid-write leaves the previous version intact (rename is atomic on POSIX filesystems).
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


class UserError(RuntimeError):
    """An error the user can act on (a corrupt file, a mismatched checkpoint, no network): the CLI
    prints its message, without a traceback, and exits 2."""


class CorruptArtifact(UserError):
    """A file exists but cannot be read; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone creates 0600 files


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
