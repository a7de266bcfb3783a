"""The demo backbone with TPT's prompt and the first Fashion-MNIST test images, for the tests
that attack a defence on real images (module-scoped fixtures call this)."""
import torch

from robustprompt.engine.tta import TPT_PROMPT
from robustprompt.models import PromptedClassifier


def demo_tpt_and_images(n: int) -> tuple[PromptedClassifier, torch.Tensor, torch.Tensor]:
    from robustprompt.api import get_backbone
    from robustprompt.data import build_dataset, clip_transform

    ds = build_dataset("fashion_mnist")
    split = ds.split("test")
    x = torch.stack([clip_transform(28)(split.load(i)) for i in range(n)])
    y = torch.tensor(split.labels[:n])
    return PromptedClassifier(get_backbone("demo"), ds.classnames, TPT_PROMPT), x, y
