"""Test-time procedures: every one runs, images are independent problems, attacks are recorded."""
import json

import pytest
import torch

from robustprompt.cli import main
from robustprompt.config import AttackSpec, DataSpec, ModelSpec
from robustprompt.engine.evaluate import EvalConfig, evaluate
from robustprompt.engine.tta import TPT_PROMPT, AdaptiveSpec, TTAConfig, TTAMethodSpec, run_tta
from robustprompt.errors import ConfigError
from robustprompt.models import PromptConfig, PromptedClassifier
from robustprompt.tta.procedures import build_procedure, list_procedures

SMALL = {"n_views": 8}


@pytest.mark.parametrize("name", ["tpt", "ctpt", "mta", "rtpt", "atpt"])
def test_each_procedure_on_the_tiny_backbone(name, tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure(name, SMALL)
    before = [p.detach().clone() for p in clf.prompt_parameters()]
    probs = proc.run(clf, tiny_images[:2], [1, 2])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    # the classifier's own prompt is never modified: tuning works on per-image copies
    assert all(torch.equal(a, b) for a, b in zip(before, clf.prompt_parameters()))


def test_registry_lists_all():
    assert list_procedures() == ["atpt", "ctpt", "mta", "rtpt", "tapt", "tpt", "ttc"]
    with pytest.raises(ConfigError, match="unknown test-time procedure"):
        build_procedure("ttt")
    with pytest.raises(ConfigError, match="fusion"):
        build_procedure("atpt", {"fusion": "mean"})
    for key in ("mix_source", "tv_resolution", "rollout_weights", "fuse_space"):
        with pytest.raises(ConfigError, match=key):
            build_procedure("atpt", {key: "nope"})
    with pytest.raises(ConfigError, match="fuse_space"):
        build_procedure("rtpt", {"fuse_space": "mean"})


def _record_rollouts(monkeypatch):
    import robustprompt.tta.atpt as atpt_module

    calls = []
    original = atpt_module.rollout

    def recording(clf, images, **kw):
        calls.append((images.detach().clone(), kw))
        return original(clf, images, **kw)

    monkeypatch.setattr(atpt_module, "rollout", recording)
    return calls


@pytest.mark.parametrize("fusion, passes", [("tv", 2), ("rtpt", 1)])
def test_atpt_maps_come_from_batched_passes_over_bases_and_final_views(fusion, passes, tiny_backbone, tiny_images,
                                                                       monkeypatch):
    """One batched rollout over all P·V bases (the masks), and — for TV weights — one over all P·V
    final views: each kept view is weighted by its own map, not its base's."""
    from robustprompt.tta.views import augmix_views

    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure("atpt", {**SMALL, "fusion": fusion, "rollout_weights": "code"})
    calls = _record_rollouts(monkeypatch)
    vs = proc.make_views(clf, tiny_images[:3], [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert len(calls) == passes and all(c[0].shape == (3 * 8, 3, 32, 32) for c in calls)
    assert all(c[1]["rollout_weights"] == "code" for c in calls)
    bases = torch.stack([augmix_views(img, 8, torch.Generator().manual_seed(s), crop_scale=(0.08, 1.0)).bases
                         for img, s in zip(tiny_images[:3], (1, 2, 3))])
    torch.testing.assert_close(calls[0][0], bases.flatten(0, 1))
    if fusion == "tv":
        torch.testing.assert_close(calls[1][0], vs.views.flatten(0, 1))
        assert vs.extra["maps"].shape == (3, 8, 4, 4)
        assert not torch.allclose(calls[1][0][1:8], calls[0][0][1:8])  # the final views are not the bases


@pytest.mark.parametrize("name", ["rtpt", "atpt"])
def test_fusion_is_over_logits_by_default(name, tiny_backbone, tiny_images):
    """R-TPT's and A-TPT's released code fuse weighted logits; probabilities stay selectable."""
    from robustprompt.tta.rtpt import reliability_weights

    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    extra = {"fusion": "rtpt"} if name == "atpt" else {}
    proc = build_procedure(name, {**SMALL, "steps": 0, **extra})
    probs = proc.run(clf, tiny_images[:2], [4, 5])
    probs_p = build_procedure(name, {**SMALL, "steps": 0, "fuse_space": "probs", **extra}).run(
        clf, tiny_images[:2], [4, 5])
    vs = proc.make_views(clf, tiny_images[:2], [torch.Generator().manual_seed(s) for s in (4, 5)])
    with torch.no_grad():
        feats = clf.encode_image(vs.views.flatten(0, 1))[0].view(2, 8, -1).double()
        z = clf.model.logit_scale.double() * feats @ clf.text_features().double().t()
    w = reliability_weights(feats, 20, 0.01)
    torch.testing.assert_close(probs.double(), (w[..., None] * z).sum(1).softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs_p.double(), (w[..., None] * z.softmax(-1)).sum(1), atol=1e-5, rtol=0)


def test_adaptive_attack_differentiates_through_atpt_views(tiny_backbone, tiny_images):
    """EOT-PGD through the attention-guided views, the final views' maps (constants) and the
    logit fusion: a finite, non-zero gradient reaches the image and the step moves it."""
    from robustprompt.attacks.threat import ThreatModel
    from robustprompt.tta.adaptive import eot_pgd

    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure("atpt", SMALL)
    x = tiny_images[:2].clone().requires_grad_(True)
    probs = proc.run(clf, x, [1, 2], differentiable=True)
    (g,) = torch.autograd.grad(probs[:, 0].sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    threat = ThreatModel(eps=4 / 255, alpha=1 / 255, steps=2, random_start=False)
    adv = eot_pgd(proc, clf, tiny_images[:2], torch.tensor([0, 1]), threat, [1, 2])
    delta = adv - tiny_images[:2]
    assert delta.abs().max() <= 4 / 255 + 1e-6 and delta.abs().max() > 0


@pytest.mark.parametrize("name", ["tpt", "rtpt", "atpt"])
def test_an_image_does_not_depend_on_the_others(name, tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure(name, SMALL)
    alone = proc.run(clf, tiny_images[1:2], [22])
    together = proc.run(clf, tiny_images[:3], [21, 22, 23])
    after_others = (proc.run(clf, tiny_images[2:3], [5]), proc.run(clf, tiny_images[1:2], [22]))[1]
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after_others, alone, atol=1e-6, rtol=0)


def test_tuning_changes_the_prediction_distribution(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    tuned = build_procedure("tpt", {**SMALL, "lr": 0.5}).run(clf, tiny_images[:2], [1, 2])
    untuned = build_procedure("tpt", {**SMALL, "steps": 0}).run(clf, tiny_images[:2], [1, 2])
    with torch.no_grad():
        plain = clf(tiny_images[:2]).softmax(1)
    torch.testing.assert_close(untuned, plain, atol=1e-5, rtol=1e-4)  # no step: view 0 = CLIP
    assert not torch.allclose(tuned, untuned, atol=1e-4)


def test_procedures_need_a_text_prompt(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b"], PromptConfig(coupling="vision", n_ctx=2, depth=1))
    with pytest.raises(ConfigError, match="tunes the text prompt"):
        build_procedure("tpt", SMALL).run(clf, tiny_images[:1], [1])
    assert build_procedure("mta", SMALL).run(clf, tiny_images[:1], [1]).shape == (1, 2)


def _cfg(**kw):
    base = dict(model=ModelSpec(name="demo"), data=DataSpec(dataset="fashion_mnist", subset=12, batch_size=4),
                method=TTAMethodSpec("atpt", {"n_views": 16}), attack=AttackSpec(eps=8, alpha=2, steps=3),
                device="cpu")
    base.update(kw)
    return TTAConfig(**base)


def test_tta_run_directory_and_non_adaptive_attack(tmp_path):
    m = run_tta(_cfg(), tmp_path / "tta", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "tta" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and {"base_clean_pred", "base_adv_pred", "clean_pred", "adv_pred"} <= set(recs[0])
    assert m["threat"]["adaptive"] == [] and "before any adaptation" in m["threat"]["target"]
    assert [a["key"] for a in m["attacks"]] == ["nonadaptive"] and m["worst_case"]["acc"] == m["robust_acc"]
    assert all(set(r["adv_preds"]) == {"nonadaptive"} and r["adv_preds"]["nonadaptive"] == r["adv_pred"]
               for r in recs)
    assert m["tta_method"] == "atpt" and m["quantize_adv"] is False
    # the non-adaptive attack is plain PGD on CLIP with the initial prompt: the same examples an
    # evaluation of zero-shot CLIP finds with the same seeds
    ev = evaluate(EvalConfig(model=ModelSpec(name="demo"), data=DataSpec(dataset="fashion_mnist", subset=12,
                                                                           batch_size=4),
                             attack=AttackSpec(eps=8, alpha=2, steps=3), device="cpu"), tmp_path / "ev", progress=False)
    ev_recs = [json.loads(line) for line in (tmp_path / "ev" / "records.jsonl").read_text().splitlines()]
    assert [r["base_adv_pred"] for r in recs] == [r["adv_pred"] for r in ev_recs]
    assert m["base_robust_acc"] == ev["robust_acc"]


def test_autoattack_chunks_are_defended_batch_size_images_at_a_time(tmp_path, monkeypatch):
    """With AutoAttack a batch is one whole chunk (6 images here); the defence and the adaptive attack
    still take data.batch_size (2) at a time, and every image is recorded. The attacks are stubbed:
    only the batching is under test."""
    import robustprompt.tta.adaptive as adaptive_module
    from robustprompt.attacks.threat import ThreatModel
    from robustprompt.tta.procedures import procedure_class

    attacked, defended, adapted = [], [], []

    def fake_threat_run(self, model, x, y, **kw):
        attacked.append(len(x))
        return x.clone()

    def fake_adaptive(procedure, clf, x, y, *, start, **kw):
        adapted.append(len(x))
        return start

    cls = procedure_class("tpt")
    original = cls.run
    monkeypatch.setattr(ThreatModel, "run", fake_threat_run)
    monkeypatch.setattr(adaptive_module, "adaptive_attack", fake_adaptive)
    monkeypatch.setattr(cls, "run", lambda self, clf, images, seeds, **kw: (
        defended.append(len(images)), original(self, clf, images, seeds, **kw))[1])
    cfg = _cfg(data=DataSpec(dataset="fashion_mnist", subset=6, batch_size=2), method=TTAMethodSpec("tpt", SMALL),
               attack=AttackSpec(attack="autoattack", eps=8, aa_chunk=6), adaptive=["known"])
    m = run_tta(cfg, tmp_path / "tta", progress=False)
    assert attacked == [6]                        # AutoAttack: the whole chunk in one run
    assert defended and max(defended) == 2 and sum(defended) == 6 * 3   # clean, non-adaptive, adaptive
    assert adapted == [2, 2, 2]
    assert m["n"] == 6
    assert m["environment"]["eot_chunk"] == cfg.adaptive_attack.eot   # recorded (CPU: every draw in one call)


@pytest.mark.slow
def test_adaptive_attack_is_at_least_as_strong(tmp_path):
    plain = run_tta(_cfg(), tmp_path / "plain", progress=False)
    small = AdaptiveSpec(steps=5, eot=2)
    adaptive = run_tta(_cfg(adaptive=True, adaptive_attack=small), tmp_path / "adaptive", progress=False)
    assert adaptive["robust_acc"] <= plain["robust_acc"]
    assert adaptive["threat"]["adaptive"] == ["secret", "known"] and "whole defence" in adaptive["threat"]["target"]
    assert adaptive["clean_acc"] == plain["clean_acc"]  # same views on the clean image
    accs = {a["key"]: a["acc"] for a in adaptive["attacks"]}
    assert set(accs) == {"nonadaptive", "adaptive_secret", "adaptive_known"}
    assert accs["nonadaptive"] == plain["robust_acc"]
    assert adaptive["robust_acc"] <= min(accs.values())


def test_worst_case_per_image_over_the_attacks(tmp_path, monkeypatch):
    """The engine's bookkeeping, with a stand-in attack whose outcome is known: per image the
    defence counts as robust only if it is right under every attack; each attack is reported."""
    from robustprompt.tta import adaptive as adaptive_module

    calls = []

    def fake_attack(procedure, clf, x, y, *, eps, norm, spec, attack_seeds, view_seeds=None, start=None, chunk=None):
        calls.append(view_seeds)
        # "known" returns a heavily perturbed image, "secret" returns the non-adaptive start
        return start if view_seeds is None else (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1)

    monkeypatch.setattr(adaptive_module, "adaptive_attack", fake_attack, raising=False)
    monkeypatch.setattr(AdaptiveSpec, "build", lambda self: self)
    m = run_tta(_cfg(adaptive=["secret", "known"], attack=AttackSpec(eps=16, alpha=4, steps=3)), tmp_path / "run",
                progress=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    # the secret attack never sees the evaluation's view seeds; the known one gets exactly them
    assert any(c is None for c in calls) and any(c is not None for c in calls)
    for r in recs:
        p = r["adv_preds"]
        assert p["adaptive_secret"] == p["nonadaptive"]       # the fake returned the start itself
        wrong = [k for k in ("nonadaptive", "adaptive_secret", "adaptive_known") if p[k] != r["label"]]
        assert r["adv_pred"] == (p[wrong[0]] if wrong else p["adaptive_known"])
    acc = {a["key"]: a["acc"] for a in m["attacks"]}
    for key in acc:
        assert acc[key] == pytest.approx(100 * sum(r["adv_preds"][key] == r["label"] for r in recs) / len(recs))
    worst = 100 * sum(all(v == r["label"] for v in r["adv_preds"].values()) for r in recs) / len(recs)
    assert m["robust_acc"] == pytest.approx(worst) == m["worst_case"]["acc"]
    assert m["worst_case"]["over"] == ["nonadaptive", "adaptive_secret", "adaptive_known"]
    assert m["defence_seed"] == 1


def test_adaptive_config_is_validated():
    with pytest.raises(ConfigError, match="adaptive"):
        _cfg(adaptive=["secret", "leaked"])
    with pytest.raises(ConfigError, match="adaptive_attack"):
        AdaptiveSpec(loss="kl")
    assert _cfg(adaptive=True).randomness_modes == ["secret", "known"] and _cfg().randomness_modes == []


def test_cli_tta_and_quantize_flag(tmp_path, capsys):
    rc = main(["tta", "--method", "tpt", "--param", "n_views=8", "--subset", "4", "--eps", "4", "--steps", "2",
               "--quantize-adv", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["quantize_adv"] is True and m["threat"]["quantize_adv"] is True
    assert "robust accuracy" in capsys.readouterr().out
    assert main(["tta", "--method", "nope", "--subset", "2", "--out", str(tmp_path / "x")]) == 2


@pytest.fixture(scope="module")
def demo_classifier():
    from robustprompt.api import get_backbone
    from robustprompt.data import build_dataset

    ds = build_dataset("fashion_mnist")
    return PromptedClassifier(get_backbone("demo"), ds.classnames, TPT_PROMPT), ds


@pytest.mark.parametrize("name", ["tpt", "ctpt", "mta", "rtpt", "atpt"])
def test_each_procedure_on_the_demo_backbone(name, demo_classifier):
    from robustprompt.data import clip_transform

    clf, ds = demo_classifier
    split = ds.split("test")
    x = torch.stack([clip_transform(28)(split.load(i)) for i in range(4)])
    probs = build_procedure(name, {"n_views": 16, "crop_scale": 0.6}).run(clf, x, [0, 1, 2, 3])
    assert probs.shape == (4, 10) and torch.allclose(probs.sum(1), torch.ones(4))
    # on clean images the defence mostly agrees with the labels (the demo backbone is ~86% accurate)
    assert (probs.argmax(1) == torch.tensor(split.labels[:4])).sum() >= 2


def test_text_tower_runs_once_per_tuning_step(tiny_backbone, tiny_images):
    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    with torch.no_grad():
        clf.text_features()  # the initial prompt's features, cached by the classifier
    calls = {"n": 0}
    original = clf.model.encode_text

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    clf.model.encode_text = counting
    build_procedure("rtpt", {"n_views": 32, "steps": 2}).run(clf, tiny_images[:3], [1, 2, 3])
    assert calls["n"] == 3  # two tuning steps + the final features, for all views and all 3 images at once


def test_stacking_on_trained_prompts(tmp_path):
    from robustprompt.engine.train import train, train_config_from_dict

    run = tmp_path / "cba"
    train(train_config_from_dict({"model": {"name": "demo", "prompt": {"depth": 2}}, "method": {"name": "cba_fapt"},
                                  "data": {"shots": 2, "batch_size": 10, "augment": "flip"}, "optim": {"epochs": 1},
                                  "train_attack": {"eps": 4, "alpha": 2}, "device": "cpu"}), run, progress=False)
    m = run_tta(_cfg(model=ModelSpec(run=str(run)), method=TTAMethodSpec("rtpt", {"n_views": 8})), tmp_path / "tta",
                progress=False)
    assert m["method"] == "cba_fapt" and m["prompt"]["coupling"] == "coupled-v2t"
    from robustprompt.api import classifier_from_spec
    from robustprompt.data import build_dataset

    clf = classifier_from_spec(ModelSpec(run=str(run)), build_dataset("fashion_mnist"))
    proc = build_procedure("rtpt", {"n_views": 8})
    init = proc.initial_prompts(clf)
    for a, b in zip(init, clf.model.prompt.text_prompts()):   # starts from the learned text-side prompts
        torch.testing.assert_close(a, b.detach())
    assert len(init) == 2  # every prompted block's text context is tuned; the vision prompts stay as trained


def test_atpt_defaults_follow_the_released_code():
    """The released A-TPT code has no TV step: its numbers come from R-TPT's fusion over logits.
    The paper's TV weighting is selectable and then fuses probabilities (its Σ w p)."""
    p = build_procedure("atpt").params
    assert (p.fusion, p.space, p.mix_source) == ("rtpt", "logits", "chain")
    assert build_procedure("atpt", {"fusion": "tv"}).params.space == "probs"
    assert build_procedure("atpt", {"fusion": "tv", "fuse_space": "logits"}).params.space == "logits"


def test_atpt_without_augmix_uses_the_crop_bases(tiny_backbone, tiny_images):
    """As the released atpt.py on ImageNet (augmix=False): mix = base, so the views are the bases
    themselves, and no rollout is needed to build them."""
    from robustprompt.tta.views import augmix_views

    clf = PromptedClassifier(tiny_backbone, ["a", "b", "c"], TPT_PROMPT)
    proc = build_procedure("atpt", {**SMALL, "augmix": False})
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    vs = proc.make_views(clf, tiny_images[:2], gens)
    want = torch.stack([augmix_views(img, 8, torch.Generator().manual_seed(s), use_augmix=False,
                                     crop_scale=(proc.params.crop_scale, 1.0)).views
                        for img, s in zip(tiny_images[:2], (4, 5))])
    torch.testing.assert_close(vs.views, want)
