"""FGSM and PGD (Madry et al.) under ℓ∞ or ℓ2, in pixel space [0,1].

The attack differentiates only w.r.t. the perturbation (`torch.autograd.grad`), so it never
touches parameter gradients and can run inside a training step. It does not change the model's
train/eval mode.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError
from .base import fixed_text, normal_noise, uniform_noise
from .losses import get_loss

LossArg = Union[str, Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]]
NORMS = ("linf", "l2")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The perturbation projected into the ε-ball, then so that x + delta stays in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def ascent_step(grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    """The steepest-ascent step of size alpha for a gradient: ℓ∞ alpha·sign(g), ℓ2 alpha·g/‖g‖."""
    return alpha * grad.sign() if norm == "linf" else alpha * grad / _flat_norm(grad)


def random_perturbation(x: torch.Tensor, eps: float, norm: str, seeds: Optional[Sequence[int]],
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A seeded random perturbation inside the ε-ball (ℓ∞: uniform cube; ℓ2: Gaussian direction,
    uniform radius), projected as `project` does. The noise is drawn in float32 (the same draws
    whatever x's dtype) and computed in x's dtype."""
    if norm == "linf":
        delta = (uniform_noise(x.shape, seeds, x.device, generator).to(x.dtype) * 2 - 1) * eps
    else:
        direction = normal_noise(x.shape, seeds, x.device, generator).to(x.dtype)
        direction = direction / _flat_norm(direction)
        radius_seeds = None if seeds is None else [s + 7919 for s in seeds]
        radius = uniform_noise(torch.Size([x.shape[0], 1, 1, 1]), radius_seeds, x.device, generator).to(x.dtype)
        delta = direction * radius * eps
    return project(delta, x, eps, norm)


def _check(eps: float, alpha: float, steps: int, norm: str, restarts: int) -> None:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if eps < 0 or alpha <= 0 and steps > 0:
        raise ConfigError(f"attack needs eps >= 0 and alpha > 0 (got eps={eps}, alpha={alpha})")
    if steps < 0 or restarts < 1:
        raise ConfigError(f"attack needs steps >= 0 and restarts >= 1 (got {steps}, {restarts})")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    *,
    norm: str = "linf",
    loss: LossArg = "ce",
    random_start: bool = True,
    restarts: int = 1,
    clean_logits: Optional[torch.Tensor] = None,
    seeds: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Projected gradient ascent on `loss` within the ε-ball around x.

    x: B×3×H×W in [0,1]; y: B labels. eps/alpha in pixel units (4/255, not 4). Returns x̃ B×3×H×W
    (detached, float32 like x). loss: "ce", "kl" (to the clean prediction), "dlr", or a callable
    (logits, y, clean_logits) → per-example loss. With restarts > 1 each example keeps the
    restart that misclassifies it, else the one with the highest loss. seeds: one integer per
    example for the random start, making results independent of batching. precision: "fp32", or
    "bf16" to run the model's forwards and backwards under bf16 autocast (cheaper on GPUs, a
    possibly weaker attack; the loss, the step and the projection stay fp32). ℓ2: eps is the radius
    of δ's norm over all of an image's pixels and channels (3.0, as torchattacks and AutoAttack).
    """
    _check(eps, alpha, steps, norm, restarts)
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"unknown attack precision {str(precision)[:40]!r}; choose one of fp32, bf16")
    loss_fn = get_loss(loss) if isinstance(loss, str) else loss
    x = x.detach()
    y = y.detach()
    # fp32 switches off any autocast around the call (a bf16 training step's): attacks stay fp32
    # unless asked; with no autocast around, disabling it changes nothing
    amp = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with fixed_text(model):
        if clean_logits is None and (loss == "kl"):
            with torch.no_grad(), amp:
                clean_logits = model(x).float()
        best_x, best_loss, best_wrong = x.clone(), None, None
        for r in range(restarts):
            run_seeds = None if seeds is None else [int(s) * 1009 + r for s in seeds]
            delta = random_perturbation(x, eps, norm, run_seeds, generator) if random_start else torch.zeros_like(x)
            for _ in range(steps):
                delta.requires_grad_(True)
                with amp:
                    logits = model(x + delta).float()
                obj = loss_fn(logits, y, clean_logits).sum()
                (grad,) = torch.autograd.grad(obj, delta)
                with torch.no_grad():
                    delta = project(delta.detach() + ascent_step(grad, alpha, norm), x, eps, norm)
            x_adv = (x + delta.detach()).clamp(0.0, 1.0)
            if restarts == 1:
                return x_adv
            with torch.no_grad(), amp:
                logits = model(x_adv).float()
            cur_loss = loss_fn(logits, y, clean_logits)
            cur_wrong = logits.argmax(dim=1) != y
            if best_loss is None:
                best_x, best_loss, best_wrong = x_adv, cur_loss, cur_wrong
            else:
                better = (cur_wrong & ~best_wrong) | ((cur_wrong == best_wrong) & (cur_loss > best_loss))
                best_x = torch.where(better.view(-1, 1, 1, 1), x_adv, best_x)
                best_loss = torch.where(better, cur_loss, best_loss)
                best_wrong = best_wrong | cur_wrong
        return best_x


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
         loss: LossArg = "ce", clean_logits: Optional[torch.Tensor] = None,
         precision: str = "fp32") -> torch.Tensor:
    """One gradient step of size eps from x (no random start)."""
    return pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm=norm, loss=loss,
               random_start=False, clean_logits=clean_logits, precision=precision)
