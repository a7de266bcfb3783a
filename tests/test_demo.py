"""The embedded default: built by the project itself, CLIP-like, accurate, and attackable."""
import copy
import json

import pytest
import torch

from robustprompt.attacks import pgd
from robustprompt.data import build_dataset
from robustprompt.demo.backbone import RECIPE, demo_dir, load_demo_backbone
from robustprompt.models import PromptConfig, PromptedClassifier, PromptedCLIP, TraceSpec


@pytest.fixture(scope="module")
def demo():
    return load_demo_backbone()


@pytest.fixture(scope="module")
def fmnist_test():
    ds = build_dataset("fashion_mnist")
    split = ds.split("test")
    idx = list(range(0, 10000, 10))  # 1000 images, every 10th
    x = torch.stack([torch.from_numpy(split.load.images[i].copy()) for i in idx]).float().div(255)
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor([split.labels[i] for i in idx])
    return ds, x, y


def test_cache_records_recipe_and_hash(demo):
    meta = json.loads((demo_dir() / "config.json").read_text())
    assert meta["recipe"]["arch"] == RECIPE["arch"] and len(meta["sha256"]) == 64
    assert demo.extra["sha256"] == meta["sha256"]
    assert meta["model_cfg"]["vision_cfg"]["patch_size"] == 7


def test_demo_forward_equals_open_clip(demo, fmnist_test):
    """float64: the traced image path differed from open_clip's by up to 1.9e-6 in float32 (AVX-512,
    AVX2 or scalar kernels) against a 1e-5 bound; in float64 by ~1e-15."""
    _, x, _ = fmnist_test
    clip = copy.deepcopy(demo.model).double()
    model = PromptedCLIP(clip, demo.tokenizer, PromptConfig())
    tok = demo.tokenizer(["a photo of a sneaker.", "a bag"])
    x = x[:8].double()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x, TraceSpec("all", attn=True))[0],
                                   clip.encode_image(x), atol=1e-10, rtol=0)
        torch.testing.assert_close(model.encode_text(tok)[0], clip.encode_text(tok), atol=1e-10, rtol=0)


def test_zero_shot_accuracy_and_pgd(demo, fmnist_test):
    ds, x, y = fmnist_test
    clf = PromptedClassifier(demo, ds.classnames, templates=[ds.templates[0]])
    with torch.no_grad():
        clean = (clf(x).argmax(1) == y).float().mean().item()
    assert clean >= 0.75
    x_adv = pgd(clf, x[:300], y[:300], eps=8 / 255, alpha=2 / 255, steps=10, seeds=list(range(300)))
    with torch.no_grad():
        robust = (clf(x_adv).argmax(1) == y[:300]).float().mean().item()
    assert robust < 0.3  # "far down"
