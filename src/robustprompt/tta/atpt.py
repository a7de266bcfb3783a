"""A-TPT (Hai et al., ICML 2026): attention-guided views and a TV-weighted ensemble.

Per image: token-gradient reinforced rollout maps of all view bases (one batched forward +
backward, attribution.rollout), AugMix mixed spatially by attention (high-attention pixels keep
the base), R-TPT's per-view entropy loss on the most confident views, and a prediction weighted by
w_i = softmax(−TV(A_i)) over the kept views (paper) — or R-TPT's fusion (the released code).
The TV of a view is taken on its base's map at patch-grid resolution, min-max normalised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attribution.rollout import rollout, total_variation, upsample
from ..errors import ConfigError
from .base import TTAParams, TTAProcedure, ViewSet, entropy, register
from .rtpt import rtpt_fusion
from .views import attention_guided_views, augmix_views


@dataclass
class ATPTParams(TTAParams):
    ratio: float = 0.2            # r: share of pixels counted as high attention
    m_high: float = 0.2           # AugMix weight where attention is high (keeps 80% of the base)
    m_low: float = 0.8
    rollout: str = "token_grad"   # token_grad (A-TPT) | gar (original gradient attention rollout)
    fusion: str = "tv"            # tv (paper) | rtpt (released code)
    top_k: int = 20               # for fusion = rtpt
    temperature: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollout not in ("token_grad", "gar"):
            raise ConfigError(f"atpt rollout must be token_grad or gar, got {self.rollout!r}")
        if self.fusion not in ("tv", "rtpt"):
            raise ConfigError(f"atpt fusion must be tv or rtpt, got {self.fusion!r}")
        if not self.augmix:
            raise ConfigError("atpt mixes AugMix views by attention: it needs augmix: true")


def tv_fusion(logits: torch.Tensor, selected: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Σ_i∈kept softmax(−TV_i) p(x_i).  logits P×V×K, selected P×k, maps P×V×h×w → P×K."""
    P = logits.shape[0]
    rows = torch.arange(P, device=logits.device)[:, None]
    tv = total_variation(maps[rows, selected].flatten(0, 1)).view(selected.shape)
    w = (-tv).softmax(-1)
    return (w[..., None] * logits[rows, selected].softmax(-1)).sum(1)


@register
class ATPT(TTAProcedure):
    name = "atpt"
    title = "A-TPT"
    summary = "attention-guided AugMix views, per-view entropy, TV-weighted ensemble of kept views"
    Params = ATPTParams

    def make_views(self, clf, images, gens) -> ViewSet:
        p = self.params
        per_image = [augmix_views(img, p.n_views, g, use_augmix=True, crop_scale=(p.crop_scale, 1.0))
                     for img, g in zip(images, gens)]
        bases = torch.stack([v.bases for v in per_image])                     # P×V×3×S×S
        P, V = bases.shape[:2]
        maps = rollout(clf, bases.flatten(0, 1).detach(), mode=p.rollout)      # one forward+backward
        grid = maps.view(P, V, *maps.shape[-2:])
        full = upsample(maps, bases.shape[-1]).view(P, V, *bases.shape[-2:])
        views = torch.stack([attention_guided_views(v, m, ratio=p.ratio, m_high=p.m_high, m_low=p.m_low)
                             for v, m in zip(per_image, full)])
        return ViewSet(views, {"maps": grid})

    def tta_loss(self, sel_logits, text_features):
        return entropy(sel_logits).mean(-1)

    def predict(self, logits, feats, selected, viewset: ViewSet, text_features, scale):
        if self.params.fusion == "rtpt":
            return rtpt_fusion(logits, feats, self.params.top_k, self.params.temperature)
        return tv_fusion(logits, selected, viewset.extra["maps"])
