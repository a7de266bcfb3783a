"""MTA: the inlierness update, the kernel bandwidth and the whole MeanShift against hand-worked
numbers and a float64 per-image loop written here from the released procedure's description."""
import math

import pytest
import torch

from robustprompt.engine.tta import TPT_PROMPT
from robustprompt.errors import ConfigError
from robustprompt.models import PromptedClassifier
from robustprompt.tta.mta import (
    MTAParams,
    gaussian_density,
    inlierness_step,
    kernel_bandwidth,
    meanshift_mode,
)
from robustprompt.tta.procedures import build_procedure


def test_inlierness_update_matches_a_hand_worked_example():
    # three views, two classes; zero-shot probabilities p_s and the density d_s at the mode
    probs = torch.tensor([[[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]], dtype=torch.float64)
    density = torch.tensor([[1.0, 0.5, 0.2]], dtype=torch.float64)
    y0 = torch.full((1, 3), 1 / 3, dtype=torch.float64)
    # by hand: A = P Pᵀ = [[.82, .50, .26], [.50, .50, .50], [.26, .50, .68]]
    # A·y0 = [1.58, 1.50, 1.44] / 3 ; (d + 4·A y0) / 0.2 = [15.5333…, 12.5, 10.6]
    s = [(1.0 + 4 * 1.58 / 3) / 0.2, (0.5 + 4 * 1.50 / 3) / 0.2, (0.2 + 4 * 1.44 / 3) / 0.2]
    assert s[1] == pytest.approx(12.5) and s[2] == pytest.approx(10.6)
    z = sum(math.exp(v) for v in s)
    expected = torch.tensor([[math.exp(v) / z for v in s]], dtype=torch.float64)   # ≈ [.9476, .0456, .0068]
    got = inlierness_step(y0, density, probs @ probs.transpose(1, 2), lambda_y=0.2, lambda_q=4.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # the swapped reading (softmax((d + 0.2·A y)/4)) is nearly uniform: the test tells them apart
    swapped = inlierness_step(y0, density, probs @ probs.transpose(1, 2), lambda_y=4.0, lambda_q=0.2)
    assert swapped.max() < 0.4 and got.max() > 0.9


def test_bandwidth_is_half_the_mean_squared_distance_to_the_30_percent_nearest_views():
    # 11 views on a line, spacing 1: k = ⌊0.3·10⌋ = 3 nearest other views
    feats = torch.zeros(1, 11, 2, dtype=torch.float64)
    feats[0, :, 0] = torch.arange(11, dtype=torch.float64)
    h2 = kernel_bandwidth(feats)
    # end point: neighbours at 1, 2, 3 → 0.5·(1 + 4 + 9)/3 = 7/3; interior: 1, 1, 2 → 0.5·(1+1+4)/3 = 1
    # second point: 1 (left), 1 (right), 2 → 1 as well
    expected = torch.ones(11, dtype=torch.float64)
    expected[0] = expected[10] = 7 / 3
    torch.testing.assert_close(h2[0], expected, rtol=1e-12, atol=1e-12)
    # the kernel: exp(−‖x − m‖² / (2h²)) — at the mode x_5, view 0 (distance 5) gets exp(−25/(14/3))
    dens = gaussian_density(feats, feats[:, 5], h2)
    assert dens[0, 0].item() == pytest.approx(math.exp(-25 * 3 / 14), rel=1e-12)
    assert dens[0, 5].item() == 1.0


def test_bandwidth_against_a_float64_loop_for_64_views():
    g = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(2, 64, 6, generator=g, dtype=torch.float64), dim=-1)
    k = int(0.3 * 63)                                                   # 18
    for p in range(2):
        for s in range(64):
            d2 = sorted(float(((feats[p, s] - feats[p, t]) ** 2).sum()) for t in range(64) if t != s)
            assert kernel_bandwidth(feats)[p, s].item() == pytest.approx(0.5 * sum(d2[:k]) / k, rel=1e-10)


def _reference_mta(x, probs, lambda_y=0.2, lambda_q=4.0, iters=5, tol=1e-6):
    """One image, python floats: the released procedure written out step by step."""
    V = len(x)
    dot = lambda a, b: sum(u * v for u, v in zip(a, b))  # noqa: E731
    sq = lambda a, b: sum((u - v) ** 2 for u, v in zip(a, b))  # noqa: E731
    A = [[dot(probs[i], probs[j]) for j in range(V)] for i in range(V)]
    k = max(1, int(0.3 * (V - 1)))
    h2 = [0.5 * sum(sorted(sq(x[i], x[j]) for j in range(V) if j != i)[:k]) / k for i in range(V)]
    kern = lambda m: [math.exp(-sq(x[i], m) / (2 * h2[i])) for i in range(V)]  # noqa: E731
    y = [1.0 / V] * V
    m = list(x[0])
    for _ in range(iters):
        d = kern(m)
        for _ in range(iters):
            s = [(d[i] + lambda_q * sum(A[i][j] * y[j] for j in range(V))) / lambda_y for i in range(V)]
            top = max(s)
            e = [math.exp(v - top) for v in s]
            new = [v / sum(e) for v in e]
            moved = math.sqrt(sq(new, y))
            y = new
            if moved < tol:
                break
        for _ in range(iters):
            w = [yi * ki for yi, ki in zip(y, kern(m))]
            new = [sum(w[i] * x[i][c] for i in range(V)) / sum(w) for c in range(len(m))]
            norm = math.sqrt(dot(new, new))
            new = [v / norm for v in new]
            moved = math.sqrt(sq(new, m))
            m = new
            if moved < tol:
                break
    return m, y


def test_meanshift_matches_a_per_image_float64_loop():
    g = torch.Generator().manual_seed(0)
    P, V, D, K = 3, 12, 5, 4
    feats = torch.nn.functional.normalize(torch.randn(P, V, D, generator=g, dtype=torch.float64), dim=-1)
    feats[1] = torch.nn.functional.normalize(feats[1] + 2.0 * feats[1, :1], dim=-1)  # a tight image
    probs = (3 * torch.randn(P, V, K, generator=g, dtype=torch.float64)).softmax(-1)
    mode, y = meanshift_mode(feats, probs)
    for p in range(P):
        ref_m, ref_y = _reference_mta(feats[p].tolist(), probs[p].tolist())
        torch.testing.assert_close(mode[p], torch.tensor(ref_m, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(y[p], torch.tensor(ref_y, dtype=torch.float64), rtol=0, atol=1e-12)


def test_inlierness_concentrates_on_the_agreeing_cluster():
    # 12 views around one direction that agree on class 0, 4 scattered views voting elsewhere
    g = torch.Generator().manual_seed(1)
    centre = torch.nn.functional.normalize(torch.randn(8, generator=g, dtype=torch.float64), dim=0)
    inliers = centre + 0.15 * torch.randn(12, 8, generator=g, dtype=torch.float64)
    outliers = torch.randn(4, 8, generator=g, dtype=torch.float64)
    feats = torch.nn.functional.normalize(torch.cat([inliers, outliers]), dim=-1)[None]
    logits = torch.zeros(1, 16, 5, dtype=torch.float64)
    logits[0, :12, 0] = 4.0
    logits[0, 12:, 1:] = 4.0 * torch.eye(4, dtype=torch.float64)
    mode, y = meanshift_mode(feats, logits.softmax(-1))
    assert y[0, 12:].sum() < 1e-3                  # the outliers are switched off
    assert y.max() > 3 / 16                         # far from uniform (1/16)
    # the mode sits in the cluster (inliers are centre + noise, cos ≈ 0.93 to it), away from outliers
    assert torch.dot(mode[0], centre) > 0.9
    assert (feats[0, 12:] @ mode[0]).max() < 0.6


def test_one_view_gives_the_zero_shot_prediction(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    probs = build_procedure("mta", {"n_views": 1}).run(clf, tiny_images[:2], [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(probs, clf(tiny_images[:2]).softmax(1), atol=1e-5, rtol=1e-4)


def test_images_are_solved_independently(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure("mta", {"n_views": 8})
    together = proc.run(clf, tiny_images[:3], [4, 5, 6])
    alone = proc.run(clf, tiny_images[1:2], [5])
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-4)


def test_defaults_follow_the_released_code():
    p = MTAParams()
    assert (p.lambda_y, p.lambda_q, p.outer_steps, p.inner_steps, p.mode_steps) == (0.2, 4.0, 5, 5, 5)
    assert (p.tol, p.knn_ratio, p.steps) == (1e-6, 0.3, 0)
    assert p.augmix is False          # MTA's main.py: augmix=(len(set_id)>1 and args.tpt) → crops only
    for bad in ({"lambda_y": 0}, {"lambda_q": -1}, {"inner_steps": 0}, {"knn_ratio": 0}, {"tol": -1}):
        with pytest.raises(ConfigError, match="mta"):
            build_procedure("mta", bad)


def test_inlierness_is_far_from_uniform_on_the_demo_backbone():
    # the swapped-λ reading gave max y ≈ 0.017 ≈ 1/64 here: every view weighted alike
    from robustprompt.api import get_backbone
    from robustprompt.data import build_dataset, clip_transform

    ds = build_dataset("fashion_mnist")
    clf = PromptedClassifier(get_backbone("demo"), ds.classnames, TPT_PROMPT)
    split = ds.split("test")
    x = torch.stack([clip_transform(28)(split.load(i)) for i in range(4)])
    proc = build_procedure("mta", {"n_views": 64})
    solved = []
    solve = proc.solve
    proc.solve = lambda logits, feats: solved.append(solve(logits, feats)) or solved[-1]
    with torch.no_grad():
        probs = proc.run(clf, x, [0, 1, 2, 3])
    y = solved[0].inlierness
    assert y.shape == (4, 64) and torch.allclose(y.sum(1), torch.ones(4, dtype=y.dtype))
    assert (y.max(1).values > 4 / 64).all()                     # measured 0.13–0.69
    assert (probs.argmax(1) == torch.tensor(split.labels[:4])).sum() >= 2   # demo backbone ~86%
