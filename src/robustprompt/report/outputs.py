"""Where `report` and `explain` write: checked before any work, written atomically.

A place that cannot be written (a file where a folder should be, a path through a file, no
permission) is a one-line ConfigError before anything is computed; a write that fails midway
(a full disk) leaves no partial file behind and an earlier figure of the same name intact.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError

FIGURE_SUFFIXES = ("", ".png", ".pdf")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(folder: Path, shown: str) -> None:
    """``folder`` exists as a writable folder, or can be made inside one."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {shown} is a file, not a folder")
    ancestor = _nearest_existing(folder)
    if not ancestor.is_dir():
        raise ConfigError(f"cannot write {shown}: {str(ancestor)[:200]} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {shown}: no permission to write in {str(ancestor)[:200]}")


def check_output_folder(path: str | os.PathLike) -> Path:
    """``--out`` of `report`: a folder that exists or can be created, and can be written."""
    folder = Path(path)
    _check_creatable(folder, str(folder)[:200])
    return folder


def figure_base(path: str | os.PathLike) -> Path:
    """``--out`` of `explain` without its suffix: PATH.png / PATH.pdf are written; an existing
    folder gets FOLDER/explain.png and FOLDER/explain.pdf."""
    p = Path(path)
    if p.is_dir():
        return p / "explain"
    if p.suffix.lower() not in FIGURE_SUFFIXES:
        raise ConfigError(f"--out must end in .png or .pdf, got {p.name[:100]}")
    return p.with_suffix("") if p.suffix else p


def check_figure_path(path: str | os.PathLike) -> None:
    """``--out`` of `explain`: both figure files (see figure_base) must be writable."""
    shown = str(path)[:200]
    base = figure_base(path)
    for target in (base.with_suffix(".png"), base.with_suffix(".pdf")):
        if target.is_dir():
            raise ConfigError(f"cannot write {shown}: {str(target)[:200]} is a folder")
    parent = base.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"cannot write {shown}: {str(parent)[:200]} is a file, not a folder")
    _check_creatable(parent, shown)


def save_figure(fig, paths: Sequence[Path], **savefig_kw) -> list[Path]:
    """Save matplotlib ``fig`` to each of ``paths`` (format from the suffix) through a temporary
    file beside it, so a failed write (disk full) leaves no partial figure. An OSError names
    the figure it was writing."""
    written = []
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
        try:
            fig.savefig(tmp, **savefig_kw)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        written.append(path)
    return written
