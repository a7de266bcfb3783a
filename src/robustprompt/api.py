"""The public entry points: build a classifier from a name, weights, class names and prompts."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ModelSpec
from .data.base import Dataset
from .errors import ConfigError, ModelError
from .models import Backbone, PromptConfig, PromptedClassifier, load_backbone
from .models.safe_archive import first_non_finite, one_line, read_safetensors


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (CUDA if available, else CPU) or a torch device string; ConfigError for anything torch
    cannot parse or this machine does not have."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    name: str,
    pretrained: Optional[str] = None,
    *,
    classnames: Sequence[str],
    prompt: PromptConfig = PromptConfig(),
    templates: Optional[Sequence[str]] = None,
    quick_gelu: Optional[bool] = None,
    device: str | torch.device = "cpu",
) -> PromptedClassifier:
    """A classifier over `classnames`: images B×3×S×S in [0,1] → logits B×K.

    >>> clf = load_classifier("ViT-B-32", pretrained="openai", classnames=["cat", "dog"],
    ...                       prompt=PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=9))
    """
    device = resolve_device(device)
    backbone = get_backbone(name, pretrained, quick_gelu, device)
    return PromptedClassifier(backbone, classnames, prompt, templates).to(device)


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
    """Build the classifier a config describes, loading learned prompts from `spec.run` if set."""
    prompt = spec.prompt or PromptConfig()
    state = None
    if spec.run:
        prompt, state, spec = _trained_prompts(spec)
    clf = load_classifier(spec.name, spec.pretrained, classnames=dataset.classnames, prompt=prompt,
                          templates=resolve_templates(spec.templates, dataset), quick_gelu=spec.quick_gelu,
                          device=device)
    if state is not None:
        _check_prompt_layout(state, clf.prompt_state_dict(), Path(spec.run))
        clf.load_prompt_state_dict({k: v.to(clf.mean.device) for k, v in state.items()})
    return clf


def _check_prompt_layout(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], run: Path) -> None:
    """The run's prompt tensors must be exactly those its config.yaml's prompt layout makes."""
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or extra or shapes:
        names = lambda ks: [one_line(k, 60) for k in ks[:3]]   # noqa: E731 (names come from the file)
        raise ModelError(f"{run / 'prompts.safetensors'} does not hold the prompts {run / 'config.yaml'} "
                         f"describes: {len(missing)} missing (e.g. {names(missing)}), {len(extra)} unexpected "
                         f"(e.g. {names(extra)}), {len(shapes)} of another shape (e.g. {shapes[:3]})")


def run_backbone_spec(run: str) -> ModelSpec:
    """The backbone (name, weights, activation) a training run's prompts belong to, no prompts."""
    trained = _trained_prompts(ModelSpec(run=run))[2]
    return ModelSpec(name=trained.name, pretrained=trained.pretrained, quick_gelu=trained.quick_gelu)


def resolved_prompt(spec: ModelSpec) -> PromptConfig:
    """The prompt layout a model spec ends up with (a training run's own, if `run` is set)."""
    if spec.run:
        return _trained_prompts(spec)[0]
    return spec.prompt or PromptConfig()


def _trained_prompts(spec: ModelSpec) -> tuple[PromptConfig, dict[str, torch.Tensor], ModelSpec]:
    """Prompt settings, prompt tensors and backbone spec of a training run directory (written by
    `robustprompt train`). Every defect of the directory is a one-line ConfigError/ModelError
    naming the file: an empty or foreign config.yaml, a damaged prompts.safetensors, NaN/inf prompts."""
    from .config import from_dict, load_yaml

    run = Path(spec.run)
    ckpt = run / "prompts.safetensors"
    cfg_file = run / "config.yaml"
    if not ckpt.is_file() or not cfg_file.is_file():
        raise ConfigError(f"{run} is not a finished training run (expected prompts.safetensors and config.yaml)")
    model_cfg = load_yaml(cfg_file).get("model")
    if model_cfg is None:
        raise ConfigError(f"{cfg_file} has no model section: it is not the config of a `robustprompt train` run")
    if not isinstance(model_cfg, dict):
        raise ConfigError(f"{cfg_file}: model must be a mapping, got a {type(model_cfg).__name__}")
    trained = from_dict(ModelSpec, {k: v for k, v in model_cfg.items() if k in ModelSpec.__dataclass_fields__},
                        f"{cfg_file}: model")
    if trained.prompt is None:
        raise ConfigError(f"{cfg_file} has no model.prompt section, so the layout of {ckpt.name} is unknown")
    state = read_safetensors(ckpt, "prompts")
    bad = first_non_finite(state)
    if bad is not None:
        raise ModelError(f"{ckpt}: prompt tensor {one_line(bad, 80)} holds non-finite values (NaN or inf); "
                         "refusing to use it (did that training diverge?)")
    # the prompts belong to the backbone they were trained on: its settings win
    spec = ModelSpec(name=trained.name, pretrained=trained.pretrained, quick_gelu=trained.quick_gelu,
                     prompt=trained.prompt, templates=spec.templates, run=spec.run)
    return trained.prompt, state, spec
