"""Parsing IDX files (the MNIST container format), gzipped or not."""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from robustprompt.errors import DatasetError

IMAGES_MAGIC = 2051  # unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # unsigned byte, 1 dimension


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        # decide by content, not by name: some mirrors ship gunzipped files under .gz names
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from None


def _header(data: bytes, path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    size = 4 + 4 * ndim
    if len(data) < size:
        raise DatasetError(f"IDX file {path} is truncated: {len(data)} bytes, "
                           f"shorter than its {size}-byte header")
    found, *dims = struct.unpack(f">{1 + ndim}I", data[:size])
    if found != magic:
        raise DatasetError(f"IDX file {path}: magic number {found}, expected {magic}")
    expected = size + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(f"IDX file {path}: {len(data)} bytes, expected {expected} for "
                           f"shape {tuple(dims)}")
    return tuple(dims)


def read_idx_images(path: Path) -> np.ndarray:
    """Image file (magic 2051) -> uint8 array N x rows x cols."""
    data = _read_bytes(path)
    n, rows, cols = _header(data, path, IMAGES_MAGIC, 3)
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_idx_labels(path: Path) -> np.ndarray:
    """Label file (magic 2049) -> uint8 array N."""
    data = _read_bytes(path)
    _header(data, path, LABELS_MAGIC, 1)
    return np.frombuffer(data, dtype=np.uint8, offset=8).copy()
