"""Attacks on a test-time defence, and the threat models they belong to.

Threat models (names shared with the engine, records and reports):

* ``nonadaptive`` (the papers' protocol): PGD/AutoAttack against CLIP with the initial prompt,
  computed before any adaptation; the defence then runs on the adversarial image.
* ``adaptive_secret``: the attack goes through the whole defence, but the defender's randomness
  (its view seeds) is secret. The attacker does EOT (Athalye et al. 2018): every step averages the
  loss over ``eot`` fresh view draws of its own, seeded from its attack seeds, the restart, the step
  and the draw — never from the evaluation's view seeds. All draws of a step go through the
  defence in one batched call (the images repeated ``eot`` times, one seed per copy).
* ``adaptive_known``: white-box on a deterministic deployment — every gradient is that of the loss
  of ``procedure.run(x + δ, view_seeds)``, the exact views the evaluation will use. An upper bound
  on attack strength.

The attack (`adaptive_attack`, spec `AdaptiveAttack`): APGD (Croce & Hein, ICML 2020) with its
step-size schedule and momentum, CE or DLR loss, random restarts, and per image the best iterate
over all steps and restarts. ``schedule="pgd"`` is plain PGD with a fixed step ε/4 (sign steps for
ℓ∞, normalised gradient steps for ℓ2), no momentum. APGD follows the released autoattack code:
initial step 2ε, momentum 0.75, checkpoints w_j (`apgd_checkpoints`); at a checkpoint an image's
step is halved and it returns to its best point (and that point's gradient) of the current restart
when its loss went up in at most ρ = 0.75 of the steps since the last checkpoint, or when neither
its step nor its best loss changed since then (not tested at the first checkpoint). The first
window counts against the starting point's loss (the paper's f(x⁽⁰⁾)). Under secret randomness
the losses the schedule compares come from different draws (as in AutoAttack's ``rand`` version).

What is differentiated, and what is held constant (straight-through / constant):

* views: crops and flips are bilinear resamplings (linear in the image, exact gradient); AugMix's
  geometric ops likewise; its quantising pixel ops (posterize, solarize, equalize, autocontrast's
  rounding) are straight-through (identity gradient), in tta.views — their exact derivative is
  zero almost everywhere.
* confident-view selection (top-k lowest entropy): an index set, no useful gradient — the indices
  are constants, the selected views' features are not.
* the prompt update (``through_update=True``, default): differentiated exactly — the tuning loss
  is computed on the non-detached view features and AdamW is run functionally with
  ``create_graph`` (TTAProcedure.tune_copies), so d(prediction)/d(image) includes the path
  image → features → tuning gradient → updated prompt → text features. With the papers' single
  AdamW step from a fresh state that path is small (the first Adam step is ≈ lr·sign(g), whose
  derivative is ≈ 0), but it is exact and grows with more steps. ``through_update=False`` holds the
  tuned prompt constant (the legacy attack's choice).
* A-TPT's attention maps (the top-⌈r·S²⌉ pixel masks and TV weights' maps): computed from detached
  inputs (top-k selections, no useful gradient) — constants.
* R-TPT's reliability weights (top-k neighbours' mean similarity, softmax): differentiated; the
  neighbour indices are a top-k selection, hence constant, their similarities are not.
* MTA's MeanShift: differentiated through every unrolled iteration; the per-image early stops are
  boolean masks (constants).

Losses. The procedures return class probabilities; the losses use log(probabilities) (floored at
the dtype's smallest normal). CE = −log p_y. DLR (Croce & Hein 2020) =
−(l_y − max_{j≠y} l_j) / (l_π1 − l_π3 + 1e-12) on the log-probabilities l; for the procedures that
fuse logits (TPT, C-TPT, R-TPT and A-TPT by default, MTA) log-probabilities are the logits minus a
per-image constant, so this is exactly DLR on the logits; with fewer than 3 classes the denominator
is 1 (the plain margin).

Best iterate. Per image the attack keeps the iterate with the highest score: first the fraction of
the step's view draws on which the defence is fooled (known randomness: 0 or 1 on the evaluation's
own views), then the loss. The first restart starts from ``start`` when one is given (e.g. the
non-adaptive example), which makes it a candidate, so the result is never weaker than ``start`` on
the attacker's own estimate; every other restart starts from a uniformly random point of the
ε-ball (seeded).

`eot_pgd` is the legacy attack (EOT with one draw per step, fixed step, prompt update constant),
kept as the baseline the new one is compared with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..attacks import losses as attack_losses
from ..attacks.base import uniform_noise
from ..attacks.pgd import NORMS, ascent_step, project, random_perturbation
from ..attacks.threat import ThreatModel
from ..errors import ConfigError
from ..models import PromptedClassifier
from .base import TTAProcedure

LOSSES = ("ce", "dlr")
SCHEDULES = ("apgd", "pgd")


# APGD constants (Croce & Hein 2020 and their released autoattack code)
APGD_MOMENTUM = 0.75          # α: weight of the new step against the previous displacement
APGD_RHO = 0.75               # halve when the loss went up in ≤ ρ of the steps since the last checkpoint
APGD_INITIAL_STEP = 2.0       # η⁽⁰⁾ = 2ε


@dataclass(frozen=True)
class AdaptiveAttack:
    """An adaptive attack on a test-time defence (see the module docstring)."""

    steps: int = 100            # iterations per restart
    eot: int = 16               # fresh view sets per step for secret randomness (known: 1, the eval's views)
    loss: str = "ce"            # ce | dlr (margin)
    restarts: int = 1
    schedule: str = "apgd"      # apgd (Croce & Hein 2020 step-size schedule with momentum) | pgd (fixed α = ε/4)
    through_update: bool = True  # differentiate through the prompt update (create_graph)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eot < 1 or self.restarts < 1:
            raise ConfigError(f"adaptive attack needs steps, eot, restarts >= 1 "
                              f"(got {self.steps}, {self.eot}, {self.restarts})")
        if self.loss not in LOSSES:
            raise ConfigError(f"adaptive attack loss must be one of {LOSSES}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"adaptive attack schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def title(self, randomness: str) -> str:
        """'EOT-16 APGD-100' (secret) / 'APGD-100' (known), plus loss and restarts when not default."""
        name = f"{'APGD' if self.schedule == 'apgd' else 'PGD'}-{self.steps}"
        if randomness == "secret":
            name = f"EOT-{self.eot} {name}"
        if self.loss != "ce":
            name += f" {self.loss.upper()}"
        if self.restarts > 1:
            name += f" ×{self.restarts} restarts"
        return name


# ----------------------------------------------------------------------------- seeds

_MASK64 = (1 << 64) - 1


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over the parts): distinct tuples give
    unrelated seeds, so attack draws do not line up with the evaluation's seeds (which are
    image_seed(seed + 1, index), small affine values)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


_SALT_VIEWS, _SALT_START = 0x5EC12E7, 0x57A127


def draw_seeds(attack_seeds: Sequence[int], restart: int, step: int, eot: int) -> list[int]:
    """View seeds of the attacker's own EOT draws at one step: draw-major, eot·B seeds
    (row e·B + i is draw e of image i)."""
    return [_mix(_SALT_VIEWS, s, restart, step, e) for e in range(eot) for s in attack_seeds]


# ----------------------------------------------------------------------------- losses


def log_probs(probs: torch.Tensor) -> torch.Tensor:
    """log of class probabilities, floored at the dtype's smallest normal (no −inf)."""
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def dlr_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR (attacks.losses.dlr_loss); with K < 3 classes, where it is undefined, the plain margin
    −(z_y − max_{j≠y} z_j).  z N×K, y N → N."""
    if z.shape[1] >= 3:
        return attack_losses.dlr_loss(z, y)
    return -(z.gather(1, y[:, None])[:, 0] - z.scatter(1, y[:, None], float("-inf")).max(1).values)


def attack_loss(probs: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-row attack loss (higher = worse for the defence).  probs N×K, y N → N."""
    logp = log_probs(probs)
    # log-probabilities are their own log-softmax, so CE on them is −log p_y
    return attack_losses.ce_loss(logp, y) if loss == "ce" else dlr_loss(logp, y)


