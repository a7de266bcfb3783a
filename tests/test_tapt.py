"""TAPT (tta.tapt) and its statistics pre-pass (tta.token_stats): the alignment loss against a
hand-worked case, the statistics against a float64 computation from traced tokens, the file and
its refusals, per-image independence, bad parameters, and the adaptive attack."""
import copy
import hashlib
import logging

import pytest
import torch

from robustprompt.config import AttackSpec, ModelSpec
from robustprompt.engine.tta import TPT_PROMPT, defence_model_spec
from robustprompt.errors import ConfigError
from robustprompt.models import PromptConfig, PromptedClassifier, load_backbone
from robustprompt.models.trace import TraceSpec
from robustprompt.tta.procedures import build_procedure, list_procedures
from robustprompt.tta.tapt import TAPT_PROMPT, alignment_loss, tapt_alignment, view_moments
from robustprompt.tta.token_stats import (TokenStats, backbone_hash, check_stats_for, compute_token_stats,
                                          load_token_stats, save_token_stats)

from finite_diff import DirectionalCheck

PROMPT = PromptConfig(coupling="independent", n_ctx=2, depth=3, text_init="a photo of a", text_init_mode="phrase")
CLASSES = ["a", "b", "c"]


# ----------------------------------------------------------------------------- the loss, by hand
def _hand_case():
    """Two blocks, one token, two channels, two views of one image.
    block 0: views [1, 3], [3, 5] → μ = [2, 4], σ² = [1, 1]
    block 1: views [0, 2], [4, 2] → μ = [2, 2], σ² = [4, 0]"""
    tokens = [torch.tensor([[[[1., 3.]], [[3., 5.]]]]), torch.tensor([[[[0., 2.]], [[4., 2.]]]])]   # P×k×N×C
    moments = [view_moments(t) for t in tokens]
    # references for 3 tower blocks (block 2 never read); clean = the views' own moments
    adv = TokenStats(clean_mean=torch.tensor([[[2., 4.]], [[2., 2.]], [[9., 9.]]]),
                     clean_var=torch.tensor([[[1., 1.]], [[4., 0.]], [[9., 9.]]]),
                     adv_mean=torch.tensor([[[2., 2.]], [[0., 2.]], [[9., 9.]]]),
                     adv_var=torch.tensor([[[1., 3.]], [[4., 4.]], [[9., 9.]]]))
    return moments, adv


def test_view_moments_by_hand():
    (m0, v0), (m1, v1) = _hand_case()[0]
    for got, want in ((m0, [2., 4.]), (v0, [1., 1.]), (m1, [2., 2.]), (v1, [4., 0.])):
        assert got.flatten().tolist() == want


def test_alignment_loss_by_hand():
    """ℓ1, adversarial reference: block 0 ½·mean(0, 2) + ½·mean(0, 2) = 1; block 1 ½·mean(2, 0) +
    ½·mean(0, 4) = 1.5; sum 2.5. Clean reference: 0. ℓ2: block 0 ½·mean(0, 4) + ½·mean(0, 4) = 2,
    block 1 ½·mean(4, 0) + ½·mean(0, 16) = 5; sum 7. Block 1 alone: 1.5."""
    moments, s = _hand_case()
    means, variances = [m for m, _ in moments], [v for _, v in moments]
    assert alignment_loss(means, variances, s.adv_mean, s.adv_var, [0, 1]).tolist() == [2.5]
    assert alignment_loss(means, variances, s.clean_mean, s.clean_var, [0, 1]).tolist() == [0.0]
    assert alignment_loss(means, variances, s.adv_mean, s.adv_var, [0, 1], "l2").tolist() == [7.0]
    assert alignment_loss(means[1:], variances[1:], s.adv_mean, s.adv_var, [1]).tolist() == [1.5]
    for gamma, want in ((0.5, 1.25), (1.0, 2.5), (0.0, 0.0), (0.2, 0.5)):
        got = tapt_alignment(means, variances, s, [0, 1], gamma).item()
        assert got == pytest.approx(want, abs=1e-12)


# ----------------------------------------------------------------------------- the statistics pre-pass
@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return PromptedClassifier(load_backbone("rp-tiny"), CLASSES, PROMPT).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(5, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1])


