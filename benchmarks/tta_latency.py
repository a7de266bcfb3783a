"""Seconds per image of A-TPT and R-TPT: the toolkit against a straightforward implementation of the
same computation organised as the released code does it, same model, same views, same run; and the
toolkit defending one image at a time against several images at once (--batch P: the views of P
images in one pass, each image with its own prompt copy — exact, since images are independent).

straightforward:
  rollout      one forward + backward per view (64 single-image passes; `.backward()` from the
               top-1 score, gradients read off the traced block inputs)
  selection    a forward over all views with the initial prompt
  tuning       a forward over the selected views with the prompt being tuned (image tower again)
  prediction   a forward over all views with the tuned prompt, and the rollout of every final
               view (again one pass per view) for the TV-weighted ensemble
toolkit (robustprompt.tta.atpt): the rollout of all bases, then of all final views, each from one
  batched forward + backward (autograd stops at the traced blocks), one forward over the final
  views, and text-only tuning and prediction (the image tower does not depend on the text prompt).
Both use the same views, maps post-processing, selection, loss and fusion; the script checks
that they predict the same classes and prints the largest difference of the class probabilities,
on float64 copies (in float32 A-TPT's token-gradient weights cancel heavily and rounding alone
moves its maps by a few percent; see `agree`). With --batch P, one at a time and P at once are timed on the same P
images after a warm-up at both shapes.
R-TPT's straightforward loop is the same without the rollouts: a forward over all views for
selection, over the selected views per tuning step, over all views for the prediction, one image
at a time; R-TPT's reliability-weighted fusion.
Usage: python benchmarks/tta_latency.py [--models demo ViT-B-16] [--images 2] [--views 64]
       [--procedures atpt rtpt] [--batch 8]
"""
from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from _bench import device as device_arg, positive, sync

from robustprompt.attribution.rollout import normalise_maps, upsample
from robustprompt.models import TraceSpec
from robustprompt.tta.atpt import tv_fusion
from robustprompt.tta.rtpt import rtpt_fusion
from robustprompt.tta.base import entropy
from robustprompt.tta.procedures import build_procedure
from robustprompt.tta.views import attention_guided_views, augmix_views


def naive_rollout_map(clf, image: torch.Tensor) -> torch.Tensor:
    """Token-gradient rollout of ONE image, the straightforward way: forward, full backward."""
    n = clf.model.vision_layers
    x = image[None].clone().requires_grad_(True)
    out = clf.features(x, vision_trace=TraceSpec(blocks=(n - 2, n - 1), attn=True))
    for b in (n - 2, n - 1):
        out.vision[b].x_in.retain_grad()
    score = out.logits[0, out.logits[0].argmax()]
    score.backward()
    mats = []
    for b in (n - 2, n - 1):
        t = out.vision[b]
        w = torch.relu((t.x_in * t.x_in.grad).sum(-1))
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        m = torch.eye(w.shape[-1]) .to(w) + (t.attn.detach() * w[:, None, None, :]).mean(1)
        mats.append(m / m.sum(-1, keepdim=True))
    roll = mats[1] @ ((mats[0] + mats[1]) / 2)
    return normalise_maps(roll[:, 0, out.vision.patch_slice].reshape(1, *out.vision.grid).detach())[0]


