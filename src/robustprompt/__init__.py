"""robustprompt: adversarially robust prompt learning for CLIP-style models, measured honestly.

    import robustprompt as rp
    clf = rp.load_classifier("demo", classnames=[...])
    clf = rp.load_classifier(run="runs/train/...")          # or prompts="file.safetensors" / "hf-hub:org/repo"
    x_adv = rp.attacks.pgd(clf, x, y, eps=4/255, alpha=1/255, steps=10)
"""
__version__ = "0.1.0"

from . import attacks  # noqa: E402
from . import catalog  # noqa: E402
from .api import load_classifier, open_prompts  # noqa: E402
from .attacks import ThreatModel  # noqa: E402
from .errors import RobustPromptError  # noqa: E402
from .hub import pull, push  # noqa: E402
from .models.prompt_file import PromptMeta, read_meta as read_prompt_meta, write_prompts  # noqa: E402
from .models import PromptConfig, PromptedClassifier, TraceSpec  # noqa: E402

__all__ = ["attacks", "catalog", "load_classifier", "open_prompts", "write_prompts", "read_prompt_meta", "PromptMeta",
           "push", "pull", "ThreatModel", "RobustPromptError", "PromptConfig",
           "PromptedClassifier", "TraceSpec", "__version__"]
