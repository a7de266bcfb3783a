"""The public entry points: build a classifier from a name, weights, class names and prompts."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import ModelSpec
from .data.base import Dataset
from .errors import ConfigError, ModelError
from .models import Backbone, PromptConfig, PromptedClassifier, load_backbone


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here")
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
        clf.load_prompt_state_dict({k: v.to(clf.mean.device) for k, v in state.items()})
    return clf


def run_backbone_spec(run: str) -> ModelSpec:
    """The backbone (name, weights, activation) a training run's prompts belong to, no prompts."""
    trained = _trained_prompts(ModelSpec(run=run))[2]
    return ModelSpec(name=trained.name, pretrained=trained.pretrained, quick_gelu=trained.quick_gelu)


def resolved_prompt(spec: ModelSpec) -> PromptConfig:
    """The prompt layout a model spec ends up with (a training run's own, if `run` is set)."""
    if spec.run:
        return _trained_prompts(spec)[0]
    return spec.prompt or PromptConfig()


def _trained_prompts(spec: ModelSpec):
    """Prompt settings and tensors of a training run directory (written by `robustprompt train`)."""
    from safetensors.torch import load_file

    from .config import from_dict, load_yaml

    run = Path(spec.run)
    ckpt = run / "prompts.safetensors"
    cfg_file = run / "config.yaml"
    if not ckpt.is_file() or not cfg_file.is_file():
        raise ConfigError(f"{run} is not a finished training run (expected prompts.safetensors and config.yaml)")
    cfg = load_yaml(cfg_file)
    model_cfg = cfg.get("model", {})
    trained = from_dict(ModelSpec, {k: v for k, v in model_cfg.items() if k in ModelSpec.__dataclass_fields__},
                        f"{cfg_file}: model")
    # the prompts belong to the backbone they were trained on: its settings win
    spec = ModelSpec(name=trained.name, pretrained=trained.pretrained, quick_gelu=trained.quick_gelu,
                     prompt=trained.prompt, templates=spec.templates, run=spec.run)
    return trained.prompt, load_file(str(ckpt)), spec
