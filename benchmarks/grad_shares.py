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
For CBA-FAPT it also reports the textual distribution's normalised entropy (1 = uniform) and the
relative change of the prompt gradient when γ is set to 0, for the default `text_norm=standardize`
and for the plain softmax of the raw map (`text_norm=none`, the dead reading).
Usage: python benchmarks/grad_shares.py [--backbones demo ViT-B-32] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from robustprompt.attacks import ThreatModel
from robustprompt.attribution.cba import matching_score, normalised_entropy, text_attribution, text_distribution
from robustprompt.engine.grad_share import gradient_norms, gradient_shares
from robustprompt.methods import build_method, list_methods, method_class
from robustprompt.methods.base import StepResult
from robustprompt.api import get_backbone
from robustprompt.models import PromptConfig, PromptedClassifier, TraceSpec

ORDER = ["coop", "vpt", "ivlp", "maple", "advvp", "advvlp", "advmaple", "apt", "fap", "cba_fapt", "apd"]


def demo_batch(n: int):
    from robustprompt.data import build_dataset, clip_transform
    ds = build_dataset("fashion_mnist")
    split = ds.split("train")
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["demo", "ViT-B-32"])
    ap.add_argument("--methods", nargs="+", default=[m for m in ORDER if m in list_methods()])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lines = [f"Weighted gradient share of each loss term at the initial prompts (one batch, float32, "
             f"CPU {platform.machine()}, torch {torch.__version__}).", ""]
    for bname in args.backbones:
        bb, classes, x, y, threat, override = setting(bname)
        lines += [f"**{bname}** ({len(y)} images, {len(classes)} classes, training attack "
                  f"{threat.describe()['norm']} PGD-{threat.steps} ε={threat.eps * 255:.0f}/255)", "",
                  "| method | term | weight | ‖∇(w·L)‖ | share |", "|---|---|---:|---:|---:|"]
        for name in args.methods:
            result, norms, shares, _, _ = shares_of(name, {}, bb, classes, x, y, threat, override)
            for k in norms:
                lines.append(f"| {method_class(name).title} | {k} | {result.weights[k]:g} | "
                             f"{norms[k]:.3g} | {100 * shares[k]:.3g}% |")
            print(f"{bname} {name}: " + ", ".join(f"{k} {100 * s:.3g}%" for k, s in shares.items()), flush=True)
        if "cba_fapt" in args.methods:
            result, norms, shares, _, _ = shares_of("cba_fapt", {"text_norm": "none"}, bb, classes, x, y,
                                                    threat, override)
            for k in norms:
                lines.append(f"| CBA-FAPT, `text_norm=none` | {k} | {result.weights[k]:g} | "
                             f"{norms[k]:.3g} | {100 * shares[k]:.3g}% |")
            lines += ["", "CBA-FAPT textual distribution on this batch (true-class prompts):", "",
                      "| reading | normalised entropy, mean (max) | max abs(A_t) | rel. change of ∇θ when γ = 0 |",
                      "|---|---:|---:|---:|"]
            lines += cba_text_stats(bb, classes, x, y, threat, override)
        weights, norms, shares = ctpt_shares(bb, classes, x[:2])
        lines += ["", "C-TPT's test-time loss at the initial prompt (2 images):", "",
                  "| term | weight | ‖∇(w·L)‖ | share |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {weights[k]:g} | {norms[k]:.3g} | {100 * shares[k]:.3g}% |" for k in norms]
        print(f"{bname} ctpt: " + ", ".join(f"{k} {100 * v:.3g}%" for k, v in shares.items()), flush=True)
        lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
