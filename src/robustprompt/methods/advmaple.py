"""Adversarial MaPLe: CE on PGD examples with MaPLe's coupled prompts."""
from ..models import PromptConfig
from .adversarial_ce import AdversarialCE
from .base import register


@register
class AdvMaPLe(AdversarialCE):
    name = "advmaple"
    title = "AdvMaPLe"
    summary = "Adversarial MaPLe: CE on PGD examples with MaPLe's coupled prompts"
    default_prompt = PromptConfig(coupling="coupled", n_ctx=2, depth=9,
                                  text_init_mode="template")  # FAP trainers/advmaple.py: ctx_init = the dataset template
