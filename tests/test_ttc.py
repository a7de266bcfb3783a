"""TTC (test-time counterattacks): the τ gate and the step weights on hand-worked cases, the whole
procedure against a float64 loop on a linear "encoder", the counterattack's budget and objective on
the tiny backbone, per-image independence, seeds, bad params, and the adaptive attack through it."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from robustprompt.attacks.pgd import random_perturbation
from robustprompt.attacks.threat import ThreatModel
from robustprompt.engine.tta import TPT_PROMPT
from robustprompt.errors import ConfigError
from robustprompt.models import PromptConfig, PromptedClassifier
from robustprompt.tta.adaptive import AdaptiveAttack, adaptive_attack
from robustprompt.tta.procedures import build_procedure, list_procedures
from robustprompt.tta.ttc import counterattack, sensitivity, step_weights, tau_gate

from demo_data import demo_tpt_and_images


@pytest.fixture(scope="module")
def tiny64(tiny_backbone):
    clf = PromptedClassifier(copy.deepcopy(tiny_backbone), ["a", "b", "c"], TPT_PROMPT).double()
    clf._cache = None   # text features cached in float32 before .double()
    return clf


@pytest.fixture
def images64():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ----------------------------------------------------------------------------- the formulas


def test_tau_gate_on_hand_worked_embeddings():
    anchor = torch.tensor([[3.0, 4.0], [3.0, 4.0], [0.0, 10.0], [1.0, 0.0]], dtype=torch.float64)
    noisy = torch.tensor([[3.0, 4.5], [3.0, 5.0], [6.0, 10.0], [1.0, 0.0]], dtype=torch.float64)
    tau = sensitivity(noisy, anchor)
    # ‖(0, .5)‖/5 = .1;  ‖(0, 1)‖/5 = .2;  ‖(6, 0)‖/10 = .6;  0/1 = 0
    torch.testing.assert_close(tau, torch.tensor([0.1, 0.2, 0.6, 0.0], dtype=torch.float64), atol=1e-15, rtol=0)
    # strictly below τ_thres: the image exactly at 0.2 is left alone, as sign(τ_thres − τ) > 0 in the code
    assert tau_gate(tau, 0.2).tolist() == [True, False, False, True]
    assert tau_gate(tau, 0.7).tolist() == [True, True, True, True]
    assert tau_gate(tau, 0.0).tolist() == [False, False, False, False]


def test_step_weights_by_hand():
    e2, e4 = math.exp(2), math.exp(4)
    want = torch.tensor([1, e2, e4], dtype=torch.float64) / (1 + e2 + e4)   # ≈ 0.016, 0.117, 0.867
    torch.testing.assert_close(step_weights(2, 2.0, torch.float64), want, atol=1e-15, rtol=0)
    torch.testing.assert_close(step_weights(3, 0.0, torch.float64), torch.full((4,), 0.25, dtype=torch.float64))
    assert step_weights(0, 2.0).tolist() == [1.0]


# ----------------------------------------------------------------------------- a linear "encoder"


class LinearClassifier:
    """f(x) = A·vec(x) (no mean/std), text features T, logits 10·f̂·T: everything by hand."""

    def __init__(self, a: torch.Tensor, text: torch.Tensor) -> None:
        self.a, self.text = a, text
        self.model = SimpleNamespace(encode_image=lambda z: (z.flatten(1) @ self.a.t(), None))

    def normalize(self, x):
        return x

    def encode_image(self, x):
        return F.normalize(self.model.encode_image(x)[0], dim=-1), None

    def text_features(self):
        return self.text

    def logits_from(self, f, t):
        return 10 * f @ t.t()


def _expected_linear(x, a, text, seeds, eps, alpha, steps, beta, tau_thres, ungated, combine="perturbation"):
    """The released code's TTC on f = A·x, one image at a time in float64: ∇_δ‖Aδ‖² = 2AᵀAδ."""
    out, gated = [], []
    for xi, s in zip(x, seeds):
        u = torch.empty(xi.shape).uniform_(generator=torch.Generator().manual_seed(s)).double()
        d0 = ((xi + (2 * u - 1) * eps).clamp(0, 1) - xi)
        tau = (a @ d0.flatten()).norm() / (a @ xi.flatten()).norm()
        ds, d = [d0], d0
        for _ in range(steps):
            g = (2 * a.t() @ a @ d.flatten()).view_as(d)
            d = (d + alpha * g.sign()).clamp(-eps, eps)
            d = (xi + d).clamp(0, 1) - xi
            ds.append(d)
        w = [math.exp(beta * k) for k in range(steps + 1)]
        gated.append(bool(tau < tau_thres))
        unit = lambda z: F.normalize(a @ z.flatten(), dim=0)  # noqa: E731
        if tau < tau_thres and combine == "perturbation":
            f = unit(xi + sum(wk / sum(w) * dk for wk, dk in zip(w, ds)))
        elif tau < tau_thres:     # the weighted mean of the unit embeddings along the steps
            f = F.normalize(sum(wk / sum(w) * unit(xi + dk) for wk, dk in zip(w, ds)), dim=0)
        else:
            f = unit(xi + d0 if ungated == "noise" else xi)
        out.append((10 * text @ f).softmax(0))
    return torch.stack(out), gated