def naive_select_tune_predict(proc, clf, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released codes' loop for one image's views V×3×S×S: a forward over all views to select
    the confident ones, a forward over the selected views per tuning step (the image tower again),
    a forward over all views for the prediction. Returns (selected k, logits V×K, features V×D)."""
    p = proc.params
    scale = clf.model.logit_scale.detach()
    with torch.no_grad():
        txt0 = clf.text_features()
        ent = entropy(scale * clf.encode_image(views)[0] @ txt0.t())                      # selection pass
        sel = ent.topk(p.n_selected, largest=False).indices
    prompts = [torch.nn.Parameter(t.detach().clone()[None]) for t in clf.model.prompt.text_prompts()]
    opt = torch.optim.AdamW(prompts, lr=p.lr, weight_decay=p.weight_decay)
    for _ in range(p.steps):
        with torch.no_grad():
            feats_sel = clf.encode_image(views[sel])[0]                                   # tuning pass
        txt = proc.text_features(clf, prompts)[0]
        loss = entropy(scale * feats_sel @ txt.t()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        txt = proc.text_features(clf, prompts)[0]
        feats = clf.encode_image(views)[0]                                                # prediction pass
    return sel, scale * feats @ txt.t(), feats


def naive_atpt(proc, clf, image: torch.Tensor, seed: int) -> int:
    p = proc.params
    views = augmix_views(image, p.n_views, torch.Generator().manual_seed(seed), crop_scale=(p.crop_scale, 1.0))
    maps = torch.stack([naive_rollout_map(clf, b) for b in views.bases])               # per view
    full = upsample(maps, image.shape[-1])
    final = attention_guided_views(views, full, ratio=p.ratio, m_high=p.m_high, m_low=p.m_low,
                                   mix_source=p.mix_source)
    sel, logits, _ = naive_select_tune_predict(proc, clf, final)
    own = torch.stack([naive_rollout_map(clf, v) for v in final])                       # each view's own map
    return tv_fusion(logits[None], sel[None], own[None], resolution=p.tv_resolution, size=image.shape[-1],
                     space=p.space)[0]


def naive_rtpt(proc, clf, image: torch.Tensor, seed: int) -> torch.Tensor:
    """R-TPT, one image, as its released code runs it: the image tower over the views three times."""
    p = proc.params
    views = augmix_views(image, p.n_views, torch.Generator().manual_seed(seed), use_augmix=p.augmix,
                         crop_scale=(p.crop_scale, 1.0)).views
    _, logits, feats = naive_select_tune_predict(proc, clf, views)
    return rtpt_fusion(logits[None], feats[None], p.top_k, p.temperature, p.fuse_space)[0]


NAIVE = {"atpt": naive_atpt, "rtpt": naive_rtpt}
PARAMS = {"atpt": {"fusion": "tv"}, "rtpt": {}}   # A-TPT: the paper's TV path, two rollouts


def agree(a: torch.Tensor, b: torch.Tensor) -> tuple[float, bool]:
    """max |Δp| between two stacks of class probabilities, and whether they predict the same
    classes. R-TPT's agree to float64 rounding; A-TPT's to ~1e-3, because its top-20% pixel
    selection on upsampled maps has near-ties that rounding differences (batched vs single passes)
    order differently, so a few of 64 views mix a few pixels differently."""
    return float((a - b).abs().max()), bool(torch.equal(a.argmax(-1), b.argmax(-1)))


def float64_pair(clf, images: torch.Tensor, first, second) -> tuple[torch.Tensor, torch.Tensor]:
    """first(c, x) and second(c, x) on a float64 copy of the classifier and images."""
    c = copy.deepcopy(clf).double()
    c._cache = None   # text features cached in float32
    x = images.double()
    return first(c, x), second(c, x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["demo", "ViT-B-16"])
    ap.add_argument("--images", type=positive, default=2)
    ap.add_argument("--views", type=positive, default=64)
    ap.add_argument("--classes", type=positive, default=10)
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--procedures", nargs="+", default=["atpt", "rtpt"], choices=sorted(NAIVE))
    ap.add_argument("--batch", type=int, default=0, help="also time the toolkit on this many images at once")
    args = ap.parse_args()
    device = args.device
    from robustprompt.api import get_backbone
    from robustprompt.engine.tta import TPT_PROMPT
    from robustprompt.models import PromptedClassifier

    rows = []
    for name in args.models:
        torch.manual_seed(0)
        bb = get_backbone(name, device=device)
        clf = PromptedClassifier(bb, [f"class {i}" for i in range(args.classes)], TPT_PROMPT).to(device)
        n_img = max(args.images, args.batch)
        images = torch.rand(n_img, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))
        images = images.to(device)
        for pname in args.procedures:
            proc = build_procedure(pname, {"n_views": args.views, **PARAMS[pname]})
            naive = NAIVE[pname]
            proc.run(clf, images[:1], [0])   # warm-up
            naive(proc, clf, images[0], 0)
            sync(device)
            t0 = time.perf_counter()
            torch.cat([proc.run(clf, images[i:i + 1], [100 + i]) for i in range(args.images)])
            sync(device)
            t_fast = (time.perf_counter() - t0) / args.images
            t0 = time.perf_counter()
            torch.stack([naive(proc, clf, images[i], 100 + i) for i in range(args.images)])
            sync(device)
            t_slow = (time.perf_counter() - t0) / args.images
            # equivalence in float64: A-TPT's token-gradient weights (Σ_c x·∂s/∂x over a token's
            # channels) cancel heavily, so float32 rounding of one batched pass against single-image
            # passes moves rollout maps by up to a few %
            same = agree(*float64_pair(clf, images[:args.images], lambda c, im: torch.cat(
                [proc.run(c, im[i:i + 1], [100 + i]) for i in range(len(im))]), lambda c, im: torch.stack(
                [naive(proc, c, im[i], 100 + i) for i in range(len(im))])))
            t_batch, t_one, same_batch = None, None, None
            if args.batch > 1:
                seeds = [100 + i for i in range(args.batch)]
                for _ in range(2):   # warm-up at both shapes
                    proc.run(clf, images[:1], seeds[:1])
                    proc.run(clf, images[:args.batch], seeds)
                sync(device)
                t0 = time.perf_counter()
                for i in range(args.batch):
                    proc.run(clf, images[i:i + 1], [seeds[i]])
                sync(device)
                t_one = (time.perf_counter() - t0) / args.batch   # one at a time, on the same images
                t0 = time.perf_counter()
                proc.run(clf, images[:args.batch], seeds)
                sync(device)
                t_batch = (time.perf_counter() - t0) / args.batch
                same_batch = agree(*float64_pair(clf, images[:args.batch], lambda c, im: torch.cat(
                    [proc.run(c, im[i:i + 1], [seeds[i]]) for i in range(len(im))]),
                    lambda c, im: proc.run(c, im, seeds)))
            rows.append((name, proc.title, t_slow, t_fast, same, t_batch, t_one, same_batch))
            print(f"{name} {proc.title}: straightforward {t_slow:.3f} s/img, toolkit {t_fast:.3f} s/img "
                  f"({t_slow / t_fast:.2f}x), max |dp| {same[0]:.1e}"
                  + (f"; {args.batch} images at once {t_batch:.3f} s/img ({t_one / t_batch:.2f}x one at a time), "
                     f"max |dp| {same_batch[0]:.1e}" if t_batch else ""), flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\n{args.views} views, {args.classes} classes, 1 tuning step, {where}, torch {torch.__version__}; "
          "same: in float64, the same predicted classes (max |Δp| of the class probabilities given); "
          "the times are float32\n")
    batch_cols = (f" toolkit on {args.batch} images: one at a time (s/img) | all at once (s/img) | speed-up | same |"
                  if args.batch > 1 else "")
    print("| backbone | procedure | straightforward (s/img) | toolkit, one at a time (s/img) | speed-up | same |"
          + batch_cols)
    print("|---|---|---:|---:|---:|---|" + ("---:|---:|---:|---|" if args.batch > 1 else ""))

    def verdict(v: tuple[float, bool]) -> str:
        return f"{'yes' if v[1] else 'NO'} ({v[0]:.0e})"

    for name, title, s, f, same, tb, t1, sb in rows:
        extra = f" {t1:.3f} | {tb:.3f} | {t1 / tb:.2f}× | {verdict(sb)} |" if tb else ""
        print(f"| {name} | {title} | {s:.3f} | {f:.3f} | {s / f:.2f}× | {verdict(same)} |" + extra)


if __name__ == "__main__":
    main()
