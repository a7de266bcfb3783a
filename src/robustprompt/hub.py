"""Trained prompts on the Hugging Face Hub: `robustprompt push` / `pull`, `--run hf-hub:ORG/REPO`
and `load_classifier(prompts="hf-hub:ORG/REPO")`.

A prompt repo holds what a training run directory needs to be reopened — ``prompts.safetensors``
(self-describing: models.prompt_file), ``config.yaml``, ``metrics.json`` — plus a generated model
card, ``README.md``, and the metrics of the run's evaluations found beside it (``evals/NAME/metrics.json``).

The network calls are thin wrappers: `build_payload` (pure: a folder of files) and `model_card`
(pure: text) carry the logic and are tested offline; `push` hands the folder to
`HfApi.upload_folder`, `download` asks `snapshot_download`, which also serves repos from the local
Hugging Face cache when offline (HF_HUB_OFFLINE=1). Every Hub failure — a repo or revision not
found, no network and not cached, no token, no permission — is a one-line error naming the repo.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from .errors import ConfigError, ModelError, RobustPromptError
from .attacks.threat import cli_eps, eps_text
from .messages import one_line, quote
from .models.prompt_file import PROMPTS_FILE, PromptMeta, read_meta

HUB_PREFIX = "hf-hub:"
RUN_FILES = (PROMPTS_FILE, "config.yaml", "metrics.json")
CARD = "README.md"
EVALS = "evals"
DOWNLOAD_PATTERNS = [*RUN_FILES, CARD, f"{EVALS}/*/metrics.json"]
LIBRARY = "robustprompt"


# ---------------------------------------------------------------------- names
def is_hub_ref(value: Any) -> bool:
    """True for "hf-hub:ORG/REPO[@REVISION]"."""
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def parse_ref(ref: str, where: str = "repo") -> tuple[str, Optional[str]]:
    """"hf-hub:ORG/REPO[@REVISION]" or "ORG/REPO[@REVISION]" → (repo id, revision or None);
    ConfigError (one line, naming `where`) for anything the Hub would not accept as a repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    rest = ref[len(HUB_PREFIX):] if is_hub_ref(ref) else str(ref)
    repo, at, revision = rest.partition("@")
    if at and not revision:
        raise ConfigError(f"{where} {quote(ref, 120)}: nothing after '@' (give a branch, tag or commit, or drop the '@')")
    if "/" not in repo:
        raise ConfigError(f"{where} {quote(ref, 120)} is not a Hub repo id: expected ORG/REPO")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise ConfigError(f"{where} {quote(ref, 120)} is not a Hub repo id: {one_line(exc, 200)}") from None
    return repo, (revision or None)


