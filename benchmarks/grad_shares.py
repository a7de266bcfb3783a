"""Is every loss term alive? Each weighted term's share of the prompt gradient, for every method.

For loss = Σ_k w_k·L_k, the share of term k is ‖∇_θ(w_k·L_k)‖ / Σ_j ‖∇_θ(w_j·L_j)‖ over all
trainable parameters θ (robustprompt.engine.grad_share), measured on one training batch at the
method's initial prompts, on two backbones:

  demo      the embedded demo backbone (Fashion-MNIST, 28 px), 16 training images, the demo's
            prompt depth 3 (at most 4 text context tokens: CoOp's and APT's 16 do not fit its 16-token
            text context) and training attack (PGD-2, ε = 4/255, α = 2/255) — what `make demo` trains;
  ViT-B-32  a random-init open_clip ViT-B/32, 224 px random images, 10 classes, 8 images, each
            method's paper layout (2 tokens × 9 blocks) and the papers' training attack PGD-2,
            ε = α = 1/255.

The test-time loss with more than one term, C-TPT's marginal entropy − λ·ATFD, is measured the
same way on the text prompt TPT tunes (4 tokens from "a photo of a"), 64 views of 2 test images
(16 views at 224 px on ViT-B/32), at the initial prompt.
TAPT's test-time loss, entropy + (w/depth)·[γ·A(adv) + (1−γ)·A(clean)], is measured on the per-image
text + vision prompt copies TAPT tunes, at the initial prompt, on the selected views of 2 test
images, with the terms built by TAPT's own functions (and checked against `TAPT.objective`): on the
demo, its TAPT setting (TAPT_PROMPT_DEMO, 64 crop + flip views, statistics of 64 Fashion-MNIST
training images clean and under PGD-10, ε = 4/255); on ViT-B/32, TAPT_PROMPT (2 tokens × 9 blocks),
16 views, statistics of 8 random images clean and under PGD-2, ε = α = 1/255. On the demo it also
reports what one TAPT step does: the relative size of the prompt update and max |Δp| of the test
image's probabilities on 16 test images, and how many predictions change.
For CBA-FAPT it also reports the textual distribution's normalised entropy (1 = uniform) and the
relative change of the prompt gradient when γ is set to 0, for the default `text_norm=standardize`
and for the plain softmax of the raw map (`text_norm=none`, the dead reading).
Usage: python benchmarks/grad_shares.py [--backbones demo ViT-B-32] [--only train|tta] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from robustprompt.attacks import ThreatModel
from robustprompt.attribution.cba import normalised_entropy, text_attribution, text_distribution
from robustprompt.engine.grad_share import gradient_norms, gradient_shares
from robustprompt.methods import build_method, list_methods, method_class
from robustprompt.methods.base import StepResult
from robustprompt.api import get_backbone
from robustprompt.models import PromptConfig, PromptedClassifier, TraceSpec

ORDER = ["coop", "vpt", "ivlp", "maple", "advvp", "advvlp", "advmaple", "apt", "fap", "cba_fapt", "apd"]


def demo_batch(n: int, split_name: str = "train"):
    from robustprompt.data import build_dataset, clip_transform
    ds = build_dataset("fashion_mnist")
    split = ds.split(split_name)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(split), generator=g)[:n].tolist()
    tf = clip_transform(28)
    x = torch.stack([tf(split.load(i)) for i in idx])
    y = torch.tensor([split.labels[i] for i in idx])
    return ds.classnames, x, y


def setting(name: str):
    """(backbone, classnames, x, y, threat, prompt override)"""
    torch.manual_seed(0)
    if name == "demo":
        bb = get_backbone("demo")
        classes, x, y = demo_batch(16)
        return bb, classes, x, y, ThreatModel.from_255(4, 2, steps=2), {"depth": 3, "max_ctx": 4}
    bb = get_backbone(name)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 224, 224, generator=g)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    y = torch.arange(8) % len(classes)
    return bb, classes, x, y, ThreatModel.from_255(1, 1, steps=2), {}


def build(name: str, params: dict, bb, classes, threat, prompt_override):
    method = build_method(name, params, threat)
    layout = {**method.default_prompt.to_dict(), **prompt_override}
    if "max_ctx" in layout:  # the demo's 16-token text context cannot hold CoOp's 16 context tokens
        layout["n_ctx"] = min(layout["n_ctx"], layout.pop("max_ctx"))
    prompt = PromptConfig.from_dict(layout)
    torch.manual_seed(0)
    clf = PromptedClassifier(bb, classes, prompt)
    method.setup(clf, lambda p: PromptedClassifier(bb, classes, p))
    params_ = [p for grp in method.trainable_groups(clf) for p in grp]
    return method, clf, params_


def shares_of(name, params, bb, classes, x, y, threat, override):
    method, clf, ps = build(name, params, bb, classes, threat, override)
    torch.manual_seed(1)
    result = method.step(clf, x, y)
    norms = gradient_norms(result, ps)
    return result, norms, gradient_shares(norms), clf, ps


def ctpt_shares(bb, classes, x) -> tuple[dict, dict, dict]:
    """C-TPT's two terms at TPT's initial prompt: (weights, norms, shares)."""
    from robustprompt.engine.tta import TPT_PROMPT
    from robustprompt.tta.base import entropy, marginal_entropy
    from robustprompt.tta.ctpt import atfd
    from robustprompt.tta.procedures import build_procedure

    proc = build_procedure("ctpt", {"n_views": 64 if x.shape[-1] <= 64 else 16})
    clf = PromptedClassifier(bb, classes, TPT_PROMPT)
    gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
    with torch.no_grad():
        views = proc.make_views(clf, x, gens).views
        P, V = views.shape[:2]
        feats = clf.encode_image(views.flatten(0, 1))[0].view(P, V, -1)
        scale = clf.model.logit_scale
        ent = entropy(scale * feats @ clf.text_features().t())                       # P×V
        sel = ent.topk(proc.params.n_selected, dim=1, largest=False).indices
    sel_feats = torch.gather(feats, 1, sel[..., None].expand(-1, -1, feats.shape[-1]))
    prompts = [torch.nn.Parameter(t.detach()[None].repeat(P, 1, 1)) for t in clf.model.prompt.text_prompts()]
    txt = proc.text_features(clf, prompts)
    terms = {"entropy": marginal_entropy(scale.detach() * sel_feats @ txt.transpose(1, 2)).sum(),
             "neg_atfd": -atfd(txt).sum()}
    r = StepResult.weighted(terms, {"entropy": 1.0, "neg_atfd": proc.params.lam})
    norms = gradient_norms(r, prompts)
    return r.weights, norms, gradient_shares(norms)


def cba_text_stats(bb, classes, x, y, threat, override) -> list[str]:
    lines = []
    for norm in ("standardize", "none"):
        params = {"text_norm": norm}
        method, clf, ps = build("cba_fapt", params, bb, classes, threat, override)
        last = TraceSpec(blocks=(-1,))
        out = clf.features(x, text_trace=last)
        amap, valid = text_attribution(clf.model, out.text, out.image_features.detach(), y)
        ent = normalised_entropy(text_distribution(amap.detach(), valid, norm=norm), valid)
        grads = {}
        for gamma in (method.params.gamma, 0.0):
            m, c, p_ = build("cba_fapt", {**params, "gamma": gamma}, bb, classes, threat, override)
            torch.manual_seed(1)
            r = m.step(c, x, y)
            grads[gamma] = torch.cat([g.flatten() for g in torch.autograd.grad(r.loss, p_)])
        g1, g0 = grads[method.params.gamma], grads[0.0]
        rel = float((g1 - g0).norm() / g1.norm())
        lines.append(f"| `text_norm={norm}` | {ent.mean():.4f} (max {ent.max():.4f}) | "
                     f"{float(amap.detach().abs().max()):.3g} | {rel:.3g} |")
    return lines


# ---------------------------------------------------------------------------- TAPT
def tapt_setting(bname: str, bb, classes, tmp: Path):
    """(TAPT procedure, classifier, test images P×3×S×S) for one backbone: the statistics are computed
    here, with the toolkit's own pre-pass, into a file in `tmp`."""
    import logging

    from robustprompt.config import AttackSpec, DataSpec, ModelSpec
    from robustprompt.tta.procedures import build_procedure
    from robustprompt.tta.tapt import TAPT_PROMPT
    from robustprompt.tta.token_stats import compute_token_stats, run_token_stats, save_token_stats

    logging.getLogger("robustprompt.tta.tapt").setLevel(logging.ERROR)   # "starting from the stats' prompt"
    path = tmp / f"tapt-{bname}.safetensors"
    if bname == "demo":
        from robustprompt.api import classifier_from_spec
        from robustprompt.demo.run import TAPT_PROMPT_DEMO, TTA_PARAMS, TTA_SUBSET, tapt_stats_config
        from robustprompt.engine.tasks import load_task

        run_token_stats(tapt_stats_config(64), path, progress=False)
        task = load_task(DataSpec(dataset="fashion_mnist", split="test", subset=TTA_SUBSET, batch_size=8))
        clf = classifier_from_spec(ModelSpec(name="demo", prompt=PromptConfig(**TAPT_PROMPT_DEMO)), task.dataset)
        clf.eval()
        tf = task.transform(clf)
        x = torch.stack([tf(task.split.load(i)) for i in task.indices])      # the demo's TTA subset
        y = torch.tensor([int(task.split.labels[i]) for i in task.indices])
        return build_procedure("tapt", {**TTA_PARAMS["tapt"], "stats": str(path)}), clf, x, y
    torch.manual_seed(0)
    clf = PromptedClassifier(bb, classes, TAPT_PROMPT)
    clf.eval()
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(8, 3, 224, 224, generator=g), torch.arange(8) % len(classes)
    stats = compute_token_stats(clf, [(xs, ys, list(range(8)))], AttackSpec(attack="pgd", eps=1.0, alpha=1.0, steps=2))
    save_token_stats(stats, path)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))   # test images, not the stats'
    return build_procedure("tapt", {"n_views": 16, "stats": str(path)}), clf, x, None


