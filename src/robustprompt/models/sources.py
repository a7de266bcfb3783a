"""Where a backbone's weights come from: one resolver from (model name, pretrained) to a
`WeightSource` — the kind of source, its id and revision, the weight file(s) with their SHA-256,
and the open_clip model and preprocess configs — for every place open_clip loads weights from.

    kind       model name                  pretrained                id                 revision
    random     ARCH (e.g. ViT-B-32)        None / "none" / "random"  —                  —
    tag        ARCH                        an open_clip tag          the tag            the Hub commit, when
                                                                                        open_clip downloads it
                                                                                        from the Hub
    file       ARCH                        a checkpoint path         the path           —
    hf-hub     hf-hub:ORG/REPO[@REVISION]  None                      ORG/REPO           the commit the Hub served
    local-dir  local-dir:PATH              None                      the folder         —
    demo       demo (demo/backbone.py: the embedded Fashion-MNIST backbone; see Backbone.provenance)

Resolving finds or downloads the files (through huggingface_hub's cache, or open_clip's own
download function for tags) and hashes them; it never reads them as tensors: `load_backbone`
does that through models.safe_archive, so a Hub file gets the same data-only reading, strict
key/shape check and finite check as a local file. open_clip's own `create_model` is only asked
to build the architecture (`load_weights=False`): it would otherwise fall back to random weights,
with a log line, when a Hub download fails.

`hf-hub:ORG/REPO@REVISION` pins a branch, tag or commit (everything after the first "@"; repo ids
cannot hold one). Without it the Hub's default branch is used, and the commit it pointed to is
recorded. Weights are looked up as open_clip does: `open_clip_model.safetensors`, then
`open_clip_pytorch_model.bin`, at the commit `open_clip_config.json` came from.

Every problem is a `ModelError` with one line that names the model and what is wrong.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ModelError
from ..messages import one_line, quote

log = logging.getLogger("robustprompt")

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's order of preference: on the Hub (pretrained.download_pretrained_from_hf) ...
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# ... and in a local folder (factory._find_checkpoint_in_dir); any other file with these suffixes after
LOCAL_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                      "pytorch_model.bin", "pytorch_model.pth", "model.pth")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
RANDOM_INIT = (None, "", "none", "random")
# open_clip's PreprocessCfg fields that a source may set; "size" always follows the built model
PREPROCESS_KEYS = ("mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
MAX_CONFIG_BYTES = 10_000_000
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CHUNK = 1 << 20
_SHA_CACHE: dict[tuple, str] = {}


# ---------------------------------------------------------------------------- hashing
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


@dataclass(frozen=True)
class WeightFile:
    """One file of a source: its name there (a repo path, a file name) and where it lies here."""

    name: str
    path: Path
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike, name: Optional[str] = None, what: str = "checkpoint") -> "WeightFile":
        path = Path(path)
        if not path.is_file():   # a FIFO or device would block the hash (and is no checkpoint)
            raise ModelError(f"{what} {path} is not a regular file")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise ModelError(f"cannot read {what} {path}: {one_line(exc.strerror or exc, 200)}") from None
        return cls(name or path.name, path, digest)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


def combined_sha256(files: Sequence[WeightFile]) -> Optional[str]:
    """The weights' hash: None without files, a single file's own SHA-256, and for several files
    the SHA-256 of their `sha256sum` listing ("<hash>  <name>\\n" lines sorted by name)."""
    if not files:
        return None
    if len(files) == 1:
        return files[0].sha256
    listing = "".join(f"{f.sha256}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(listing.encode()).hexdigest()


# ---------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights come from (see the module docstring's table), and what open_clip
    needs to build it: `model_ref` (a built-in architecture name, or `local-dir:FOLDER` holding
    the source's open_clip_config.json), `model_cfg` (open_clip's model config), `preprocess` (the
    source's own preprocess entries, laid over open_clip's defaults; no "size": that is the
    built model's) and `quick_gelu` (whether the weights were trained with QuickGELU)."""

    kind: str
    name: str                                   # the model name as given
    id: Optional[str] = None
    revision: Optional[str] = None
    files: tuple[WeightFile, ...] = ()
    config: Optional[WeightFile] = None         # open_clip_config.json (hf-hub, local-dir)
    model_ref: str = ""
    model_cfg: dict = field(default_factory=dict, compare=False)
    preprocess: dict = field(default_factory=dict, compare=False)
    quick_gelu: bool = False
    details: dict = field(default_factory=dict, compare=False)   # extra record entries (arch, hf_hub, …)

    @property
    def sha256(self) -> Optional[str]:
        """The weights' SHA-256 (`combined_sha256` of the files); None for random init."""
        return combined_sha256(self.files)

    @property
    def label(self) -> str:
        """How error messages name the source."""
        if self.kind == "tag":
            return f"{self.details.get('arch', self.name)}/{self.id}"
        if self.kind == "file":
            return f"checkpoint {self.id}"
        return self.name

    def describe(self) -> dict[str, Any]:
        """What a run records: kind, id, revision, files with their SHA-256, and the weights' hash."""
        out: dict[str, Any] = {"kind": self.kind, "id": self.id, "revision": self.revision,
                               "files": [f.describe() for f in self.files], "sha256": self.sha256}
        if self.config is not None:
            out["config"] = self.config.describe()
        out.update(self.details)
        return out


