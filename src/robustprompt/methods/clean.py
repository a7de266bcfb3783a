"""Clean prompt tuning: cross-entropy on natural images (CoOp, VPT, IVLP, MaPLe share it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import PromptedClassifier
from .base import Method, StepResult


class CleanPromptTuning(Method):
    adversarial = False

    def step(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        logits = clf(x)
        ce = F.cross_entropy(logits, y)
        return StepResult(ce, {"ce": ce}, clean_logits=logits, weights={"ce": 1.0})
