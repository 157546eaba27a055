"""The exit-status contract of every command (run.py and scripts/), enforced in one place:

    0    done; for a run, every check passed
    1    a check failed (the run's own verdict, returned by the command)
    2    bad input: config, files, paths, environment (an unwritable work dir, a full disk).
         One line says what and where; no traceback.
    3    an internal error, i.e. a bug: the traceback goes to a log file and one line says where
    130  interrupted (Ctrl-C)
    141  the reader of the output went away (`... | head`): stopped quietly, as `cat` would (128 + SIGPIPE);
         commands print through `Console` below, which hands a closed pipe to `guard` (rich would exit 1)

A command's `main` raises; `guard` maps what it raised to a status. Bad input is any `UserError`
(core.artifacts: every domain error the user can act on derives from it) or an OSError that says the
environment refused (permission, read-only, disk full, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from rich.console import Console as RichConsole

from core.artifacts import atomic_write_text
from core.errors import UserError
from core.paths import workdir


class Console(RichConsole):
    """rich's console for commands: a closed output pipe raises BrokenPipeError for `guard` (exit 141)
    instead of rich's own exit 1; not a terminal, it is 160 columns wide (logs and pipes stay readable)."""

    def __init__(self, stderr: bool = False, **kwargs):
        stream = sys.stderr if stderr else sys.stdout
        super().__init__(stderr=stderr, width=None if stream.isatty() else 160, **kwargs)

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError

OK, CHECK_FAILED, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED, PIPE_CLOSED = 0, 1, 2, 3, 130, 141

WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EEXIST,
                      errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EMFILE}


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors follow the contract: one `error:` line (not usage + message), exit 2."""

    def error(self, message: str) -> None:
        raise UserError(f"{message} ({self.prog} --help)")


def path_argument(text: str) -> Path:
    """An argparse type: a path, never an empty string (which would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def crash_log(command: str) -> Callable[[], Path]:
    """Where a command's internal error leaves its traceback: <work dir>/output/crash/<command>.log."""
    return lambda: workdir() / "output" / "crash" / f"{command}.log"


def say_error(message: str) -> None:
    """One line on stderr (a message's own newlines are flattened: the contract is one line)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def guard(main: Callable[[], int], crash_log: Callable[[], Path], interrupted: str = "interrupted") -> int:
    """Run `main` and turn what it raises into the contract's status. `crash_log()` names the file
    that takes the traceback of an internal error (asked only then); if it cannot be written, a
    file in the system's temp dir takes it."""
    try:
        status = main()
        sys.stdout.flush()  # a closed pipe shows here, inside the contract, not at interpreter exit
        return status
    except UserError as exc:
        say_error(str(exc))
        return BAD_INPUT
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no second error when stdout is flushed at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            return _internal_error(crash_log)
        where = f"{exc.filename}: " if exc.filename else ""
        hint = (" (check that the work dir is writable and has space; FINETUNE_WORKDIR moves it)"
                if exc.errno in WRITE_ERRNOS else "")
        say_error(f"{where}{exc.strerror or exc}{hint}")
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Exception:  # noqa: BLE001 - the contract: any other exception is a bug, logged in full
        return _internal_error(crash_log)


def _internal_error(crash_log: Callable[[], Path]) -> int:
    kind, exc, _ = sys.exc_info()
    text = (f"{datetime.now(timezone.utc).isoformat()} {' '.join(sys.argv)}\n"
            f"cwd {os.getcwd()}\n\n{traceback.format_exc()}")
    for where in (crash_log, lambda: Path(tempfile.gettempdir()) / f"finetune-crash-{os.getpid()}.log"):
        try:
            path = atomic_write_text(where(), text)
            break
        except OSError:
            continue
    else:
        sys.stderr.write(text)
        path = "stderr above"
    say_error(f"internal error (a bug, please report it): {kind.__name__}: {exc}; traceback in {path}")
    return INTERNAL_ERROR