@pytest.mark.parametrize("ungated, combine", [("noise", "perturbation"), ("clean", "perturbation"),
                                             ("noise", "embedding"), ("clean", "embedding")])
def test_whole_procedure_against_a_float64_loop_on_a_linear_encoder(ungated, combine):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64) + 3 * torch.eye(12, dtype=torch.float64)
    text = F.normalize(torch.randn(4, 12, generator=gen, dtype=torch.float64), dim=-1)
    x = torch.rand(3, 3, 2, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    x[1] = 0.004 * x[1]              # a dark image: the noise is large relative to it, τ > 0.2
    x[2, 0] = 1.0                    # a saturated channel: the [0,1] clamp binds
    seeds = [5, 6, 7]
    proc = build_procedure("ttc", {"ungated": ungated, "combine": combine})
    got = proc.run(LinearClassifier(a, text), x, seeds)
    want, gated = _expected_linear(x, a, text, seeds, 4 / 255, 1 / 255, 2, 2.0, 0.2, ungated, combine)
    assert gated == [True, False, True]     # both branches of the gate are exercised
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_counterattack_pushes_the_embedding_away_within_its_budget(tiny64, images64):
    proc = build_procedure("ttc", {"steps": 3})
    embed = lambda z: proc.embed(tiny64, z)  # noqa: E731
    for norm, eps, alpha in (("linf", 4 / 255, 1 / 255), ("l2", 0.5, 0.2)):
        x = images64
        with torch.no_grad():
            anchor = embed(x)
            d0 = random_perturbation(x, eps, norm, [1, 2, 3, 4])
        ca = counterattack(embed, x, d0, anchor, eps=eps, alpha=alpha, steps=3, norm=norm)
        assert len(ca.deltas) == 4 and len(ca.embeddings) == 3
        with torch.no_grad():
            dist = [(embed(x + d) - anchor).norm(dim=-1) for d in ca.deltas]
        assert (dist[-1] > dist[0]).all(), dist
        for d in ca.deltas:
            size = d.flatten(1).abs().amax(1) if norm == "linf" else d.flatten(1).norm(dim=1)
            assert (size <= eps + 1e-12).all()
            assert ((x + d) >= 0).all() and ((x + d) <= 1).all()


# ----------------------------------------------------------------------------- the procedure


def test_registered_and_defaults_follow_the_released_code():
    assert "ttc" in list_procedures()
    proc = build_procedure("ttc")
    p = proc.params
    assert proc.title == "TTC" and proc.tunes_prompt is False
    assert (p.eps, p.step_size, p.steps, p.tau_thres, p.beta) == (4.0, 1.0, 2, 0.2, 2.0)
    assert (p.norm, p.embedding, p.combine, p.ungated, p.gate_grad) == ("linf", "raw", "perturbation", "noise",
                                                                          "constant")
    assert p.eps_pixels == 4 / 255 and p.step_pixels == 1 / 255


def test_zero_budget_is_the_classifier_with_its_own_prompts(tiny_backbone, images64):
    """ε = 0: no noise, no counterattack — exactly the classifier's prediction with whatever prompt it
    carries (here a vision-language prompt set to random values, not the initial one)."""
    clf = PromptedClassifier(copy.deepcopy(tiny_backbone), ["a", "b", "c"],
                             PromptConfig(coupling="independent", n_ctx=2, depth=2)).double()
    with torch.no_grad():
        for prm in clf.prompt_parameters():
            prm.copy_(torch.randn_like(prm, generator=torch.Generator().manual_seed(4)) * 0.5)
    clf._cache = None
    with torch.no_grad():
        want = clf(images64).softmax(1)
        got = build_procedure("ttc", {"eps": 0}).run(clf, images64, [1, 2, 3, 4])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_each_image_is_independent_of_its_batch(tiny64, images64):
    for params in ({}, {"combine": "embedding", "ungated": "clean"}, {"norm": "l2", "eps": 0.5, "step_size": 0.2}):
        proc = build_procedure("ttc", params)
        with torch.no_grad():
            alone = proc.run(tiny64, images64[1:2], [22])
            together = proc.run(tiny64, images64[:3], [21, 22, 23])
        torch.testing.assert_close(together[1:2], alone, atol=1e-12, rtol=0)


def test_seeds_fix_the_randomness(tiny64, images64):
    proc = build_procedure("ttc")
    with torch.no_grad():
        a, b = proc.run(tiny64, images64, [1, 2, 3, 4]), proc.run(tiny64, images64, [1, 2, 3, 4])
        c = proc.run(tiny64, images64, [5, 6, 7, 8])
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-9)


