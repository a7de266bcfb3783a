"""Small helpers shared by the dataset builders: readable class names, text-file reading."""
from __future__ import annotations

from pathlib import Path

from robustprompt.errors import DatasetError


def readable(classname: str) -> str:
    """Class name as it goes into a prompt: underscores become spaces."""
    return classname.replace("_", " ").strip()


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file as ``(line_number, stripped_text)``."""
    if not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
