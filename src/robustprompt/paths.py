"""Where robustprompt keeps things it builds or downloads (demo backbone, few-shot draws), and the
atomic writes every result file goes through."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from .errors import StorageError


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


def storage_error(path: str | os.PathLike, exc: OSError) -> StorageError:
    """One line naming the file and the system's reason (e.g. 'No space left on device')."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return StorageError(f"cannot write {str(path)[:200]}: {reason}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one.

    The bytes go to a temporary file beside `path` (fsynced), which then replaces `path`. Any
    OSError (a full disk, no permission) becomes a StorageError naming `path`; the temporary file
    is removed and an earlier `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise storage_error(path, exc) from exc


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, "object"]) -> None:
    """A safetensors file of CPU tensors, written atomically (see atomic_write_bytes)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
