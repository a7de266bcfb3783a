"""Attacks against independent references: a float64 PGD on a linear model written by hand."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustprompt.attacks import ThreatModel, autoattack, dlr_loss, fgsm, kl_loss, pgd
from robustprompt.errors import ConfigError
from robustprompt.models import PromptConfig, PromptedClassifier


class Linear(nn.Module):
    def __init__(self, W, b):
        super().__init__()
        self.W = nn.Parameter(torch.tensor(W, dtype=torch.float32), requires_grad=False)
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float32), requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.W.t() + self.b


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_pgd(W, b, x, y, eps, alpha, steps, norm):
    """Float64 PGD with the analytic CE gradient ∂/∂x = Wᵀ(softmax(Wx+b) − onehot(y))."""
    x0 = x.reshape(len(x), -1).astype(np.float64)
    xa = x0.copy()
    onehot = np.eye(W.shape[0])[y]
    for _ in range(steps):
        g = (_softmax(xa @ W.T + b) - onehot) @ W
        if norm == "linf":
            xa = xa + alpha * np.sign(g)
            xa = np.clip(xa, x0 - eps, x0 + eps)
        else:
            xa = xa + alpha * g / np.linalg.norm(g, axis=1, keepdims=True)
            d = xa - x0
            n = np.linalg.norm(d, axis=1, keepdims=True)
            xa = x0 + d * np.minimum(1.0, eps / n)
        xa = np.clip(xa, 0.0, 1.0)
    return xa.reshape(x.shape)


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
def test_pgd_matches_float64_reference(norm, eps, alpha):
    rng = np.random.default_rng(0)
    W = rng.normal(size=(5, 3 * 4 * 4))
    b = rng.normal(size=5)
    x = rng.uniform(size=(6, 3, 4, 4))
    y = rng.integers(0, 5, size=6)
    model = Linear(W, b)
    got = pgd(model, torch.tensor(x, dtype=torch.float32), torch.tensor(y), eps, alpha, 7, norm=norm,
              random_start=False)
    ref = reference_pgd(W, b, x, y, eps, alpha, 7, norm)
    np.testing.assert_allclose(got.numpy(), ref, atol=2e-5)


def test_fgsm_is_one_signed_step():
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(4, 12)), rng.normal(size=4)
    x, y = rng.uniform(size=(5, 3, 2, 2)), rng.integers(0, 4, size=5)
    got = fgsm(Linear(W, b), torch.tensor(x, dtype=torch.float32), torch.tensor(y), 0.03)
    np.testing.assert_allclose(got.numpy(), reference_pgd(W, b, x, y, 0.03, 0.03, 1, "linf"), atol=2e-6)


def test_losses_by_hand():
    z = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.5, 4.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    # sample 0: true class on top: −(3−2)/(3−1); sample 1: −(1−4)/(4−0.5)
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-0.5, 3 / 3.5]))
    zc = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    ref = F.kl_div(z.log_softmax(1), zc.softmax(1), reduction="none").sum(1)
    torch.testing.assert_close(kl_loss(z, y, zc), ref)
    with pytest.raises(ConfigError):
        dlr_loss(z[:, :2], torch.tensor([0, 1]))


def test_pgd_on_classifier_stays_in_budget_and_encodes_text_once(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c", "d"], PromptConfig(coupling="coupled", n_ctx=2, depth=2))
    y = torch.tensor([0, 1, 2, 3])
    before = clf.text_encode_count
    x_adv = pgd(clf, tiny_images, y, eps=4 / 255, alpha=1 / 255, steps=10)
    assert clf.text_encode_count - before == 1  # once for all 10 steps, prompts require grad
    assert (x_adv - tiny_images).abs().max() <= 4 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in clf.prompt_parameters())  # attack leaves parameter grads alone
    with torch.no_grad():
        assert F.cross_entropy(clf(x_adv), y) > F.cross_entropy(clf(tiny_images), y)


def test_pgd_per_example_seeds_make_batches_irrelevant(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"])
    y = torch.tensor([0, 1, 2, 0])
    seeds = [11, 12, 13, 14]
    whole = pgd(clf, tiny_images, y, 4 / 255, 1 / 255, 3, seeds=seeds)
    halves = torch.cat([pgd(clf, tiny_images[:2], y[:2], 4 / 255, 1 / 255, 3, seeds=seeds[:2]),
                        pgd(clf, tiny_images[2:], y[2:], 4 / 255, 1 / 255, 3, seeds=seeds[2:])])
    torch.testing.assert_close(whole, halves, atol=1e-6, rtol=0)


def test_restarts_never_weaker(tiny_backbone):
    torch.manual_seed(0)
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c", "d", "e"])
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        y = clf(x).argmax(1)
    seeds = list(range(16))
    one = pgd(clf, x, y, 1 / 255, 0.5 / 255, 2, seeds=seeds)
    three = pgd(clf, x, y, 1 / 255, 0.5 / 255, 2, seeds=seeds, restarts=3)
    with torch.no_grad():
        wrong1 = clf(one).argmax(1) != y
        wrong3 = clf(three).argmax(1) != y
    assert torch.all(wrong3 | ~wrong1)


def test_threat_model_units_and_errors():
    tm = ThreatModel.from_255(4, 1, steps=100)
    assert tm.eps == pytest.approx(4 / 255) and tm.step_size == pytest.approx(1 / 255)
    assert ThreatModel.from_255(1).step_size == pytest.approx(0.25 / 255)  # default α = ε/4
    d = tm.describe()
    assert d["eps_255"] == 4 and d["alpha_255"] == 1 and d["precision"] == "float32"
    assert "PGD-100" in tm.short()
    with pytest.raises(ConfigError, match="pixel units"):
        ThreatModel(eps=4)
    with pytest.raises(ConfigError):
        ThreatModel(attack="cw")
    with pytest.raises(ConfigError):
        ThreatModel(norm="l1")


def test_autoattack_with_few_classes(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c", "d", "e"])
    with torch.no_grad():
        y = clf(tiny_images).argmax(1)
    x_adv = autoattack(clf, tiny_images, y, eps=16 / 255)
    assert (x_adv - tiny_images).abs().max() <= 16 / 255 + 1e-5
    with torch.no_grad():
        assert (clf(x_adv).argmax(1) == y).float().mean() < 1.0
    with pytest.raises(ConfigError, match="at least 4 classes"):
        autoattack(PromptedClassifier(tiny_backbone, ["a", "b", "c"]), tiny_images, y % 3, eps=8 / 255)
