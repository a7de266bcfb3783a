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
    receive prompts (1 = shallow). text_init: a phrase whose token embeddings initialise the
    free block-0 text context when it has exactly n_ctx tokens (else N(0, init_std²)).
    """

    coupling: str = "none"
    n_ctx: int = 2
    depth: int = 9
    text_init: Optional[str] = "a photo of a"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.coupling not in COUPLINGS:
            raise ConfigError(f"prompt coupling {self.coupling!r} is unknown; choose one of: "
                              + "; ".join(f"{k} ({v})" for k, v in _COUPLING_HELP.items()))
        if self.coupling != "none":
            if not isinstance(self.n_ctx, int) or self.n_ctx < 1:
                raise ConfigError(f"prompt n_ctx must be a positive integer, got {self.n_ctx!r}")
            if not isinstance(self.depth, int) or self.depth < 1:
                raise ConfigError(f"prompt depth must be a positive integer, got {self.depth!r}")

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
        if self.text_ctx is not None and cfg.text_init and embed_phrase is not None:
            emb = embed_phrase(cfg.text_init)  # (n_tokens, d_text), without SOS/EOT
            if emb.shape[0] == n:
                with torch.no_grad():
                    self.text_ctx[0].copy_(emb)
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
