"""R-TPT (Sheng et al., CVPR 2025): per-view entropies (no marginal), and a reliability-weighted
ensemble over all views: w = softmax(mean top-k cosine similarity of each view to the others / τ).

Fusion space. The released code (TomSheng21/R-TPT, rtpt.py) fuses the tuned *logits*:
``weight @ tuned_outputs``, then takes the argmax. That is the default here (``fuse_space:
logits``); ``predict`` returns softmax of the fused logits because the procedures' interface is
class probabilities. ``fuse_space: probs`` averages the per-view probabilities instead
(Σ_i w_i softmax(z_i)), the reading of an ensemble "of predictions"; the paper's full text was not
available to check its wording here, so that reading is offered, not claimed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .base import TTAParams, TTAProcedure, ViewSet, entropy, register

FuseSpace = Literal["logits", "probs"]
FUSE_SPACES = ("logits", "probs")


def check_fuse_space(value: str, where: str) -> None:
    if value not in FUSE_SPACES:
        raise ConfigError(f"{where} fuse_space must be one of {FUSE_SPACES}, got {value!r}")


@dataclass
class RTPTParams(TTAParams):
    top_k: int = 20
    temperature: float = 0.01
    fuse_space: str = "logits"   # logits (released code: weight @ logits) | probs

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fuse_space(self.fuse_space, "rtpt")
        if self.top_k < 1 or not self.temperature > 0:
            raise ConfigError(f"rtpt needs top_k >= 1 and temperature > 0, got {self.top_k}, {self.temperature}")


def reliability_weights(feats: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """feats P×V×D (L2-normalised) → P×V weights softmax(score / τ), where a view's score is its
    mean cosine similarity to its min(top_k, V−1) most similar *other* views.

    The self-similarity is excluded by masking the diagonal exactly. The released code instead
    sets ``sim[sim >= 1.0] = -inf``: in float32 a unit vector's self-similarity often rounds to
    just below 1 (about 40% of them for random 512-d features), so those views count themselves
    as their best neighbour (similarity ≈ 1) and get an inflated score, at random.
    """
    sim = feats @ feats.transpose(1, 2)
    V = sim.shape[-1]
    if V == 1:
        return sim.new_ones(sim.shape[:2])
    eye = torch.eye(V, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, float("-inf"))
    k = max(1, min(top_k, V - 1))
    score = sim.topk(k, dim=-1).values.mean(-1)
    return (score / temperature).softmax(-1)


def fuse(weights: torch.Tensor, logits: torch.Tensor, space: FuseSpace = "logits") -> torch.Tensor:
    """Weighted ensemble of views → class probabilities P×K. weights P×V (rows sum to 1), logits
    P×V×K. "logits": softmax(Σ_i w_i z_i) (the released codes); "probs": Σ_i w_i softmax(z_i)."""
    if space == "logits":
        return torch.einsum("pv,pvk->pk", weights, logits).softmax(-1)
    if space == "probs":
        return torch.einsum("pv,pvk->pk", weights, logits.softmax(-1))
    raise ValueError(f"space must be one of {FUSE_SPACES}, got {space!r}")


def rtpt_fusion(logits: torch.Tensor, feats: torch.Tensor, top_k: int, temperature: float,
                space: FuseSpace = "logits") -> torch.Tensor:
    """R-TPT's ensemble over all views: logits P×V×K, feats P×V×D → class probabilities P×K."""
    return fuse(reliability_weights(feats, top_k, temperature), logits, space)


@register
class RTPT(TTAProcedure):
    name = "rtpt"
    title = "R-TPT"
    summary = "mean point-wise entropy; reliability-weighted ensemble of all views"
    Params = RTPTParams

    def tta_loss(self, sel_logits, text_features):
        return entropy(sel_logits).mean(-1)

    def predict(self, logits, feats, selected, viewset: ViewSet, text_features, scale):
        p = self.params
        return rtpt_fusion(logits, feats, p.top_k, p.temperature, p.fuse_space)
