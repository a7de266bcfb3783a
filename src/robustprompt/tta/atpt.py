"""A-TPT (Hai et al., ICML 2026): attention-guided views, and a TV-weighted (paper) or R-TPT
(released code, the default) ensemble.

Per image (all images of a batch together):
1. views: crops+flips b_j and AugMix chain mixtures mix_j (tta.views); the token-gradient rollout
   map of every base b_j, all P·V bases in one batched forward + backward (attribution.rollout),
   normalised on the patch grid (0.99-quantile clip, min-max) and upsampled bilinearly to the
   image, as the released code does; then x_j = (1−λ)⊙b_j + λ⊙mix_j with λ = m_high on the top
   ⌈r·S²⌉ pixels, m_low elsewhere (``mix_source``: chain = released code | augmix).
2. R-TPT's per-view entropy loss on the most confident views, one AdamW step.
3. prediction, ``fusion`` (default ``rtpt``: the released code, which produced the paper's
   numbers, has no TV step; the paper's TV weighting is ``fusion=tv``):
   - ``tv`` (paper): w_i = softmax(−TV(A(x_i))) over the kept views, TV of each *final* view's
     own map A(x_i) — a second batched forward + backward over all P·V final views. The map is
     normalised as in step 1 and its TV taken at ``tv_resolution``: ``image`` (default; S×S, the
     bilinear upsampling of the grid map — the resolution of the paper's A(x) ∈ R^{H×W}, whose
     top ⌈rHW⌉ pixels mask the image, and the only resolution at which the released code ever
     materialises a map) or ``grid`` (the patch grid). TV has no temperature, so resolution acts
     as one: the image-resolution TV is ≈ S/grid times the grid TV and the weights are sharper.
   - ``rtpt``: R-TPT's similarity-weighted ensemble — what the released code does (it has no TV
     step at all; it fuses with R-TPT's weights over the views ranked by tuned entropy).
   Both fuse in ``fuse_space`` (logits: softmax(Σ w_i z_i), the released code's ``weight @
   logits``; probs: Σ w_i p(x_i), the paper's ĉ = argmax Σ_i w_i p_c(x_i)). Unset, it follows the
   fusion's source: logits for ``rtpt`` (code), probs for ``tv`` (paper; no code to follow).
Rollout (``rollout_weights``): paper = last two blocks averaged equally (default), code = 1/3, 2/3.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..attribution.rollout import ROLLOUT_WEIGHTS, rollout, total_variation, upsample
from ..errors import ConfigError
from .base import TTAParams, TTAProcedure, ViewSet, entropy, register
from .rtpt import FuseSpace, check_fuse_space, fuse, rtpt_fusion
from .views import MIX_SOURCES, attention_guided_views, augmix_views

TV_RESOLUTIONS = ("image", "grid")


@dataclass
class ATPTParams(TTAParams):
    ratio: float = 0.2            # r: share of pixels counted as high attention
    m_high: float = 0.2           # weight of the augmentation where attention is high (keeps 80% of the base)
    m_low: float = 0.8
    mix_source: str = "chain"     # chain (released code: AugMix's chain mixture) | augmix (finished AugMix view)
    rollout: str = "token_grad"   # token_grad (A-TPT) | gar (original gradient attention rollout)
    rollout_weights: str = "paper"  # paper (last two blocks equally) | code (1/3, 2/3)
    fusion: str = "rtpt"          # rtpt (released code) | tv (paper)
    tv_resolution: str = "image"  # image (S×S, upsampled) | grid (patch grid)
    fuse_space: Optional[str] = None  # logits | probs; None: logits for rtpt (code), probs for tv (paper)
    top_k: int = 20               # for fusion = rtpt
    temperature: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"rollout": ("token_grad", "gar"), "fusion": ("tv", "rtpt"), "mix_source": MIX_SOURCES,
                   "rollout_weights": ROLLOUT_WEIGHTS, "tv_resolution": TV_RESOLUTIONS}
        for field_name, allowed in choices.items():
            if getattr(self, field_name) not in allowed:
                raise ConfigError(f"atpt {field_name} must be one of {allowed}, got {getattr(self, field_name)!r}")
        if self.fuse_space is not None:
            check_fuse_space(self.fuse_space, "atpt")


    @property
    def space(self) -> FuseSpace:
        """The fusion space in force: fuse_space, or the reading that goes with the fusion."""
        if self.fuse_space is not None:
            return self.fuse_space  # type: ignore[return-value]
        return "logits" if self.fusion == "rtpt" else "probs"


def tv_weights(maps: torch.Tensor) -> torch.Tensor:
    """softmax(−TV) over the second dim: maps P×k×h×w → weights P×k."""
    P, k = maps.shape[:2]
    return (-total_variation(maps.flatten(0, 1)).view(P, k)).softmax(-1)


def tv_fusion(logits: torch.Tensor, selected: torch.Tensor, maps: torch.Tensor, *, resolution: str = "image",
              size: Optional[int] = None, space: FuseSpace = "logits") -> torch.Tensor:
    """A-TPT's TV-weighted ensemble of the kept views → class probabilities P×K.

    logits P×V×K, selected P×k (kept view indices), maps P×V×gh×gw (each view's own normalised
    grid map). resolution "image": the kept maps are upsampled bilinearly to size×size before the
    TV; "grid": TV on the patch grid. space: see rtpt.fuse.
    """
    P = logits.shape[0]
    rows = torch.arange(P, device=logits.device)[:, None]
    kept = maps[rows, selected]                                            # P×k×gh×gw
    if resolution == "image":
        if size is None:
            raise ValueError("tv_fusion at image resolution needs the image size")
        kept = upsample(kept.flatten(0, 1), size).view(*selected.shape, size, size)
    elif resolution != "grid":
        raise ValueError(f"resolution must be one of {TV_RESOLUTIONS}, got {resolution!r}")
    return fuse(tv_weights(kept), logits[rows, selected], space)


@register
class ATPT(TTAProcedure):
    name = "atpt"
    title = "A-TPT"
    summary = "attention-guided AugMix views, per-view entropy, R-TPT (code) or TV-weighted (paper) ensemble"
    Params = ATPTParams

    def _maps(self, clf, x: torch.Tensor) -> torch.Tensor:
        """Normalised rollout maps P×V×gh×gw of images P×V×3×S×S: one batched forward + backward.
        The maps are constants (the input is detached): they only select pixels and weight views."""
        p = self.params
        maps = rollout(clf, x.flatten(0, 1).detach(), mode=p.rollout, rollout_weights=p.rollout_weights)
        return maps.view(*x.shape[:2], *maps.shape[-2:])

    def make_views(self, clf, images, gens) -> ViewSet:
        p = self.params
        per_image = [augmix_views(img, p.n_views, g, use_augmix=p.augmix, crop_scale=(p.crop_scale, 1.0))
                     for img, g in zip(images, gens)]
        bases = torch.stack([v.bases for v in per_image])                     # P×V×3×S×S
        P, V, _, S, _ = bases.shape
        if p.augmix:
            full = upsample(self._maps(clf, bases).flatten(0, 1), S).view(P, V, S, S)
            views = torch.stack([attention_guided_views(v, m, ratio=p.ratio, m_high=p.m_high, m_low=p.m_low,
                                                        mix_source=p.mix_source)
                                 for v, m in zip(per_image, full)])
        else:  # the released code without AugMix (ImageNet): mix = base, so the views are the bases
            views = bases
        # TV weights need each final view's own map; R-TPT fusion needs none
        extra = {"maps": self._maps(clf, views)} if p.fusion == "tv" else {}
        return ViewSet(views, extra)

    def tta_loss(self, sel_logits, text_features):
        return entropy(sel_logits).mean(-1)

    def predict(self, logits, feats, selected, viewset: ViewSet, text_features, scale):
        p = self.params
        if p.fusion == "rtpt":
            return rtpt_fusion(logits, feats, p.top_k, p.temperature, p.space)
        return tv_fusion(logits, selected, viewset.extra["maps"], resolution=p.tv_resolution,
                         size=viewset.views.shape[-1], space=p.space)