@pytest.mark.parametrize("params", [{}, {"norm": "l2", "eps": 0.5, "step_size": 0.2}, {"combine": "embedding"},
                                    {"gate_grad": "sigmoid", "gate_temperature": 1.0}])
def test_differentiable_run_keeps_the_forward_and_has_a_gradient(tiny64, images64, params):
    proc = build_procedure("ttc", params)
    with torch.no_grad():
        plain = proc.run(tiny64, images64, [1, 2, 3, 4])
    x = images64.clone().requires_grad_(True)
    probs = proc.run(tiny64, x, [1, 2, 3, 4], differentiable=True, through_update=True)
    torch.testing.assert_close(probs, plain, atol=1e-12, rtol=0)
    (g,) = torch.autograd.grad(probs[:, 0].log().sum(), x)
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()


def test_default_adaptive_graph_drops_the_embeddings_and_keeps_the_gradient(tiny64, images64, monkeypatch):
    """ℓ∞ with a constant gate and perturbation weights: the attacker differentiates only the δ_k, so the
    steps' image-tower graphs are freed — and the gradient is exactly the one with every graph kept."""
    import robustprompt.tta.ttc as ttc_module

    def gradient():
        x = images64.clone().requires_grad_(True)
        probs = build_procedure("ttc", {}).run(tiny64, x, [1, 2, 3, 4], differentiable=True)
        return torch.autograd.grad(probs[:, 0].log().sum(), x)[0]

    lean = gradient()
    original, asked = ttc_module.counterattack, []

    def keep_everything(*args, **kwargs):
        asked.append(kwargs["keep_embeddings"])
        return original(*args, **{**kwargs, "keep_embeddings": True})

    monkeypatch.setattr(ttc_module, "counterattack", keep_everything)
    full = gradient()
    assert asked == [False]
    torch.testing.assert_close(lean, full, rtol=0, atol=0)
    ca = original(lambda z: z.flatten(1)[:, :5] * 2, images64.clone().requires_grad_(True),
                  torch.zeros_like(images64), torch.zeros(4, 5, dtype=images64.dtype), eps=0.1, alpha=0.05,
                  steps=2, differentiable=True, keep_embeddings=False)
    assert not any(e.requires_grad for e in ca.embeddings) and all(d.requires_grad for d in ca.deltas[1:])


