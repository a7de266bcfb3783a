"""Independent vision-language prompts, clean CE."""
from ..models import PromptConfig
from .clean import CleanPromptTuning
from .base import register


@register
class IVLP(CleanPromptTuning):
    name = "ivlp"
    title = "IVLP"
    summary = "Independent vision-language prompts, clean CE"
    default_prompt = PromptConfig(coupling="independent", n_ctx=2, depth=9,
                                  text_init_mode="phrase")  # MaPLe repo trainers/independentVL.py: CTX_INIT "a photo of a"
