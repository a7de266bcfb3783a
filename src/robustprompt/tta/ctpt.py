"""C-TPT (Yoon et al., ICLR 2024): TPT's loss minus λ·ATFD, the average distance of the class text
features from their centroid — dispersed text features calibrate the tuned prompt."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TTAParams, TTAProcedure, marginal_entropy, register


@dataclass
class CTPTParams(TTAParams):
    lam: float = 50.0


def atfd(text_features: torch.Tensor) -> torch.Tensor:
    """Average text feature dispersion per image: mean_c ‖t_c − mean t‖₂.  P×K×D → P."""
    centroid = text_features.mean(dim=-2, keepdim=True)
    return (text_features - centroid).norm(dim=-1).mean(dim=-1)


@register
class CTPT(TTAProcedure):
    name = "ctpt"
    title = "C-TPT"
    summary = "TPT − λ·ATFD (text-feature dispersion), λ = 50"
    Params = CTPTParams

    def tta_loss(self, sel_logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return marginal_entropy(sel_logits) - self.params.lam * atfd(text_features)