ATTACK = AttackSpec(eps=8.0, alpha=2.0, steps=3)
SEEDS = [11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def stats(clf, data):
    x, y = data
    return compute_token_stats(clf, [(x[:2], y[:2], SEEDS[:2]), (x[2:], y[2:], SEEDS[2:])], ATTACK, seed=0)


def _direct(clf, x):
    """float64 mean and population variance over images of every block's traced input tokens."""
    with torch.no_grad():
        _, rec = clf.encode_image(x, trace=TraceSpec(blocks="all"))
    t = torch.stack([rec[b].x_in.double() for b in range(rec.n_layers)])      # L×S×N×C
    return t.mean(1), ((t - t.mean(1, keepdim=True)) ** 2).mean(1)


def test_stats_match_a_float64_computation_from_traced_tokens(clf, data, stats):
    x, y = data
    x_adv = ATTACK.threat().run(clf, x, y, seeds=SEEDS, seed=0)    # per-image seeds: batch-independent
    for (mean, var), (got_m, got_v) in ((_direct(clf, x), (stats.clean_mean, stats.clean_var)),
                                        (_direct(clf, x_adv), (stats.adv_mean, stats.adv_var))):
        assert got_m.shape == (3, 1 + 16 + 2, 32)
        torch.testing.assert_close(got_m.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_v.double(), var, atol=1e-5, rtol=1e-4)
    assert (stats.adv_mean - stats.clean_mean).abs().max() > 1e-2        # the attack moved the tokens
    # the prompt tokens are the prompt: mean = the block's vision prompt, variance 0
    vp = clf.model.prompt.vision_prompts()
    torch.testing.assert_close(stats.clean_mean[1, -2:], vp[1].detach(), atol=1e-6, rtol=0)
    assert stats.clean_var[1, -2:].abs().max() < 1e-8


def test_file_round_trip_and_refusal_for_another_backbone(clf, stats, tmp_path):
    path = tmp_path / "stats.safetensors"
    sha = save_token_stats(stats, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]     # no temporary file left
    back = load_token_stats(path, clf)
    for k in ("clean_mean", "clean_var", "adv_mean", "adv_var"):
        assert torch.equal(getattr(back, k), getattr(stats, k))
    m = back.meta
    assert back.sha256 == sha and m["n"] == 5 and m["seed"] == 0 and m["toolkit_version"]
    assert m["backbone_hash"] == backbone_hash(clf) and m["prompt"] == PROMPT.to_dict()
    assert m["threat"]["eps"] == pytest.approx(8 / 255) and m["threat"]["steps"] == 3
    assert set(back.prompt_state) == set(clf.prompt_state_dict())
    torch.manual_seed(1)
    other = PromptedClassifier(load_backbone("rp-tiny"), CLASSES, PROMPT)
    with pytest.raises(ConfigError) as err:
        load_token_stats(path, other)
    msg = str(err.value)
    assert backbone_hash(clf) in msg and backbone_hash(other) in msg and "\n" not in msg


def test_statistics_of_another_activation_are_refused(clf, stats):
    """The same weights with and without QuickGELU share a weight hash but are two networks."""
    other = copy.copy(stats)
    other.meta = {**stats.meta, "backbone": {**stats.meta["backbone"], "quick_gelu": True}}
    assert not clf.backbone_info.get("quick_gelu")
    with pytest.raises(ConfigError, match="quick_gelu=True"):
        check_stats_for(other, clf)
    check_stats_for(stats, clf)


@pytest.mark.parametrize("extra, message", [
    (["--model", "rp-tiny"], "no --dataset given"),                               # the demo's 28-px data, silently
    (["--attack", "autoattack"], "AutoAttack is not supported"),
    (["--seed", str(2 ** 70)], "seed"),
    (["--out", "FILE/stats.safetensors"], "cannot create"),                  # a file where its folder would be
])
def test_tta_stats_refuses_in_one_line_before_any_work(extra, message, tmp_path, capsys):
    from robustprompt.cli import main

    args = ["tta-stats", "--no-progress", "--out", str(tmp_path / "s.safetensors"), *extra]
    (tmp_path / "file").write_text("")
    args = [a.replace("FILE", str(tmp_path / "file")) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_token_stats(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable"):
        load_token_stats(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- the procedure
@pytest.fixture(scope="module")
def stats_file(stats, tmp_path_factory):
    path = tmp_path_factory.mktemp("tapt") / "stats.safetensors"
    save_token_stats(stats, path)
    return str(path)


def _proc(stats_file, **kw):
    return build_procedure("tapt", {"stats": stats_file, "n_views": 10, **kw})


def test_registered_with_its_prompt_and_the_file_hash(stats_file):
    assert "tapt" in list_procedures()
    proc = _proc(stats_file)
    assert proc.title == "TAPT" and proc.default_prompt == TAPT_PROMPT
    assert proc.params.stats_sha256 == hashlib.sha256(open(stats_file, "rb").read()).hexdigest()
    p = proc.params
    assert (p.steps, p.lr, p.weight_decay, p.n_views, p.select_ratio, p.augmix) == (1, 5e-4, 0.01, 10, 0.1, False)
    assert (p.align_weight, p.adv_weight, p.align_layers, p.align_norm) == (100.0, 0.5, "code", "l1")
    assert (TAPT_PROMPT.coupling, TAPT_PROMPT.n_ctx, TAPT_PROMPT.depth) == ("independent", 2, 9)
    # the engine gives TAPT its own prompt and every other procedure TPT's, as before
    assert defence_model_spec(ModelSpec(name="rp-tiny"), proc).prompt == TAPT_PROMPT
    assert defence_model_spec(ModelSpec(name="rp-tiny"), build_procedure("tpt")).prompt == TPT_PROMPT
    assert defence_model_spec(ModelSpec(name="rp-tiny")).prompt == TPT_PROMPT


def test_images_are_independent_and_order_does_not_matter(clf, data, stats_file):
    x = data[0][:3]
    before = clf.prompt_state_dict()
    proc = _proc(stats_file)
    with torch.no_grad():
        together = proc.run(clf, x, [1, 2, 3])
        reverse = proc.run(clf, x.flip(0), [3, 2, 1]).flip(0)
        alone = torch.cat([proc.run(clf, x[i:i + 1], [s]) for i, s in enumerate([1, 2, 3])])
        again = proc.run(clf, x, [1, 2, 3])
    for other in (reverse, alone, again):
        torch.testing.assert_close(other, together, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, clf.prompt_state_dict()[k]) for k, v in before.items())   # clf untouched


def test_tuning_changes_the_prediction_and_the_alignment_matters(clf, data, stats_file):
    x = data[0][:3]
    with torch.no_grad():
        untuned = _proc(stats_file, steps=0).run(clf, x, [1, 2, 3])
        entropy_only = _proc(stats_file, align_weight=0.0, lr=0.05).run(clf, x, [1, 2, 3])
        tapt = _proc(stats_file, lr=0.05).run(clf, x, [1, 2, 3])
        tapt_all = _proc(stats_file, lr=0.05, align_layers="all").run(clf, x, [1, 2, 3])
    # no tuning: the classifier's own prediction on the test image
    torch.testing.assert_close(untuned, clf(x).softmax(1), atol=1e-5, rtol=1e-4)
    assert (entropy_only - untuned).abs().max() > 1e-4
    assert (tapt - entropy_only).abs().max() > 1e-4
    assert (tapt_all - tapt).abs().max() > 1e-6


@pytest.mark.parametrize("params, match", [
    ({"align_layers": "first"}, "align_layers"), ({"adv_weight": 1.5}, "adv_weight"),
    ({"align_norm": "l3"}, "align_norm"), ({"align_weight": -1.0}, "align_weight"),
    ({"stats_sha256": "0" * 64}, "stats_sha256"), ({"n_views": 0}, "n_views"),
])
def test_bad_params_are_refused(stats_file, params, match):
    with pytest.raises(ConfigError, match=match):
        _proc(stats_file, **params)


def test_missing_stats_and_unfit_models_are_refused(clf, data, stats_file, tmp_path):
    with pytest.raises(ConfigError, match="tta-stats"):
        build_procedure("tapt")
    with pytest.raises(ConfigError, match="does not exist"):
        build_procedure("tapt", {"stats": str(tmp_path / "nope.safetensors")})
    text_only = PromptedClassifier(load_backbone("rp-tiny"), CLASSES, TPT_PROMPT)
    with pytest.raises(ConfigError, match="no vision prompt"):
        _proc(stats_file).initial_prompts(text_only)
    # the same backbone (same seed), another prompt layout (n_ctx 3): it cannot take the file's prompt
    torch.manual_seed(0)
    wide = PromptedClassifier(load_backbone("rp-tiny"), CLASSES,
                              PromptConfig(coupling="independent", n_ctx=3, depth=3))
    with pytest.raises(ConfigError, match="another layout"):
        _proc(stats_file).initial_prompts(wide)
    with pytest.raises(ConfigError, match="prompt_from_stats"):
        _proc(stats_file, prompt_from_stats=False).initial_prompts(_shifted_prompt())


def _shifted_prompt() -> PromptedClassifier:
    """The fixture's backbone (same seed) with another prompt (every entry + 0.1)."""
    torch.manual_seed(0)
    other = PromptedClassifier(load_backbone("rp-tiny"), CLASSES, PROMPT)
    with torch.no_grad():
        for p in other.prompt_parameters():
            p.add_(0.1)
    return other


def test_another_initial_prompt_is_replaced_by_the_stats_one(clf, stats_file, caplog):
    other = _shifted_prompt()
    with caplog.at_level(logging.WARNING):
        _proc(stats_file).initial_prompts(other)
    assert "starting from the prompt" in caplog.text
    assert all(torch.equal(v, other.prompt_state_dict()[k]) for k, v in clf.prompt_state_dict().items())


def test_trained_prompts_are_never_replaced_by_the_stats_one(clf, stats_file):
    """A model whose prompts were loaded from a run (--run) keeps them: statistics of another prompt
    are refused, not swapped in (the paper starts TAPT from adversarially trained prompts)."""
    other = _shifted_prompt()
    other.prompt_origin = "runs/train/ivlp-x/prompts.safetensors"
    before = {k: v.clone() for k, v in other.prompt_state_dict().items()}
    with pytest.raises(ConfigError, match="tta-stats --run"):
        _proc(stats_file).initial_prompts(other)
    assert all(torch.equal(v, before[k]) for k, v in other.prompt_state_dict().items())
    trained_same = copy.deepcopy(clf)   # the statistics' own prompt, loaded from a run: accepted
    trained_same.prompt_origin = "runs/train/ivlp-y/prompts.safetensors"
    _proc(stats_file).initial_prompts(trained_same)


@pytest.fixture(scope="module")
def clf64(clf):
    c = copy.deepcopy(clf).double()
    c._cache = None   # text features cached in float32 before .double()
    return c


def _perturbed(prompts, g, scale=0.05):
    """Two per-image copies (P = 2) of per-block prompts: the prompt, and the prompt + noise."""
    return [torch.stack([t, t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype)]) for t in prompts]


def test_objective_matches_a_per_image_float64_loop(clf64, stats_file):
    """Per-image prompt copies through the batched pass (one image tower call, per-image vision
    prompts) = each image alone with its prompt loaded into the model: marginal entropy of the
    mean softmax + 100/depth · Σ_{b=0,1} ½·A_b(adv) + ½·A_b(clean), moments over the views."""
    proc = _proc(stats_file)
    g = torch.Generator().manual_seed(3)
    views = torch.rand(2, 4, 3, 32, 32, generator=g, dtype=torch.float64)      # P = 2 images × k = 4 views
    text = _perturbed(proc.initial_prompts(clf64), g)
    vision = _perturbed(proc.initial_vision_prompts(clf64), g)
    got = proc.objective(clf64, views, text, vision)
    ref = load_token_stats(stats_file)
    for i in range(2):
        m = copy.deepcopy(clf64)
        with torch.no_grad():
            for b in range(PROMPT.depth):
                m.model.prompt.text_ctx[b].copy_(text[b][i])
                m.model.prompt.vision_ctx[b].copy_(vision[b][i])
        m._cache = None
        with torch.no_grad():
            feats, rec = m.encode_image(views[i], trace=TraceSpec(blocks="all"))
            p = (m.model.logit_scale * feats @ m.encode_text()[0].t()).softmax(-1).mean(0)
        want = -(p * p.log()).sum()
        for b in (0, 1):   # depth 3: the released loop's blocks 0 … depth − 2
            t = rec[b].x_in
            mu, var = t.mean(0), t.var(0, unbiased=False)
            for rm, rv in ((ref.adv_mean, ref.adv_var), (ref.clean_mean, ref.clean_var)):
                want = want + 100 / 3 * 0.5 * (0.5 * (mu - rm[b].double()).abs().mean()
                                              + 0.5 * (var - rv[b].double()).abs().mean())
        assert float(got[i]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_gradient_through_the_update_matches_finite_differences(clf64, stats_file, norm):
    """float64, crops + flips: the directional derivative of log p_y with through_update equals
    the finite difference of the non-differentiable defence (central differences at h = 2e-6 and
    1e-6, Richardson-extrapolated; the view selection does not change for steps this small), and
    holding the tuned prompts constant misses the update's path (3 AdamW steps, lr 0.1).
    The ℓ1 alignment is piecewise smooth: at h = 1e-4 a central difference straddles a kink
    (measured: 0.22 at 1e-3, −6.8 at 1e-4, 1.308515 at 1e-5 and 1e-6; exact 1.308515; held −1.71,
    3.0 away); with ℓ2 every h agrees (1.186094)."""
    proc = _proc(stats_file, n_views=8, steps=3, lr=0.1, align_norm=norm)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    check = DirectionalCheck(lambda z, **kw: proc.run(clf64, z, [1, 2], **kw), x,
                             torch.randn(x.shape, generator=g, dtype=torch.float64), torch.tensor([0, 1]))
    central, directional = check.central, check.directional

    fd = (4 * central(1e-6) - central(2e-6)) / 3
    exact, held = directional(True), directional(False)
    assert abs(exact - fd) < 1e-6 * max(1.0, abs(fd))
    assert abs(held - fd) > 10 * abs(exact - fd) and abs(held - fd) > 1e-8


# ----------------------------------------------------------------------------- attacks
def test_differentiable_paths_carry_a_gradient(clf, data, stats_file):
    proc = _proc(stats_file, lr=0.05)
    x = data[0][:2].clone().requires_grad_(True)
    grads = []
    for through in (False, True):
        out = proc.run(clf, x, [1, 2], differentiable=True, through_update=through)
        with torch.no_grad():
            torch.testing.assert_close(out, proc.run(clf, x, [1, 2]), atol=1e-5, rtol=1e-4)
        grads.append(torch.autograd.grad(out[:, 0].log().sum(), x)[0])
    assert all(g.abs().sum() > 0 for g in grads)
    assert (grads[0] - grads[1]).abs().max() > 0    # the update's own path contributes


def test_adaptive_attack_is_at_least_as_strong_as_the_non_adaptive_one(clf, data, stats_file):
    from robustprompt.tta.adaptive import AdaptiveAttack, _evaluate, adaptive_attack

    x, y = data[0][:3], data[1][:3]
    proc, vs, eps = _proc(stats_file, n_views=8), [7, 8, 9], 4 / 255
    nonadaptive = AttackSpec(eps=4.0, steps=5).threat().run(clf, x, y, seeds=[1, 2, 3], seed=0)
    spec = AdaptiveAttack(steps=3)
    adv = adaptive_attack(proc, clf, x, y, eps=eps, norm="linf", spec=spec, attack_seeds=[1, 2, 3],
                          view_seeds=vs, start=nonadaptive)
    assert (adv - x).abs().max() <= eps + 1e-6
    s, a = (_evaluate(proc, clf, z, y, vs, 1, spec, None) for z in (nonadaptive, adv))
    assert ((a.fooled > s.fooled) | ((a.fooled == s.fooled) & (a.loss >= s.loss - 1e-6))).all()
    with torch.no_grad():
        wrong = lambda z: int((proc.run(clf, z, vs).argmax(1) != y).sum())   # noqa: E731
    assert wrong(adv) >= wrong(nonadaptive)


# ----------------------------------------------------------------------------- the commands
@pytest.fixture
def folder(tmp_path):
    """4 RGB images of 2 classes in an imagefolder layout, and rp-tiny weights in a file (a random
    init is another backbone in every process; a file has one hash)."""
    from PIL import Image

    root = tmp_path / "images"
    for c, color in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (36, 36), tuple(v + 10 * i for v in color)).save(root / c / f"{i}.png")
    torch.manual_seed(0)
    torch.save(load_backbone("rp-tiny").model.state_dict(), tmp_path / "tiny.pt")
    return root


def test_tta_stats_command_then_a_tapt_run(folder, tmp_path, capsys):
    from robustprompt.cli import main

    model = ["--model", "rp-tiny", "--pretrained", str(tmp_path / "tiny.pt"), "--dataset", f"imagefolder:{folder}",
             "--coupling", "independent", "--n-ctx", "2", "--depth", "3", "--no-progress"]
    out = tmp_path / "stats.safetensors"
    assert main(["tta-stats", *model, "--steps", "1", "--eps", "4", "--out", str(out)]) == 0
    meta = load_token_stats(out).meta
    assert meta["n"] == 4 and meta["dataset"] == f"imagefolder:{folder}" and meta["threat"]["steps"] == 1
    # the untrained prompt is drawn from the config's seed: the same config gives the same file,
    # whatever the process's random state was before
    torch.manual_seed(12345)
    again = tmp_path / "again.safetensors"
    assert main(["tta-stats", *model, "--steps", "1", "--eps", "4", "--out", str(again)]) == 0
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(out.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(["tta-stats", *model, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustprompt tta-stats: error: --out") and "is a folder" in err and "\n" not in err
    # a separate process's untrained prompt is another draw: TAPT starts from the file's
    assert main(["tta", *model, "--method", "tapt", "--param", f"stats={out}", "--param", "n_views=4",
                 "--attack", "none", "--out", str(tmp_path / "run")]) == 0
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tta_params"]["stats_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert metrics["prompt"]["coupling"] == "independent"
