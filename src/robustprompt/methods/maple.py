"""Multi-modal prompt learning (Khattak et al. 2023): vision prompts projected from text prompts, clean CE."""
from ..models import PromptConfig
from .clean import CleanPromptTuning
from .base import register


@register
class MaPLe(CleanPromptTuning):
    name = "maple"
    title = "MaPLe"
    summary = "Multi-modal prompt learning (Khattak et al. 2023): vision prompts projected from text prompts, clean CE"
    default_prompt = PromptConfig(coupling="coupled", n_ctx=2, depth=9,
                                  text_init_mode="phrase")  # MaPLe trainers/maple.py: CTX_INIT "a photo of a"
