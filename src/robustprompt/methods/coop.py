"""Context optimisation (Zhou et al. 2022): a learned text context, clean CE."""
from ..models import PromptConfig
from .clean import CleanPromptTuning
from .base import register


@register
class CoOp(CleanPromptTuning):
    name = "coop"
    title = "CoOp"
    summary = "Context optimisation (Zhou et al. 2022): a learned text context, clean CE"
    default_prompt = PromptConfig(coupling="text", n_ctx=16, depth=1)
