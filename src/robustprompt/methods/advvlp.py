"""Adversarial independent vision-language prompts: CE on PGD examples."""
from ..models import PromptConfig
from .adversarial_ce import AdversarialCE
from .base import register


@register
class AdvVLP(AdversarialCE):
    name = "advvlp"
    title = "AdvVLP"
    summary = "Adversarial independent vision-language prompts: CE on PGD examples"
    default_prompt = PromptConfig(coupling="independent", n_ctx=2, depth=9,
                                  text_init_mode="phrase")  # FAP trainers/advindependentVL.py: CTX_INIT "a photo of a"
