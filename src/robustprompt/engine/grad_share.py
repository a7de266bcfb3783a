"""Which loss terms actually move the prompts: each weighted term's share of the gradient.

A regulariser can be right in form and dead in number (a KL between two near-uniform
distributions, a map difference six orders of magnitude below the cross-entropy). The loss value
does not show it; the gradient does. For loss = Σ_k w_k·L_k over trainable parameters θ:

    norm_k  = ‖∇_θ (w_k·L_k)‖₂          (all parameters concatenated)
    share_k = norm_k / Σ_j norm_j

The training engine records these on the first step of every epoch (`grad_weight.<term>`,
`grad_norm.<term>`, `grad_share.<term>` in the epoch's summary); `benchmarks/grad_shares.py` tabulates them for every
method on the demo backbone and on a random-init ViT-B/32.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..methods.base import StepResult


def gradient_norms(result: StepResult, params: Sequence[torch.nn.Parameter]) -> dict[str, float]:
    """‖∇_θ (w_k·L_k)‖₂ for each weighted term of `result` (its graph is kept for the step's
    own backward). A term that does not reach θ has norm 0."""
    params = [p for p in params if p.requires_grad]
    out: dict[str, float] = {}
    for name, weight in result.weights.items():
        term = result.terms[name]
        if not isinstance(term, torch.Tensor) or not term.requires_grad or weight == 0:
            out[name] = 0.0
            continue
        grads = torch.autograd.grad(float(weight) * term, params, retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
        out[name] = math.sqrt(sq)
    return out


def gradient_shares(norms: dict[str, float]) -> dict[str, float]:
    """norm_k / Σ_j norm_j (all zeros when nothing has a gradient)."""
    total = sum(norms.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in norms.items()}


def share_record(result: StepResult, params: Sequence[torch.nn.Parameter]) -> dict[str, float]:
    """Flat summary keys: grad_weight.<term> (w_k), grad_norm.<term> and grad_share.<term>."""
    norms = gradient_norms(result, params)
    shares = gradient_shares(norms)
    return {**{f"grad_weight.{k}": float(w) for k, w in result.weights.items()},
            **{f"grad_norm.{k}": v for k, v in norms.items()},
            **{f"grad_share.{k}": v for k, v in shares.items()}}
