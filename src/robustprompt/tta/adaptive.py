"""Attacks on a test-time defence.

non-adaptive (the papers' protocol): PGD against CLIP with the initial prompt, computed before any
adaptation; the defence then runs on the adversarial image.

adaptive: EOT-PGD through the defence — every step draws fresh random views of the current
adversarial image and differentiates the defended prediction through the view generation
(crops, flips, AugMix mixing; straight-through for quantising ops), the view features and the
ensemble weights. The tuned prompt is recomputed from the current image at every step but enters
as a constant: its one AdamW step from a fresh state moves every coordinate by ≈ lr·sign(g), whose
derivative is zero almost everywhere, so differentiating through it would add nothing. A-TPT's
attention masks are likewise recomputed every step and held constant (top-k selections). The
attack starts from the non-adaptive example and each image keeps whichever of the two the defence
gets wrong (worst case), so it is never weaker than the papers' protocol.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..attacks.base import uniform_noise
from ..attacks.threat import ThreatModel
from ..errors import ConfigError
from ..models import PromptedClassifier
from .base import TTAProcedure


def _step_seeds(seeds: Sequence[int], step: int) -> list[int]:
    return [(int(s) * 7_919 + 104_729 * (step + 1)) % (2**62) for s in seeds]


def eot_pgd(procedure: TTAProcedure, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor,
            threat: ThreatModel, seeds: Sequence[int], start: torch.Tensor | None = None) -> torch.Tensor:
    """ℓ∞/ℓ2 PGD on the defended prediction (CE on its class probabilities), fresh views each step."""
    if threat.attack not in ("pgd", "fgsm"):
        raise ConfigError(f"adaptive attacks on a test-time defence support pgd and fgsm, not {threat.attack}")
    eps, steps = threat.eps, (1 if threat.attack == "fgsm" else threat.steps)
    alpha = eps if threat.attack == "fgsm" else threat.step_size
    if start is not None:
        delta = (start - x).detach()
    elif threat.random_start and threat.attack == "pgd":
        delta = (uniform_noise(x.shape, list(seeds), x.device) * 2 - 1) * eps
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    for step in range(steps):
        delta.requires_grad_(True)
        probs = procedure.run(clf, x + delta, _step_seeds(seeds, step), differentiable=True)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            if threat.norm == "linf":
                delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
            else:
                g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                delta = delta + alpha * g
                delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()
