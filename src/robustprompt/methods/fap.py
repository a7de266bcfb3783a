"""FAP (Zhou et al., NeurIPS 2024): few-shot adversarial prompt learning.

loss = CE(x) + λ₁ · mean_b[ KL(p(x) ‖ p(x̃)) · (1 + cos(f(x), f(x̃))) ]
with f the (normalised) image features; the training attack maximises the KL term. The second
factor makes consistent multi-modal predictions and differentiated visual features pull together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import PromptConfig, PromptedClassifier
from .base import Method, StepResult, register


@dataclass
class FAPParams:
    lam1: float = 1.5


def kl_per_example(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """KL(p(x) ‖ p(x̃)) per example, B."""
    return (clean_logits.softmax(-1) * (clean_logits.log_softmax(-1) - adv_logits.log_softmax(-1))).sum(-1)


@register
class FAP(Method):
    name = "fap"
    title = "FAP"
    summary = "FAP: clean CE + λ₁·KL(p(x)‖p(x̃))·(1 + cos(f(x), f(x̃))), KL-maximising attack"
    default_prompt = PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=9,
                                  text_init_mode="template")  # FAP trainers/fap.py: ctx_init = the dataset template
    adversarial = True
    attack_loss = "kl"
    Params = FAPParams

    def step(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        txt, _ = clf.encode_text()
        clean = clf.features(x, text=(txt, None))
        x_adv = self.attack(clf, x, y, txt, clean_logits=clean.logits.detach())
        adv = clf.features(x_adv, text=(txt, None))
        ce = F.cross_entropy(clean.logits, y)
        kl = kl_per_example(clean.logits, adv.logits)
        cos = (clean.image_features * adv.image_features).sum(-1)
        reg = (kl * (1 + cos)).mean()
        return StepResult.weighted({"ce": ce, "kl_cos": reg}, {"ce": 1.0, "kl_cos": self.params.lam1},
                                   clean_logits=clean.logits, adv_logits=adv.logits)
