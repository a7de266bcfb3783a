"""MTA (Zanella & Ben Ayed, CVPR 2024): no prompt tuning; a robust MeanShift over the view
embeddings finds their mode, with an inlierness score per view optimised jointly.

Our reading of the paper's formulation (documented, not the released code): maximise over the
mode m and inlierness y on the simplex
    J(m, y) = Σ_s y_s K(x_s, m) + (λ_y/2) yᵀ W y − λ_q Σ_s y_s log y_s,
with a Gaussian kernel K (bandwidth from the median squared distance to the mode), the
text-informed affinity W = P Pᵀ of the views' zero-shot class probabilities, and the entropy
barrier keeping y a softmax. Alternating fixed-point updates: y ∝ exp((K + λ_y W y)/λ_q),
m = Σ y_s K_s x_s / Σ y_s K_s. The prediction is the mode's zero-shot logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import TTAParams, TTAProcedure, ViewSet, register


@dataclass
class MTAParams(TTAParams):
    lambda_y: float = 0.2
    lambda_q: float = 4.0
    outer_steps: int = 5
    inner_steps: int = 5
    steps: int = 0                # no prompt tuning


def meanshift_mode(feats: torch.Tensor, probs: torch.Tensor, lambda_y: float, lambda_q: float,
                   outer_steps: int, inner_steps: int) -> torch.Tensor:
    """feats P×V×D (normalised), probs P×V×K → modes P×D (normalised). View 0 initialises m."""
    W = probs @ probs.transpose(1, 2)                                          # P×V×V
    P, V, _ = feats.shape
    y = torch.full((P, V), 1.0 / V, device=feats.device, dtype=feats.dtype)
    m = feats[:, 0]
    for _ in range(outer_steps):
        d2 = ((feats - m[:, None]) ** 2).sum(-1)                               # P×V
        bandwidth = d2.median(dim=1, keepdim=True).values.clamp_min(1e-8)
        k = torch.exp(-d2 / (2 * bandwidth))
        for _ in range(inner_steps):
            y = ((k + lambda_y * (W @ y[..., None])[..., 0]) / lambda_q).softmax(-1)
        wk = y * k
        m = F.normalize((wk[..., None] * feats).sum(1) / wk.sum(1, keepdim=True).clamp_min(1e-12), dim=-1)
    return m


@register
class MTA(TTAProcedure):
    name = "mta"
    title = "MTA"
    summary = "no prompt tuning: robust MeanShift mode of the view embeddings with inlierness scores"
    tunes_prompt = False
    Params = MTAParams

    def predict(self, logits, feats, selected, viewset: ViewSet, text_features, scale):
        p = self.params
        mode = meanshift_mode(feats, logits.softmax(-1), p.lambda_y, p.lambda_q, p.outer_steps, p.inner_steps)
        return (scale * (mode[:, None, :] * text_features).sum(-1)).softmax(-1)
