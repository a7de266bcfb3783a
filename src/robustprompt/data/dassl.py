"""Few-shot subsets written by Dassl (CoOp, MaPLe, FAP): ``<dataset folder>/split_fewshot/shot_K-seed_S.pkl``.

Dassl-based code draws a K-shot subset once per (K, seed) and pickles it as a dict
``{"train": [Datum, ...], "val": [Datum, ...]}`` (ImageNet: ``"train"`` only), where ``Datum``
is ``dassl.data.datasets.base_dataset.Datum`` with the attributes ``_impath`` (absolute path on
the machine that wrote the file), ``_label``, ``_domain`` and ``_classname``. Reading that file
means the same seed gives the same training images as FAP/MaPLe.

A pickle from a data directory is untrusted input: a general ``pickle.load`` can run any code.
``read_dassl_fewshot`` uses an unpickler whose ``find_class`` admits only the few names such a
file needs (Dassl's ``Datum``, mapped to the plain local ``DasslDatum``; ``copyreg``'s
reconstructor for protocol 0/1 files; ``builtins.object``) and refuses anything else before it
is called.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from robustprompt.data.base import Split
from robustprompt.errors import DatasetError

_DATUM_GLOBAL = ("dassl.data.datasets.base_dataset", "Datum")
_MAX_BYTES = 256 * 1024 * 1024  # a K-shot list is small; refuse anything absurd before reading it


class DasslDatum:
    """Stand-in for Dassl's ``Datum``: accepts only its four plain fields as state."""

    _FIELDS = {"_impath": str, "_label": int, "_domain": int, "_classname": str}

    def __init__(self) -> None:
        self._impath, self._label, self._domain, self._classname = "", 0, 0, ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]  # (dict, slots) form
        if not isinstance(state, dict) or not set(state) <= set(self._FIELDS):
            raise pickle.UnpicklingError(f"unexpected Datum state {type(state).__name__}")
        for key, value in state.items():
            kind = self._FIELDS[key]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise pickle.UnpicklingError(f"Datum.{key} must be an int, got {type(value).__name__}")
            if kind is str and not isinstance(value, str):
                raise pickle.UnpicklingError(f"Datum.{key} must be a str, got {type(value).__name__}")
            setattr(self, key, value)

    @property
    def impath(self) -> str:
        return self._impath

    @property
    def label(self) -> int:
        return self._label

    @property
    def classname(self) -> str:
        return self._classname


def _reconstruct(cls: Any, base: Any, state: Any) -> DasslDatum:
    """copyreg._reconstructor for protocol 0/1 files, for DasslDatum only."""
    if cls is not DasslDatum or base is not object or state is not None:
        raise pickle.UnpicklingError("only Dassl's Datum may be reconstructed")
    return DasslDatum()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a Dassl few-shot file needs; everything else is refused."""

    _ALLOWED = {
        _DATUM_GLOBAL: DasslDatum,
        ("copyreg", "_reconstructor"): _reconstruct,
        ("copy_reg", "_reconstructor"): _reconstruct,
        ("builtins", "object"): object,
        ("__builtin__", "object"): object,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a Dassl few-shot file") from None


@dataclass
class DasslFewShot:
    """The items of one Dassl few-shot file: train (and val, if present) lists of DasslDatum."""

    path: Path
    train: list[DasslDatum]
    val: list[DasslDatum]


def read_dassl_fewshot(path: str | Path) -> DasslFewShot:
    """Load ``path`` with the restricted unpickler. DatasetError naming the file when it holds
    anything but {"train": [Datum...], "val": [Datum...]} (or when a global is refused)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:
            raise DatasetError(f"Dassl few-shot file {path} is {size} bytes; refusing to read it")
        data = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except DatasetError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, our type checks, damaged files
        raise DatasetError(f"Dassl few-shot file {path} cannot be read safely: {exc}") from exc
    if not isinstance(data, dict) or "train" not in data or not set(data) <= {"train", "val", "test"}:
        raise DatasetError(f"Dassl few-shot file {path} must hold a dict with a 'train' list "
                           f"(and optionally 'val'), got {type(data).__name__}")
    lists = {}
    for key in ("train", "val"):
        items = data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(d, DasslDatum) for d in items):
            raise DatasetError(f"Dassl few-shot file {path}: '{key}' must be a list of Datum")
        lists[key] = items
    return DasslFewShot(path, lists["train"], lists["val"])


def dassl_fewshot_path(dataset_dir: str | Path, shots: int, seed: int) -> Path:
    """Where Dassl-based code writes a K-shot draw: ``<dataset_dir>/split_fewshot/shot_K-seed_S.pkl``."""
    return Path(dataset_dir) / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"


def _suffixes(impath: str) -> list[str]:
    """'/a/b/c.jpg' → ['a/b/c.jpg', 'b/c.jpg', 'c.jpg'] (longest first; Windows separators too)."""
    parts = [p for p in impath.replace("\\", "/").split("/") if p]
    return ["/".join(parts[k:]) for k in range(len(parts))]


def match_dassl_items(items: Sequence[DasslDatum], split: Split, source: Path,
                      full_split: Optional[Split] = None) -> list[int]:
    """Indices into ``split`` of the Dassl items, in the file's order.

    A Dassl impath is absolute on the machine that wrote it; it matches the split image whose id
    (its path relative to the dataset folder) is the longest suffix of that impath. With
    ``full_split`` (the split before a base/new class filter), items of the other classes are
    dropped, as CoOp's ``subsample_classes`` does after loading the file; an item found in
    neither is an error naming the file and the path.
    """
    index = {image_id: i for i, image_id in enumerate(split.ids)}
    everywhere = set(full_split.ids) if full_split is not None else set()
    out: list[int] = []
    for item in items:
        suffixes = _suffixes(item.impath)
        hit = next((s for s in suffixes if s in index), None)
        if hit is not None:
            out.append(index[hit])
        elif not any(s in everywhere for s in suffixes):
            raise DatasetError(f"Dassl few-shot file {source}: image {item.impath!r} matches no image of "
                               f"this split (ids look like {split.ids[0]!r})" if len(split) else
                               f"Dassl few-shot file {source}: the split is empty")
    return out


def coop_dataset_dir(name: str, root: str | Path | None) -> Optional[Path]:
    """The folder of a CoOp-layout dataset under ``root`` (where Dassl keeps ``split_fewshot``),
    or None for datasets outside that layout (fashion_mnist, imagefolder:, csv:)."""
    if root is None or ":" in name:
        return None
    from robustprompt.data.coop import SPLIT_JSON_LAYOUTS
    from robustprompt.data.registry import canonical_name

    try:
        canonical = canonical_name(name)
    except DatasetError:
        return None
    folders = {k: v.folder for k, v in SPLIT_JSON_LAYOUTS.items()}
    folders.update({"fgvc_aircraft": "fgvc_aircraft", "imagenet": "imagenet"})
    folder = folders.get(canonical)
    return Path(root) / folder if folder else None