def test_sigmoid_gate_adds_the_gate_s_gradient_only(tiny64, images64):
    """Same forward; the straight-through surrogate changes the backward only (the constant mask's
    gradient plus the sigmoid's slope through τ)."""
    grads = {}
    for gate in ("constant", "sigmoid"):
        proc = build_procedure("ttc", {"gate_grad": gate, "gate_temperature": 1.0})
        x = images64.clone().requires_grad_(True)
        probs = proc.run(tiny64, x, [1, 2, 3, 4], differentiable=True)
        grads[gate] = torch.autograd.grad(probs[:, 0].log().sum(), x)[0]
    assert not torch.allclose(grads["constant"], grads["sigmoid"], atol=1e-12)


@pytest.mark.parametrize("params, key", [
    ({"eps": -1}, "eps"), ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"step_size": 0}, "step_size"),
    ({"tau_thres": -0.1}, "tau_thres"), ({"beta": float("nan")}, "beta"), ({"norm": "l1"}, "norm"),
    ({"embedding": "pooled"}, "embedding"), ({"combine": "mean"}, "combine"), ({"ungated": "skip"}, "ungated"),
    ({"gate_grad": "bpda"}, "gate_grad"), ({"gate_temperature": 0}, "gate_temperature"),
    ({"augmix": True}, "augmix"), ({"n_views": 8}, "n_views")])
def test_bad_params_are_refused_in_one_line(params, key):
    with pytest.raises(ConfigError, match=key) as err:
        build_procedure("ttc", params)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- attacks through TTC


@pytest.fixture(scope="module")
def demo():
    return demo_tpt_and_images(6)


def test_adaptive_attack_is_at_least_as_strong_as_the_nonadaptive_one(demo):
    """Known randomness, started from the non-adaptive example as the engine does: per image, every
    image the non-adaptive PGD fools stays fooled, and the attack through the counterattack fools
    more. Measured (6 images): CLIP under PGD-10 fools 2, TTC on those examples 0; the adaptive
    attack's first restart (from the non-adaptive example) 0, with the second (random start) 2."""
    clf, x, y = demo
    proc = build_procedure("ttc")
    seeds, views = [1, 2, 3, 4, 5, 6], [100, 101, 102, 103, 104, 105]
    eps = 4 / 255
    nonadaptive = ThreatModel(eps=eps, alpha=1 / 255, steps=10).run(clf, x, y, seeds=seeds, seed=0)
    adaptive = adaptive_attack(proc, clf, x, y, eps=eps, norm="linf", spec=AdaptiveAttack(steps=5, restarts=2),
                               attack_seeds=seeds, view_seeds=views, start=nonadaptive)
    assert (adaptive - x).abs().amax() <= eps + 1e-6 and (adaptive >= 0).all() and (adaptive <= 1).all()
    with torch.no_grad():
        fooled_non = proc.run(clf, nonadaptive, views).argmax(1) != y
        fooled_ada = proc.run(clf, adaptive, views).argmax(1) != y
    assert (fooled_ada >= fooled_non).all(), (fooled_non, fooled_ada)
    assert fooled_ada.sum() > fooled_non.sum(), (fooled_non, fooled_ada)   # the counterattack's gradient matters


@pytest.mark.parametrize("method, given, want", [("ttc", None, 2), ("ttc", 1, 1), ("tpt", None, 1)])
def test_adaptive_restarts_default_to_the_procedure_s_and_are_recorded(tmp_path, method, given, want):
    """TTC's adaptive attack gets a second, random restart unless the user sets restarts; the
    resolved value is what the run's config records (so other procedures keep their identities)."""
    import yaml

    from robustprompt.config import from_dict
    from robustprompt.engine.tta import TTAConfig, run_tta

    raw = {"model": {"name": "demo"}, "data": {"dataset": "fashion_mnist", "subset": 1, "batch_size": 1},
           "method": {"name": method, "params": {} if method == "ttc" else {"n_views": 2}},
           "attack": {"attack": "none"}, "adaptive_attack": {} if given is None else {"restarts": given},
           "device": "cpu"}
    run_tta(from_dict(TTAConfig, raw), tmp_path / "run", progress=False)
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["adaptive_attack"]["restarts"] == want
