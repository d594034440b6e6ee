"""The admin token that guards `POST /api/faults`: the configured one, or a fresh one per start.

A generated token is written to a file only its owner can read, so a local operator (or
`kevlard fault`) can pick it up without it ever appearing in a process listing or a config file.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

TOKEN_FILE_NAME = "admin_token"


def default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "kevlard"


def resolve_admin_token(configured: str, state_dir: str | os.PathLike | None = None) -> tuple[str, Path | None]:
    """(token, file it was written to): `configured` as is with no file when it is set, otherwise
    a new random token written to `<state_dir>/admin_token` (mode 0600, directory 0700)."""
    if configured:
        return configured, None
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path = directory / TOKEN_FILE_NAME
    # O_NOFOLLOW: a symlink planted at this path must not redirect the write; the mode is given
    # at creation so the token is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        # a file left by an older run with looser permissions keeps them through O_TRUNC
        os.fchmod(f.fileno(), 0o600)
        f.write(token)
    return token, path
