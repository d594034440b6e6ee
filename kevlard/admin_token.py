"""The admin token that guards `POST /api/faults`: the configured one, or a fresh one per start.

A generated token is written to a file only its owner can read, so a local operator (or
`kevlard fault`) can pick it up without it ever appearing in a process listing or a config file.
One file per port, `admin_token.<port>`: several daemons on one host each keep their own, and a
client finds the one of the daemon it talks to from the port in its URL.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit


def default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "kevlard"


def token_file(port: int, state_dir: str | os.PathLike | None = None) -> Path:
    """Where the daemon listening on `port` writes its generated token."""
    return (Path(state_dir) if state_dir is not None else default_state_dir()) / f"admin_token.{port}"


def token_file_for_url(url: str, state_dir: str | os.PathLike | None = None) -> Path:
    """The token file of the daemon at `url` (its port; 80 or 443 when the URL names none)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a daemon URL: {url!r} ({e})") from None
    return token_file(port or (443 if parts.scheme == "https" else 80), state_dir)


def resolve_admin_token(configured: str, port: int,
                        state_dir: str | os.PathLike | None = None) -> tuple[str, Path | None]:
    """(token, file it was written to): `configured` as is with no file when it is set, otherwise
    a new random token written to `<state_dir>/admin_token.<port>` (mode 0600, directory 0700)."""
    if configured:
        return configured, None
    path = token_file(port, state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = new_admin_token()
    # O_NOFOLLOW: a symlink planted at this path must not redirect the write; the mode is given
    # at creation so the token is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        # a file left by an older run with looser permissions keeps them through O_TRUNC
        os.fchmod(f.fileno(), 0o600)
        f.write(token)
    return token, path


def new_admin_token() -> str:
    return secrets.token_urlsafe(32)


def remove_token_file(path: Path | None, token: str) -> None:
    """At exit: the file goes with the daemon, unless another daemon has since written its own there."""
    try:
        if path is not None and path.read_text(encoding="ascii") == token:
            path.unlink()
    except (OSError, UnicodeDecodeError):
        pass
