"""robustprompt: adversarially robust prompt learning for CLIP-style models."""
__version__ = "0.1.0"