# ---------------------------------------------------------------------- errors
def hub_error(exc: BaseException, what: str) -> Optional[RobustPromptError]:
    """A one-line error for a failed Hub call about `what` ("hf-hub:org/repo"), or None when
    `exc` is not a Hub, network or token problem (a bug: let it raise)."""
    import huggingface_hub.errors as E

    reason: Optional[str] = None
    if isinstance(exc, E.HFValidationError):
        return ConfigError(f"{what}: {one_line(exc, 200)}")
    if isinstance(exc, E.GatedRepoError):
        reason = "the repo is gated: accept its conditions on the Hub, then log in (`hf auth login`) or pass --token"
    elif isinstance(exc, E.RepositoryNotFoundError):
        reason = "repo not found (or private: log in with `hf auth login`, set HF_TOKEN or pass --token)"
    elif isinstance(exc, E.RevisionNotFoundError):
        reason = "revision not found in the repo"
    elif isinstance(exc, E.LocalTokenNotFoundError):
        reason = "no Hugging Face token: log in with `hf auth login`, set HF_TOKEN or pass --token"
    elif isinstance(exc, (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled)):
        reason = ("not in the local Hugging Face cache and the Hub cannot be reached (no network, or "
                  "HF_HUB_OFFLINE=1); download it once with network access")
    elif isinstance(exc, E.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            reason = (f"not allowed (HTTP {status}): the token is missing, invalid or lacks write access "
                      "to this repo (`hf auth login`, HF_TOKEN or --token)")
        else:
            reason = f"the Hub answered HTTP {status}: {one_line(str(exc).splitlines()[0] if str(exc) else '', 160)}"
    else:
        try:
            import httpx2
            network = (httpx2.TransportError, ConnectionError, TimeoutError)
        except ImportError:   # an older huggingface_hub on requests/httpx
            network = (ConnectionError, TimeoutError)
        if isinstance(exc, network):
            reason = f"cannot reach the Hub ({type(exc).__name__}: {one_line(exc, 160)})"
    return None if reason is None else ModelError(f"{what}: {reason}")


def _raise_hub(exc: Exception, what: str) -> None:
    err = hub_error(exc, what)
    if err is None:
        raise exc
    raise err from None


# ---------------------------------------------------------------------- download
def download(repo_id: str, revision: Optional[str] = None, *, token: Optional[str] = None,
             cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """The snapshot folder (in the Hugging Face cache) of prompt repo `repo_id` at `revision`
    (default: main): its prompts.safetensors, config.yaml, metrics.json, README.md and evals.
    Offline (HF_HUB_OFFLINE=1 or no network) a cached snapshot is used. One-line ModelError when
    the repo is not found, not reachable and not cached, or holds no prompts.safetensors."""
    from huggingface_hub import snapshot_download

    what = HUB_PREFIX + repo_id + (f"@{revision}" if revision else "")
    try:
        path = Path(snapshot_download(repo_id=repo_id, repo_type="model", revision=revision, token=token,
                                      cache_dir=cache_dir, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as exc:   # noqa: BLE001 — mapped to one line when it is the Hub's, else re-raised
        _raise_hub(exc, what)
    if not (path / PROMPTS_FILE).is_file():
        raise ModelError(f"{what} holds no {PROMPTS_FILE}: it is not a robustprompt prompt repo "
                         "(a backbone repo goes to --model / load_backbone instead)")
    return path


def resolve_run(run: str | os.PathLike) -> str:
    """A `--run` / `model.run` value as a local folder: "hf-hub:ORG/REPO[@REVISION]" → its
    downloaded snapshot (the path names the commit the Hub served); anything else unchanged.
    The one place where a Hub prompt repo becomes a run directory."""
    if not is_hub_ref(run):
        return str(run)
    repo, revision = parse_ref(str(run), "--run")
    return str(download(repo, revision))


def pull(ref: str, revision: Optional[str] = None, out: Optional[str | os.PathLike] = None, *,
         token: Optional[str] = None) -> Path:
    """`robustprompt pull`: download prompt repo `ref` (ORG/REPO or hf-hub:ORG/REPO[@REV]);
    with `out`, copy its files there (a folder `--run` and `load_classifier(run=...)` accept),
    else return the snapshot folder in the Hugging Face cache."""
    repo, at = parse_ref(ref, "repo")
    if revision is not None and at is not None and revision != at:
        raise ConfigError(f"repo {quote(ref, 120)} names revision {quote(at, 60)} but --revision is {quote(revision, 60)}")
    snap = download(repo, revision or at, token=token)
    if out is None:
        return snap
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    from .paths import atomic_write_bytes

    for f in sorted(p for p in snap.rglob("*") if p.is_file()):
        atomic_write_bytes(out / f.relative_to(snap), f.read_bytes())
    return out


# ---------------------------------------------------------------------- payload and card
def _read_json(path: Path) -> Optional[dict]:
    """A JSON mapping, or None if the file is absent; ConfigError if it is not JSON."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({one_line(exc, 120)})") from None
    return data if isinstance(data, dict) else None


def _same_path(a: Any, b: Path) -> bool:
    try:
        return isinstance(a, str) and Path(a).resolve() == b.resolve()
    except OSError:
        return False


def find_evaluations(run_dir: str | os.PathLike) -> dict[str, dict]:
    """Finished evaluations of training run `run_dir` beside it (an experiment's seed folder:
    train/ + eval-NAME/): {folder name: metrics.json} of every sibling whose config.yaml loads
    `run_dir`'s prompts."""
    run_dir = Path(run_dir)
    out: dict[str, dict] = {}
    parent = run_dir.resolve().parent
    for d in sorted(p for p in parent.iterdir() if p.is_dir() and p.resolve() != run_dir.resolve()):
        metrics = _read_json(d / "metrics.json") if (d / "metrics.json").is_file() else None
        if not metrics or metrics.get("kind") not in ("eval", "tta"):
            continue
        try:
            cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        run = (cfg.get("model") or {}).get("run") if isinstance(cfg, dict) else None
        if _same_path(run, run_dir):
            out[d.name] = metrics
    return out


def _cell(value: Any) -> str:
    """A value as one markdown table cell (no newline, no bare '|')."""
    return one_line(str(value), 120).replace("|", "\\|")


def _fmt_acc(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def _threat_label(threat: Optional[dict]) -> str:
    if not threat:
        return "clean (no attack)"
    if threat.get("short"):
        return str(threat["short"])
    try:
        from .attacks import ThreatModel

        keep = {k: threat[k] for k in ("eps", "alpha", "attack", "norm", "steps", "restarts", "loss")
                if k in threat}
        return ThreatModel(**keep).short()
    except Exception:   # noqa: BLE001 — a record from another version: fall back to its numbers
        return f"{threat.get('attack', '?')} {threat.get('norm', '')} ε={eps_text(threat)}"


ACCURACY_HEADER = ["evaluated on", "threat model", "clean acc. (%)", "robust acc. (%)", "images"]


def accuracy_rows(metrics: Optional[dict], evals: dict[str, dict]) -> list[list[str]]:
    """Rows of the card's accuracy table: each evaluation (its dataset, classes and split, threat
    model, clean and robust accuracy, number of images), then the training run's last epoch
    (training images, under the training attack)."""
    rows = []
    for name, m in sorted(evals.items()):
        where = f"{m.get('dataset', '?')} ({m.get('split', '?')} split, {m.get('classes', 'all')} classes)"
        threat = _threat_label(m.get("threat"))
        if m.get("kind") == "tta":
            threat = f"{threat} (test-time defence {m.get('method', '?')})"
        rows.append([where, threat, _fmt_acc(m.get("clean_acc")), _fmt_acc(m.get("robust_acc")),
                     str(m.get("n", "–"))])
    epochs = (metrics or {}).get("epochs") or []
    if epochs and isinstance(epochs[-1], dict):
        last = epochs[-1]
        rows.append([f"training images ({(metrics or {}).get('dataset', '?')}, last epoch)",
                     _threat_label((metrics or {}).get("train_threat")), _fmt_acc(last.get("train_clean_acc")),
                     _fmt_acc(last.get("train_adv_acc")), str((metrics or {}).get("n_train", "–"))])
    return rows


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_card(meta: PromptMeta, repo_id: str, *, metrics: Optional[dict] = None,
               evals: Optional[dict[str, dict]] = None, license: Optional[str] = None) -> str:
    """README.md for prompt repo `repo_id`: YAML front matter the Hub reads (library_name, tags,
    base_model for a Hub backbone, license if given) and a body with the method, backbone and its
    weights' SHA-256, dataset, training threat model, an accuracy table and how to load it."""
    bb, ds, method = meta.backbone, meta.dataset or {}, meta.method.get("name", "unknown")
    front: dict[str, Any] = {"library_name": LIBRARY,
                             "tags": [LIBRARY, "clip", "open_clip", "prompt-learning", "adversarial-robustness",
                                      method],
                             "pipeline_tag": "zero-shot-image-classification"}
    if license:
        front["license"] = license
    if meta.hub and meta.hub.get("repo_id"):
        front["base_model"] = meta.hub["repo_id"]
    backbone = bb["name"] + (f" ({bb['pretrained']})" if bb.get("pretrained") else "")
    hub = meta.hub or {}
    facts = [
        ["method", method],
        ["backbone", backbone + (f", Hub revision {hub['revision']}" if hub.get("revision") else "")],
        ["backbone weights SHA-256", bb.get("weights_sha256") or "none recorded (random initialisation?)"],
        ["QuickGELU", "yes" if bb.get("quick_gelu") else "no"],
        ["dataset", ", ".join(f"{k} {v}" for k, v in (("", ds.get("name")), ("classes", ds.get("classes")),
                                                        ("shots", ds.get("shots")), ("seed", ds.get("seed")))
                              if v is not None).strip() or "not recorded"],
        ["training threat model", _threat_label(meta.train_threat)],
        ["prompts", f"coupling {meta.prompt.coupling}, n_ctx {meta.prompt.n_ctx}, depth {meta.prompt.depth}"],
        ["classes", f"{len(meta.classnames)} ({', '.join(meta.classnames[:8])}{', …' if len(meta.classnames) > 8 else ''})"],
        ["written by", f"robustprompt {meta.toolkit.get('version', '?')}"],
    ]
    rows = accuracy_rows(metrics, evals or {})
    accuracy = (_table(ACCURACY_HEADER, rows) if rows else "No evaluation was recorded with this run.")
    ref = HUB_PREFIX + repo_id
    # evaluate at the budget it was trained for (ℓ∞ ε=1/255 for prompts trained clean)
    budget = cli_eps(meta.train_threat) if meta.train_threat else "--eps 1"
    body = f"""# {method} prompts for {bb['name']}{f" on {ds['name']}" if ds.get('name') else ''}

Adversarially robust prompts learned with robustprompt.
The file `{PROMPTS_FILE}` describes itself (its safetensors metadata): prompt layout, class names,
templates, backbone and the SHA-256 of its weights — loading it onto other weights is refused.

{_table(["", ""], facts)}

## Accuracy

{accuracy}

Clean and robust accuracy in percent; robust accuracy is under the threat model of its row.

## How to load

```python
import robustprompt as rp

clf = rp.load_classifier(prompts="{ref}")   # images B×3×S×S in [0, 1] → logits B×K
```

```bash
robustprompt pull {repo_id} --out prompts/{repo_id.split('/')[-1]}
robustprompt eval --run {ref} --dataset {ds.get('spec') or ds.get('name') or 'DATASET'} --attack pgd {budget}
```
"""
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def build_payload(run_dir: str | os.PathLike, dest: str | os.PathLike, repo_id: str, *,
                  license: Optional[str] = None) -> list[Path]:
    """Fill folder `dest` with what `push` uploads for training run `run_dir`: prompts.safetensors,
    config.yaml, metrics.json (if present), the evaluations found beside the run
    (evals/NAME/metrics.json) and the generated README.md. Returns the files, relative to `dest`.
    One-line ConfigError/ModelError for a folder that is not a finished run or whose prompt file
    does not describe itself (a pushed file must rebuild its classifier alone)."""
    run_dir, dest = Path(run_dir), Path(dest)
    prompts = run_dir / PROMPTS_FILE
    if not run_dir.is_dir() or not prompts.is_file():
        raise ConfigError(f"{run_dir} is not a finished training run (expected {PROMPTS_FILE})")
    meta = read_meta(prompts)
    if meta is None:
        raise ModelError(f"{prompts} does not describe itself (written before prompt files carried metadata, "
                         "or by another tool): retrain it with this version to share it")
    metrics = _read_json(run_dir / "metrics.json")
    evals = find_evaluations(run_dir)
    files = [Path(PROMPTS_FILE)]
    shutil.copyfile(prompts, dest / PROMPTS_FILE)
    for name in ("config.yaml", "metrics.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, dest / name)
            files.append(Path(name))
    for name, m in evals.items():
        (dest / EVALS / name).mkdir(parents=True, exist_ok=True)
        (dest / EVALS / name / "metrics.json").write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
        files.append(Path(EVALS) / name / "metrics.json")
    card = model_card(meta, repo_id, metrics=metrics, evals=evals, license=license)
    (dest / CARD).write_text(card, encoding="utf-8")
    files.append(Path(CARD))
    return files


# ---------------------------------------------------------------------- upload
def push(run_dir: str | os.PathLike, repo: str, *, private: bool = False, revision: Optional[str] = None,
         token: Optional[str] = None, license: Optional[str] = None, commit_message: Optional[str] = None,
         api: Any = None) -> str:
    """`robustprompt push`: upload training run `run_dir` (see build_payload) to model repo `repo`
    (ORG/REPO), creating it if needed (`private` applies then) and the branch `revision` if
    given; one commit. Returns the commit URL. The payload is built and checked before any
    network call; no token → a one-line ConfigError before any network call as well."""
    repo_id, at = parse_ref(repo, "repo")
    if at is not None and revision is not None and at != revision:
        raise ConfigError(f"repo {quote(repo, 120)} names revision {quote(at, 60)} but --revision is {quote(revision, 60)}")
    revision = revision or at
    what = HUB_PREFIX + repo_id
    if api is None:
        from huggingface_hub import HfApi, get_token

        if token is None and get_token() is None:
            raise ConfigError(f"{what}: no Hugging Face token: log in with `hf auth login`, set HF_TOKEN or pass --token")
        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="robustprompt-push-") as tmp:
        build_payload(run_dir, tmp, repo_id, license=license)
        message = commit_message or f"robustprompt push {Path(run_dir).name}"
        try:
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True, token=token)
            if revision is not None:
                api.create_branch(repo_id=repo_id, repo_type="model", branch=revision, exist_ok=True, token=token)
            info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=tmp, revision=revision,
                                     commit_message=message, token=token)
        except Exception as exc:   # noqa: BLE001 — mapped to one line when it is the Hub's, else re-raised
            _raise_hub(exc, what)
    return str(getattr(info, "commit_url", None) or getattr(info, "oid", None) or info)