# ----------------------------------------------------------------------------- one evaluation


class Evaluation(NamedTuple):
    loss: torch.Tensor     # B, the attack loss (mean over draws)
    fooled: torch.Tensor   # B, the fraction of draws on which the defence is wrong
    grad: torch.Tensor     # B×3×H×W, the gradient of the summed loss w.r.t. the image


def _evaluate(procedure: TTAProcedure, clf: PromptedClassifier, x_adv: torch.Tensor, y: torch.Tensor,
              seeds: Sequence[int], draws: int, spec: AdaptiveAttack, chunk: Optional[int]) -> Evaluation:
    """Loss, fooled fraction and gradient at x_adv (B×3×H×W) over `draws` view sets per image.
    seeds: draws·B view seeds, draw-major. The draws go through the defence `chunk` at a time
    (all at once when None) as one batch of chunk·B images; gradients are summed over chunks."""
    B = x_adv.shape[0]
    per = draws if chunk is None else max(1, min(chunk, draws))
    loss_sum = x_adv.new_zeros(B)
    fooled_sum = x_adv.new_zeros(B)
    grad = torch.zeros_like(x_adv)
    for lo in range(0, draws, per):
        n = min(per, draws - lo)
        xi = x_adv.detach().requires_grad_(True)
        probs = procedure.run(clf, xi.repeat(n, 1, 1, 1), seeds[lo * B:(lo + n) * B], differentiable=True,
                              through_update=spec.through_update)
        yy = y.repeat(n)
        loss = attack_loss(probs, yy, spec.loss)
        (g,) = torch.autograd.grad(loss.sum() / draws, xi)
        grad += g
        with torch.no_grad():
            loss_sum += loss.detach().view(n, B).sum(0)
            fooled_sum += (probs.argmax(1) != yy).to(x_adv.dtype).view(n, B).sum(0)
    return Evaluation(loss_sum / draws, fooled_sum / draws, grad)


