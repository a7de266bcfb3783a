"""Bounded, one-line rendering of user content inside error messages.

A user's value can be huge (a YAML alias expansion, a 100 kB string, a nested structure): an
error message quotes at most ``LIMIT`` characters of it, on one line, and never builds the full
``repr`` first (``reprlib`` stops early), so quoting costs time proportional to what is shown.
"""
from __future__ import annotations

import reprlib
from typing import Any

LIMIT = 200          # characters of user content an error message quotes
LINE_LIMIT = 1000    # characters of a whole error line, as the CLI prints it
ELLIPSIS = "…"

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxdict = _repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 6
_repr.maxarray = 6
_repr.maxstring = LIMIT
_repr.maxlong = 60
_repr.maxother = LIMIT


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


def one_line(text: str, limit: int = LINE_LIMIT) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space, cut to
    ``limit`` characters with a trailing "…"."""
    return _cap(" ".join(str(text).split()), limit)


def quote(value: Any, limit: int = LIMIT) -> str:
    """A ``repr`` of ``value`` for an error message: one line, at most ``limit`` characters."""
    return _cap(_repr.repr(value), limit)  # a repr holds no raw newline
