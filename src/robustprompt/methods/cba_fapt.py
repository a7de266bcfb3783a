"""CBA-FAPT (Feng et al., AAAI 2026): few-shot adversarial prompt tuning regularised by the
alignment of cross-modal bidirectional attribution maps between clean and adversarial images.

loss = L_nat + α·L_adv + β·L_VAA + γ·L_TAA
  L_nat, L_adv  cross-entropy on x and on x̃ (PGD, maximising CE)
  L_VAA         mean_b ‖A_v(x_b) − A_v(x̃_b)‖₂, visual maps of the true class (attribution.cba)
  L_TAA         mean_b KL(softmax A_t(x_b) ‖ softmax A_t(x̃_b)) over the prompt's tokens 0…EOT

The maps' channel weights are gradients; they are taken with create_graph=True, but only the last
block's tail lies between the score and the attention output, so the extra cost is small.
The textual map, which the paper leaves open, is built like the visual one at the last text
block's EOT token over the true class's prompt; an image changes it only through the score
gradient w (see attribution/cba.py), and it becomes a distribution by a softmax over tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attribution.cba import matching_score, text_attribution, vision_attribution
from ..errors import ConfigError
from ..models import PromptConfig, PromptedClassifier, TraceSpec
from .base import Method, StepResult, register

LAST_BLOCK = TraceSpec(blocks=(-1,))


@dataclass
class CBAFAPTParams:
    alpha: float = 5.0
    beta: float = 0.05
    gamma: float = 0.03
    heads: str = "per_head"      # per_head | concat: how the forward cosine weights treat heads

    def __post_init__(self) -> None:
        if self.heads not in ("per_head", "concat"):
            raise ConfigError(f"cba_fapt heads must be per_head or concat, got {self.heads!r}")


def masked_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(softmax p ‖ softmax q) over the valid tokens of each row, B. Masked tokens get a large
    finite negative logit, not −inf: −inf − (−inf) would turn the masked gradients into NaN."""
    lp = p_logits.masked_fill(~valid, -1e9).log_softmax(-1)
    lq = q_logits.masked_fill(~valid, -1e9).log_softmax(-1)
    return (lp.exp() * (lp - lq) * valid).sum(-1)


@register
class CBAFAPT(Method):
    name = "cba_fapt"
    title = "CBA-FAPT"
    summary = "CBA-FAPT: L_nat + α·L_adv + β·L_VAA + γ·L_TAA with bidirectional attribution alignment"
    default_prompt = PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=9)
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
        l_taa = masked_kl(t_clean, t_adv, valid).mean()

        loss = l_nat + p.alpha * l_adv + p.beta * l_vaa + p.gamma * l_taa
        return StepResult(loss, {"nat": l_nat, "adv": l_adv, "vaa": l_vaa, "taa": l_taa},
                          clean_logits=clean.logits, adv_logits=adv.logits)
