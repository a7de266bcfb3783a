"""Loading CLIP backbones through open_clip: a built-in architecture with weights from a
pretrained tag, a local checkpoint file (state dict, safetensors, or OpenAI's TorchScript archive)
or none; or a model that brings its own config and weights, `hf-hub:ORG/REPO[@REVISION]` or
`local-dir:PATH`. Where the weights come from is resolved by models.sources; they are always read
here, as data only."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import open_clip
import torch
from open_clip import factory as oc_factory
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CustomTextCLIP, convert_to_custom_text_state_dict
from torch import nn

from ..data.transforms import Preprocess, clip_transform
from ..errors import ConfigError, ModelError
from ..messages import quote
from .safe_archive import first_non_finite, is_torchscript_archive, one_line, read_checkpoint  # noqa: F401
from .sources import HF_HUB_PREFIX, WeightSource, resolve_source

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
    """A frozen open_clip model plus everything needed to feed it.

    `source` says where the weights came from (models.sources.WeightSource); `weights_sha256`
    is their hash (None for random init), the value `engine.identity.weights_fingerprint`
    gives for the same model spec. The preprocessing fields follow the model's open_clip
    preprocess config (its tag's, or its repo's open_clip_config.json)."""

    model: nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str
    weights: str                      # "random", a pretrained tag, a file path, or hf-hub:REPO@COMMIT
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    quick_gelu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    resize_mode: str = "shortest"
    fill_color: int | tuple[int, ...] = 0
    source: Optional[WeightSource] = None

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the weights came from: {"kind", "id", "revision", "files": [{"name", "sha256"}],
        "sha256", …} (WeightSource.describe). The demo backbone (demo/backbone.py relabels a
        random rp-demo after copying its cached file in) is recognised by its name and hash."""
        if self.name == "demo" and self.extra.get("sha256"):
            return {"kind": "demo", "id": self.weights, "revision": self.extra.get("recipe_hash"),
                    "files": [{"name": "model.safetensors", "sha256": self.extra["sha256"]}],
                    "sha256": self.extra["sha256"]}
        if self.source is None:
            return {"kind": "random" if self.weights == "random" else "unknown", "id": None,
                    "revision": None, "files": [], "sha256": None}
        return self.source.describe()

    @property
    def weights_sha256(self) -> Optional[str]:
        """SHA-256 of the weight file (for several files: of their sha256sum listing); None for
        random init."""
        return self.provenance["sha256"]

    @property
    def preprocess(self) -> Preprocess:
        """How images are resized for this backbone (data.resize_mode "auto")."""
        return Preprocess(self.image_size, self.interpolation, self.resize_mode, self.fill_color)

    def describe(self) -> dict[str, Any]:
        """What a result file records about the backbone."""
        source = self.provenance
        out = {
            "name": self.name,
            "weights": self.weights,
            "quick_gelu": self.quick_gelu,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "preprocess": self.preprocess.to_dict(),
            "source": source,
            "weights_sha256": source["sha256"],
            **self.extra,
        }
        if source["kind"] == "hf-hub":   # the keys prompt files look for (models.prompt_file.hub_origin)
            out["hub_repo"], out["hub_revision"] = source["id"], source["revision"]
        return out


def list_architectures() -> list[str]:
    return open_clip.list_models()


