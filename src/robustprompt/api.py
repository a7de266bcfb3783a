"""The public entry points: a classifier from a backbone and class names, or from trained prompts (a
run directory, a self-describing prompt file, or a Hub repo)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ModelSpec
from .data.base import Dataset
from .errors import ConfigError, ModelError, RobustPromptError
from .messages import quote
from .models import Backbone, PromptConfig, PromptedClassifier, load_backbone
from .models.prompt_file import PROMPTS_FILE, PromptMeta, read_meta
from .models.safe_archive import first_non_finite, one_line, read_safetensors

log = logging.getLogger("robustprompt")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (CUDA if available, else Apple's MPS if available, else CPU) or a torch device
    string ("cuda:1" keeps its index); ConfigError for anything torch cannot parse or this
    machine does not have."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {one_line(repr(device), 60)} is not a device: "
                          "use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} was asked for but only {torch.cuda.device_count()} CUDA "
                          "device(s) are visible here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} was asked for but MPS is not available here")
    return dev


def get_backbone(name: str, pretrained: Optional[str] = None, quick_gelu: Optional[bool] = None,
                 device: str | torch.device = "cpu") -> Backbone:
    """`name` "demo" is the embedded Fashion-MNIST backbone (built and cached on first use);
    anything else is an open_clip architecture name."""
    if name == "demo":
        if pretrained not in (None, "", "demo"):
            raise ModelError("the demo backbone has its own weights; drop --pretrained")
        from .demo.backbone import load_demo_backbone

        return load_demo_backbone(device=device)
    return load_backbone(name, pretrained, quick_gelu=quick_gelu, device=device)


def load_classifier(
    name: Optional[str] = None,
    pretrained: Optional[str] = None,
    *,
    classnames: Optional[Sequence[str]] = None,
    prompt: Optional[PromptConfig] = None,
    templates: Optional[Sequence[str]] = None,
    quick_gelu: Optional[bool] = None,
    device: str | torch.device = "cpu",
    run: Optional[str | os.PathLike] = None,
    prompts: Optional[str | os.PathLike] = None,
    allow_backbone_mismatch: bool = False,
) -> PromptedClassifier:
    """A classifier: images B×3×S×S in [0,1] → logits B×K (K = number of class names).

    Three ways, one call:

    - a backbone and fresh (untrained) prompts: `name` ("demo", an open_clip architecture,
      `hf-hub:ORG/REPO`, `local-dir:PATH`), `pretrained`, `classnames` (required), `prompt`;
    - trained prompts from a run: `run` = a training run directory (`robustprompt train`,
      `robustprompt pull --out`) or "hf-hub:ORG/REPO[@REVISION]" (a repo `robustprompt push` wrote);
    - trained prompts from a file: `prompts` = a prompts.safetensors that describes itself, or
      "hf-hub:ORG/REPO[@REVISION]".

    With `run` / `prompts`, everything else is recorded with the prompts and optional: the backbone
    (`name`, `pretrained`, `quick_gelu` override where it is loaded from, e.g. a weight file that
    moved — its SHA-256 must still be the recorded one), the class names (pass others for
    base→new transfer), the templates. Prompts are refused (ModelError, one line naming both
    hashes) on a backbone whose weights' SHA-256 differs from the recorded one, unless
    `allow_backbone_mismatch`. `prompt` cannot be given with them (the layout is recorded).
    A prompt file written before files described themselves loads through its run directory's
    config.yaml (`run=`), with `classnames` from the caller or the run's dataset.

    >>> clf = load_classifier("ViT-B-32", pretrained="openai", classnames=["cat", "dog"],
    ...                       prompt=PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=9))
    >>> clf = load_classifier(run="runs/train/cba_fapt-fashion_mnist-16shot-seed0-1a2b3c4d5e")
    >>> clf = load_classifier(prompts="hf-hub:my-org/fap-imagenet-vitb32")
    """
    if run is not None or prompts is not None:
        if prompt is not None:
            raise ConfigError("prompt= cannot be given with run= or prompts=: the prompt layout is recorded with "
                              "the prompts")
        return _load_trained(run=run, prompts=prompts, name=name, pretrained=pretrained, quick_gelu=quick_gelu,
                             classnames=classnames, templates=templates, device=device,
                             allow_backbone_mismatch=allow_backbone_mismatch)
    if name is None:
        raise ConfigError("load_classifier needs a backbone name, run= (a training run) or prompts= (a prompt file)")
    if classnames is None:
        raise ConfigError(f"load_classifier({quote(name, 80)}, ...) needs classnames= (the labels, in order)")
    device = resolve_device(device)
    backbone = get_backbone(name, pretrained, quick_gelu, device)
    return PromptedClassifier(backbone, classnames, prompt or PromptConfig(), templates).to(device)


# ------------------------------------------------------------------------------ trained prompts
@dataclass
class TrainedPrompts:
    """Learned prompts and what they belong to.

    file: the prompt file; state: its tensors (CPU); prompt: their layout; backbone: the spec
    (name, pretrained, quick_gelu) of the backbone they were trained on; weights_sha256: the
    recorded SHA-256 of its weights (None: not recorded — nothing to check); meta: the file's
    own description (None for a file written before files described themselves, read through
    `config` = its run's config.yaml)."""

    file: Path
    state: dict[str, torch.Tensor]
    prompt: PromptConfig
    backbone: ModelSpec
    weights_sha256: Optional[str]
    meta: Optional[PromptMeta] = None
    config: Optional[Path] = None


def open_prompts(*, run: Optional[str | os.PathLike] = None,
                 prompts: Optional[str | os.PathLike] = None) -> TrainedPrompts:
    """Read trained prompts from a run directory or a prompt file (either may be
    "hf-hub:ORG/REPO[@REVISION]", downloaded once); every defect is a one-line ConfigError or
    ModelError naming the file."""
    from .hub import is_hub_ref, resolve_run

    if (run is None) == (prompts is None):
        raise ConfigError("give one of run= (a training run directory) or prompts= (a prompt file)")
    if run is not None:
        return _open_run(Path(resolve_run(run)))
    if is_hub_ref(prompts):
        return _open_run(Path(resolve_run(prompts)))
    path = Path(prompts)
    if path.is_dir():
        return _open_run(path)
    if not path.is_file():
        raise ConfigError(f"prompts {quote(str(prompts), 200)} is not a file")
    meta = read_meta(path, damaged_header_ok=True)
    if meta is not None:
        return _from_meta(path, meta)
    if path.name == PROMPTS_FILE and (path.parent / "config.yaml").is_file():   # an older run's file
        return _from_run_config(path.parent)
    _read_state(path)   # a damaged file: the reader's one-line error
    raise ModelError(f"{path} does not describe itself (no robustprompt metadata: written before prompt files "
                     "carried it, or by another tool); load its run directory with run= instead")


def _open_run(run: Path) -> TrainedPrompts:
    ckpt = run / PROMPTS_FILE
    if not ckpt.is_file():
        raise ConfigError(f"{run} is not a finished training run (expected {PROMPTS_FILE} and config.yaml)")
    meta = read_meta(ckpt, damaged_header_ok=True)   # damaged: reported after config.yaml's defects, as before
    if meta is not None:
        return _from_meta(ckpt, meta)
    return _from_run_config(run)


def _read_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = read_safetensors(ckpt, "prompts")
    bad = first_non_finite(state)
    if bad is not None:
        raise ModelError(f"{ckpt}: prompt tensor {one_line(bad, 80)} holds non-finite values (NaN or inf); "
                         "refusing to use it (did that training diverge?)")
    return state


def _from_meta(ckpt: Path, meta: PromptMeta) -> TrainedPrompts:
    bb = meta.backbone
    name = bb["name"]
    revision = (meta.hub or {}).get("revision")
    if name.startswith("hf-hub:") and revision:
        # the commit the Hub served when the prompts were trained, not whatever the branch holds now
        name = f"{name.partition('@')[0]}@{revision}"
    spec = ModelSpec(name=name, pretrained=bb.get("pretrained"), quick_gelu=bool(bb.get("quick_gelu", False)),
                     prompt=meta.prompt)
    return TrainedPrompts(ckpt, _read_state(ckpt), meta.prompt, spec, meta.weights_sha256, meta)


def _from_run_config(run: Path) -> TrainedPrompts:
    """A run whose prompt file does not describe itself: its config.yaml says what it is."""
    from .config import from_dict, load_yaml

    ckpt, cfg_file = run / PROMPTS_FILE, run / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"{run} is not a finished training run (expected {PROMPTS_FILE} and config.yaml)")
    model_cfg = load_yaml(cfg_file).get("model")
    if model_cfg is None:
        raise ConfigError(f"{cfg_file} has no model section: it is not the config of a `robustprompt train` run")
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{cfg_file}: model must be a mapping, got a {type(model_cfg).__name__}")
    trained = from_dict(ModelSpec, {k: v for k, v in model_cfg.items()
                                    if k in ModelSpec.__dataclass_fields__ and k != "run"}, f"{cfg_file}: model")
    if trained.prompt is None:
        raise ConfigError(f"{cfg_file} has no model.prompt section, so the layout of {ckpt.name} is unknown")
    fingerprint = model_cfg.get("fingerprint")
    sha = fingerprint.get("weights") if isinstance(fingerprint, dict) else None
    spec = ModelSpec(name=trained.name, pretrained=trained.pretrained, quick_gelu=trained.quick_gelu,
                     prompt=trained.prompt)
    return TrainedPrompts(ckpt, _read_state(ckpt), trained.prompt, spec, sha if isinstance(sha, str) else None,
                          None, cfg_file)


