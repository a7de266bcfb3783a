"""MTA (Zanella & Ben Ayed, CVPR 2024): no prompt tuning; a robust MeanShift over the view
embeddings finds their mode, with an inlierness score per view optimised jointly.

Per image, with V views x_1..x_V (L2-normalised image features; x_1 = the test image itself) and
their zero-shot class probabilities p_s = softmax(scale · x_s·T) under the initial prompt:

* affinity   A = P Pᵀ (V×V): A_st = p_s·p_t, how much two views agree on the class.
* bandwidth  per view s, fixed once before any iteration:
             h_s² = 0.5 · mean of ‖x_s − x_t‖² over its k = ⌊0.3·(V − 1)⌋ nearest other views,
             and K_s(m) = exp(−‖x_s − m‖² / (2 h_s²)) (so the exponent is ‖x_s − m‖² divided by
             that mean squared k-NN distance).
* inlierness y on the simplex, uniform at start; mode m = x_1 at start. Each outer iteration:
    inlierness step: with the density d_s = K_s(m) at the current mode, repeat
                     y ← softmax((d + λ_q · A y) / λ_y)          (λ_q = 4, λ_y = 0.2)
                     up to `inner_steps` times, stopping early once ‖Δy‖₂ < tol;
    mode step:       repeat m ← normalise(Σ_s y_s K_s(m) x_s / Σ_s y_s K_s(m))
                     up to `mode_steps` times, stopping early once ‖Δm‖₂ < tol.
  `outer_steps` (5) outer iterations, always all of them (no outer stopping test).
* prediction: the mode's zero-shot logits scale · m·T (returned here as their softmax).

λ_q weighs the quadratic (view-affinity) term and λ_y the entropy barrier: the inlierness update is
the fixed point of maximising Σ_s y_s d_s + (λ_q/2)·yᵀAy − λ_y Σ_s y_s log y_s over the simplex.
Everything above — the update, the bandwidth rule, the 5/5/5 iteration counts, the 1e-6
tolerance and the initialisation — follows the authors' released code (MaxZanella/MTA, mta.py:
`solve_mta`, `gaussian_kernel`; the hyper-parameter names and roles from main.py's arguments).
Two guards the released code lacks, each only where it would produce NaN: k is at least 1 (the
code's k is 0 for V ≤ 4) and h² is floored at a tiny positive value (identical views).

MTA's released main.py builds its views with `augmix=(len(set_id)>1 and args.tpt)`, False for an
`--mta` run: random resized crops + flips only, on every dataset. MTAParams.augmix is therefore
False by default; `augmix: true` selects TPT's AugMix views.

All images of a batch are solved at once (P×V×D tensors); the early stops are per image (a
converged image's y or m is frozen while the others keep iterating), as in a per-image loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import TTAParams, TTAProcedure, ViewSet, register


@dataclass
class MTAParams(TTAParams):
    lambda_y: float = 0.2         # entropy-barrier weight (the softmax temperature of y)
    lambda_q: float = 4.0         # quadratic affinity-term weight
    outer_steps: int = 5
    inner_steps: int = 5          # inlierness updates per outer step (at most)
    mode_steps: int = 5           # mean-shift updates per outer step (at most)
    tol: float = 1e-6             # early stop of the inner loops on ‖Δy‖₂ / ‖Δm‖₂
    knn_ratio: float = 0.3        # bandwidth from the ⌊ratio·(V−1)⌋ nearest other views
    steps: int = 0                # no prompt tuning
    augmix: bool = False          # MTA's released code: crops + flips only, every dataset

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambda_y <= 0 or self.lambda_q < 0:
            raise ConfigError(f"mta needs lambda_y > 0 and lambda_q >= 0 "
                              f"(got {self.lambda_y}, {self.lambda_q})")
        if min(self.outer_steps, self.inner_steps, self.mode_steps) < 1 or self.tol < 0:
            raise ConfigError("mta needs outer_steps, inner_steps, mode_steps >= 1 and tol >= 0 (got "
                              f"{self.outer_steps}, {self.inner_steps}, {self.mode_steps}, {self.tol})")
        if not 0 < self.knn_ratio <= 1:
            raise ConfigError(f"mta knn_ratio must be in (0, 1], got {self.knn_ratio}")


class MeanShiftResult(NamedTuple):
    mode: torch.Tensor            # P×D, unit norm
    inlierness: torch.Tensor      # P×V, rows on the simplex


def kernel_bandwidth(feats: torch.Tensor, knn_ratio: float = 0.3) -> torch.Tensor:
    """Per-view squared bandwidth h² (P×V) from feats P×V×D:
    h_s² = 0.5 · mean squared distance from x_s to its k = max(1, ⌊knn_ratio·(V−1)⌋) nearest
    other views (V = 1: no neighbours, h² = 1)."""
    V = feats.shape[1]
    if V == 1:
        return feats.new_ones(feats.shape[:2])
    k = min(V - 1, max(1, int(knn_ratio * (V - 1))))
    d2 = torch.cdist(feats, feats).square()                                   # P×V×V
    # drop the smallest entry of each row (the view itself, at distance 0), keep the next k
    nearest = d2.topk(k + 1, dim=-1, largest=False).values[..., 1:]
    return (0.5 * nearest.mean(-1)).clamp_min(torch.finfo(feats.dtype).tiny)


def gaussian_density(feats: torch.Tensor, mode: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """K_s(m) = exp(−‖x_s − m‖² / (2 h_s²)).  feats P×V×D, mode P×D, h2 P×V → P×V."""
    return torch.exp(-(feats - mode[:, None]).square().sum(-1) / (2 * h2))


def inlierness_step(y: torch.Tensor, density: torch.Tensor, affinity: torch.Tensor,
                    lambda_y: float, lambda_q: float) -> torch.Tensor:
    """One update y ← softmax((d + λ_q·A y) / λ_y).  y, density P×V; affinity P×V×V → P×V."""
    return ((density + lambda_q * (affinity @ y[..., None])[..., 0]) / lambda_y).softmax(-1)


def mode_step(feats: torch.Tensor, mode: torch.Tensor, y: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """One weighted mean-shift step, renormalised.  feats P×V×D, mode P×D, y/h2 P×V → P×D."""
    w = y * gaussian_density(feats, mode, h2)
    # the released code divides by Σw without a floor; the floor only matters if every kernel
    # value underflows, where it keeps the mode finite instead of NaN
    shifted = (w[..., None] * feats).sum(1) / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return F.normalize(shifted, dim=-1)


def _iterate(state: torch.Tensor, step, n: int, tol: float) -> torch.Tensor:
    """Apply `step` up to n times per image (rows of state), freezing an image once its update
    moved it by less than tol (‖Δ‖₂), like a per-image `while` loop with that stopping rule."""
    active = torch.ones(state.shape[0], dtype=torch.bool, device=state.device)
    for _ in range(n):
        new = step(state)
        moved = (new - state).norm(dim=-1)
        state = torch.where(active[:, None], new, state)
        active = active & (moved >= tol)
        if not bool(active.any()):
            break
    return state


def meanshift_mode(feats: torch.Tensor, probs: torch.Tensor, lambda_y: float = 0.2, lambda_q: float = 4.0,
                   outer_steps: int = 5, inner_steps: int = 5, mode_steps: int = 5, tol: float = 1e-6,
                   knn_ratio: float = 0.3) -> MeanShiftResult:
    """MTA's robust MeanShift. feats P×V×D (L2-normalised, view 0 = the test image), probs P×V×K
    (the views' zero-shot class probabilities) → mode P×D (unit norm) and inlierness y P×V."""
    P, V, _ = feats.shape
    affinity = probs @ probs.transpose(1, 2)                                   # P×V×V
    h2 = kernel_bandwidth(feats, knn_ratio)                                    # fixed once
    y = feats.new_full((P, V), 1.0 / V)
    mode = feats[:, 0]
    for _ in range(outer_steps):
        density = gaussian_density(feats, mode, h2)
        y = _iterate(y, lambda y_: inlierness_step(y_, density, affinity, lambda_y, lambda_q), inner_steps, tol)
        mode = _iterate(mode, lambda m: mode_step(feats, m, y, h2), mode_steps, tol)
    return MeanShiftResult(mode, y)


@register
class MTA(TTAProcedure):
    name = "mta"
    title = "MTA"
    summary = "no prompt tuning: robust MeanShift mode of the view embeddings with inlierness scores"
    tunes_prompt = False
    Params = MTAParams

    def solve(self, logits: torch.Tensor, feats: torch.Tensor) -> MeanShiftResult:
        """The MeanShift of P images: logits P×V×K (zero-shot, initial prompt), feats P×V×D."""
        p = self.params
        return meanshift_mode(feats, logits.softmax(-1), p.lambda_y, p.lambda_q, p.outer_steps,
                              p.inner_steps, p.mode_steps, p.tol, p.knn_ratio)

    def predict(self, logits, feats, selected, viewset: ViewSet, text_features, scale):
        mode = self.solve(logits, feats).mode
        return (scale * (mode[:, None, :] * text_features).sum(-1)).softmax(-1)
