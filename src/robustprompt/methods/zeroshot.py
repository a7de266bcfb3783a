"""Zero-shot CLIP: the hand-written prompt, nothing trained."""
from ..models import PromptConfig
from .base import Method, register


@register
class ZeroShot(Method):
    name = "zeroshot"
    title = "zero-shot CLIP"
    summary = "Zero-shot CLIP with the dataset's hand-written template; nothing is trained"
    default_prompt = PromptConfig(coupling="none")

    @property
    def trains(self) -> bool:
        return False

    def trainable_groups(self, clf):
        return []
