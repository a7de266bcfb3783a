"""Reading and validating CoOp ``split_zhou_*.json`` files."""
from __future__ import annotations

import json
from pathlib import Path

from robustprompt.data.base import SPLIT_NAMES
from robustprompt.errors import DatasetError

Entries = list[tuple[str, int]]


def read_split_json(path: Path) -> tuple[dict[str, Entries], list[str]]:
    """Parse a split file ``{"train"|"val"|"test": [[relative_path, label, classname], ...]}``.

    Returns ``({split: [(relative_path, label), ...]}, classnames)`` with classnames[label]
    exactly as written in the file. Labels must be 0..N-1 and each label must have one name.
    """
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot parse split file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"split file {path}: expected a JSON object with keys "
                           f"{', '.join(SPLIT_NAMES)}, got {type(raw).__name__}")
    missing = [k for k in SPLIT_NAMES if k not in raw]
    if missing:
        raise DatasetError(f"split file {path}: missing key(s) {', '.join(missing)} "
                           f"(expected {', '.join(SPLIT_NAMES)})")

    names: dict[int, str] = {}
    splits: dict[str, Entries] = {}
    for split in SPLIT_NAMES:
        items = raw[split]
        if not isinstance(items, list):
            raise DatasetError(f"split file {path}: {split!r} must be a list of "
                               "[relative_path, label, classname] entries")
        entries: Entries = []
        for n, item in enumerate(items):
            where = f"split file {path}: {split}[{n}]"
            if not (isinstance(item, list) and len(item) == 3):
                raise DatasetError(f"{where} must be [relative_path, label, classname], got {item!r}")
            rel, label, cname = item
            if not isinstance(rel, str) or not rel:
                raise DatasetError(f"{where}: the path must be a non-empty string, got {rel!r}")
            if isinstance(label, bool) or not isinstance(label, int):
                raise DatasetError(f"{where}: the label must be an integer, got {label!r}")
            if not isinstance(cname, str):
                raise DatasetError(f"{where}: the class name must be a string, got {cname!r}")
            known = names.setdefault(label, cname)
            if known != cname:
                raise DatasetError(f"{where}: label {label} has two class names, "
                                   f"{known!r} and {cname!r}")
            entries.append((rel, label))
        splits[split] = entries

    if not names:
        raise DatasetError(f"split file {path} lists no images")
    expected = set(range(len(names)))
    if set(names) != expected:
        extra = sorted(set(names) - expected)
        raise DatasetError(f"split file {path}: labels must be 0..{len(names) - 1} without gaps; "
                           f"found unexpected label(s) {extra[:10]}")
    return splits, [names[i] for i in range(len(names))]
