"""Seconds per image of each attack on each test-time defence (demo backbone by default).

Attacks (robustprompt.tta.adaptive; the threat-model names of issue 9):
  nonadaptive      PGD-N ℓ∞ on CLIP with the initial prompt (the papers' protocol): no defence inside
  adaptive_secret  EOT-E APGD-N through the whole defence, E fresh view draws per step (one batched
                   call), gradient through the prompt update (create_graph)
  adaptive_known   APGD-N through the whole defence on the evaluation's own views
plus, for scale, one run of the defence itself (no gradient).

The adaptive attacks cost the same per step at every step, so they can be timed with fewer steps
(--steps) and reported per --report-steps steps: seconds × (report_steps + 1) / (steps + 1) (an
APGD run of N steps makes N + 1 gradient evaluations). The non-adaptive PGD is timed at full length.
Usage: python benchmarks/adaptive_cost.py [--images 2] [--views 64] [--steps 100] [--eot 16]
       [--procedures tpt mta rtpt atpt] [--threads 2] [--repeats 1]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from robustprompt.attacks.threat import ThreatModel
from robustprompt.tta.adaptive import AdaptiveAttack, adaptive_attack
from robustprompt.tta.procedures import build_procedure


def load(n_images: int):
    from robustprompt.api import get_backbone
    from robustprompt.data import build_dataset, clip_transform
    from robustprompt.engine.tta import TPT_PROMPT
    from robustprompt.models import PromptedClassifier

    ds = build_dataset("fashion_mnist")
    split = ds.split("test")
    x = torch.stack([clip_transform(28)(split.load(i)) for i in range(n_images)])
    y = torch.tensor(split.labels[:n_images])
    return PromptedClassifier(get_backbone("demo"), ds.classnames, TPT_PROMPT), x, y


REPEATS = 1


def timed(fn) -> float:
    """Wall seconds of fn(), the minimum over REPEATS runs (robust to other load on a shared CPU)."""
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100, help="adaptive attack steps actually run")
    ap.add_argument("--report-steps", type=int, default=100, help="steps the table is scaled to")
    ap.add_argument("--pgd-steps", type=int, default=100)
    ap.add_argument("--eot", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="EOT draws per batched call")
    ap.add_argument("--eps", type=float, default=4.0, help="in /255")
    ap.add_argument("--procedures", nargs="+", default=["tpt", "mta", "rtpt", "atpt"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="time each attack this often, keep the minimum")
    args = ap.parse_args()
    global REPEATS
    REPEATS = max(1, args.repeats)
    torch.set_num_threads(args.threads)
    clf, x, y = load(args.images)
    n, eps = args.images, args.eps / 255
    seeds, views = list(range(1, n + 1)), list(range(1000, 1000 + n))
    scale = (args.report_steps + 1) / (args.steps + 1)
    threat = ThreatModel(eps=eps, alpha=1 / 255, steps=args.pgd_steps)
    t_pgd = timed(lambda: threat.run(clf, x, y, seeds=seeds, seed=0)) / n

    print(f"demo backbone, {n} images, {args.views} views, ε = {args.eps:g}/255 ℓ∞, CPU {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; adaptive attacks timed with {args.steps} steps, reported per {args.report_steps} "
          f"(EOT-{args.eot}); non-adaptive PGD-{args.pgd_steps} timed in full. Seconds per image "
          "(ratio to the non-adaptive attack).\n")
    print(f"| defence | defence run | non-adaptive PGD-{args.pgd_steps} | adaptive secret EOT-{args.eot} "
          f"APGD-{args.report_steps} | adaptive known APGD-{args.report_steps} |")
    print("|---|---:|---:|---:|---:|")
    for name in args.procedures:
        proc = build_procedure(name, {"n_views": args.views})
        with torch.no_grad():
            t_run = timed(lambda: proc.run(clf, x, views)) / n

        def attack(**kw):
            return adaptive_attack(proc, clf, x, y, eps=eps, norm="linf", attack_seeds=seeds, chunk=args.chunk, **kw)

        t_secret = timed(lambda: attack(spec=AdaptiveAttack(steps=args.steps, eot=args.eot))) / n * scale
        t_known = timed(lambda: attack(spec=AdaptiveAttack(steps=args.steps), view_seeds=views)) / n * scale
        print(f"| {proc.title} | {t_run:.2f} | {t_pgd:.2f} (1×) | {t_secret:.1f} ({t_secret / t_pgd:.0f}×) | "
              f"{t_known:.1f} ({t_known / t_pgd:.0f}×) |", flush=True)


if __name__ == "__main__":
    main()
