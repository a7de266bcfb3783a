"""Deep visual prompt tuning (Jia et al. 2022), clean CE."""
from ..models import PromptConfig
from .clean import CleanPromptTuning
from .base import register


@register
class VPT(CleanPromptTuning):
    name = "vpt"
    title = "VPT"
    summary = "Deep visual prompt tuning (Jia et al. 2022), clean CE"
    default_prompt = PromptConfig(coupling="vision", n_ctx=2, depth=9)
