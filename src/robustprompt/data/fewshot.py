"""Few-shot draws (seeded, optionally cached), base/new class splits, and fixed subsamples."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Sequence

from robustprompt.data.base import Dataset, LazySplits, Split
from robustprompt.errors import DatasetError
from robustprompt.paths import atomic_write_text, cache_dir


def split_fingerprint(split: Split) -> str:
    """sha1 over the split's ids and labels: changes whenever the list of images does."""
    digest = hashlib.sha1()
    for image_id, label in zip(split.ids, split.labels):
        digest.update(f"{image_id}\t{label}\n".encode("utf-8"))
    return digest.hexdigest()


def _draw(split: Split, shots: int, seed: int, classnames: Sequence[str] | None) -> list[int]:
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(split.labels):
        by_label[label].append(index)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < shots:
            known = classnames is not None and 0 <= label < len(classnames)
            name = f" ({classnames[label]!r})" if known else ""
            raise DatasetError(f"class {label}{name} has {len(pool)} image(s) in the split, "
                               f"but {shots} shots were asked")
        chosen.extend(rng.sample(pool, shots))
    return sorted(chosen)


def _cache_path(cache_key: str, shots: int, seed: int) -> Path:
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in cache_key.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise DatasetError(f"invalid few-shot cache key {cache_key!r}")
    return cache_dir().joinpath("fewshot", *parts, f"shot_{shots}-seed_{seed}.json")


def _read_cached(path: Path, fingerprint: str, n: int, expected: int) -> list[int] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        indices = record["indices"]
        if record["fingerprint"] != fingerprint or len(indices) != expected:
            return None
        if not all(isinstance(i, int) and 0 <= i < n for i in indices):
            return None
        return sorted(indices)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a stale or damaged cache entry is simply redrawn


def few_shot_indices(
    split: Split,
    shots: int,
    seed: int,
    cache_key: str | None = None,
    classnames: Sequence[str] | None = None,
) -> list[int]:
    """Sorted indices of ``shots`` distinct images per class, drawn with ``random.Random(seed)``
    class by class in label order. With ``cache_key`` the draw is stored under
    ``cache_dir()/fewshot/<cache_key>/shot_<K>-seed_<S>.json`` and reused while the split's
    fingerprint is unchanged."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots <= 0:
        raise DatasetError(f"shots must be a positive integer, got {shots!r}")
    if cache_key is None:
        return _draw(split, shots, seed, classnames)

    path = _cache_path(cache_key, shots, seed)
    fingerprint = split_fingerprint(split)
    num_classes = len(set(split.labels))
    if path.is_file():
        cached = _read_cached(path, fingerprint, len(split), shots * num_classes)
        if cached is not None:
            return cached
    indices = _draw(split, shots, seed, classnames)
    record = {"shots": shots, "seed": seed, "fingerprint": fingerprint, "indices": indices}
    atomic_write_text(path, json.dumps(record))
    return indices


def base_new_split(dataset: Dataset, which: str) -> Dataset:
    """Keep the base classes (first ceil(N/2) labels) or the new ones (the rest) in every split,
    re-labelled 0..M-1; ``which='all'`` returns ``dataset`` unchanged."""
    if which == "all":
        return dataset
    n = len(dataset.classnames)
    cut = math.ceil(n / 2)
    if which == "base":
        lo, hi = 0, cut
    elif which == "new":
        lo, hi = cut, n
    else:
        raise DatasetError(f"unknown class subset {which!r}; expected 'base', 'new' or 'all'")
    def restrict(name: str) -> Split:
        split = dataset.splits[name]
        keep = [i for i, label in enumerate(split.labels) if lo <= label < hi]
        sub = split.subset(keep)
        return Split(sub.ids, [label - lo for label in sub.labels], sub.load)

    # lazily, split by split: a lazy dataset (ImageNet) stays lazy
    splits = LazySplits({name: partial(restrict, name) for name in dataset.splits})
    return Dataset(f"{dataset.name}/{which}", list(dataset.classnames[lo:hi]), splits,
                   list(dataset.templates))


def subsample(split: Split, n: int, seed: int) -> Split:
    """A fixed random subset of ``n`` images (kept in index order), or ``split`` itself when
    ``n >= len(split)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise DatasetError(f"subsample size must be a positive integer, got {n!r}")
    if n >= len(split):
        return split
    return split.subset(sorted(random.Random(seed).sample(range(len(split)), n)))
