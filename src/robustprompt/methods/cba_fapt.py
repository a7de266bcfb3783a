"""CBA-FAPT (Feng et al., AAAI 2026): few-shot adversarial prompt tuning regularised by the
alignment of cross-modal bidirectional attribution maps between clean and adversarial images.

loss = L_nat + α·L_adv + β·L_VAA + γ·L_TAA
  L_nat, L_adv  cross-entropy on x and on x̃ (PGD, maximising CE)
  L_VAA         mean_b ‖A_v(x_b) − A_v(x̃_b)‖₂, visual maps of the true class (attribution.cba)
  L_TAA         mean_b KL(P_t(x_b) ‖ P_t(x̃_b)), P_t the textual map as a distribution over the
                prompt's tokens 0…EOT

The maps' channel weights are gradients; they are taken with create_graph=True, but only the last
block's tail lies between the score and the attention output, so the extra cost is small.
The textual map, which the paper leaves open, is built like the visual one at the last text
block's EOT token over the true class's prompt; an image changes it only through the score
gradient w (see attribution/cba.py). It becomes a distribution by a softmax of the map
*standardised* over its tokens (`text_norm="standardize"`, τ = `text_temperature` = 1): a softmax
of the raw map (`text_norm="none"`, selectable) is uniform on every backbone we measured, because
|A_t| ~ 1e-2, which leaves L_TAA ≈ 1e-7 and its gradient ~1e-8 — the γ term would be dead.
The forward weights are the paper's Eq. 6, one cosine over all heads (`heads="concat"`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attribution.cba import TEXT_NORMS, matching_score, text_attribution, text_logits, vision_attribution
from ..errors import ConfigError
from ..models import PromptConfig, PromptedClassifier, TraceSpec
from .base import Method, StepResult, register

LAST_BLOCK = TraceSpec(blocks=(-1,))


@dataclass
class CBAFAPTParams:
    alpha: float = 5.0
    beta: float = 0.05
    gamma: float = 0.03
    heads: str = "concat"           # concat (Eq. 6: one cosine over all heads) | per_head
    text_norm: str = "standardize"  # how the textual map becomes a distribution: standardize | none
    text_temperature: float = 1.0   # τ of that softmax

    def __post_init__(self) -> None:
        if self.heads not in ("per_head", "concat"):
            raise ConfigError(f"cba_fapt heads must be per_head or concat, got {self.heads!r}")
        if self.text_norm not in TEXT_NORMS:
            raise ConfigError(f"cba_fapt text_norm must be one of {', '.join(TEXT_NORMS)}, got {self.text_norm!r}")
        if not self.text_temperature > 0:
            raise ConfigError(f"cba_fapt text_temperature must be > 0, got {self.text_temperature}")


def textual_alignment(t_clean: torch.Tensor, t_adv: torch.Tensor, valid: torch.Tensor, *,
                      norm: str = "standardize", temperature: float = 1.0) -> torch.Tensor:
    """L_TAA per image, B: KL(P_t(x) ‖ P_t(x̃)) over each prompt's valid tokens. text_logits gives
    masked tokens a large finite logit (probability 0, no −inf − −inf NaN in the gradient)."""
    lp = text_logits(t_clean, valid, norm=norm, temperature=temperature).log_softmax(-1)
    lq = text_logits(t_adv, valid, norm=norm, temperature=temperature).log_softmax(-1)
    return (lp.exp() * (lp - lq) * valid).sum(-1)


@register
class CBAFAPT(Method):
    name = "cba_fapt"
    title = "CBA-FAPT"
    summary = "CBA-FAPT: L_nat + α·L_adv + β·L_VAA + γ·L_TAA with bidirectional attribution alignment"
    default_prompt = PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=9, text_init_mode="template")  # as FAP's code
    adversarial = True
    Params = CBAFAPTParams

    def step(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        p = self.params
        txt, ttrace = clf.encode_text(LAST_BLOCK)
        x_adv = self.attack(clf, x, y, txt)
        clean = clf.features(x, vision_trace=LAST_BLOCK, text=(txt, ttrace))
        adv = clf.features(x_adv, vision_trace=LAST_BLOCK, text=(txt, ttrace))
        l_nat = F.cross_entropy(clean.logits, y)
        l_adv = F.cross_entropy(adv.logits, y)

        a_clean = vision_attribution(matching_score(clean.image_features, txt, y), clean.vision,
                                     heads=p.heads, create_graph=True)
        a_adv = vision_attribution(matching_score(adv.image_features, txt, y), adv.vision,
                                   heads=p.heads, create_graph=True)
        l_vaa = (a_clean - a_adv).flatten(1).norm(dim=1).mean()

        t_clean, valid = text_attribution(clf.model, ttrace, clean.image_features, y, heads=p.heads,
                                          create_graph=True)
        t_adv, _ = text_attribution(clf.model, ttrace, adv.image_features, y, heads=p.heads, create_graph=True)
        l_taa = textual_alignment(t_clean, t_adv, valid, norm=p.text_norm, temperature=p.text_temperature).mean()

        weights = {"nat": 1.0, "adv": p.alpha, "vaa": p.beta, "taa": p.gamma}
        terms = {"nat": l_nat, "adv": l_adv, "vaa": l_vaa, "taa": l_taa}
        return StepResult.weighted(terms, weights, clean_logits=clean.logits, adv_logits=adv.logits)
