"""The errors a user can act on. The CLI (core/cli.py) prints their message in one line, without a
traceback, and exits 2; every domain error of that kind (a bad config value, an unknown module, a
corrupt file, a question bank that does not parse) derives from UserError."""
from __future__ import annotations


class UserError(RuntimeError):
    """An error the user can act on (a corrupt file, a mismatched checkpoint, no network)."""


class CorruptArtifact(UserError):
    """A file exists but cannot be read; the message names the file."""