# ----------------------------------------------------------------------------- geometry


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * 3))


def _project(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """x_adv into the ε-ball around x, then into [0, 1] (the PGD attack's projection)."""
    return x + project(x_adv - x, x, eps, norm)


def _random_point(x: torch.Tensor, eps: float, norm: str, seeds: Sequence[int]) -> torch.Tensor:
    """A seeded random point of the ε-ball in [0, 1], drawn as the PGD attack's random start."""
    return x + random_perturbation(x, eps, norm, list(seeds))


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD checks its step size: w_j = ⌈p_j·N⌉ with p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) — in the released code's integer form
    (first interval ⌈0.22N⌉ … rather max(⌊0.22N⌋, 1), each next one 0.03N shorter, at least 0.06N)."""
    first, decr, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at, k = [], 0, first
    while at + k <= steps:
        at += k
        points.append(at)
        k = max(k - decr, least)
    return points


# ----------------------------------------------------------------------------- the attack


class _Best:
    """Per image: the best point so far — a higher fooled fraction wins, then a higher loss."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        self.fooled = x.new_full((x.shape[0],), -1.0)
        self.loss = x.new_full((x.shape[0],), -math.inf)

    def offer(self, x: torch.Tensor, ev: Evaluation) -> None:
        better = (ev.fooled > self.fooled) | ((ev.fooled == self.fooled) & (ev.loss > self.loss))
        self.x = torch.where(_per_image(better), x, self.x)
        self.fooled = torch.where(better, ev.fooled, self.fooled)
        self.loss = torch.where(better, ev.loss, self.loss)


def adaptive_attack(procedure: TTAProcedure, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor, *,
                    eps: float, norm: str, spec: AdaptiveAttack, attack_seeds: Sequence[int],
                    view_seeds: Optional[Sequence[int]] = None, start: Optional[torch.Tensor] = None,
                    chunk: Optional[int] = None) -> torch.Tensor:
    """Adaptive attack through the whole defence. x B×3×H×W in [0,1], y B.

    view_seeds given → known randomness: every gradient uses exactly procedure.run(..., view_seeds).
    view_seeds None → secret randomness: each step averages the loss over spec.eot fresh view draws
    seeded from attack_seeds (never the evaluation's). Returns adversarial images (B×3×H×W, within
    the ε-ball and [0,1]); per image the best iterate found (highest attack loss, with a fooled
    defence preferred) over all steps and restarts, and `start` (e.g. the non-adaptive example) is
    a candidate too so the result is never weaker than the start on the attacker's own estimate.
    chunk: draws per batched call of the defence (memory; the result does not depend on it).
    """
    if norm not in NORMS:
        raise ConfigError(f"adaptive attack norm must be one of {NORMS}, got {norm!r}")
    if not eps > 0:
        raise ConfigError(f"adaptive attack needs eps > 0, got {eps}")
    B = x.shape[0]
    if len(attack_seeds) != B or (view_seeds is not None and len(view_seeds) != B):
        raise ValueError(f"need one attack seed (and view seed) per image: {B} images, "
                         f"{len(attack_seeds)} attack seeds, {None if view_seeds is None else len(view_seeds)} view seeds")
    x = x.detach()
    y = y.to(x.device)
    known = view_seeds is not None
    draws = 1 if known else spec.eot

    def evaluate(x_adv: torch.Tensor, restart: int, step: int) -> Evaluation:
        seeds = list(view_seeds) if known else draw_seeds(attack_seeds, restart, step, draws)
        return _evaluate(procedure, clf, x_adv, y, seeds, draws, spec, chunk)

    best = _Best(x if start is None else _project(x, start.detach(), eps, norm))
    for restart in range(spec.restarts):
        if restart == 0 and start is not None:
            x0 = best.x
        else:
            x0 = _random_point(x, eps, norm, [_mix(_SALT_START, s, restart) for s in attack_seeds])
        _run_restart(x, x0, eps, norm, spec, lambda xa, step, r=restart: evaluate(xa, r, step), best)
    return best.x.detach()


