"""CBA-FAPT's regularisers are alive: the textual distribution is focused (not uniform) on the demo
backbone and on a random-init ViT-B/32, γ moves the prompt gradient, and the engine records each
loss term's weighted gradient share (checked against a hand-worked case)."""
import math

import pytest
import torch

from robustprompt.attacks import ThreatModel
from robustprompt.attribution.cba import normalised_entropy, text_attribution, text_distribution, text_logits
from robustprompt.engine.grad_share import gradient_norms, gradient_shares, share_record
from robustprompt.methods import build_method
from robustprompt.methods.base import StepResult
from robustprompt.models import PromptConfig, PromptedClassifier, TraceSpec

LAST = TraceSpec(blocks=(-1,))


# ---------------------------------------------------------------- the textual distribution
def test_standardized_distribution_by_hand():
    amap = torch.tensor([[0.01, 0.03, -0.01, 0.05, 7.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, True, False]])
    vals = [0.01, 0.03, -0.01, 0.05]
    mean = sum(vals) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)
    e = [math.exp((v - mean) / std) for v in vals]
    want = torch.tensor([[x / sum(e) for x in e] + [0.0]], dtype=torch.float64)
    torch.testing.assert_close(text_distribution(amap, valid), want, atol=1e-12, rtol=1e-12)
    # temperature: softmax(z / τ)
    e2 = [math.exp((v - mean) / std / 0.5) for v in vals]
    torch.testing.assert_close(text_distribution(amap, valid, temperature=0.5),
                               torch.tensor([[x / sum(e2) for x in e2] + [0.0]], dtype=torch.float64))
    # the raw reading: softmax of the values themselves — within 1e-2 of uniform at this scale
    raw = text_distribution(amap, valid, norm="none")
    assert (raw[0, :4] - 0.25).abs().max() < 1e-2 and raw[0, 4] == 0


def test_standardized_distribution_ignores_the_maps_units():
    g = torch.Generator().manual_seed(0)
    amap = torch.randn(3, 9, generator=g, dtype=torch.float64) * 1e-2
    valid = torch.arange(9)[None, :] <= torch.tensor([[4], [8], [6]])
    d = text_distribution(amap, valid)
    torch.testing.assert_close(text_distribution(amap * 1e4, valid), d)
    torch.testing.assert_close(text_distribution(amap + 3.0, valid), d)
    assert not torch.allclose(text_distribution(amap * 1e4, valid, norm="none"), text_distribution(amap, valid, norm="none"))


def test_constant_map_is_uniform_with_finite_gradients():
    amap = torch.full((1, 5), 0.2, requires_grad=True)
    valid = torch.tensor([[True, True, True, False, False]])
    d = text_distribution(amap, valid)
    torch.testing.assert_close(d, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]]))
    (g,) = torch.autograd.grad((d * torch.arange(5.0)).sum(), amap)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match="norm"):
        text_logits(amap, valid, norm="softmax")


def _text_entropy(bb, classes, x, prompt: PromptConfig, norm: str) -> torch.Tensor:
    torch.manual_seed(0)
    clf = PromptedClassifier(bb, classes, prompt)
    y = torch.arange(len(x)) % len(classes)
    out = clf.features(x, text_trace=LAST)
    amap, valid = text_attribution(clf.model, out.text, out.image_features.detach(), y)
    return normalised_entropy(text_distribution(amap.detach(), valid, norm=norm), valid)


@pytest.fixture(scope="module")
def demo_batch():
    from robustprompt.api import get_backbone
    from robustprompt.data import build_dataset, clip_transform

    ds = build_dataset("fashion_mnist")
    split = ds.split("test")
    tf = clip_transform(28)
    x = torch.stack([tf(split.load(i)) for i in range(8)])
    y = torch.tensor(split.labels[:8])
    return get_backbone("demo"), ds.classnames, x, y


CBA_PROMPT = PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=3)


def test_text_distribution_is_focused_on_the_demo_backbone(demo_batch):
    bb, classes, x, _ = demo_batch
    h = _text_entropy(bb, classes, x, CBA_PROMPT, "standardize")
    assert h.mean() <= 0.9, h
    # the plain softmax of the raw map is uniform: the reason for the standardisation
    assert _text_entropy(bb, classes, x, CBA_PROMPT, "none").min() > 0.999


