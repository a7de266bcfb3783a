"""Adaptive attacks on test-time defences (tta.adaptive): the gradient through the prompt update,
the APGD schedule, the threat models' randomness, and sanity checks that can fail (Carlini et al.
2019; Croce et al. 2022) on the demo backbone."""
import copy

import pytest
import torch

from robustprompt.attacks.threat import ThreatModel
from robustprompt.engine.tta import TPT_PROMPT
from robustprompt.errors import ConfigError
from robustprompt.models import PromptedClassifier
from robustprompt.tta.adaptive import (AdaptiveAttack, _evaluate, adaptive_attack, apgd_checkpoints, dlr_loss,
                                       eot_pgd)
from robustprompt.tta.procedures import build_procedure

from demo_data import demo_tpt_and_images
from finite_diff import DirectionalCheck

PROCEDURES = ["tpt", "ctpt", "mta", "rtpt", "atpt"]


# ----------------------------------------------------------------------------- through the update


@pytest.fixture(scope="module")
def tiny64(tiny_backbone):
    clf = PromptedClassifier(copy.deepcopy(tiny_backbone), ["a", "b", "c"], TPT_PROMPT).double()
    clf._cache = None   # text features cached in float32 before .double()
    return clf


@pytest.mark.parametrize("name", ["tpt", "ctpt", "rtpt"])
def test_functional_adamw_forward_equals_torch_adamw(name, tiny64, tiny_images):
    """through_update runs AdamW by hand; its forward must be torch.optim.AdamW's, to rounding.
    float64: in float32 the two differed by up to 3e-7 against a 1e-6 bound; in float64 by ≤ 1e-15."""
    clf, x = tiny64, tiny_images[:2].double()
    proc = build_procedure(name, {"n_views": 8, "steps": 3, "lr": 0.05})
    plain = proc.run(clf, x, [1, 2])
    through = proc.run(clf, x, [1, 2], differentiable=True, through_update=True)
    untuned = build_procedure(name, {"n_views": 8, "steps": 0}).run(clf, x, [1, 2])
    torch.testing.assert_close(through.detach(), plain, atol=1e-12, rtol=0)
    assert (plain - untuned).abs().max() > 1e-3   # the update does change the prediction


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", ["tpt", "ctpt", "rtpt"])
def test_gradient_through_the_update_matches_finite_differences(name, steps, tiny64):
    """float64, crops + flips (no straight-through op): the directional derivative of log p_y along
    a random direction equals the finite difference of the non-differentiable defence (central
    differences at h = 1e-4 and 5e-5, Richardson-extrapolated); holding the tuned prompt constant
    misses the update's path (measured error 1.8e-7–2.6e-4 with one AdamW step — the first Adam
    step is ≈ lr·sign(g) — and ≈ 3 with three; the exact one's is ≤ 4e-9, ≥ 26× below the bound,
    with 1 or 4 threads and AVX-512, AVX2 or scalar kernels)."""
    proc = build_procedure(name, {"n_views": 8, "steps": steps, "augmix": False, "lr": 0.1})
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    check = DirectionalCheck(lambda z, **kw: proc.run(tiny64, z, [1, 2], **kw), x,
                             torch.randn(x.shape, generator=g, dtype=torch.float64), torch.tensor([0, 1]))
    central, directional = check.central, check.directional

    fd = (4 * central(5e-5) - central(1e-4)) / 3   # Richardson: truncation error O(h⁴) ≈ 1e-13
    exact, held = directional(True), directional(False)
    assert abs(exact - fd) < 1e-7 * max(1.0, abs(fd))
    assert abs(held - fd) > 100 * abs(exact - fd) and abs(held - fd) > 1e-8


# ----------------------------------------------------------------------------- pieces


def test_apgd_checkpoints_are_croce_and_hein_s():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (intervals shrink by .03, at least .06)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_dlr_and_ce_hand_worked():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    y = torch.tensor([0, 1])
    # row 0: correct, margin 3 − 1 = 2, π1 − π3 = 3 − 0 → −2/3; row 1: 2 − 5 = −3, 5 − 1 = 4 → 3/4
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-2 / 3, 3 / 4]))
    torch.testing.assert_close(dlr_loss(z[:, :2], y), torch.tensor([-2.0, -2.0]))  # K=2: plain margin


