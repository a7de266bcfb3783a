"""Learnable deep prompts for both towers and the ways they can be coupled (METHODS.md §0).

A prompt set is `depth` blocks × `n_ctx` tokens per tower. Block 0's tokens enter with the
embeddings; at every later block < depth fresh tokens replace the previous block's prompt tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError

TEXT_INIT_MODES = ("placeholder", "phrase", "template")

_TEXT_INIT_HELP = {
    "placeholder": '"X … X {class}." — the context is initialised from text_init only when that '
                   "phrase has exactly n_ctx tokens, else N(0, init_std²) (CoOp with a full-length init)",
    "phrase": '"<ctx> <rest of text_init> {class}." — the n_ctx context tokens start as the first '
              "n_ctx tokens of text_init and its remaining words stay as fixed text (MaPLe's and "
              "AdvVLP's released code: \"a photo of a\", n_ctx 2 → \"<c1> <c2> of a {class}.\")",
    "template": "as phrase, with the dataset's own template (its '{}' kept verbatim) as the phrase "
                "(FAP's released trainers: ctx_init = CUSTOM_TEMPLATES[dataset], so ImageNet reads "
                '"<c1> <c2> of a {}. {class}.")',
}

COUPLINGS = ("none", "text", "vision", "independent", "coupled", "coupled-v2t", "fap")

_COUPLING_HELP = {
    "none": "no prompts (zero-shot CLIP)",
    "text": "text prompts only (CoOp; APT)",
    "vision": "vision prompts only (VPT-deep; AdvVP)",
    "independent": "free prompts in both towers (IVLP; AdvVLP; APD)",
    "coupled": "free text prompts, vision prompts = Linear(text) per block (MaPLe; AdvMaPLe)",
    "coupled-v2t": "free vision prompts, text prompts = Linear(vision) per block (FAP; CBA-FAPT)",
    "fap": "as coupled-v2t, except block 0 is t→v, as in FAP's released code",
}


@dataclass(frozen=True)
class PromptConfig:
    """Which prompts a model carries.

    coupling: one of COUPLINGS. n_ctx: tokens per block and tower. depth: number of blocks that
    receive prompts (1 = shallow). text_init: the init phrase. text_init_mode (TEXT_INIT_MODES)
    says how the class prompt text and the free block-0 text context are formed from it:
    placeholder ("X … X {class}.", init only when the phrase has exactly n_ctx tokens), phrase
    (MaPLe: "<ctx> <rest of the phrase> {class}.", init from its first n_ctx tokens) or template
    (FAP: as phrase, with the dataset's template verbatim as the phrase).
    """

    coupling: str = "none"
    n_ctx: int = 2
    depth: int = 9
    text_init: Optional[str] = "a photo of a"
    init_std: float = 0.02
    text_init_mode: str = "placeholder"

    def __post_init__(self) -> None:
        if self.text_init_mode not in TEXT_INIT_MODES:
            raise ConfigError(f"prompt text_init_mode {self.text_init_mode!r} is unknown; choose one of: "
                              + "; ".join(f"{k} ({v})" for k, v in _TEXT_INIT_HELP.items()))
        if self.text_init_mode == "phrase" and self.coupling != "none" and not self.text_init:
            raise ConfigError("prompt text_init_mode 'phrase' needs a text_init phrase (e.g. 'a photo of a')")
        if self.coupling not in COUPLINGS:
            raise ConfigError(f"prompt coupling {self.coupling!r} is unknown; choose one of: "
                              + "; ".join(f"{k} ({v})" for k, v in _COUPLING_HELP.items()))
        if self.coupling != "none":
            if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
                raise ConfigError(f"prompt n_ctx must be a positive integer, got {self.n_ctx!r}")
            if not isinstance(self.depth, int) or self.depth < 1:
                raise ConfigError(f"prompt depth must be a positive integer, got {self.depth!r}")

    def init_phrase(self, template: Optional[str] = None) -> Optional[str]:
        """The phrase the class prompts start with and the text context is initialised from:
        the dataset's template (``template`` mode, '{}' kept) or ``text_init``."""
        if self.text_init_mode == "template":
            return template or "a photo of a {}."
        return self.text_init

    @property
    def has_text(self) -> bool:
        return self.coupling not in ("none", "vision")

    @property
    def has_vision(self) -> bool:
        return self.coupling not in ("none", "text")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "PromptConfig":
        if d is None:
            return cls()
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown prompt settings {sorted(unknown)}; "
                              f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


class PromptLearner(nn.Module):
    """Holds the prompt parameters and returns, per block, the text and vision context tokens.

    Shapes: text tokens n_ctx × d_text, vision tokens n_ctx × d_vision, per block b < depth.
    """

    def __init__(
        self,
        cfg: PromptConfig,
        d_text: int,
        d_vision: int,
        text_layers: int,
        vision_layers: int,
        embed_phrase: Callable[[str], torch.Tensor] | None = None,
        template: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_text, self.d_vision = d_text, d_vision
        c = cfg.coupling
        if cfg.has_text and cfg.depth > text_layers:
            raise ConfigError(f"prompt depth {cfg.depth} exceeds the text tower's {text_layers} blocks")
        if cfg.has_vision and cfg.depth > vision_layers:
            raise ConfigError(f"prompt depth {cfg.depth} exceeds the vision tower's {vision_layers} blocks")
        n, depth = cfg.n_ctx, cfg.depth

        def free(d: int, count: int) -> nn.ParameterList:
            return nn.ParameterList([nn.Parameter(torch.randn(n, d) * cfg.init_std) for _ in range(count)])

        # Free ("source") prompts and per-block projections to the other tower, by coupling.
        self.text_ctx = free(d_text, depth) if c in ("text", "independent", "coupled") else None
        self.vision_ctx = free(d_vision, depth) if c in ("vision", "independent", "coupled-v2t") else None
        self.t2v = nn.ModuleList([nn.Linear(d_text, d_vision) for _ in range(depth)]) if c == "coupled" else None
        self.v2t = nn.ModuleList([nn.Linear(d_vision, d_text) for _ in range(depth)]) if c == "coupled-v2t" else None
        if c == "fap":
            # Block 0 is t→v (free text, projected vision); blocks 1.. are v→t.
            self.text_ctx = free(d_text, 1)
            self.vision_ctx = free(d_vision, depth - 1) if depth > 1 else None
            self.t2v = nn.ModuleList([nn.Linear(d_text, d_vision)])
            self.v2t = nn.ModuleList([nn.Linear(d_vision, d_text) for _ in range(depth - 1)])

        self.text_init_used = False
        phrase = cfg.init_phrase(template)
        if self.text_ctx is not None and phrase and embed_phrase is not None:
            emb = embed_phrase(phrase)  # (n_tokens, d_text), without SOS/EOT
            if cfg.text_init_mode == "placeholder":
                use = emb if emb.shape[0] == n else None
            elif emb.shape[0] >= n:
                use = emb[:n]  # MaPLe/FAP: embedding[0, 1:1 + n_ctx] of the tokenised phrase
            else:
                raise ConfigError(f"prompt text_init_mode {cfg.text_init_mode!r}: the phrase {phrase!r} has "
                                  f"{emb.shape[0]} tokens, fewer than n_ctx = {n}")
            if use is not None:
                with torch.no_grad():
                    self.text_ctx[0].copy_(use)
                self.text_init_used = True

    def text_side_parameters(self) -> list[nn.Parameter]:
        """Parameters the text features depend on (for text-feature caching)."""
        c = self.cfg.coupling
        params: list[nn.Parameter] = []
        if self.text_ctx is not None:
            params += list(self.text_ctx)
        if c in ("coupled-v2t", "fap"):
            if self.vision_ctx is not None:
                params += list(self.vision_ctx)
            params += list(self.v2t.parameters())
        return params

    def text_prompts(self) -> list[torch.Tensor] | None:
        """Per-block text context, list of `depth` tensors n_ctx × d_text (None if no text prompts)."""
        c = self.cfg.coupling
        if not self.cfg.has_text:
            return None
        if c in ("text", "independent", "coupled"):
            return list(self.text_ctx)
        if c == "coupled-v2t":
            return [proj(ctx) for proj, ctx in zip(self.v2t, self.vision_ctx)]
        # fap
        deeper = [proj(ctx) for proj, ctx in zip(self.v2t, self.vision_ctx)] if self.vision_ctx is not None else []
        return [self.text_ctx[0]] + deeper

    def vision_prompts(self) -> list[torch.Tensor] | None:
        """Per-block vision context, list of `depth` tensors n_ctx × d_vision (None if none)."""
        c = self.cfg.coupling
        if not self.cfg.has_vision:
            return None
        if c in ("vision", "independent", "coupled-v2t"):
            return list(self.vision_ctx)
        if c == "coupled":
            return [proj(ctx) for proj, ctx in zip(self.t2v, self.text_ctx)]
        # fap
        first = [self.t2v[0](self.text_ctx[0])]
        return first + (list(self.vision_ctx) if self.vision_ctx is not None else [])