# ---------------------------------------------------------------------------- names
def split_scheme(name: str) -> tuple[Optional[str], str]:
    """("hf-hub" | "local-dir" | None, the rest of the name)."""
    for scheme, prefix in (("hf-hub", HF_HUB_PREFIX), ("local-dir", LOCAL_DIR_PREFIX)):
        if name.startswith(prefix):
            return scheme, name[len(prefix):]
    return None, name


def parse_hub_name(name: str) -> tuple[str, Optional[str]]:
    """"hf-hub:ORG/REPO[@REVISION]" → (repo id, revision or None). ModelError for a malformed name."""
    rest = split_scheme(name)[1]
    repo, at, revision = rest.partition("@")
    if at and not revision:
        raise ModelError(f"{quote(name, 120)}: nothing after '@'; write hf-hub:ORG/REPO@REVISION "
                         "(a branch, tag or commit) or leave out the '@'")
    if not repo or repo.count("/") > 1 or repo.startswith("/") or repo.endswith("/"):
        raise ModelError(f"{quote(name, 120)} is not a Hub model name: expected hf-hub:ORG/REPO "
                         "or hf-hub:ORG/REPO@REVISION")
    return repo, (revision or None)


def model_slug(name: str, limit: int = 80) -> str:
    """A file-name-safe short form of a model name for default run-folder names: an architecture
    keeps its name ('/' → '-', as before); `hf-hub:ORG/REPO@REV` becomes `hf-hub_ORG_REPO_REV` and
    `local-dir:PATH` becomes `local-dir_<folder name>` (the config hash next to it tells runs apart)."""
    scheme, rest = split_scheme(name)
    if scheme is None:
        text = name.replace("/", "-")
    elif scheme == "local-dir":
        text = f"local-dir_{Path(rest.rstrip('/') or '/').name or 'root'}"
    else:
        text = f"hf-hub_{rest.replace('/', '_').replace('@', '_')}"
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "model"
    return text[:limit]


def check_architecture(name: str) -> str:
    """The open_clip architecture a built-in name stands for ('/' written as '-' is accepted);
    ModelError with close matches for an unknown one."""
    import difflib

    import open_clip

    arch = name.replace("/", "-")
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown open_clip architecture {quote(name, 120)}.{hint} "
                         "(`python -c 'import open_clip; print(open_clip.list_models())'` lists them; "
                         "hf-hub:ORG/REPO and local-dir:PATH load a model that brings its own config)")
    return arch