def _backbone_spec(trained: TrainedPrompts, name: Optional[str] = None, pretrained: Optional[str] = None,
                   quick_gelu: Optional[bool] = None) -> ModelSpec:
    """The recorded backbone, with the caller's overrides of where it is loaded from."""
    rec = trained.backbone
    return ModelSpec(name=name if name is not None else rec.name,
                     pretrained=str(pretrained) if pretrained is not None else rec.pretrained,
                     quick_gelu=quick_gelu if quick_gelu is not None else rec.quick_gelu)


def check_backbone(trained: TrainedPrompts, spec: ModelSpec, *, allow_mismatch: bool = False) -> None:
    """Refuse (ModelError, one line naming both SHA-256s) prompts trained on other backbone weights
    than those `spec` loads; with `allow_mismatch`, log a warning instead. Nothing to check when
    no hash was recorded (a run written before hashes were, or random initialisation)."""
    recorded = trained.weights_sha256
    if recorded is None:
        return
    weights = spec.pretrained
    if (weights not in (None, "", "none", "random") and not Path(weights).exists()
            and (os.sep in weights or Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors"))):
        raise ModelError(f"the backbone weights {quote(weights, 200)} that {trained.file} was trained on are not "
                         f"there (moved?): pass their new location (pretrained= / --pretrained), a file with "
                         f"SHA-256 {recorded}")
    from .engine.identity import weights_fingerprint

    actual = weights_fingerprint(spec)
    if actual == recorded:
        return
    where = spec.name + (f" {spec.pretrained}" if spec.pretrained else "")
    msg = (f"{trained.file} was trained on backbone weights with SHA-256 {recorded}, but {quote(where, 200)} has "
           f"{actual or 'no weight file (random initialisation)'}")
    if allow_mismatch:
        log.warning("%s; loading anyway (allow_backbone_mismatch)", msg)
        return
    raise ModelError(f"{msg}; refusing to load the prompts onto other weights (allow_backbone_mismatch=True or "
                     "--allow-backbone-mismatch loads them anyway)")


def _load_trained(*, run, prompts, name, pretrained, quick_gelu, classnames, templates, device,
                  allow_backbone_mismatch: bool) -> PromptedClassifier:
    trained = open_prompts(run=run, prompts=prompts)
    spec = _backbone_spec(trained, name, pretrained, quick_gelu)
    check_backbone(trained, spec, allow_mismatch=allow_backbone_mismatch)
    if classnames is None or templates is None:
        names, temps = _recorded_labels(trained)
        classnames = names if classnames is None else classnames
        templates = temps if templates is None else templates
    device = resolve_device(device)
    backbone = get_backbone(spec.name, spec.pretrained, spec.quick_gelu, device)
    clf = PromptedClassifier(backbone, classnames, trained.prompt, templates).to(device)
    _load_state(clf, trained)
    return clf


def _recorded_labels(trained: TrainedPrompts) -> tuple[list[str], Optional[list[str]]]:
    """Class names and templates the prompts were trained with: from the file, or, for an older
    run, from its dataset (config.yaml's data section, built as training built it)."""
    if trained.meta is not None:
        return trained.meta.classnames, trained.meta.templates or None
    from .config import load_yaml
    from .data import base_new_split, build_dataset

    cfg = load_yaml(trained.config)
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    try:
        dataset = build_dataset(data.get("dataset", "fashion_mnist"), data.get("root"))
        if data.get("classes", "all") != "all":
            dataset = base_new_split(dataset, data["classes"])
        templates = resolve_templates(model.get("templates", "dataset"), dataset)
    except (RobustPromptError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{trained.file} does not record its class names (written before prompt files described "
                          f"themselves) and its dataset cannot be opened ({one_line(exc, 200)}): pass classnames= "
                          "(and templates=)") from None
    return list(dataset.classnames), templates


def _load_state(clf: PromptedClassifier, trained: TrainedPrompts) -> None:
    _check_prompt_layout(trained.state, clf.prompt_state_dict(), trained)
    clf.load_prompt_state_dict({k: v.to(clf.mean.device) for k, v in trained.state.items()})
    clf.prompt_origin = str(trained.file)


def resolve_templates(spec: str, dataset: Dataset) -> list[str]:
    if spec == "dataset":
        return [dataset.templates[0]]
    if spec == "ensemble":
        return list(dataset.templates)
    if spec.count("{}") == 1:
        return [spec]
    raise ConfigError(f"model.templates must be 'dataset', 'ensemble' or a template with one {{}}, got {spec!r}")


def classifier_from_spec(spec: ModelSpec, dataset: Dataset, device: str | torch.device = "cpu"
                         ) -> PromptedClassifier:
    """Build the classifier a config describes, loading learned prompts from `spec.run` if set
    (the run's backbone, unless `spec.pretrained` points at its weights elsewhere; refused on
    other weights unless `spec.allow_backbone_mismatch`). Class names and templates are the
    dataset's (`spec.templates`)."""
    templates = resolve_templates(spec.templates, dataset)
    if not spec.run:
        return load_classifier(spec.name, spec.pretrained, classnames=dataset.classnames,
                               prompt=spec.prompt or PromptConfig(), templates=templates,
                               quick_gelu=spec.quick_gelu, device=device)
    return load_classifier(run=spec.run, pretrained=spec.pretrained, classnames=dataset.classnames,
                           templates=templates, device=device,
                           allow_backbone_mismatch=bool(getattr(spec, "allow_backbone_mismatch", False)))


def _check_prompt_layout(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                         trained: TrainedPrompts) -> None:
    """The prompt tensors must be exactly those the recorded prompt layout makes."""
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or extra or shapes:
        names = lambda ks: [one_line(k, 60) for k in ks[:3]]   # noqa: E731 (names come from the file)
        layout = trained.config or "its own metadata"
        raise ModelError(f"{trained.file} does not hold the prompts {layout} describes: {len(missing)} missing "
                         f"(e.g. {names(missing)}), {len(extra)} unexpected (e.g. {names(extra)}), {len(shapes)} "
                         f"of another shape (e.g. {shapes[:3]})")


def run_backbone_spec(run: str) -> ModelSpec:
    """The backbone (name, weights, activation) a training run's prompts belong to, no prompts."""
    rec = open_prompts(run=run).backbone
    return ModelSpec(name=rec.name, pretrained=rec.pretrained, quick_gelu=rec.quick_gelu)


def resolved_prompt(spec: ModelSpec) -> PromptConfig:
    """The prompt layout a model spec ends up with (a training run's own, if `run` is set)."""
    if spec.run:
        return open_prompts(run=spec.run).prompt
    return spec.prompt or PromptConfig()