def test_spec_validation():
    for bad in ({"loss": "cw"}, {"schedule": "adam"}, {"steps": 0}, {"eot": 0}, {"restarts": 0}):
        with pytest.raises(ConfigError):
            AdaptiveAttack(**bad)
    assert AdaptiveAttack().title("secret") == "EOT-16 APGD-100"
    assert AdaptiveAttack(loss="dlr").title("known") == "APGD-100 DLR"


class LinearDefence:
    """A stand-in 'defence': softmax(x·W), no randomness — the worst case in the ball is known."""

    def __init__(self, w):
        self.w = w
        self.seen = []

    def run(self, clf, images, seeds, *, differentiable=False, through_update=False):
        self.seen.append((images.shape[0], list(seeds)))
        return (images.flatten(1) @ self.w).softmax(-1)


@pytest.mark.parametrize("schedule", ["apgd", "pgd"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_finds_the_analytic_worst_case_of_a_linear_model(norm, schedule):
    """Two classes, logits x·W: the loss grows along w_1 − w_0 everywhere, so the worst case in the
    ball is x + ε·sign(w_1 − w_0) (ℓ∞) or x + ε·(w_1 − w_0)/‖w_1 − w_0‖ (ℓ2); both schedules
    must end there from x itself (inside [0,1]: x = 0.5, small ε)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, 2, generator=g, dtype=torch.float64)
    x = torch.full((2, 3, 4, 4), 0.5, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    diff = (w[:, 1] - w[:, 0]).view(1, 3, 4, 4)
    eps = 0.05 if norm == "linf" else 0.3
    want = x + eps * (diff.sign() if norm == "linf" else diff / diff.norm())
    spec = AdaptiveAttack(steps=12, schedule=schedule)
    adv = adaptive_attack(LinearDefence(w), None, x, y, eps=eps, norm=norm, spec=spec, attack_seeds=[1, 2],
                          view_seeds=[7, 8], start=x)
    torch.testing.assert_close(adv, want, atol=1e-9 if norm == "linf" else 1e-6, rtol=0)


def test_secret_randomness_never_uses_the_evaluation_s_views_and_batches_the_draws():
    """Secret: one call per step with eot·B images, seeds fresh per step and draw, none of them the
    evaluation's. Known: every call uses exactly the evaluation's view seeds."""
    w = torch.randn(3 * 4 * 4, 3, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1])
    view_seeds = [11, 12]
    secret = LinearDefence(w)
    adaptive_attack(secret, None, x, y, eps=0.1, norm="linf", spec=AdaptiveAttack(steps=4, eot=5, restarts=2),
                    attack_seeds=[11, 12])   # attack seeds equal to the view seeds: still never used as views
    assert len(secret.seen) == 2 * (4 + 1) and all(n == 5 * 2 for n, _ in secret.seen)
    seeds = [s for _, ss in secret.seen for s in ss]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(view_seeds)
    known = LinearDefence(w)
    adaptive_attack(known, None, x, y, eps=0.1, norm="linf", spec=AdaptiveAttack(steps=4, eot=5),
                    attack_seeds=[1, 2], view_seeds=view_seeds)
    assert all(n == 2 and ss == view_seeds for n, ss in known.seen) and len(known.seen) == 5


def test_chunked_eot_gives_the_same_gradient(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure("rtpt", {"n_views": 8})
    x, y, seeds = tiny_images[:2], torch.tensor([0, 1]), list(range(100, 106))
    whole = _evaluate(proc, clf, x, y, seeds, 3, AdaptiveAttack(), None)
    parts = _evaluate(proc, clf, x, y, seeds, 3, AdaptiveAttack(), 2)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm, eps", [("linf", 4 / 255), ("l2", 0.5)])
def test_result_stays_in_the_ball_and_never_falls_below_its_start(norm, eps, tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure("tpt", {"n_views": 8})
    x, y, vs = tiny_images[:3], torch.tensor([0, 1, 2]), [5, 6, 7]
    start = (x + eps / 2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).sign() / (
        1 if norm == "linf" else 32)).clamp(0, 1)
    spec = AdaptiveAttack(steps=3)
    adv = adaptive_attack(proc, clf, x, y, eps=eps, norm=norm, spec=spec, attack_seeds=[1, 2, 3], view_seeds=vs,
                          start=start)
    d = (adv - x).flatten(1)
    assert (adv >= 0).all() and (adv <= 1).all()
    assert (d.abs().amax(1) <= eps + 1e-6).all() if norm == "linf" else (d.norm(dim=1) <= eps + 1e-5).all()
    s, a = (_evaluate(proc, clf, z, y, vs, 1, spec, None) for z in (start, adv))
    assert ((a.fooled > s.fooled) | ((a.fooled == s.fooled) & (a.loss >= s.loss - 1e-6))).all()


# ----------------------------------------------------------------------------- sanity checks (demo backbone)


@pytest.fixture(scope="module")
def demo():
    return demo_tpt_and_images(4)


VIEW_SEEDS, ATTACK_SEEDS = [1000, 1001, 1002, 1003], [1, 2, 3, 4]


def _acc(proc, clf, x, y) -> int:
    with torch.no_grad():
        return int((proc.run(clf, x, VIEW_SEEDS).argmax(1) == y).sum())


@pytest.mark.parametrize("name", PROCEDURES)
def test_unbounded_known_randomness_attack_reaches_zero(name, demo):
    """ε = 1 (ℓ∞): any image is allowed, so a working attack fools every defence on every image."""
    clf, x, y = demo
    proc = build_procedure(name, {"n_views": 8})
    adv = adaptive_attack(proc, clf, x, y, eps=1.0, norm="linf", spec=AdaptiveAttack(steps=5),
                          attack_seeds=ATTACK_SEEDS, view_seeds=VIEW_SEEDS)
    assert _acc(proc, clf, x, y) >= 2 and _acc(proc, clf, adv, y) == 0


def test_attack_strength_ordering_on_rtpt(demo):
    """ε = 4/255 on R-TPT: known randomness ≤ secret randomness ≤ the legacy EOT-PGD ≤ the
    non-adaptive attack (robust accuracy, evaluated with the evaluation's views). Measured (4
    images, all 4 right when clean, 8 views; 1 and 4 threads): non-adaptive 4, legacy 4, secret
    (EOT-4 APGD-10) 4, known (APGD-10) 2 — on 8 images 8 / 8 / 7 / 3.
    The by-construction forms hold whatever the numbers: a known attack started from the secret
    (or legacy) example keeps it when it already fools the evaluation's views."""
    clf, x, y = demo
    eps = 4 / 255
    proc = build_procedure("rtpt", {"n_views": 8})
    threat = ThreatModel(eps=eps, alpha=1 / 255, steps=10)
    nonadaptive = threat.run(clf, x, y, seeds=ATTACK_SEEDS, seed=0)
    legacy = eot_pgd(proc, clf, x, y, threat, ATTACK_SEEDS, start=nonadaptive)
    run = lambda spec, **kw: adaptive_attack(proc, clf, x, y, eps=eps, norm="linf", spec=spec,  # noqa: E731
                                             attack_seeds=ATTACK_SEEDS, **kw)
    secret = run(AdaptiveAttack(steps=10, eot=4), start=nonadaptive)
    known = run(AdaptiveAttack(steps=10), view_seeds=VIEW_SEEDS, start=nonadaptive)
    acc = {k: _acc(proc, clf, v, y) for k, v in
           dict(nonadaptive=nonadaptive, legacy=legacy, secret=secret, known=known).items()}
    assert acc["known"] <= acc["secret"] <= acc["legacy"] <= acc["nonadaptive"], acc
    assert acc["known"] < acc["nonadaptive"], acc   # the defence's own gradient must matter
    for prior in (secret, legacy):
        chained = run(AdaptiveAttack(steps=2), view_seeds=VIEW_SEEDS, start=prior)
        assert _acc(proc, clf, chained, y) <= _acc(proc, clf, prior, y)


def test_robust_accuracy_is_non_increasing_in_eps(demo):
    """Known randomness on A-TPT, ε = 0.5, 1, 2, 4, 8 /255; each ε starts from the previous ε's example
    (inside the larger ball, a candidate), so a fooled image stays fooled; and 8/255 must fool
    some image the clean defence gets right. Measured: 4 4 4 3 2 of 4 (independent runs per ε,
    no chaining: 4 4 4 3 3)."""
    clf, x, y = demo
    proc = build_procedure("atpt", {"n_views": 8})
    accs, prev = [], None
    for eps in (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255):
        prev = adaptive_attack(proc, clf, x, y, eps=eps, norm="linf", spec=AdaptiveAttack(steps=4),
                               attack_seeds=ATTACK_SEEDS, view_seeds=VIEW_SEEDS, start=prev)
        accs.append(_acc(proc, clf, prev, y))
    assert accs == sorted(accs, reverse=True), accs
    assert accs[-1] < _acc(proc, clf, x, y), accs
