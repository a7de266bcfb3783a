"""Where robustprompt keeps things it builds or downloads (demo backbone, few-shot draws)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache directory: ``$ROBUSTPROMPT_CACHE``, else ``$XDG_CACHE_HOME/robustprompt``,
    else ``~/.cache/robustprompt``. Created on first use."""
    env = os.environ.get("ROBUSTPROMPT_CACHE")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "robustprompt"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
