"""Images in [0,1] → logits over class names, with CLIP's normalisation inside the model."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .backbone import Backbone
from .prompted_clip import PromptedCLIP, TextTrace, VisionTrace
from .prompts import PromptConfig
from .trace import TraceSpec

DEFAULT_TEMPLATE = "a photo of a {}."
CTX_PLACEHOLDER = "X"


@dataclass
class ClassifierOutput:
    """logits B×K; image_features B×D and text_features K×D, both L2-normalised; traces if asked."""

    logits: torch.Tensor
    image_features: torch.Tensor
    text_features: torch.Tensor
    vision: Optional[VisionTrace] = None
    text: Optional[TextTrace] = None


def prompt_texts(classnames: Sequence[str], templates: Sequence[str], n_ctx: int,
                 phrase: Optional[str] = None) -> list[str]:
    """The strings fed to the text tower. With a learned text context (n_ctx > 0):
    "X … X {class}." when ``phrase`` is None, else "{phrase} {class}." as MaPLe/FAP build it
    (prompt_prefix + " " + name + "."); either way the first n_ctx tokens after SOS are replaced
    by context vectors (and by X placeholders in the token ids, see `context_token_ids`).
    Without a learned context: every template for every class, class-major (K·T strings)."""
    names = [c.replace("_", " ") for c in classnames]
    if n_ctx > 0:
        prefix = phrase if phrase is not None else " ".join([CTX_PLACEHOLDER] * n_ctx)
        return [f"{prefix} {name}." for name in names]
    return [t.format(name) for name in names for t in templates]


def context_token_ids(tokenizer, texts: list[str], n_ctx: int) -> torch.Tensor:
    """Token ids S×L of ``texts`` with positions 1…n_ctx set to the placeholder token: those
    positions carry the learned context, whatever words of the phrase the string had there."""
    tokens = tokenizer(texts)
    if n_ctx > 0:
        placeholder = tokenizer([CTX_PLACEHOLDER])[0, 1]
        tokens[:, 1:1 + n_ctx] = placeholder
    return tokens


class PromptedClassifier(nn.Module):
    """A zero-shot or prompted CLIP classifier.

    forward(x): x B×3×S×S in [0,1] → logits B×K (K = len(classnames)).
    Text features are cached while the prompts that produce them do not change (tracked through
    the parameters' version counters), and `static_text()` pins them for a block of attack steps.
    """

    def __init__(self, backbone: Backbone, classnames: Sequence[str], prompt: PromptConfig = PromptConfig(),
                 templates: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.backbone_info = backbone.describe()
        first = templates[0] if templates else DEFAULT_TEMPLATE
        self.model = PromptedCLIP(backbone.model, backbone.tokenizer, prompt, template=first)
        self.tokenizer = backbone.tokenizer
        self.image_size = backbone.image_size
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self._cache: Optional[tuple[Any, torch.Tensor]] = None
        self._static: Optional[torch.Tensor] = None
        self.text_encode_count = 0  # how often the text tower ran (tests and benchmarks read it)
        # the file trained prompts were loaded from (None: the prompts are the layout's initial ones)
        self.prompt_origin: Optional[str] = None
        self.set_classnames(classnames, templates)

    # ------------------------------------------------------------------ set-up
    @property
    def prompt_cfg(self) -> PromptConfig:
        return self.model.prompt_cfg

    @property
    def classnames(self) -> list[str]:
        return list(self._classnames)

    @property
    def templates(self) -> list[str]:
        return list(self._templates)

    @property
    def text_ctx_len(self) -> int:
        return self.prompt_cfg.n_ctx if self.prompt_cfg.has_text else 0

    def set_classnames(self, classnames: Sequence[str], templates: Optional[Sequence[str]] = None) -> None:
        """Switch the label set (e.g. base → new classes); prompts are kept."""
        if len(classnames) < 1:
            raise ModelError("a classifier needs at least one class name")
        templates = list(templates) if templates else [DEFAULT_TEMPLATE]
        for t in templates:
            if t.count("{}") != 1:
                raise ModelError(f"template {t!r} must contain exactly one '{{}}' for the class name")
        self._classnames = list(classnames)
        self._templates = templates if self.text_ctx_len == 0 else [templates[0]]
        phrase = None
        if self.text_ctx_len and self.prompt_cfg.text_init_mode != "placeholder":
            phrase = self.prompt_cfg.init_phrase(self._templates[0])
            self._check_phrase(phrase)
        texts = prompt_texts(self._classnames, self._templates, self.text_ctx_len, phrase)
        self._check_length(texts)
        tokens = context_token_ids(self.tokenizer, texts, self.text_ctx_len)
        device = self.mean.device
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self._cache = None

    def _check_phrase(self, phrase: str) -> None:
        """The context replaces the phrase's first n_ctx tokens; a shorter phrase would eat into
        the class name (MaPLe's code silently does; refuse it)."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None and len(encode(phrase)) < self.text_ctx_len:
            raise ModelError(f"the prompt phrase {phrase!r} has fewer tokens than n_ctx = {self.text_ctx_len}")

    def _check_length(self, texts: list[str]) -> None:
        """A prompt longer than the text tower's context would be cut silently (and a learned
        context would no longer line up): refuse it instead."""
        encode = getattr(self.tokenizer, "encode", None)
        ctx = getattr(self.tokenizer, "context_length", None)
        if encode is None or ctx is None:
            return
        for text in texts:
            n = len(encode(text)) + 2  # start and end tokens
            if n > ctx:
                hint = " (lower the prompt's n_ctx)" if self.text_ctx_len else ""
                raise ModelError(f"the prompt {text!r} needs {n} tokens but the text tower holds {ctx}{hint}")

    @property
    def n_templates(self) -> int:
        return 1 if self.text_ctx_len else len(self._templates)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return self.model.prompt_parameters()

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the learned prompt tensors (and projections), keyed by name."""
        if self.model.prompt is None:
            return {}
        return {k: v.detach().clone() for k, v in self.model.prompt.state_dict().items()}

    def load_prompt_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.model.prompt is None:
            if state:
                raise ModelError("this classifier has no prompts to load")
            return
        own = self.model.prompt.state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise ModelError("prompt checkpoint does not match this prompt configuration "
                             f"(expected {sorted((k, tuple(v.shape)) for k, v in own.items())})")
        self.model.prompt.load_state_dict(state)
        self._cache = None

    def describe(self) -> dict[str, Any]:
        return {"backbone": self.backbone_info, "prompt": self.prompt_cfg.to_dict(),
                "n_classes": len(self._classnames), "templates": self.templates}

    # ------------------------------------------------------------------ text side
    def _text_key(self) -> tuple:
        params = self.model.text_side_parameters()
        return (self.tokens.data_ptr(), self.tokens.device,
                tuple((id(p), p._version, p.device) for p in params))

    def encode_text(self, trace: Optional[TraceSpec] = None) -> tuple[torch.Tensor, Optional[TextTrace]]:
        """Run the text tower on every class prompt: K×D normalised features (+ trace)."""
        if trace is not None and self.n_templates > 1:
            raise ModelError("text tracing needs a single template per class")
        self.text_encode_count += 1
        feats, rec = self.model.encode_text(self.tokens, trace)
        feats = F.normalize(feats, dim=-1)
        if self.n_templates > 1:
            feats = F.normalize(feats.view(len(self._classnames), self.n_templates, -1).mean(dim=1), dim=-1)
        return feats, rec

    def text_features(self) -> torch.Tensor:
        """K×D normalised class text features, from cache when the prompts have not changed."""
        if self._static is not None:
            return self._static
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.text_side_parameters())
        if needs_graph:
            return self.encode_text()[0]
        key = self._text_key()
        if self._cache is None or self._cache[0] != key:
            # cached in full precision even when first asked for under autocast (a bf16 clean pass):
            # the cache outlives the autocast block, and fp32 attacks and scoring read it afterwards
            kind = self.tokens.device.type
            full = torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else nullcontext()
            with torch.no_grad(), full:
                self._cache = (key, self.encode_text()[0])
        return self._cache[1]

    @contextmanager
    def static_text(self, features: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
        """Use one set of class text features (no graph) for every forward inside the block — what
        an attack wants: its steps change the image, never the text. `features` pins features
        the caller already has (e.g. the detached output of a training step's text forward);
        otherwise they are computed once here."""
        if self._static is not None and features is None:
            yield self._static
            return
        previous = self._static
        if features is not None:
            self._static = features.detach()
        else:
            with torch.no_grad():
                self._static = self.text_features()
        try:
            yield self._static
        finally:
            self._static = previous

    # ------------------------------------------------------------------ image side
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ModelError(f"expected images B×3×{self.image_size}×{self.image_size} in [0,1], "
                             f"got shape {tuple(x.shape)}")
        return (x - self.mean) / self.std

    def encode_image(self, x: torch.Tensor, trace: Optional[TraceSpec] = None,
                     vision_prompts: Optional[list[torch.Tensor]] = None
                     ) -> tuple[torch.Tensor, Optional[VisionTrace]]:
        """x B×3×S×S in [0,1] → normalised features B×D (+ trace). vision_prompts: per block
        n_ctx×d or B×n_ctx×d, overriding the learned vision context (PromptedCLIP.encode_image)."""
        feats, rec = self.model.encode_image(self.normalize(x), trace, vision_prompts)
        return F.normalize(feats, dim=-1), rec

    def logits_from(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        # text features cached or pinned under another precision (a bf16 autocast pass) meet
        # these image features in theirs; a no-op when the dtypes agree (every fp32 run)
        logits = self.model.logit_scale * image_features @ text_features.t().to(image_features.dtype)
        bias = self.model.logit_bias
        return logits + bias if bias is not None else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img, _ = self.encode_image(x)
        return self.logits_from(img, self.text_features())

    def features(self, x: torch.Tensor, vision_trace: Optional[TraceSpec] = None,
                 text_trace: Optional[TraceSpec] = None,
                 text: Optional[tuple[torch.Tensor, Optional[TextTrace]]] = None) -> ClassifierOutput:
        """One forward that also returns features and, if asked, the traced block internals.
        `text` reuses a text-side result (features, trace) from `encode_text` — the class texts
        do not depend on the image, so clean and adversarial passes can share one."""
        img, vrec = self.encode_image(x, vision_trace)
        if text is not None:
            txt, trec = text
        elif text_trace is not None:
            txt, trec = self.encode_text(text_trace)
        else:
            txt, trec = self.text_features(), None
        return ClassifierOutput(self.logits_from(img, txt), img, txt, vrec, trec)
