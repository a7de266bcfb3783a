"""R-TPT (Sheng et al., CVPR 2025): per-view entropies (no marginal), and a reliability-weighted
ensemble over all views: w = softmax(mean top-k cosine similarity of each view to the others / τ)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TTAParams, TTAProcedure, ViewSet, entropy, register


@dataclass
class RTPTParams(TTAParams):
    top_k: int = 20
    temperature: float = 0.01


def reliability_weights(feats: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """feats P×V×D (normalised) → P×V weights from each view's mean similarity to its top_k
    most similar other views."""
    sim = feats @ feats.transpose(1, 2)
    V = sim.shape[-1]
    eye = torch.eye(V, dtype=torch.bool, device=sim.device)
    sim = sim.masked_fill(eye, float("-inf"))
    k = max(1, min(top_k, V - 1))
    score = sim.topk(k, dim=-1).values.mean(-1) if V > 1 else torch.zeros(sim.shape[:2], device=sim.device)
    return (score / temperature).softmax(-1)


def rtpt_fusion(logits: torch.Tensor, feats: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    w = reliability_weights(feats, top_k, temperature)
    return (w[..., None] * logits.softmax(-1)).sum(1)


@register
class RTPT(TTAProcedure):
    name = "rtpt"
    title = "R-TPT"
    summary = "mean point-wise entropy; reliability-weighted ensemble of all views"
    Params = RTPTParams

    def tta_loss(self, sel_logits, text_features):
        return entropy(sel_logits).mean(-1)

    def predict(self, logits, feats, selected, viewset: ViewSet, text_features, scale):
        return rtpt_fusion(logits, feats, self.params.top_k, self.params.temperature)
