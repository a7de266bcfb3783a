"""Derivatives of a defence's log-probability along one direction, by autograd and by central
differences — shared by the tests that pin the gradient through a prompt update."""
from __future__ import annotations

from typing import Callable

import torch


class DirectionalCheck:
    """f(z) = Σ_i log run(z)[i, y_i] at x along d: `directional(through)` by autograd (with or
    without the path through the prompt update), `central(h)` by a central difference."""

    def __init__(self, run: Callable[..., torch.Tensor], x: torch.Tensor, d: torch.Tensor, y: torch.Tensor) -> None:
        self.run, self.x, self.d, self.y = run, x, d, y

    def logp(self, z: torch.Tensor, **kw) -> torch.Tensor:
        return self.run(z, **kw).log()[torch.arange(len(self.y)), self.y].sum()

    def directional(self, through: bool) -> float:
        xg = self.x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.logp(xg, differentiable=True, through_update=through), xg)
        return float((grad * self.d).sum())

    def central(self, h: float) -> float:
        with torch.no_grad():
            return float((self.logp(self.x + h * self.d) - self.logp(self.x - h * self.d)) / (2 * h))