# ---------------------------------------------------------------------------- resolving
def resolve_source(name: str, pretrained: str | os.PathLike | None = None, *,
                   cache_dir: Optional[str] = None) -> WeightSource:
    """Where the weights of backbone (`name`, `pretrained`) come from (module docstring): finds or
    downloads the files and hashes them. `cache_dir`: the download cache (huggingface_hub's
    cache for Hub files, open_clip's ~/.cache/clip for URL downloads) instead of the default."""
    scheme, rest = split_scheme(name)
    if scheme is not None:
        if pretrained not in (None, ""):
            pin = " (pin a version with hf-hub:ORG/REPO@REVISION)" if scheme == "hf-hub" else ""
            raise ModelError(f"{quote(name, 120)} brings its own weights: drop --pretrained "
                             f"{quote(str(pretrained), 80)}{pin}")
        if not rest:
            raise ModelError(f"{quote(name, 120)}: nothing after '{scheme}:'")
        if scheme == "hf-hub":
            repo, revision = parse_hub_name(name)
            return _resolve_hub(name, repo, revision, cache_dir)
        return _resolve_local_dir(name, rest)
    arch = check_architecture(name)
    model_cfg = _builtin_config(arch)
    base = {"name": arch, "model_ref": arch, "model_cfg": model_cfg,
            "quick_gelu": bool(model_cfg.get("quick_gelu", False)), "details": {"arch": arch}}
    if pretrained in RANDOM_INIT:
        return WeightSource(kind="random", **base)
    if os.path.exists(pretrained):
        path = Path(pretrained)
        if path.is_dir():
            raise ModelError(f"--pretrained {path} is a directory; give the checkpoint file inside it "
                             f"(or --model local-dir:{path} for an open_clip model folder)")
        return WeightSource(kind="file", id=str(path), files=(WeightFile.of(path),), **base)
    return _resolve_tag(arch, str(pretrained), cache_dir, base)


def _builtin_config(arch: str) -> dict:
    from open_clip.factory import get_model_config

    return get_model_config(arch) or {}


