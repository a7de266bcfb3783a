"""Seconds per image of each attack on each test-time defence (demo backbone by default).

Attacks (robustprompt.tta.adaptive; the threat-model names of issue 9):
  nonadaptive      PGD-N ℓ∞ on CLIP with the initial prompt (the papers' protocol): no defence inside
  adaptive_secret  EOT-E APGD-N through the whole defence, E fresh view draws per step (one batched
                   call), gradient through the prompt update (create_graph)
  adaptive_known   APGD-N through the whole defence on the evaluation's own views
plus, for scale, one run of the defence itself (no gradient), and its ratio to TPT's in the same run.
TAPT runs with a bimodal prompt (2 text + 2 vision tokens in 3 of the 4 blocks, as the demo) and
token statistics from 64 training images made first (`tta-stats`: clean and PGD-10; its seconds
per image are printed); TTC builds no views, so --views does not apply to it.

The adaptive attacks cost the same per step at every step, so they can be timed with fewer steps
(--steps) and reported per --report-steps steps: seconds × (report_steps + 1) / (steps + 1) (an
APGD run of N steps makes N + 1 gradient evaluations). The non-adaptive PGD is timed at full length.
Usage: python benchmarks/adaptive_cost.py [--images 2] [--views 64] [--steps 100] [--eot 16]
       [--procedures tpt mta rtpt atpt ttc tapt] [--threads 2] [--repeats 1]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from _bench import device as device_arg, positive, sync

from robustprompt.attacks.threat import ThreatModel
from robustprompt.tta.adaptive import AdaptiveAttack, adaptive_attack
from robustprompt.tta.procedures import build_procedure


def load(n_images: int, prompt=None, device: torch.device = torch.device("cpu")):
    from robustprompt.api import get_backbone
    from robustprompt.data import build_dataset, clip_transform
    from robustprompt.engine.tta import TPT_PROMPT
    from robustprompt.models import PromptedClassifier

    ds = build_dataset("fashion_mnist")
    split = ds.split("test")
    x = torch.stack([clip_transform(28)(split.load(i)) for i in range(n_images)])
    y = torch.tensor(split.labels[:n_images])
    torch.manual_seed(0)
    clf = PromptedClassifier(get_backbone("demo", device=device), ds.classnames, prompt or TPT_PROMPT).to(device)
    return clf, x.to(device), y.to(device)


def tapt_setup(n_images: int, stats_images: int, tmp: str, device: torch.device):
    """TAPT's classifier (the demo's bimodal prompt) and its statistics file; seconds per image of
    the statistics pre-pass."""
    from robustprompt.demo.run import TAPT_PROMPT_DEMO, tapt_stats_config
    from robustprompt.models import PromptConfig
    from robustprompt.tta.token_stats import run_token_stats

    cfg = tapt_stats_config(stats_images, str(device))
    path = f"{tmp}/stats.safetensors"
    t = time.perf_counter()
    run_token_stats(cfg, path, progress=False)
    per_image = (time.perf_counter() - t) / stats_images
    clf, x, y = load(n_images, PromptConfig(**TAPT_PROMPT_DEMO), device)
    return clf, x, y, path, per_image


REPEATS = 1
DEVICE = torch.device("cpu")


def timed(fn, warmup: bool = False) -> float:
    """Wall seconds of fn(), the minimum over REPEATS runs (robust to other load on a shared CPU);
    warmup: one untimed call first (first-call costs: kernels, allocator, caches)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(REPEATS):
        sync(DEVICE)
        t = time.perf_counter()
        fn()
        sync(DEVICE)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=positive, default=2)
    ap.add_argument("--views", type=positive, default=64)
    ap.add_argument("--steps", type=positive, default=100, help="adaptive attack steps actually run")
    ap.add_argument("--report-steps", type=positive, default=100, help="steps the table is scaled to")
    ap.add_argument("--pgd-steps", type=positive, default=100)
    ap.add_argument("--eot", type=positive, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="EOT draws per batched call")
    ap.add_argument("--eps", type=float, default=4.0, help="in /255")
    ap.add_argument("--procedures", nargs="+", default=["tpt", "mta", "rtpt", "atpt", "ttc", "tapt"])
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--repeats", type=positive, default=1, help="time each attack this often, keep the minimum")
    ap.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, cuda:1")
    args = ap.parse_args()
    global REPEATS, DEVICE
    REPEATS = args.repeats
    DEVICE = args.device
    if args.chunk is not None and args.chunk < 1:
        ap.error(f"--chunk must be ≥ 1, got {args.chunk}")
    torch.set_num_threads(args.threads)
    clf, x, y = load(args.images, device=DEVICE)
    n, eps = args.images, args.eps / 255
    seeds, views = list(range(1, n + 1)), list(range(1000, 1000 + n))
    scale = (args.report_steps + 1) / (args.steps + 1)
    threat = ThreatModel(eps=eps, alpha=1 / 255, steps=args.pgd_steps)
    t_pgd = timed(lambda: threat.run(clf, x, y, seeds=seeds, seed=0), warmup=True) / n
    where = (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else
             f"CPU {platform.processor() or platform.machine()}")
    print(f"demo backbone, {n} images, {args.views} views, ε = {args.eps:g}/255 ℓ∞, {where}, "
          f"{args.threads} threads; adaptive attacks timed with {args.steps} steps, reported per {args.report_steps} "
          f"(EOT-{args.eot}); non-adaptive PGD-{args.pgd_steps} timed in full. Seconds per image "
          "(ratio to the non-adaptive attack).\n")
    print(f"| defence | defence run (ratio to TPT's) | non-adaptive PGD-{args.pgd_steps} | adaptive secret EOT-{args.eot} "
          f"APGD-{args.report_steps} | adaptive known APGD-{args.report_steps} |")
    print("|---|---:|---:|---:|---:|")
    import dataclasses
    import tempfile

    from robustprompt.tta.procedures import procedure_class

    t_tpt = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.procedures:
            params = {}
            if "n_views" in {f.name for f in dataclasses.fields(procedure_class(name).Params)}:
                params["n_views"] = args.views
            clf_p, x_p, y_p, t_pgd_p = clf, x, y, t_pgd
            if name == "tapt":   # its own (bimodal) classifier, and the non-adaptive attack on it
                clf_p, x_p, y_p, params["stats"], t_stats = tapt_setup(n, 64, tmp, DEVICE)
                t_pgd_p = timed(lambda: threat.run(clf_p, x_p, y_p, seeds=seeds, seed=0), warmup=True) / n
            proc = build_procedure(name, params)
            with torch.no_grad():
                t_run = timed(lambda: proc.run(clf_p, x_p, views), warmup=True) / n

            def attack(**kw):
                return adaptive_attack(proc, clf_p, x_p, y_p, eps=eps, norm="linf", attack_seeds=seeds,
                                       chunk=args.chunk, **kw)

            attack(spec=AdaptiveAttack(steps=1, eot=args.eot))   # untimed: the double-backward's first call
            t_secret = timed(lambda: attack(spec=AdaptiveAttack(steps=args.steps, eot=args.eot))) / n * scale
            t_known = timed(lambda: attack(spec=AdaptiveAttack(steps=args.steps), view_seeds=views)) / n * scale
            t_tpt = t_tpt if t_tpt is not None or name != "tpt" else t_run
            ratio = f" ({t_run / t_tpt:.2f}× TPT)" if t_tpt else ""
            print(f"| {proc.title} | {t_run:.3f}{ratio} | {t_pgd_p:.2f} (1×) | {t_secret:.1f} ({t_secret / t_pgd_p:.0f}×) | "
                  f"{t_known:.1f} ({t_known / t_pgd_p:.0f}×) |", flush=True)
            if name == "tapt":
                print(f"\nTAPT's statistics pre-pass (tta-stats, clean + PGD-10, 64 images): {t_stats:.3f} s per image\n",
                      flush=True)


if __name__ == "__main__":
    main()
