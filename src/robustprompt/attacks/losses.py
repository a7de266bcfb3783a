"""Per-example attack objectives (larger = more adversarial). logits B×K → B."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

ATTACK_LOSSES = ("ce", "kl", "dlr")


def ce_loss(logits: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def kl_loss(logits: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p(x) ‖ p(x̃)) with p(x) from the clean logits (TRADES / FAP training attack)."""
    if clean_logits is None:
        raise ConfigError("the kl attack loss needs the clean logits")
    p_clean = clean_logits.softmax(dim=-1)
    return (p_clean * (clean_logits.log_softmax(dim=-1) - logits.log_softmax(dim=-1))).sum(dim=-1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3)."""
    if logits.shape[1] < 3:
        raise ConfigError(f"the dlr loss needs at least 3 classes, got {logits.shape[1]}")
    z_sorted, idx_sorted = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = idx_sorted[:, 0] == y
    z_other = torch.where(top_is_y, z_sorted[:, 1], z_sorted[:, 0])
    return -(z_y - z_other) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


LOSSES = {"ce": ce_loss, "kl": kl_loss, "dlr": dlr_loss}


def get_loss(name: str):
    if name not in LOSSES:
        raise ConfigError(f"unknown attack loss {name!r}; choose one of {', '.join(ATTACK_LOSSES)}")
    return LOSSES[name]
