"""Reading image files from disk: extension filter, fast directory listing, RGB loading."""
from __future__ import annotations

import os
from typing import Sequence

from PIL import Image

from robustprompt.errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def is_image_file(name: str) -> bool:
    """True when ``name`` ends with a known image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_subdirs(directory: str | os.PathLike) -> list[str]:
    """Sorted names of the visible sub-directories of ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_images(directory: str | os.PathLike) -> list[str]:
    """Sorted names of the visible image files directly inside ``directory``."""
    with os.scandir(directory) as entries:
        return sorted(
            e.name for e in entries
            if not e.name.startswith(".") and is_image_file(e.name) and e.is_file()
        )


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and return it as an RGB PIL image (H x W, 3 channels)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


class PathLoader:
    """``index -> RGB image`` over a list of file paths.

    A class rather than a closure so a Split can be pickled into DataLoader worker processes.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [os.fspath(p) for p in paths]

    def __call__(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