def _image_cfg(model: nn.Module, label: str, fallback_mean=OPENAI_MEAN, fallback_std=OPENAI_STD) -> dict[str, Any]:
    """The model's open_clip preprocess config as Backbone fields; ModelError (naming `label`) for
    values this toolkit cannot apply."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ModelError(f"{label}: non-square input size {tuple(size)} is not supported")
        size = size[0]
    # open_clip evaluates "random" interpolation as bicubic (transform.image_transform)
    interpolation = str(cfg.get("interpolation") or "bicubic").lower()
    interpolation = "bicubic" if interpolation == "random" else interpolation
    resize_mode = str(cfg.get("resize_mode") or "shortest")
    try:
        # validates size, interpolation, resize mode and fill colour with the transform's own checks
        clip_transform(int(size), interpolation, resize_mode=resize_mode, fill_color=cfg.get("fill_color", 0))
    except (ConfigError, TypeError, ValueError) as exc:
        raise ModelError(f"{label}: its preprocess config cannot be applied: {one_line(exc, 200)}") from None
    fill = cfg.get("fill_color", 0)
    return {
        "image_size": int(size),
        "mean": tuple(cfg.get("mean", fallback_mean)),
        "std": tuple(cfg.get("std", fallback_std)),
        "interpolation": interpolation,
        "resize_mode": resize_mode,
        "fill_color": tuple(fill) if isinstance(fill, list) else fill,
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
    """Build an open_clip model and load its weights.

    name: a built-in open_clip architecture (e.g. "ViT-B-32"); `hf-hub:ORG/REPO` or
    `hf-hub:ORG/REPO@REVISION` (a branch, tag or commit) — a Hugging Face Hub repo holding an
    open_clip_config.json and open_clip_model.safetensors / open_clip_pytorch_model.bin, as
    open_clip publishes them (downloaded to, or found offline in, the Hugging Face cache); or
    `local-dir:PATH` — a folder laid out the same way. Those two bring their own weights and
    preprocessing: `pretrained` must be None.
    pretrained (built-in architectures): None / "none" / "random" → random init; a tag known to
    open_clip (e.g. "openai", "laion2b_s34b_b79k") → its file, found or downloaded by open_clip's
    download function; a path → a local checkpoint: an open_clip/OpenAI state dict (`.pt`, `.bin`,
    `.pth`), a `.safetensors` file, or OpenAI's original TorchScript archive.
    Every weight file — tag, Hub, folder or path — is read as data only (models.safe_archive: no
    code in the file runs), must match the architecture key for key and shape for shape, and
    must hold only finite values; open_clip only builds the architecture. Where the weights came
    from (kind, repo id, revision, files and SHA-256) is `Backbone.source` / `describe()["source"]`.
    quick_gelu: None picks QuickGELU automatically for OpenAI weights (tag "openai", a tag or
    config that says so, or a TorchScript archive); pass True for other files converted from
    OpenAI weights — open_clip cannot tell from a state dict.
    cache_dir: download cache instead of the default (huggingface_hub's, or ~/.cache/clip).
    """
    source = resolve_source(name, pretrained, cache_dir=cache_dir)
    state, torchscript = read_checkpoint(source.files[0].path) if source.files else (None, False)
    if quick_gelu is not None:
        qg = bool(quick_gelu)
    else:
        qg = source.quick_gelu or torchscript
    model = _build_model(source, qg)
    if state is not None:
        _load_weights(model, state, torchscript, source)
        _log_activation(source, qg, quick_gelu, torchscript)
        check_finite(model, source.files[0].path if source.kind == "file" else source.label)
    model = _freeze(model).to(device)
    cfg = _image_cfg(model, source.label)
    tokenizer = _tokenizer(source, cache_dir)
    # forcing can only switch QuickGELU on: a config that asks for it keeps it
    uses_quick_gelu = qg or bool(source.model_cfg.get("quick_gelu", False))
    return Backbone(model=model, tokenizer=tokenizer, name=source.name, weights=_weights_label(source),
                    quick_gelu=uses_quick_gelu, source=source, **cfg)


def _weights_label(source: WeightSource) -> str:
    if source.kind == "random":
        return "random"
    if source.kind == "hf-hub":
        return f"{HF_HUB_PREFIX}{source.id}@{source.revision}" if source.revision else source.name
    if source.kind == "local-dir":
        return str(source.files[0].path)
    return str(source.id)


def _build_model(source: WeightSource, quick_gelu: bool) -> nn.Module:
    """The architecture open_clip builds from the source's config, random init: weights are
    loaded by us (no tower downloads its own pretrained weights either)."""
    try:
        model = open_clip.create_model(
            source.model_ref, pretrained=None, load_weights=False, pretrained_image=False,
            pretrained_text=False, force_quick_gelu=quick_gelu, force_preprocess_cfg=source.preprocess or None,
            device="cpu")
    except Exception as exc:   # a config open_clip (or a library it needs) cannot build
        raise ModelError(_build_problem(source, exc)) from None
    if not isinstance(model, (CLIP, CustomTextCLIP)) or isinstance(model, CoCa):
        raise ModelError(f"{source.label} is an open_clip {type(model).__name__} model; this toolkit classifies "
                         "with contrastive CLIP models (open_clip's CLIP and CustomTextCLIP) only")
    return model


def _build_problem(source: WeightSource, exc: Exception) -> str:
    vision = source.model_cfg.get("vision_cfg") or {}
    text = source.model_cfg.get("text_cfg") or {}
    if text.get("hf_model_name") and importlib.util.find_spec("transformers") is None:
        return (f"{source.label}: its text tower is the Hugging Face transformers model "
                f"{quote(text['hf_model_name'], 80)}, which needs the transformers package (pip install "
                "transformers); such a tower takes no text prompts (coupling none or vision only)")
    if vision.get("timm_model_name") and importlib.util.find_spec("timm") is None:
        return (f"{source.label}: its image tower is the timm model {quote(vision['timm_model_name'], 80)}, "
                "which needs the timm package (pip install timm)")
    return (f"{source.label}: open_clip cannot build the model its config describes: "
            f"{type(exc).__name__}: {one_line(exc, 200)}")


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], torchscript: bool,
                  source: WeightSource) -> None:
    """Fit a checkpoint's state dict to open_clip's layout (as open_clip's load_checkpoint does),
    then copy it in strictly."""
    path = source.files[0].path
    arch = source.details.get("arch", source.name)
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
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)   # an older layout of CustomTextCLIP checkpoints
    _load_state(model, state, path, arch)


def _log_activation(source: WeightSource, qg: bool, asked: Optional[bool], torchscript: bool) -> None:
    if source.kind == "tag":
        if qg and asked is None:
            log.info("pretrained=%s: using the QuickGELU variant of %s, as those weights were "
                     "trained with QuickGELU", source.id, source.name)
    elif torchscript and qg:
        log.info("%s is an OpenAI TorchScript archive: using QuickGELU activations "
                 "(the weights were trained with them)", source.files[0].path)
    elif source.kind == "file" and not qg:
        log.info("loaded %s with nn.GELU; pass quick_gelu=True (--quick-gelu) if these are "
                 "OpenAI weights", source.files[0].path)


def _tokenizer(source: WeightSource, cache_dir: Optional[str]) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for the source. A Hub repo whose config names a Hugging Face
    tokenizer gets it by that name (as open_clip does for hf-hub: names); everything else from
    the config at hand (the built-in one, or the folder's / cached snapshot's json)."""
    text = source.model_cfg.get("text_cfg") or {}
    try:
        if source.kind == "hf-hub" and text.get("hf_tokenizer_name"):
            from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

            return HFTokenizer(text["hf_tokenizer_name"],
                               context_length=text.get("context_length", DEFAULT_CONTEXT_LENGTH),
                               cache_dir=cache_dir, tokenizer_mode=text.get("tokenizer_mode"),
                               **(text.get("tokenizer_kwargs") or {}))
        return open_clip.get_tokenizer(source.model_ref, cache_dir=cache_dir)
    except Exception as exc:   # a tokenizer library missing, or its files not obtainable
        name = text.get("hf_tokenizer_name")
        needs = (" (it needs the transformers package: pip install transformers)"
                 if name and importlib.util.find_spec("transformers") is None else "")
        raise ModelError(f"{source.label}: cannot build its tokenizer {quote(name, 80) if name else ''}{needs}: "
                         f"{type(exc).__name__}: {one_line(exc, 160)}") from None


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    """Copy `state` into `model`, requiring exactly the model's keys and shapes (logit_bias optional)."""
    for key in ("logit_scale", "logit_bias"):   # a scalar saved as shape (1,) or the reverse
        own_t = getattr(model, key, None)
        if (key in state and own_t is not None and state[key].ndim != own_t.ndim
                and state[key].numel() == own_t.numel()):
            state[key] = state[key].reshape(own_t.shape)
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
