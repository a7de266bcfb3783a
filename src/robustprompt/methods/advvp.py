"""Adversarial visual prompting (Mao et al. 2022): CE on PGD examples."""
from ..models import PromptConfig
from .adversarial_ce import AdversarialCE
from .base import register


@register
class AdvVP(AdversarialCE):
    name = "advvp"
    title = "AdvVP"
    summary = "Adversarial visual prompting (Mao et al. 2022): CE on PGD examples"
    default_prompt = PromptConfig(coupling="vision", n_ctx=2, depth=9)
