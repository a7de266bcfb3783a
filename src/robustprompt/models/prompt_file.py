"""Self-describing prompt files: `prompts.safetensors` with its own metadata.

A prompt file holds the learned prompt tensors and, in the safetensors header's ``__metadata__``,
ONE key, ``"robustprompt"``, whose value is a JSON document (format version ``FORMAT_VERSION``):

    {"format": "robustprompt-prompts", "version": 1,
     "prompt":    {coupling, n_ctx, depth, text_init, text_init_mode, init_std},
     "classnames": [...all class names, in label order...],
     "templates":  [...the templates the classifier was built with...],
     "backbone":  {"name", "pretrained", "quick_gelu", "weights_sha256", "hub": {"repo_id", "revision"} | null,
                   "info": {what Backbone.describe() recorded}},
     "method":    {"name", "params"},
     "train_threat": {ThreatModel.describe() + "short"} | null,
     "dataset":   {"name", "classes", "split", "shots", "seed", "few_shot_source"} | null,
     "toolkit":   {"name": "robustprompt", "version"},
     "source":    {...where imported prompts came from...} | null}

Why one key: safetensors stores ``__metadata__`` from a hash map, so several keys come out in a
different order in every process; one key keeps the file's bytes, and so its SHA-256 (part of an
evaluation's run identity), the same for the same prompts. Metadata values must be strings, hence
JSON. `load_file` of safetensors ignores the metadata, so older readers still read the tensors.

The file alone is enough to rebuild the classifier: the backbone to load (name, pretrained, QuickGELU),
the SHA-256 of its weights (`engine.identity.weights_fingerprint`, checked on load), the prompt layout,
the class names and templates.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ..errors import ModelError, RobustPromptError
from ..messages import one_line, quote
from .prompts import PromptConfig

META_KEY = "robustprompt"
FORMAT_NAME = "robustprompt-prompts"
FORMAT_VERSION = 1
PROMPTS_FILE = "prompts.safetensors"
MAX_HEADER_BYTES = 100_000_000   # safetensors' own limit on a header

# keys under which a backbone's describe() may name the Hub repo and the commit it was served at
_HUB_REPO_KEYS = ("hub_repo", "repo_id", "hf_repo")
_HUB_REVISION_KEYS = ("hub_revision", "revision", "commit")


@dataclass
class PromptMeta:
    """Everything a prompt file says about itself (see the module docstring for the JSON layout)."""

    prompt: PromptConfig
    classnames: list[str]
    templates: list[str]
    backbone: dict[str, Any]
    method: dict[str, Any] = field(default_factory=lambda: {"name": "unknown", "params": {}})
    train_threat: Optional[dict[str, Any]] = None
    dataset: Optional[dict[str, Any]] = None
    toolkit: dict[str, Any] = field(default_factory=dict)
    source: Optional[dict[str, Any]] = None
    version: int = FORMAT_VERSION

    # ------------------------------------------------------------------ convenience
    @property
    def weights_sha256(self) -> Optional[str]:
        return self.backbone.get("weights_sha256")

    @property
    def hub(self) -> Optional[dict[str, Any]]:
        return self.backbone.get("hub")

    def to_json(self) -> str:
        """The metadata value: compact JSON with sorted keys (same prompts → same bytes)."""
        doc = {"format": FORMAT_NAME, "version": self.version, "prompt": self.prompt.to_dict(),
               "classnames": list(self.classnames), "templates": list(self.templates),
               "backbone": self.backbone, "method": self.method, "train_threat": self.train_threat,
               "dataset": self.dataset, "toolkit": self.toolkit, "source": self.source}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, where: str) -> "PromptMeta":
        """Parse and check a metadata value; every defect is a one-line ModelError naming `where`."""
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ModelError(f"{where}: its robustprompt metadata is not valid JSON "
                             f"({one_line(exc, 120)}); the file is damaged") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ModelError(f"{where}: its '{META_KEY}' metadata is not a robustprompt prompt description "
                             f"(format {quote(got, 60)}, expected {FORMAT_NAME!r})")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ModelError(f"{where}: robustprompt metadata has no valid format version (got {quote(version, 40)})")
        if version > FORMAT_VERSION:
            raise ModelError(f"{where} was written by a newer robustprompt (prompt format version {version}; "
                             f"this one reads up to {FORMAT_VERSION}): upgrade robustprompt")
        return cls(prompt=_prompt(doc, where), classnames=_strings(doc, "classnames", where),
                   templates=_strings(doc, "templates", where, allow_empty=True),
                   backbone=_backbone(doc, where), method=_method(doc, where),
                   train_threat=_mapping(doc, "train_threat", where, optional=True),
                   dataset=_mapping(doc, "dataset", where, optional=True),
                   toolkit=_mapping(doc, "toolkit", where, optional=True) or {},
                   source=_mapping(doc, "source", where, optional=True), version=version)


# ---------------------------------------------------------------------- validation helpers
def _field(doc: dict, key: str, where: str) -> Any:
    if key not in doc:
        raise ModelError(f"{where}: robustprompt metadata lacks '{key}'; the file is damaged")
    return doc[key]


def _mapping(doc: dict, key: str, where: str, optional: bool = False) -> Optional[dict]:
    value = doc.get(key) if optional else _field(doc, key, where)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ModelError(f"{where}: robustprompt metadata '{key}' must be a mapping, got {quote(value, 60)}")
    return value


def _strings(doc: dict, key: str, where: str, allow_empty: bool = False) -> list[str]:
    value = _field(doc, key, where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not allow_empty):
        raise ModelError(f"{where}: robustprompt metadata '{key}' must be a non-empty list of strings, "
                         f"got {quote(value, 80)}")
    return list(value)


def _prompt(doc: dict, where: str) -> PromptConfig:
    raw = _mapping(doc, "prompt", where)
    try:
        return PromptConfig.from_dict(raw)
    except (RobustPromptError, TypeError) as exc:
        raise ModelError(f"{where}: robustprompt metadata 'prompt' is not a valid prompt layout: "
                         f"{one_line(exc, 300)}") from None


def _backbone(doc: dict, where: str) -> dict:
    bb = _mapping(doc, "backbone", where)
    if not isinstance(bb.get("name"), str) or not bb["name"]:
        raise ModelError(f"{where}: robustprompt metadata 'backbone.name' must be a backbone name, "
                         f"got {quote(bb.get('name'), 60)}")
    for key in ("pretrained", "weights_sha256"):
        if bb.get(key) is not None and not isinstance(bb[key], str):
            raise ModelError(f"{where}: robustprompt metadata 'backbone.{key}' must be a string or null, "
                             f"got {quote(bb[key], 60)}")
    sha = bb.get("weights_sha256")
    if sha is not None and (len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha)):
        raise ModelError(f"{where}: robustprompt metadata 'backbone.weights_sha256' is not a SHA-256 "
                         f"(64 hex digits), got {quote(sha, 80)}")
    if not isinstance(bb.get("quick_gelu", False), bool):
        raise ModelError(f"{where}: robustprompt metadata 'backbone.quick_gelu' must be true or false, "
                         f"got {quote(bb.get('quick_gelu'), 40)}")
    return bb


def _method(doc: dict, where: str) -> dict:
    m = _mapping(doc, "method", where)
    if not isinstance(m.get("name"), str):
        raise ModelError(f"{where}: robustprompt metadata 'method.name' must be a string, got {quote(m.get('name'), 60)}")
    return m


# ---------------------------------------------------------------------- building the metadata
def hub_origin(info: Mapping[str, Any]) -> Optional[dict[str, Optional[str]]]:
    """{"repo_id", "revision"} of a backbone that came from the Hugging Face Hub, from what its
    describe() recorded (or its `hf-hub:` name), else None."""
    repo = next((info[k] for k in _HUB_REPO_KEYS if isinstance(info.get(k), str)), None)
    name = info.get("name")
    if repo is None and isinstance(name, str) and name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
    if repo is None:
        return None
    revision = next((info[k] for k in _HUB_REVISION_KEYS if isinstance(info.get(k), str)), None)
    return {"repo_id": repo, "revision": revision}


def _jsonable(obj: Any) -> Any:
    """Plain JSON data: dataclasses, tuples and paths turned into dicts, lists and strings."""
    from ..config import to_dict

    return json.loads(json.dumps(to_dict(obj), default=str))


def build_meta(
    *,
    prompt: PromptConfig,
    model: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    method: str,
    method_params: Optional[Mapping[str, Any]] = None,
    train_threat: Any = None,
    dataset: Optional[Mapping[str, Any]] = None,
    backbone_info: Optional[Mapping[str, Any]] = None,
    weights_sha256: Optional[str] = "auto",
    source: Optional[Mapping[str, Any]] = None,
) -> PromptMeta:
    """The metadata of prompts trained (or imported) for `model` (a config.ModelSpec: name,
    pretrained, quick_gelu). `backbone_info`: the loaded backbone's describe() (recorded as is;
    its resolved quick_gelu and Hub repo/revision win over the spec's). `weights_sha256` "auto"
    computes `engine.identity.weights_fingerprint(model)` — the one backbone hash. `train_threat`:
    a ThreatModel (its describe() plus its short label) or an already described dict, or None."""
    from .. import __version__

    info = _jsonable(dict(backbone_info or {}))
    if weights_sha256 == "auto":
        from ..engine.identity import weights_fingerprint

        weights_sha256 = weights_fingerprint(model)
    quick_gelu = info.get("quick_gelu", model.quick_gelu)
    backbone = {"name": model.name, "pretrained": None if model.pretrained is None else str(model.pretrained),
                "quick_gelu": bool(quick_gelu), "weights_sha256": weights_sha256,
                "hub": hub_origin({**info, "name": model.name}), "info": info}
    threat = train_threat
    if threat is not None and hasattr(threat, "describe"):
        threat = {**threat.describe(), "short": threat.short()}
    return PromptMeta(prompt=prompt, classnames=[str(c) for c in classnames], templates=[str(t) for t in templates],
                      backbone=backbone, method={"name": method, "params": _jsonable(dict(method_params or {}))},
                      train_threat=None if threat is None else _jsonable(threat),
                      dataset=None if dataset is None else _jsonable(dict(dataset)),
                      toolkit={"name": "robustprompt", "version": __version__},
                      source=None if source is None else _jsonable(dict(source)))


# ---------------------------------------------------------------------- writing
def write_prompt_file(path: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: PromptMeta) -> Path:
    """Write `state` (prompt tensors, moved to the CPU) with `meta` in the header, atomically
    (a reader sees the old file or the whole new one; StorageError on a full disk)."""
    from safetensors.torch import save

    from ..paths import atomic_write_bytes

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: meta.to_json()}))
    return path


def write_prompts(
    out: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    *,
    seed: Optional[int] = None,
    **fields: Any,
) -> Path:
    """Write learned prompts as a self-describing prompt file or a loadable run directory.

    out: a path ending in ``.safetensors`` → that one file; anything else → a directory holding
    ``prompts.safetensors`` and a ``config.yaml`` (model / method / data / seed, kind "import"),
    which `--run DIR`, `load_classifier(run=DIR)` and `robustprompt push DIR` accept.
    state: the prompt tensors by `PromptedClassifier.prompt_state_dict()` names (their layout must
    be the one `prompt` makes on `model`; `load_classifier` checks it on load).
    fields: `build_meta`'s keyword arguments, which describe the prompts:
    prompt: their PromptConfig; model: a `config.ModelSpec` (name, pretrained, quick_gelu) of the
    backbone they belong to.
    classnames / templates: the label set in label order and the templates used (at least one).
    method: the method's name (e.g. "fap"); method_params: its hyperparameters.
    train_threat: the training ThreatModel (or its describe() dict), None for clean training.
    dataset: e.g. {"name": "imagenet", "classes": "base", "shots": 16, "seed": 1}.
    source: provenance of imported prompts, e.g. {"kind": "dassl", "file": "...", "sha256": "..."}.
    Returns the prompt file written. Example (an importer)::

        write_prompts("runs/import/fap-imagenet", state, prompt=PromptConfig(coupling="fap", n_ctx=2, depth=9),
                      model=ModelSpec(name="ViT-B-32", pretrained="openai"), classnames=names,
                      templates=["a photo of a {}."], method="fap", train_threat=ThreatModel.from_255(1),
                      dataset={"name": "imagenet", "shots": 16, "seed": 1}, source={"kind": "dassl", "file": f})
    """
    meta = build_meta(**fields)
    model, prompt = fields["model"], meta.prompt
    out = Path(out)
    if out.suffix == ".safetensors":
        return write_prompt_file(out, state, meta)
    import yaml

    from ..config import to_dict
    from ..paths import atomic_write_text

    model_cfg = {**_jsonable(to_dict(model)), "prompt": prompt.to_dict(),
                 "fingerprint": {"weights": meta.weights_sha256}}
    model_cfg.pop("run", None)
    if len(meta.templates) == 1:   # the one template used, verbatim (a dataset name would need the dataset)
        model_cfg["templates"] = meta.templates[0]
    config = {"kind": "import", "model": model_cfg, "method": meta.method, "data": meta.dataset or {},
              "seed": seed, "source": meta.source}
    file = write_prompt_file(out / PROMPTS_FILE, state, meta)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return file


# ---------------------------------------------------------------------- reading
def read_meta(path: str | os.PathLike, *, damaged_header_ok: bool = False) -> Optional[PromptMeta]:
    """The metadata of prompt file `path`, or None when it has none (written before prompt files
    described themselves, or a safetensors file of another tool). A damaged or foreign
    ``robustprompt`` entry is a one-line ModelError naming the file; so is a file whose
    safetensors header cannot be read, unless `damaged_header_ok` (then None: the caller reads
    the tensors next and reports the damage with the reader's words)."""
    try:
        raw = _header_metadata(Path(path))
    except ModelError:
        if damaged_header_ok:
            return None
        raise
    if raw is None or META_KEY not in raw:
        return None
    value = raw[META_KEY]
    if not isinstance(value, str):
        raise ModelError(f"{path}: its '{META_KEY}' metadata is not a string; the file is damaged")
    return PromptMeta.from_json(value, str(path))


def _header_metadata(path: Path) -> Optional[dict]:
    """The ``__metadata__`` mapping of a safetensors header (None if absent), read without the
    tensors; a header that is not safetensors' is a one-line ModelError."""
    import struct

    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelError(f"cannot read prompts {path}: not a safetensors file ({len(head)} bytes)")
            n = struct.unpack("<Q", head)[0]
            size = os.fstat(fh.fileno()).st_size
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise ModelError(f"cannot read prompts {path}: truncated or corrupt safetensors header "
                                 f"(it claims {n} bytes, the file has {size})")
            header = json.loads(fh.read(n).decode("utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read prompts {path}: {one_line(exc.strerror or exc)}") from None
    except (ValueError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError
        raise ModelError(f"cannot read prompts {path}: corrupt safetensors header ({one_line(exc, 120)})") from None
    if not isinstance(header, dict):
        raise ModelError(f"cannot read prompts {path}: corrupt safetensors header (not a mapping)")
    meta = header.get("__metadata__")
    if meta is not None and not isinstance(meta, dict):
        raise ModelError(f"cannot read prompts {path}: corrupt safetensors header (__metadata__ is not a mapping)")
    return meta


def meta_dict(meta: PromptMeta) -> dict[str, Any]:
    """The metadata as the JSON document (a plain dict)."""
    return json.loads(meta.to_json())


__all__ = ["META_KEY", "FORMAT_VERSION", "PROMPTS_FILE", "PromptMeta", "build_meta", "hub_origin",
           "write_prompt_file", "write_prompts", "read_meta", "meta_dict"]