def _run_restart(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str, spec: AdaptiveAttack,
                 evaluate, best: _Best) -> None:
    """One APGD (or fixed-step PGD) run from x_adv; offers every iterate to `best`."""
    apgd = spec.schedule == "apgd"
    ev = evaluate(x_adv, -1)
    best.offer(x_adv, ev)
    grad = ev.grad
    step_size = x.new_full((x.shape[0],), (APGD_INITIAL_STEP if apgd else 0.25) * eps)
    # restart-local state of the schedule (APGD returns to the best point of its own run)
    x_best, loss_best, grad_best = x_adv.clone(), ev.loss.clone(), grad.clone()
    losses = [ev.loss]
    checkpoints, last_check = set(apgd_checkpoints(spec.steps)), 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones_like(loss_best, dtype=torch.bool)   # released code: no 2nd test at w_1
    x_old = x_adv.clone()
    for i in range(spec.steps):
        with torch.no_grad():
            z = _project(x, x_adv + _per_image(step_size) * ascent_step(grad, 1.0, norm), eps, norm)
            if apgd and i > 0:
                z = _project(x, x_adv + APGD_MOMENTUM * (z - x_adv) + (1 - APGD_MOMENTUM) * (x_adv - x_old),
                             eps, norm)
            x_old, x_adv = x_adv, z
        ev = evaluate(x_adv, i)
        best.offer(x_adv, ev)
        grad = ev.grad
        if not apgd:
            continue
        losses.append(ev.loss)
        up = ev.loss > loss_best
        x_best = torch.where(_per_image(up), x_adv, x_best)
        grad_best = torch.where(_per_image(up), grad, grad_best)
        loss_best = torch.where(up, ev.loss, loss_best)
        if i + 1 in checkpoints:
            k = i + 1 - last_check
            hist = torch.stack(losses[-(k + 1):])                          # (k+1)×B
            increased = (hist[1:] > hist[:-1]).sum(0)
            oscillating = increased <= APGD_RHO * k
            stalled = ~reduced_last_check & (loss_best_last_check >= loss_best)
            reduce = oscillating | stalled
            reduced_last_check, loss_best_last_check, last_check = reduce, loss_best.clone(), i + 1
            step_size = torch.where(reduce, step_size / 2, step_size)
            x_adv = torch.where(_per_image(reduce), x_best, x_adv)
            grad = torch.where(_per_image(reduce), grad_best, grad)


# ----------------------------------------------------------------------------- legacy


def _step_seeds(seeds: Sequence[int], step: int) -> list[int]:
    return [(int(s) * 7_919 + 104_729 * (step + 1)) % (2**62) for s in seeds]


def eot_pgd(procedure: TTAProcedure, clf: PromptedClassifier, x: torch.Tensor, y: torch.Tensor,
            threat: ThreatModel, seeds: Sequence[int], start: torch.Tensor | None = None) -> torch.Tensor:
    """Legacy: ℓ∞/ℓ2 PGD on the defended prediction (CE on its class probabilities), one fresh view
    draw per step, the threat's fixed step, the prompt update held constant; returns the last iterate."""
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
            delta = project(delta + ascent_step(grad, alpha, threat.norm), x, eps, threat.norm)
    return (x + delta).detach()
