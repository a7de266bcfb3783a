"""Dataset names -> builders, with forgiving aliases ("oxford-pets", "imagenet-a", ...)."""
from __future__ import annotations

from pathlib import Path

from robustprompt.data.base import Dataset
from robustprompt.data.coop import COOP_BUILDERS, build_coop
from robustprompt.data.fashion_mnist import build_fashion_mnist
from robustprompt.data.generic import build_csv, build_image_folder
from robustprompt.errors import DatasetError

FASHION_MNIST = "fashion_mnist"

# extra spellings beyond hyphen/underscore/space variants of the canonical names
_EXTRA_ALIASES = {
    "flowers102": "oxford_flowers",
    "oxfordflowers102": "oxford_flowers",
    "pets": "oxford_pets",
    "cars": "stanford_cars",
    "aircraft": "fgvc_aircraft",
    "describabletextures": "dtd",
    "imagenetadversarial": "imagenet_a",
    "imagenetrendition": "imagenet_r",
    "fashionmnist": FASHION_MNIST,
}


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def list_datasets() -> list[str]:
    """Canonical names accepted by build_dataset (besides ``imagefolder:<path>``, ``csv:<path>``)."""
    return sorted([*COOP_BUILDERS, FASHION_MNIST])


def canonical_name(name: str) -> str:
    """The canonical dataset name for ``name`` or an alias of it; DatasetError if unknown."""
    aliases = {_key(n): n for n in list_datasets()}
    aliases.update(_EXTRA_ALIASES)
    found = aliases.get(_key(name))
    if found is None:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}, "
                           "plus imagefolder:<path> and csv:<path>")
    return found


def build_dataset(name: str, root: str | Path | None = None, download: bool = False) -> Dataset:
    """Build a dataset by name. CoOp datasets need ``root`` (the folder holding all of them);
    ``fashion_mnist`` searches ``root`` then system locations (and downloads if allowed);
    ``imagefolder:<path>`` and ``csv:<path>`` ignore ``root``."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix.strip().lower() in ("imagefolder", "csv"):
        if not rest.strip():
            raise DatasetError(f"dataset {name!r}: a path must follow '{prefix}:'")
        builder = build_image_folder if prefix.strip().lower() == "imagefolder" else build_csv
        return builder(rest.strip())
    canonical = canonical_name(name)
    if canonical == FASHION_MNIST:
        return build_fashion_mnist(root, download=download)
    if root is None:
        raise DatasetError(f"dataset {canonical!r} needs a data root: the folder that holds the "
                           f"CoOp dataset folders (`robustprompt data prepare --dataset {canonical} --root DIR` "
                           "says how to fill it)")
    try:
        return build_coop(canonical, root)
    except DatasetError as exc:   # the loader stops at the first problem; the check lists them all
        raise DatasetError(f"{exc}; run `robustprompt data check --dataset {canonical} --root {str(root)[:200]}` "
                           "for everything that is missing") from None
