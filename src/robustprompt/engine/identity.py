"""What a run's result depends on beyond its settings: the bytes of the prompts and backbone
weights it loads, and which images (ids, labels, classes) it works on.

These fingerprints go into the run's semantic config (`model.fingerprint`, `data.fingerprint`),
so a retrained prompt file, a replaced checkpoint or a changed image folder makes a different run
instead of a silently reused one.

Trusted and not: a weight file is identified by its SHA-256 (streamed, cached within a process per
(path, size, mtime, inode)) — a checkpoint path, an open_clip tag's downloaded file, a Hub repo's or
a local folder's file alike (models.sources); a split by the ordered ids and
labels of the images used and the class names, not by pixel content (an image file replaced under
the same name is not noticed).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

from ..config import ModelSpec
from ..models.sources import RANDOM_INIT, WeightSource, resolve_source, sha256_file, split_scheme

__all__ = ["sha256_file", "weights_fingerprint", "model_fingerprint", "split_fingerprint", "weights_source"]


def weights_source(spec: ModelSpec) -> Optional[WeightSource]:
    """Where the backbone weights of `spec` come from (models.sources.resolve_source: finds or
    downloads and hashes the files), or None for the demo backbone, for random initialisation
    and for a `pretrained` value that is neither a file nor a known tag (load_backbone refuses
    that one, listing the known tags). ModelError for any other problem (an unknown
    architecture, a Hub repo not found or not reachable, …)."""
    builtin = split_scheme(spec.name)[0] is None
    if spec.name == "demo" or (builtin and spec.pretrained in RANDOM_INIT):
        return None
    if builtin and not Path(str(spec.pretrained)).exists():
        import open_clip

        if not open_clip.get_pretrained_cfg(spec.name.replace("/", "-"), str(spec.pretrained)):
            return None
    return resolve_source(spec.name, spec.pretrained)


def weights_fingerprint(spec: ModelSpec) -> Optional[str]:
    """SHA-256 of the backbone weights a spec loads — THE hash of a backbone, equal to
    `Backbone.weights_sha256` of the backbone it loads: the demo backbone's cached file (built
    first if needed); the file of a path, of an open_clip tag (downloaded by open_clip if not
    cached), of an `hf-hub:` repo (at the commit the Hub serves) or of a `local-dir:` folder;
    for several files, the SHA-256 of their sha256sum listing. None for random initialisation."""
    if spec.name == "demo":
        from ..demo.backbone import ensure_demo_backbone

        return sha256_file(ensure_demo_backbone(progress=False) / "model.safetensors")
    source = weights_source(spec)
    return source.sha256 if source is not None else None


def model_fingerprint(spec: ModelSpec, *, with_prompts: bool = True) -> dict[str, Optional[str]]:
    """{"weights": sha256 | None} plus, for a backbone that brings its own open_clip config
    (`hf-hub:`, `local-dir:`), {"config": sha256 of its open_clip_config.json} (it sets the
    architecture and the preprocessing), and, for a spec that loads a training run's prompts
    (`spec.run`), {"prompts": sha256 of run/prompts.safetensors}. The weights are those of the
    backbone the run was trained on (its config.yaml)."""
    backbone = spec
    out: dict[str, Optional[str]] = {}
    if spec.run:
        from ..api import run_backbone_spec

        backbone = run_backbone_spec(spec.run)
        if with_prompts:
            out["prompts"] = sha256_file(Path(spec.run) / "prompts.safetensors")
    if backbone.name == "demo":
        out["weights"] = weights_fingerprint(backbone)
        return out
    source = weights_source(backbone)
    out["weights"] = source.sha256 if source is not None else None
    if source is not None and source.config is not None:
        out["config"] = source.config.sha256
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
