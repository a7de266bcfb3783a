"""Adversarial prompt tuning with cross-entropy on PGD examples (AdvVP, AdvVLP, AdvMaPLe)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import PromptedClassifier
from .base import Method, StepResult


class AdversarialCE(Method):
    adversarial = True

    def step(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        txt, _ = clf.encode_text()
        x_adv = self.attack(clf, x, y, txt)
        logits = clf.features(x_adv, text=(txt, None)).logits
        ce = F.cross_entropy(logits, y)
        return StepResult(ce, {"adv_ce": ce}, adv_logits=logits, weights={"adv_ce": 1.0})
