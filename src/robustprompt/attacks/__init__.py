"""Attacks on any nn.Module that maps [0,1] images to logits. Know nothing of training."""
from .autoattack import autoattack
from .base import fixed_text
from .losses import ATTACK_LOSSES, ce_loss, dlr_loss, kl_loss
from .pgd import fgsm, pgd
from .threat import ATTACKS, ThreatModel

__all__ = ["autoattack", "fixed_text", "ATTACK_LOSSES", "ce_loss", "dlr_loss", "kl_loss", "fgsm", "pgd",
           "ATTACKS", "ThreatModel"]
