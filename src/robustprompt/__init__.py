"""robustprompt: adversarially robust prompt learning for CLIP-style models, measured honestly.

    import robustprompt as rp
    clf = rp.load_classifier("demo", classnames=[...])
    x_adv = rp.attacks.pgd(clf, x, y, eps=4/255, alpha=1/255, steps=10)
"""
__version__ = "0.1.0"

from . import attacks  # noqa: E402
from . import catalog  # noqa: E402
from .api import load_classifier  # noqa: E402
from .attacks import ThreatModel  # noqa: E402
from .errors import RobustPromptError  # noqa: E402
from .models import PromptConfig, PromptedClassifier, TraceSpec  # noqa: E402

__all__ = ["attacks", "catalog", "load_classifier", "ThreatModel", "RobustPromptError", "PromptConfig",
           "PromptedClassifier", "TraceSpec", "__version__"]
