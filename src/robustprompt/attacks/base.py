"""Shared pieces of the attacks: fixed-text context and seeded random starts."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Sequence

import torch
from torch import nn


@contextmanager
def fixed_text(model: nn.Module) -> Iterator[None]:
    """Inside an attack the class texts never change: a model that can pin its text features
    (`static_text()`, as `PromptedClassifier` does) computes them once for all steps."""
    pin = getattr(model, "static_text", None)
    with (pin() if callable(pin) else nullcontext()):
        yield


def uniform_noise(shape: torch.Size, seeds: Optional[Sequence[int]], device: torch.device,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """U[0,1) noise of `shape` (B×…). With per-example seeds, row i depends only on seeds[i], so
    results do not depend on how images are batched or sharded."""
    if seeds is None:
        return torch.rand(shape, generator=generator, device="cpu").to(device)
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.rand(shape[1:], generator=g))
    return torch.stack(rows).to(device)


def normal_noise(shape: torch.Size, seeds: Optional[Sequence[int]], device: torch.device,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if seeds is None:
        return torch.randn(shape, generator=generator, device="cpu").to(device)
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.randn(shape[1:], generator=g))
    return torch.stack(rows).to(device)
