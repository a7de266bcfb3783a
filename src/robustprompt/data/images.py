"""Reading image files from disk: extension filter, fast directory listing, RGB loading.

Every image becomes 8-bit RGB. Wider pixels are scaled, never clipped (``convert("RGB")`` clips a
16-bit image at 255, which silently turns a dark picture white):

- 16-bit integers (modes I;16, I;16B, I;16L, I;16N): the high byte, v >> 8 — what Pillow itself
  does to 16-bit RGB and RGBA PNGs and torchvision's ``convert_image_dtype`` does to uint16, so a
  16-bit picture loads the same whether stored as grey or as RGB. It differs from round(v/257) by
  at most one level and agrees with it on every v = 257·k (an 8-bit image widened the usual way).
- 32-bit integers (mode I): scaled by the range the file declares, v·256 // (max + 1) (the same
  rule: v >> 8 for max = 65535): PNG and PPM hold at most 16-bit samples (older Pillow opens
  them as I); a TIFF declares its range by MaxSampleValue / SMaxSampleValue or BitsPerSample
  ≤ 16. Without a declared range, or with negative values, the image is refused.
- floats (mode F): values all in [0, 1] are read as [0, 1] (round(v·255)); otherwise values in
  [0, 255] as 8-bit levels (round(v)); anything else (negative, above 255, NaN) is refused. A
  float image whose values are all ≤ 1 is therefore always read as [0, 1].
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from robustprompt.errors import DatasetError
from robustprompt.messages import one_line

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


def cached_list_images(directory: str | os.PathLike) -> list[str]:
    """``list_images(directory)``, remembered in the cache directory under a key made of the
    folder's absolute path and its modification time (which changes whenever an entry is added,
    removed or renamed), so a large tree such as ImageNet is listed once, not on every run.
    A cache that cannot be read or written only costs a fresh listing."""
    import hashlib
    import json

    from robustprompt.paths import atomic_write_text, cache_dir

    path = os.path.abspath(directory)
    stamp = os.stat(path).st_mtime_ns
    key = hashlib.sha1(f"{path}\0{stamp}".encode()).hexdigest()
    cache = cache_dir() / "listings" / f"{key}.json"
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("path") == path and cached.get("mtime_ns") == stamp:
            return list(cached["names"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    names = list_images(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"path": path, "mtime_ns": stamp, "names": names}))
    except OSError:
        pass
    return names


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and return it as an 8-bit RGB PIL image (H x W, 3 channels), wide
    pixels scaled as the module docstring says. Any unreadable file is a one-line DatasetError
    naming it; a decompression bomb (over twice Pillow's MAX_IMAGE_PIXELS) is refused from its
    header, before any pixel is decoded."""
    shown = str(path)[:200]
    try:
        with Image.open(path) as img:
            img.load()  # decode now, while the file is open (an RGB image is returned as is)
            return to_rgb8(img, shown)
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {shown}") from None
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"cannot read image {shown}: refused as a possible decompression bomb "
                           f"({one_line(str(exc), 200)})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot read image {shown}: {one_line(str(exc), 200) or type(exc).__name__}") from None


_MODES_16 = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def to_rgb8(img: Image.Image, name: str = "image") -> Image.Image:
    """``img`` as 8-bit RGB: 8-bit modes by Pillow's convert, 16-bit, 32-bit integer and float
    modes scaled (never clipped) as the module docstring says, or a DatasetError naming ``name``."""
    if img.mode == "RGB":
        return img
    if img.mode in _MODES_16:
        return _grey(np.asarray(img) >> 8)
    if img.mode == "I":
        return _grey(_scale_int32(np.asarray(img), _declared_max(img), name))
    if img.mode == "F":
        return _grey(_scale_float(np.asarray(img), name))
    return img.convert("RGB")


def _grey(levels: np.ndarray) -> Image.Image:
    """H×W 8-bit levels (any integer dtype, already in [0, 255]) → an RGB image."""
    return Image.fromarray(levels.astype(np.uint8), mode="L").convert("RGB")


def _declared_max(img: Image.Image) -> Optional[int]:
    """The largest value a mode-I image's format says its samples can take, if it says."""
    if img.format in ("PNG", "PPM"):
        return 65535
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    for tag in (341, 281):  # SMaxSampleValue, MaxSampleValue
        value = tags.get(tag)
        if value is not None:
            value = max(value) if isinstance(value, tuple) else value
            if isinstance(value, int) and value > 0:
                return value
    bits = tags.get(258)  # BitsPerSample
    bits = max(bits) if isinstance(bits, tuple) and bits else bits
    if isinstance(bits, int) and 8 <= bits <= 16:
        return (1 << bits) - 1
    return None


def _scale_int32(a: np.ndarray, top: Optional[int], name: str) -> np.ndarray:
    """v·256 // (top + 1): the v >> k rule for top = 2**b − 1, and exact for any other top."""
    if top is None:
        raise DatasetError(f"cannot read image {name}: 32-bit integer pixels (mode I) with no declared range; "
                           f"convert it to 8 or 16 bits")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > top:
        raise DatasetError(f"cannot read image {name}: 32-bit integer pixels in [{lo}, {hi}] lie outside "
                           f"the declared range [0, {top}]")
    return (a.astype(np.uint64) * 256) // (top + 1)


def _scale_float(a: np.ndarray, name: str) -> np.ndarray:
    """[0, 1] floats → round(v·255); [0, 255] floats (some value above 1) → round(v)."""
    a = a.astype(np.float64)
    finite = bool(np.isfinite(a).all())
    lo, hi = (float(a.min()), float(a.max())) if finite and a.size else (0.0, 0.0)
    if not finite or lo < 0 or hi > 255:
        shown = "non-finite values" if not finite else f"values in [{lo:g}, {hi:g}]"
        raise DatasetError(f"cannot read image {name}: floating-point pixels with {shown}; only [0, 1] or "
                           f"[0, 255] can be read")
    return np.rint(a * (255.0 if hi <= 1 else 1.0))


class PathLoader:
    """``index -> RGB image`` over a list of file paths.

    A class rather than a closure so a Split can be pickled into DataLoader worker processes.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [os.fspath(p) for p in paths]

    def __call__(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