def tapt_selected_views(proc, clf, x: torch.Tensor) -> torch.Tensor:
    """The views TAPT tunes on, P×k×3×S×S: its views of x, the k most confident under the initial prompt."""
    from robustprompt.tta.base import entropy

    proc.initial_prompts(clf)   # TAPT's checks (and the statistics' prompt loaded into clf)
    gens = [torch.Generator().manual_seed(i) for i in range(len(x))]
    with torch.no_grad():
        views = proc.make_views(clf, x, gens).views
        P, V = views.shape[:2]
        feats = clf.encode_image(views.flatten(0, 1))[0].view(P, V, -1)
        ent = entropy(clf.model.logit_scale * feats @ clf.text_features().t())
        sel = ent.topk(min(proc.params.n_selected, V), dim=1, largest=False).indices
    return views[torch.arange(P)[:, None], sel]


def tapt_shares(proc, clf, x: torch.Tensor) -> dict:
    """TAPT's terms at its initial per-image prompt copies, built from TAPT's own functions (their
    weighted sum is checked against TAPT.objective): weights, norms and shares of entropy vs
    alignment and of entropy vs the adv and clean halves, the norms per tower, and the fraction of
    vision-prompt elements where |∂(w·A)| > |∂H| (AdamW's first step is ≈ lr·sign(∇): those are
    the elements whose update direction the alignment decides)."""
    from robustprompt.tta.base import marginal_entropy
    from robustprompt.tta.tapt import alignment_loss, tapt_alignment, view_moments
    from robustprompt.tta.token_stats import block_inputs

    sel = tapt_selected_views(proc, clf, x)
    P, k = sel.shape[:2]
    init = proc.initial_prompts(clf) + proc.initial_vision_prompts(clf)
    n_text = len(init) - len(clf.model.prompt.vision_prompts())
    prompts = [torch.nn.Parameter(t.unsqueeze(0).repeat(P, 1, 1).clone()) for t in init]
    text, vision = prompts[:n_text], prompts[n_text:]
    blocks, pp = proc.aligned_blocks(clf), proc.params
    feats, tokens = block_inputs(clf, sel.flatten(0, 1), blocks,
                                 vision_prompts=[v.repeat_interleave(k, dim=0) for v in vision])
    logits = clf.model.logit_scale.detach() * feats.view(P, k, -1) @ proc._text(clf, text, P).transpose(1, 2)
    moments = [view_moments(t.view(P, k, *t.shape[1:])) for t in tokens]
    mu, var = [m for m, _ in moments], [v for _, v in moments]
    st = proc._stats_on(feats)
    c = pp.align_weight / clf.prompt_cfg.depth
    terms = {"entropy": marginal_entropy(logits).sum(),
             "alignment": tapt_alignment(mu, var, st, blocks, pp.adv_weight, pp.align_norm).sum(),
             "align_adv": alignment_loss(mu, var, st.adv_mean, st.adv_var, blocks, pp.align_norm).sum(),
             "align_clean": alignment_loss(mu, var, st.clean_mean, st.clean_var, blocks, pp.align_norm).sum()}
    two = StepResult.weighted(terms, {"entropy": 1.0, "alignment": c})
    halves = StepResult.weighted(terms, {"entropy": 1.0, "align_adv": c * pp.adv_weight,
                                         "align_clean": c * (1 - pp.adv_weight)})
    shipped = proc.objective(clf, sel, text, vision).sum()
    if not torch.allclose(two.loss, shipped, rtol=1e-5, atol=1e-6):
        raise RuntimeError(f"the benchmark's TAPT loss {float(two.loss)} is not TAPT.objective's {float(shipped)}")
    out = {"weights": {**two.weights, **halves.weights}, "k": k, "n_views": pp.n_views, "blocks": blocks,
           "loss": float(shipped.detach())}
    out["norms"] = {**gradient_norms(two, prompts), **gradient_norms(halves, prompts)}
    out["shares2"] = gradient_shares({n: out["norms"][n] for n in two.weights})
    out["shares3"] = gradient_shares({n: out["norms"][n] for n in halves.weights})
    out["tower"] = {n: (gradient_norms(two, text)[n] if text else 0.0, gradient_norms(two, vision)[n])
                    for n in two.weights}
    def flat_grad(term: torch.Tensor) -> torch.Tensor:
        # the last block's vision prompt is not in the aligned blocks (code: 0 … depth−2): no gradient
        gs = torch.autograd.grad(term, vision, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(v)).flatten() for g, v in zip(gs, vision)])

    g_h, g_a = flat_grad(terms["entropy"]), flat_grad(c * terms["alignment"])
    out["align_dominates"] = float((g_a.abs() > g_h.abs()).double().mean())
    g_adv, g_clean = flat_grad(terms["align_adv"]), flat_grad(terms["align_clean"])
    out["cos_adv_clean"] = float(torch.nn.functional.cosine_similarity(g_adv.double(), g_clean.double(), dim=0))
    # how far apart the two reference statistics are, against how far the views are from the clean ones
    gap = sum(float((st.adv_mean[b] - st.clean_mean[b]).abs().mean()) for b in blocks)
    dist = sum(float((m.detach() - st.clean_mean[b]).abs().mean()) for m, b in zip(mu, blocks))
    out["ref_gap"] = (gap, dist)
    return out