def test_text_distribution_is_focused_on_random_init_vitb32(vitb32_backbone):
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    classes = ["cat", "dog", "ankle boot", "golden retriever"]
    prompt = PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=9)
    h = _text_entropy(vitb32_backbone, classes, x, prompt, "standardize")
    assert h.mean() <= 0.9, h
    assert _text_entropy(vitb32_backbone, classes, x, prompt, "none").min() > 0.999


# ---------------------------------------------------------------- γ moves the gradient
def _prompt_grad(bb, classes, x, y, params: dict, threat: ThreatModel, prompt: PromptConfig) -> torch.Tensor:
    method = build_method("cba_fapt", params, threat)
    torch.manual_seed(0)
    clf = PromptedClassifier(bb, classes, prompt)
    torch.manual_seed(1)  # the same attack noise for every call
    r = method.step(clf, x, y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(r.loss, clf.prompt_parameters())])


def _gamma_effect(bb, classes, x, y, threat, prompt, norm):
    g = _prompt_grad(bb, classes, x, y, {"text_norm": norm}, threat, prompt)
    again = _prompt_grad(bb, classes, x, y, {"text_norm": norm}, threat, prompt)
    g0 = _prompt_grad(bb, classes, x, y, {"text_norm": norm, "gamma": 0.0}, threat, prompt)
    noise = float((g - again).norm() / g.norm())
    return float((g - g0).norm() / g.norm()), noise


def test_gamma_changes_the_prompt_gradient_on_the_demo_backbone(demo_batch):
    bb, classes, x, y = demo_batch
    change, noise = _gamma_effect(bb, classes, x, y, ThreatModel.from_255(4, 2, steps=2), CBA_PROMPT, "standardize")
    assert change > 1e-4 and change > 1000 * max(noise, 1e-9), (change, noise)
    dead, _ = _gamma_effect(bb, classes, x, y, ThreatModel.from_255(4, 2, steps=2), CBA_PROMPT, "none")
    assert dead < change / 100, (dead, change)


def test_gamma_changes_the_prompt_gradient_on_random_init_vitb32(vitb32_backbone):
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    prompt = PromptConfig(coupling="coupled-v2t", n_ctx=2, depth=9)
    change, noise = _gamma_effect(vitb32_backbone, ["cat", "dog", "car"], x, y, ThreatModel.from_255(1, 1, steps=1),
                                  prompt, "standardize")
    assert change > 1e-4 and change > 1000 * max(noise, 1e-9), (change, noise)


# ---------------------------------------------------------------- gradient shares
def test_gradient_norms_by_hand():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.tensor([5.0], dtype=torch.float64), requires_grad=False)
    # L1 = Σa² (∇a = 2a, ∇b = 0); L2 = a₀·b (∇a = (b, 0), ∇b = a₀); L3 does not reach a or b
    terms = {"l1": (a ** 2).sum(), "l2": a[0] * b[0], "l3": frozen.sum() * 1.0}
    r = StepResult.weighted(terms, {"l1": 2.0, "l2": 3.0, "l3": 4.0})
    assert float(r.loss.detach()) == pytest.approx(2 * 5.0 + 3 * 3.0 + 4 * 5.0)
    norms = gradient_norms(r, [a, b, frozen])
    assert norms["l1"] == pytest.approx(2 * math.sqrt(2 ** 2 + 4 ** 2))
    assert norms["l2"] == pytest.approx(3 * math.sqrt(3 ** 2 + 1 ** 2))
    assert norms["l3"] == 0.0
    shares = gradient_shares(norms)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["l1"] == pytest.approx(norms["l1"] / (norms["l1"] + norms["l2"]))
    rec = share_record(r, [a, b])
    assert rec["grad_weight.l2"] == 3.0 and rec["grad_share.l3"] == 0.0
    r.loss.backward()  # the graph survives the diagnostics
    torch.testing.assert_close(a.grad, torch.tensor([2 * 2 * 1.0 + 3 * 3.0, 2 * 2 * 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="do not exist"):
        StepResult.weighted(terms, {"l4": 1.0})
