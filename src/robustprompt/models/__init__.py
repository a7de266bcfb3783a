"""Backbones, the prompted CLIP and the classifier built on it. Knows nothing of methods."""
from .backbone import Backbone, load_backbone
from .classifier import ClassifierOutput, PromptedClassifier, prompt_texts
from .prompted_clip import PromptedCLIP, TextTrace, VisionTrace
from .prompts import COUPLINGS, PromptConfig, PromptLearner
from .trace import BlockTrace, TraceSpec

__all__ = [
    "Backbone", "load_backbone", "ClassifierOutput", "PromptedClassifier", "prompt_texts",
    "PromptedCLIP", "TextTrace", "VisionTrace", "COUPLINGS", "PromptConfig", "PromptLearner",
    "BlockTrace", "TraceSpec",
]
