"""APT (Li et al., CVPR 2024, "One prompt word is enough"): a learned text context trained with
CE on adversarial examples, generated either against the current prompt ("onthefly") or once
against the frozen zero-shot model with the hand-written prompt ("fixed")."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import PromptConfig, PromptedClassifier
from .base import Method, StepResult, register


@dataclass
class APTParams:
    attack_prompt: str = "onthefly"   # onthefly | fixed

    def __post_init__(self) -> None:
        if self.attack_prompt not in ("onthefly", "fixed"):
            raise ConfigError(f"apt attack_prompt must be onthefly or fixed, got {self.attack_prompt!r}")


@register
class APT(Method):
    name = "apt"
    title = "APT"
    summary = "Adversarial text prompt (APT): CE on PGD examples from the on-the-fly or the fixed prompt"
    default_prompt = PromptConfig(coupling="text", n_ctx=16, depth=1)
    adversarial = True
    Params = APTParams

    def setup(self, clf: PromptedClassifier, make_classifier) -> None:
        self.fixed = make_classifier(PromptConfig()) if self.params.attack_prompt == "fixed" else None

    def step(self, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        txt, _ = clf.encode_text()
        if self.fixed is not None:
            x_adv = self.train_threat.run(self.fixed, x, y)
        else:
            x_adv = self.attack(clf, x, y, txt)
        logits = clf.features(x_adv, text=(txt, None)).logits
        ce = F.cross_entropy(logits, y)
        return StepResult(ce, {"adv_ce": ce}, adv_logits=logits, weights={"adv_ce": 1.0})
