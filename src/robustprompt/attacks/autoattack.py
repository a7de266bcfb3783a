"""AutoAttack through the PyPI package `pyautoattack` (the official AutoAttack is git-only)."""
from __future__ import annotations

import logging
from importlib.metadata import version as pkg_version
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import fixed_text

_NORMS = {"linf": "Linf", "l2": "L2"}


def autoattack_info(norm: str = "linf", version: str = "standard", n_classes: int | None = None) -> dict[str, Any]:
    """What a result records about the AutoAttack that ran."""
    info: dict[str, Any] = {"package": "pyautoattack", "package_version": pkg_version("pyautoattack"),
                            "version": version, "norm": norm}
    if version == "standard":
        info["attacks"] = ["apgd-ce", "apgd-t", "fab-t", "square"]
        if n_classes is not None:
            info["n_target_classes"] = min(9, n_classes - 1)
    return info


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
               version: str = "standard", seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """AutoAttack ("standard": APGD-CE, APGD-T, FAB-T, Square). x B×3×H×W in [0,1] → x̃.

    With fewer than 10 classes the targeted attacks get n_classes − 1 targets instead of 9
    (the package default would index past the logits). Needs at least 4 classes, since the
    targeted DLR loss uses the 4th-largest logit.
    """
    from pyautoattack import AutoAttack

    if norm not in _NORMS:
        raise ConfigError(f"AutoAttack norm must be one of {', '.join(_NORMS)}, got {norm!r}")
    with fixed_text(model):
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        if version == "standard" and n_classes < 4:
            raise ConfigError(f"AutoAttack 'standard' needs at least 4 classes (its targeted DLR loss "
                              f"uses the 4th-largest logit); this task has {n_classes}. Use PGD instead.")
        adversary = AutoAttack(model, norm=_NORMS[norm], eps=eps, version=version, seed=seed,
                               device=x.device)
        if version == "standard":
            adversary.apgd_targeted.n_target_classes = min(9, n_classes - 1)
            adversary.fab.n_target_classes = min(9, n_classes - 1)
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.detach()
