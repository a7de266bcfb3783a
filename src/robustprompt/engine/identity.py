"""What a run's result depends on beyond its settings: the bytes of the prompts and backbone
weights it loads, and which images (ids, labels, classes) it works on.

These fingerprints go into the run's semantic config (`model.fingerprint`, `data.fingerprint`),
so a retrained prompt file, a replaced checkpoint or a changed image folder makes a different run
instead of a silently reused one.

Trusted and not: a file is identified by its SHA-256 (streamed, cached within a process per
(path, size, mtime, inode)); an open_clip pretrained tag by its name only; a split by the ordered ids and
labels of the images used and the class names, not by pixel content (an image file replaced under
the same name is not noticed).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from ..config import ModelSpec

_CHUNK = 1 << 20
_SHA_CACHE: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, read once in 1 MiB chunks. Cached for the life of the process per
    (resolved path, size, mtime, and inode and ctime): a file rewritten in place gets a new
    mtime/ctime, one replaced atomically a new inode — either way a new hash."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def weights_fingerprint(spec: ModelSpec) -> Optional[str]:
    """SHA-256 of the backbone weight file a spec loads: the demo backbone's cached file (built
    first if needed), or `pretrained` when it is a path. None for an open_clip tag (its name is
    already in the config) and for random initialisation."""
    if spec.name == "demo":
        from ..demo.backbone import ensure_demo_backbone

        return sha256_file(ensure_demo_backbone(progress=False) / "model.safetensors")
    if spec.pretrained and Path(spec.pretrained).is_file():
        return sha256_file(spec.pretrained)
    return None


def model_fingerprint(spec: ModelSpec, *, with_prompts: bool = True) -> dict[str, Optional[str]]:
    """{"weights": sha256 | None} plus, for a spec that loads a training run's prompts
    (`spec.run`), {"prompts": sha256 of run/prompts.safetensors}. The weights are those of the
    backbone the run was trained on (its config.yaml)."""
    backbone = spec
    out: dict[str, Optional[str]] = {}
    if spec.run:
        from ..api import run_backbone_spec

        backbone = run_backbone_spec(spec.run)
        if with_prompts:
            out["prompts"] = sha256_file(Path(spec.run) / "prompts.safetensors")
    out["weights"] = weights_fingerprint(backbone)
    return out


def split_fingerprint(ids: Sequence[str], labels: Sequence[int], indices: Sequence[int],
                      classnames: Sequence[str]) -> str:
    """sha1 (hex, 16 chars) of the ordered (index, id, label) of the images used and the class
    names: adding, removing, renaming or relabelling an image, or changing the classes, changes it."""
    h = hashlib.sha1()
    h.update(json.dumps(list(classnames)).encode())
    for i in indices:
        h.update(json.dumps([int(i), ids[i], int(labels[i])]).encode())
    return h.hexdigest()[:16]