def tapt_table(bname: str, r: dict) -> list[str]:
    lines = ["", f"TAPT's test-time loss at the initial prompt (2 images, {r['n_views']} views, {r['k']} selected "
             f"each, aligned blocks {r['blocks']}; ‖∇‖ over the per-image text + vision prompt copies):", "",
             "| term | weight | ‖∇(w·L)‖ | on text prompts | on vision prompts | share (2 terms) "
             "| share (3 terms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    def pct(d: dict, n: str) -> str:
        return f"{100 * d[n]:.3g}%" if n in d else "–"

    for n in ("entropy", "alignment", "align_adv", "align_clean"):
        t = r["tower"].get(n)
        per_tower = f"{t[0]:.3g} | {t[1]:.3g}" if t else "– | –"
        lines.append(f"| {n} | {r['weights'][n]:g} | {r['norms'][n]:.3g} | {per_tower} | "
                     f"{pct(r['shares2'], n)} | {pct(r['shares3'], n)} |")
    gap, dist = r["ref_gap"]
    lines += ["", f"Vision-prompt elements where |∂(w·A)| > |∂H| (AdamW's first step ≈ lr·sign(∇)): "
              f"{100 * r['align_dominates']:.3g}%. cos(∇A(adv), ∇A(clean)) = {r['cos_adv_clean']:.4f}; "
              f"Σ_b mean abs(μ̂_adv − μ̂_clean) = {gap:.3g} against "
              f"Σ_b mean abs(μ_views − μ̂_clean) = {dist:.3g}."]
    print(f"{bname} tapt: " + ", ".join(f"{n} {100 * v:.3g}%" for n, v in {**r['shares2'], **r['shares3']}.items()),
          flush=True)
    return lines


def tapt_step_effect(proc, clf, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """What one TAPT step does on x (P images) and on their non-adaptive adversarial versions (the
    demo's PGD-10, ε = 4/255, on the initial prompt)."""
    from robustprompt.config import AttackSpec
    from robustprompt.demo.run import PGD_STEPS, TRAIN_EPS

    x_adv = AttackSpec(attack="pgd", eps=TRAIN_EPS, steps=PGD_STEPS).threat().run(
        clf, x, y, seeds=list(range(len(x))), seed=0).detach()
    rows = [tapt_step_row("clean", proc, clf, x, y), tapt_step_row("PGD-10", proc, clf, x_adv, y)]
    return ["", f"One TAPT step (AdamW, lr {proc.params.lr:g}) on the demo's {len(x)} TTA test images, against the "
            "initial prompt on the same views:", "",
            "| images | ‖Δθ‖/‖θ₀‖ text | vision | all | lr·√n/‖θ₀‖ | max abs(Δp) "
            "| median of per-image max abs(Δp) "
            "| min top-1 − top-2 margin | median margin | predictions changed | acc. initial → tuned |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


def tapt_step_row(label: str, proc, clf, x: torch.Tensor, y: torch.Tensor) -> str:
    """‖Δθ‖/‖θ₀‖ of the per-image prompt copies after one step (text, vision, all), max |Δp| of the
    test image's probabilities against the initial prompt (same views), the predictions that
    change, the initial top-1 − top-2 probability margin and the accuracy before and after."""
    from robustprompt.tta.procedures import build_procedure

    seeds = list(range(len(x)))
    sel = tapt_selected_views(proc, clf, x)
    init_t, init_v = proc.initial_prompts(clf), proc.initial_vision_prompts(clf)
    text, vision = proc.tune_prompts(clf, sel)

    def rel(tuned, init):
        if not init:
            return float("nan")
        d = sum(float((a - b.unsqueeze(0)).double().pow(2).sum()) for a, b in zip(tuned, init))
        n = sum(float(b.double().pow(2).sum()) * len(x) for b in init)
        return (d / n) ** 0.5

    r_t, r_v, r_all = rel(text, init_t), rel(vision, init_v), rel(text + vision, init_t + init_v)
    n_el = sum(t.numel() for t in init_t + init_v)
    norm0 = sum(float(t.double().pow(2).sum()) for t in init_t + init_v) ** 0.5
    sign_step = proc.params.lr * n_el ** 0.5 / norm0       # |Adam's first step| = lr per element
    still = build_procedure("tapt", {**{k: getattr(proc.params, k) for k in ("n_views", "crop_scale", "augmix")},
                                     "stats": proc.params.stats, "steps": 0})
    with torch.no_grad():
        p1, p0 = proc.run(clf, x, seeds), still.run(clf, x, seeds)
    dp = (p1 - p0).abs().max(dim=1).values
    top2 = p0.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    flips = int((p1.argmax(1) != p0.argmax(1)).sum())
    acc0, acc1 = (100 * float((p.argmax(1) == y).double().mean()) for p in (p0, p1))
    print(f"tapt one step, {label}: rel update {r_all:.3g}, max |Δp| {float(dp.max()):.3g}, flips {flips}", flush=True)
    return (f"| {len(x)} {label} | {r_t:.3g} | {r_v:.3g} | {r_all:.3g} | {sign_step:.3g} | {float(dp.max()):.3g} | "
            f"{float(dp.median()):.3g} | {float(margin.min()):.3g} | {float(margin.median()):.3g} | {flips} | "
            f"{acc0:.3g} → {acc1:.3g} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["demo", "ViT-B-32"])
    ap.add_argument("--methods", nargs="+", default=[m for m in ORDER if m in list_methods()])
    ap.add_argument("--only", choices=["train", "tta"], help="only the training losses, or only the test-time ones")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = [f"Weighted gradient share of each loss term at the initial prompts (one batch, float32, "
             f"CPU {platform.machine()}, torch {torch.__version__}).", ""]
    for bname in args.backbones:
        bb, classes, x, y, threat, override = setting(bname)
        lines += [f"**{bname}** ({len(y)} images, {len(classes)} classes, training attack "
                  f"{threat.describe()['norm']} PGD-{threat.steps} ε={threat.eps * 255:.0f}/255)"]
        if args.only != "tta":
            lines += ["", "| method | term | weight | ‖∇(w·L)‖ | share |", "|---|---|---:|---:|---:|"]
        for name in (args.methods if args.only != "tta" else []):
            result, norms, shares, _, _ = shares_of(name, {}, bb, classes, x, y, threat, override)
            for k in norms:
                lines.append(f"| {method_class(name).title} | {k} | {result.weights[k]:g} | "
                             f"{norms[k]:.3g} | {100 * shares[k]:.3g}% |")
            print(f"{bname} {name}: " + ", ".join(f"{k} {100 * s:.3g}%" for k, s in shares.items()), flush=True)
        if "cba_fapt" in args.methods and args.only != "tta":
            result, norms, shares, _, _ = shares_of("cba_fapt", {"text_norm": "none"}, bb, classes, x, y,
                                                    threat, override)
            for k in norms:
                lines.append(f"| CBA-FAPT, `text_norm=none` | {k} | {result.weights[k]:g} | "
                             f"{norms[k]:.3g} | {100 * shares[k]:.3g}% |")
            lines += ["", "CBA-FAPT textual distribution on this batch (true-class prompts):", "",
                      "| reading | normalised entropy, mean (max) | max abs(A_t) | rel. change of ∇θ when γ = 0 |",
                      "|---|---:|---:|---:|"]
            lines += cba_text_stats(bb, classes, x, y, threat, override)
        if args.only == "train":
            lines.append("")
            continue
        weights, norms, shares = ctpt_shares(bb, classes, x[:2])
        lines += ["", "C-TPT's test-time loss at the initial prompt (2 images):", "",
                  "| term | weight | ‖∇(w·L)‖ | share |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {weights[k]:g} | {norms[k]:.3g} | {100 * shares[k]:.3g}% |" for k in norms]
        print(f"{bname} ctpt: " + ", ".join(f"{k} {100 * v:.3g}%" for k, v in shares.items()), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            proc, clf, xt, yt = tapt_setting(bname, bb, classes, Path(tmp))
            lines += tapt_table(bname, tapt_shares(proc, clf, xt[:2]))
            if bname != "demo":   # 16 views keep k = 1 view, whose variance over views is 0: TAPT's 64 too
                from robustprompt.tta.procedures import build_procedure
                proc64 = build_procedure("tapt", {"n_views": 64, "stats": proc.params.stats})
                lines += tapt_table(f"{bname} (64 views)", tapt_shares(proc64, clf, xt[:2]))
            else:
                lines += tapt_step_effect(proc, clf, xt, yt)
        lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
