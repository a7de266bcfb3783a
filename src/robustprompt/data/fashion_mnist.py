"""Fashion-MNIST from its four IDX files: the project's offline demo dataset."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from robustprompt.data.base import Dataset, Split
from robustprompt.data.idx import read_idx_images, read_idx_labels
from robustprompt.errors import DatasetError
from robustprompt.paths import cache_dir

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
              "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a product photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
]
# split -> (images file stem, labels file stem)
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# parsed arrays keyed by the files' identity, so repeated builds in one process are cheap
_CACHE: dict[tuple, dict[str, tuple[np.ndarray, np.ndarray]]] = {}


class ArrayLoader:
    """``index -> RGB 28 x 28 PIL image`` over a uint8 array N x 28 x 28 (picklable)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _files_in(directory: Path) -> dict[str, tuple[Path, Path]] | None:
    """The four files in ``directory`` as {split: (images, labels)}, or None if any is missing."""
    found = {}
    for split, stems in FILES.items():
        paths = [_find_file(directory, s) for s in stems]
        if None in paths:
            return None
        found[split] = tuple(paths)
    return found


def _download_dir() -> Path:
    return cache_dir() / "fashion_mnist"


def _local_candidates(root: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        dirs += [root / "fashion-mnist", root / "fashion_mnist", root]
    return dirs + [SYSTEM_DIR]


def _download() -> dict[str, tuple[Path, Path]]:
    from torchvision.datasets import FashionMNIST

    target = _download_dir()
    try:
        FashionMNIST(str(target), train=True, download=True)
        FashionMNIST(str(target), train=False, download=True)
    except Exception as exc:  # network and archive errors come in many types
        raise DatasetError(f"downloading Fashion-MNIST into {target} failed: {exc}") from None
    files = _files_in(target / "FashionMNIST" / "raw")
    if files is None:
        raise DatasetError(f"Fashion-MNIST download into {target} did not leave the four IDX files "
                           f"in {target / 'FashionMNIST' / 'raw'}")
    return files


def _load_arrays(files: dict[str, tuple[Path, Path]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    key = tuple(
        (str(p.resolve()), st.st_mtime_ns, st.st_size)
        for pair in files.values() for p in pair for st in [os.stat(p)]
    )
    if key in _CACHE:
        return _CACHE[key]
    arrays = {}
    for split, (img_path, lbl_path) in files.items():
        images, labels = read_idx_images(img_path), read_idx_labels(lbl_path)
        if len(images) != len(labels):
            raise DatasetError(f"Fashion-MNIST: {img_path} holds {len(images)} images but "
                               f"{lbl_path} holds {len(labels)} labels")
        if labels.size and labels.max() >= len(CLASSNAMES):
            raise DatasetError(f"Fashion-MNIST: {lbl_path} has label {int(labels.max())}, "
                               f"expected 0..{len(CLASSNAMES) - 1}")
        images.setflags(write=False)
        labels.setflags(write=False)
        arrays[split] = (images, labels)
    _CACHE[key] = arrays
    return arrays


def build_fashion_mnist(root: str | Path | None = None, download: bool = False) -> Dataset:
    """Fashion-MNIST with 'train' (60k) and 'test' (10k); images are uint8 28 x 28 in memory,
    returned as RGB PIL images."""
    candidates = _local_candidates(root)
    files = next((f for f in map(_files_in, candidates) if f is not None), None)
    if files is None:
        # a copy that an earlier download left in the cache is reused without the network;
        # looked up last so that finding the data elsewhere never creates the cache folder
        candidates.append(_download_dir() / "FashionMNIST" / "raw")
        files = _files_in(candidates[-1])
    if files is None:
        if not download:
            raise DatasetError(
                "Fashion-MNIST not found; looked for train-images-idx3-ubyte.gz, "
                "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                "t10k-labels-idx1-ubyte.gz (gzipped or not) in "
                + ", ".join(str(d) for d in candidates)
                + ". Install them with `apt-get install dataset-fashion-mnist`, pass a data root "
                "that holds them, or allow the download (download=True)."
            )
        files = _download()
    arrays = _load_arrays(files)
    splits = {}
    for split, (images, labels) in arrays.items():
        splits[split] = Split(
            ids=[f"fashion_mnist/{split}/{i:05d}" for i in range(len(labels))],
            labels=labels.astype(int).tolist(),
            load=ArrayLoader(images),
        )
    return Dataset("fashion_mnist", list(CLASSNAMES), splits, list(TEMPLATES))
