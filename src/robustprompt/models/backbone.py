"""Loading CLIP backbones through open_clip: by name, with weights from a pretrained tag,
a local checkpoint file (state dict, safetensors, or OpenAI's TorchScript archive), or none."""
from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from open_clip import factory as oc_factory
from torch import nn

from ..errors import ModelError
from .safe_archive import first_non_finite, is_torchscript_archive, one_line, read_checkpoint  # noqa: F401

log = logging.getLogger("robustprompt")


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs a root-level warning for every random-init model; we record "random" instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


logging.getLogger().addFilter(_DropRandomInitNotice())

_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)  # rp-tiny (tests) and rp-demo (the embedded default)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Backbone:
    """A frozen open_clip model plus everything needed to feed it."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str
    weights: str                      # "random", a pretrained tag, or a file path
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    quick_gelu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What a result file records about the backbone."""
        return {
            "name": self.name,
            "weights": self.weights,
            "quick_gelu": self.quick_gelu,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            **self.extra,
        }


def list_architectures() -> list[str]:
    return open_clip.list_models()


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name.replace("/", "-") not in known:
        close = difflib.get_close_matches(name.replace("/", "-"), known, n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown open_clip architecture {name!r}.{hint} "
                         f"(`python -c 'import open_clip; print(open_clip.list_models())'` lists them)")


def _image_cfg(model: nn.Module, fallback_mean=OPENAI_MEAN, fallback_std=OPENAI_STD) -> dict[str, Any]:
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ModelError(f"non-square input size {size} is not supported")
        size = size[0]
    return {
        "image_size": int(size),
        "mean": tuple(cfg.get("mean", fallback_mean)),
        "std": tuple(cfg.get("std", fallback_std)),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_backbone(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    quick_gelu: bool | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> Backbone:
    """Build an open_clip model by architecture name and load weights.

    pretrained: None / "none" / "random" → random init; a tag known to open_clip (e.g. "openai",
    "laion2b_s34b_b79k") → downloaded as open_clip does; a path → a local checkpoint: an
    open_clip/OpenAI state dict (`.pt`, `.bin`, `.pth`), a `.safetensors` file, or OpenAI's
    original TorchScript archive, always read as data only (models.safe_archive: no code in the
    file runs; non-finite weights are refused). quick_gelu: None picks QuickGELU automatically for OpenAI
    weights (tag "openai" or a TorchScript archive); pass True for other files converted from
    OpenAI weights — open_clip cannot tell from a state dict.
    """
    _check_name(name)
    arch = name.replace("/", "-")
    weights = "random" if pretrained in (None, "", "none", "random") else str(pretrained)
    extra: dict[str, Any] = {}

    if weights == "random":
        qg = bool(quick_gelu)
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=qg, device="cpu")
    elif os.path.exists(weights):
        path = Path(weights)
        if path.is_dir():
            raise ModelError(f"--pretrained {path} is a directory; give the checkpoint file inside it")
        # read as data only: never torch.jit.load, never a pickle that can name code (safe_archive)
        state, torchscript = read_checkpoint(path)
        qg = (True if quick_gelu is None else quick_gelu) if torchscript else bool(quick_gelu)
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=qg, device="cpu")
        if torchscript:
            # metadata entries of OpenAI's archives, and masks that scripting saves as state
            for key in [k for k in state if k in ("input_resolution", "context_length", "vocab_size")
                        or k.endswith("attn_mask")]:
                state.pop(key)
        else:
            try:
                state = oc_factory.convert_state_dict(model, state)
            except Exception as exc:   # a state dict of some other layout
                raise ModelError(f"checkpoint {path} does not match architecture {arch}: "
                                 f"{type(exc).__name__}: {one_line(exc)}") from exc
        _load_state(model, state, path, arch)
        if torchscript and qg:
            log.info("%s is an OpenAI TorchScript archive: using QuickGELU activations "
                     "(the weights were trained with them)", path)
        elif not qg:
            log.info("loaded %s with nn.GELU; pass quick_gelu=True (--quick-gelu) if these are "
                     "OpenAI weights", path)
    else:
        tag_cfg = open_clip.get_pretrained_cfg(arch, weights)
        if not tag_cfg:
            tags = [t for m, t in open_clip.list_pretrained() if m == arch]
            raise ModelError(f"--pretrained {weights!r} is neither a file nor a tag known for {arch}; "
                             f"known tags: {', '.join(tags) or 'none'}")
        if quick_gelu is None:
            qg = bool(tag_cfg.get("quick_gelu", False)) or weights == "openai"
        else:
            qg = quick_gelu
        if qg and quick_gelu is None:
            log.info("pretrained=%s: using the QuickGELU variant of %s, as those weights were "
                     "trained with QuickGELU", weights, arch)
        try:
            model = open_clip.create_model(arch, pretrained=weights, force_quick_gelu=qg,
                                           device="cpu", cache_dir=cache_dir)
        except Exception as exc:  # network failure, missing cache
            raise ModelError(f"could not obtain weights {arch}/{weights}: {exc}") from exc

    if weights != "random":
        check_finite(model, weights)
    model = _freeze(model).to(device)
    cfg = _image_cfg(model)
    tokenizer = open_clip.get_tokenizer(arch)
    return Backbone(model=model, tokenizer=tokenizer, name=arch, weights=weights,
                    quick_gelu=qg, extra=extra, **cfg)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Copy `state` into `model`, requiring exactly the model's keys and shapes (logit_bias optional)."""
    if ("logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim
            and state["logit_scale"].numel() == model.logit_scale.numel()):
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    own = model.state_dict()
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise ModelError(f"checkpoint {path} does not match architecture {arch}: {shape_errors[:3]}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "logit_bias"]
    if missing or result.unexpected_keys:
        unexpected = [one_line(k, 80) for k in result.unexpected_keys[:3]]   # names from the file: capped
        raise ModelError(
            f"checkpoint {path} does not match architecture {arch}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {unexpected})")


def check_finite(model: nn.Module, source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or ±inf (parameters and buffers): they would make every number
    downstream NaN, which the metrics would report as 0% accuracy rather than as an error."""
    bad = first_non_finite(model)
    if bad is not None:
        raise ModelError(f"weights {source} hold non-finite values (NaN or inf) in {bad}; refusing to use them")