def _resolve_tag(arch: str, tag: str, cache_dir: Optional[str], base: dict) -> WeightSource:
    """An open_clip pretrained tag: the file through open_clip's own download function (Hub or
    URL, its cache), hashed; the tag's preprocess entries and QuickGELU flag."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg:
        tags = [t for m, t in open_clip.list_pretrained() if m == arch]
        raise ModelError(f"--pretrained {quote(tag, 120)} is neither a file nor a tag known for {arch}; "
                         f"known tags: {', '.join(tags) or 'none'}")
    try:
        path = download_pretrained(tag_cfg, cache_dir=cache_dir)
    except Exception as exc:   # network, cache, Hub errors: open_clip wraps the Hub's in FileNotFoundError
        raise ModelError(f"could not obtain weights {arch}/{tag}: {_download_problem(exc, cache_dir)}") from None
    if not path or not os.path.isfile(path):
        raise ModelError(f"could not obtain weights {arch}/{tag}: open_clip's download gave no file")
    details = {**base["details"], "hf_hub": tag_cfg.get("hf_hub") or None, "url": tag_cfg.get("url") or None}
    return WeightSource(
        kind="tag", name=arch, id=tag, revision=snapshot_commit(path),
        files=(WeightFile.of(path, what=f"weights {arch}/{tag}"),), model_ref=arch, model_cfg=base["model_cfg"],
        preprocess=_preprocess_entries(tag_cfg), details=details,
        quick_gelu=bool(tag_cfg.get("quick_gelu", False)) or tag == "openai" or base["quick_gelu"])


def _resolve_local_dir(name: str, rest: str) -> WeightSource:
    folder = Path(rest).expanduser()
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "no such directory"
        raise ModelError(f"{quote(name, 200)}: {what}")
    config_path = folder / OPEN_CLIP_CONFIG
    if not config_path.is_file():
        raise ModelError(f"{quote(name, 200)} is not an open_clip model folder: it has no {OPEN_CLIP_CONFIG}")
    config = read_open_clip_config(config_path, name)
    weights = find_local_weights(folder)
    if weights is None:
        raise ModelError(f"{quote(name, 200)}: no weight file in the folder (looked for "
                         f"{', '.join(LOCAL_WEIGHT_FILES[:3])}, … or any *.safetensors, *.bin, *.pth)")
    model_cfg = config["model_cfg"]
    return WeightSource(
        kind="local-dir", name=name, id=str(folder.resolve()), files=(WeightFile.of(weights),),
        config=WeightFile.of(config_path, what="config"), model_ref=f"{LOCAL_DIR_PREFIX}{folder}",
        model_cfg=model_cfg, preprocess=_preprocess_entries(config.get("preprocess_cfg") or {}),
        quick_gelu=bool(model_cfg.get("quick_gelu", False)))


def find_local_weights(folder: Path) -> Optional[Path]:
    """The weight file open_clip would pick in `folder`: the first of LOCAL_WEIGHT_FILES present,
    else the first *.safetensors, *.bin or *.pth by name (safetensors first), with a warning when
    there are several to choose from."""
    found = sorted((p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()),
                   key=lambda p: (p.suffix != ".safetensors", p.name))
    for preferred in LOCAL_WEIGHT_FILES:
        if (folder / preferred).is_file():
            return folder / preferred
    if len(found) > 1:
        log.warning("several weight files in %s (%s): using %s, as open_clip would", folder,
                    ", ".join(p.name for p in found[:5]), found[0].name)
    return found[0] if found else None


def read_open_clip_config(path: Path, name: str) -> dict:
    """An open_clip_config.json as a mapping with a usable "model_cfg" (and, optionally, a
    "preprocess_cfg" mapping). ModelError naming `name` for anything else."""
    label = quote(name, 200)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelError(f"{label}: {OPEN_CLIP_CONFIG} is {size} bytes; a config is at most {MAX_CONFIG_BYTES}")
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{label}: {OPEN_CLIP_CONFIG} is not valid JSON ({one_line(exc, 120)})") from None
    except OSError as exc:
        raise ModelError(f"{label}: cannot read {OPEN_CLIP_CONFIG}: {one_line(exc.strerror or exc, 120)}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelError(f"{label} is not an open_clip model: its {OPEN_CLIP_CONFIG} has no model_cfg mapping")
    model_cfg = config["model_cfg"]
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing or not all(isinstance(model_cfg.get(k), dict) for k in ("vision_cfg", "text_cfg")):
        raise ModelError(f"{label} is not an open_clip model: its model_cfg lacks "
                         f"{', '.join(missing) or 'vision_cfg/text_cfg mappings'}")
    if not isinstance(config.get("preprocess_cfg", {}), dict):
        raise ModelError(f"{label}: preprocess_cfg in {OPEN_CLIP_CONFIG} must be a mapping")
    return config


def _preprocess_entries(cfg: dict) -> dict:
    return {k: cfg[k] for k in PREPROCESS_KEYS if cfg.get(k) is not None}


def snapshot_commit(path: str | os.PathLike) -> Optional[str]:
    """The commit of a file in a Hugging Face cache (…/models--ORG--REPO/snapshots/<commit>/file):
    the revision the Hub served. None for a file elsewhere."""
    parts = Path(path).parts   # not resolved: the snapshot entry is a link into blobs/
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None


# ---------------------------------------------------------------------------- the Hub
class _Hub:
    """The parts of huggingface_hub used here (its submodules are imported lazily by the package)."""

    def __init__(self) -> None:
        self.hf_hub_download = importlib.import_module("huggingface_hub").hf_hub_download
        self.errors = importlib.import_module("huggingface_hub.errors")
        self.utils = importlib.import_module("huggingface_hub.utils")
        self.constants = importlib.import_module("huggingface_hub.constants")


def _hub(name: str) -> _Hub:
    try:
        return _Hub()
    except ImportError:
        raise ModelError(f"{quote(name, 120)} needs the huggingface_hub package: pip install huggingface_hub") from None


def _resolve_hub(name: str, repo: str, revision: Optional[str], cache_dir: Optional[str]) -> WeightSource:
    hub = _hub(name)
    try:
        hub.utils.validate_repo_id(repo)
    except hub.errors.HFValidationError as exc:
        raise ModelError(f"{quote(name, 120)} is not a Hub model name: {one_line(exc, 160)}") from None
    at = f" at revision {quote(revision, 60)}" if revision else ""
    try:
        config_path = _hub_download(hub, repo, OPEN_CLIP_CONFIG, revision, cache_dir)
    except Exception as exc:   # classified below; anything unknown keeps its type and text
        kind, why = _hub_problem(exc, hub, cache_dir)
        if kind == "entry":
            raise ModelError(f"{quote(name, 120)} is not an open_clip repo: it has no {OPEN_CLIP_CONFIG}{at}") from None
        raise ModelError(f"{quote(name, 120)}: {why}") from None
    commit = snapshot_commit(config_path)
    config = read_open_clip_config(Path(config_path), name)
    weights, problems = None, []
    for filename in HUB_WEIGHT_FILES:   # at the config's commit: both files from the same snapshot
        try:
            weights = (filename, _hub_download(hub, repo, filename, commit or revision, cache_dir))
            break
        except Exception as exc:
            kind, why = _hub_problem(exc, hub, cache_dir)
            if kind not in ("entry", "not-cached"):
                raise ModelError(f"{quote(name, 120)}: {why}") from None
            problems.append((kind, why))
    if weights is None:
        rev = f" at revision {commit or revision}" if (commit or revision) else ""
        if all(kind == "entry" for kind, _ in problems):
            raise ModelError(f"{quote(name, 120)}: no weight file in the repo{rev} (looked for "
                             f"{' and '.join(HUB_WEIGHT_FILES)})")
        why = next(w for k, w in problems if k == "not-cached")
        raise ModelError(f"{quote(name, 120)}: no weight file{rev} ({' or '.join(HUB_WEIGHT_FILES)}) — {why}")
    model_cfg = config["model_cfg"]
    return WeightSource(
        kind="hf-hub", name=name, id=repo, revision=commit or revision,
        files=(WeightFile.of(weights[1], weights[0], what="weights"),),
        config=WeightFile.of(config_path, OPEN_CLIP_CONFIG, what="config"),
        model_ref=f"{LOCAL_DIR_PREFIX}{Path(config_path).parent}", model_cfg=model_cfg,
        preprocess=_preprocess_entries(config.get("preprocess_cfg") or {}),
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        details={"requested_revision": revision} if revision else {})


def _hub_download(hub, repo: str, filename: str, revision: Optional[str], cache_dir: Optional[str]) -> str:
    from .. import __version__

    return hub.hf_hub_download(repo_id=repo, filename=filename, revision=revision, cache_dir=cache_dir,
                               library_name="robustprompt", library_version=__version__)


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 20:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _hub_problem(exc: BaseException, hub, cache_dir: Optional[str]) -> tuple[str, str]:
    """(kind, one-line reason) of a failed Hub download: "gated", "repo", "revision", "entry"
    (no such file), "not-cached" (offline or unreachable, and not in the cache), "http" or "other"."""
    errors = hub.errors
    for e in _chain(exc):
        if isinstance(e, errors.GatedRepoError):
            return "gated", "the repo is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
        if isinstance(e, errors.RepositoryNotFoundError):
            return "repo", ("repository not found on the Hugging Face Hub (check the name; a private repo "
                            "needs `hf auth login`)")
        if isinstance(e, errors.RevisionNotFoundError):
            return "revision", "revision not found in the repo"
        if isinstance(e, errors.LocalEntryNotFoundError):
            cache = cache_dir or hub.constants.HF_HUB_CACHE
            if hub.constants.is_offline_mode():
                return "not-cached", f"not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set"
            cause = next((c for c in _chain(e)[1:]), None)
            reason = f": {type(cause).__name__}: {one_line(cause, 120)}" if cause is not None else ""
            return "not-cached", (f"not in the local Hugging Face cache ({cache}) and the Hub could not be "
                                  f"reached{reason}")
        if isinstance(e, errors.EntryNotFoundError):
            return "entry", "file not found in the repo"
        if isinstance(e, errors.HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", "?")
            return "http", f"the Hub answered HTTP {status}: {one_line(str(e).split(chr(10))[0], 160)}"
    return "other", f"{type(exc).__name__}: {one_line(exc, 200)}"


def _download_problem(exc: BaseException, cache_dir: Optional[str]) -> str:
    """One line saying why open_clip's download of a tag failed (Hub errors classified)."""
    try:
        hub = _Hub()
    except ImportError:
        return f"{type(exc).__name__}: {one_line(exc, 200)}"
    return _hub_problem(exc, hub, cache_dir)[1]
