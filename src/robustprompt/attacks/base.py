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


def _seeded(shape: torch.Size, seeds: Optional[Sequence[int]], device: torch.device,
            generator: Optional[torch.Generator], fill: str) -> torch.Tensor:
    out = torch.empty(shape, device=device)
    if seeds is None:
        if generator is not None and generator.device != out.device:
            return _seeded(shape, None, torch.device("cpu"), generator, fill).to(device)
        return out.uniform_(generator=generator) if fill == "uniform" else out.normal_(generator=generator)
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    # one generator on the images' own device, reseeded per row: no host-side noise, no copy
    g = torch.Generator(device=device)
    for row, s in zip(out, seeds):
        g.manual_seed(int(s))
        row.uniform_(generator=g) if fill == "uniform" else row.normal_(generator=g)
    return out


def uniform_noise(shape: torch.Size, seeds: Optional[Sequence[int]], device: torch.device,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """U[0,1) noise of `shape` (B×…). With per-example seeds, row i depends only on seeds[i] (and
    the device type), so results do not depend on how images are batched or sharded."""
    return _seeded(shape, seeds, device, generator, "uniform")


def normal_noise(shape: torch.Size, seeds: Optional[Sequence[int]], device: torch.device,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    return _seeded(shape, seeds, device, generator, "normal")
