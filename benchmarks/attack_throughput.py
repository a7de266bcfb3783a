"""PGD throughput of the toolkit against a naive loop that re-encodes the class texts at every
step (what the reference repositories do), on the same model in the same run.

Model: random-init open_clip ViT-B-32 (weights do not change the cost), batch 32, float32.
Reported per class count: seconds per PGD step for
  floor   — one image-only forward+backward (the least a PGD step can cost),
  toolkit — rp.attacks.pgd on a PromptedClassifier (text features computed once and cached),
  naive   — every step runs the text tower over all class prompts, then the image step.
Usage: python benchmarks/attack_throughput.py [--steps 3] [--classes 10 100 1000] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from _bench import sync
import torch.nn.functional as F

from robustprompt.attacks import pgd
from robustprompt.models import PromptedClassifier, load_backbone


def timed(fn, device, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class NaiveClassifier(torch.nn.Module):
    """The reference-repo pattern: text features recomputed inside every forward."""

    def __init__(self, clf: PromptedClassifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img, _ = self.clf.encode_image(x)
        txt, _ = self.clf.encode_text()
        return self.clf.logits_from(img, txt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-32", device=device)
    x = torch.rand(args.batch, 3, 224, 224, device=device)
    k = args.steps
    rows = []
    for n in args.classes:
        names = [f"class number {i}" for i in range(n)]
        clf = PromptedClassifier(bb, names).to(device)
        naive = NaiveClassifier(clf)
        y = torch.arange(args.batch, device=device) % n
        with torch.no_grad():
            txt = clf.text_features()  # warm the cache, as an evaluation run does once

        def floor_step():
            xr = x.clone().requires_grad_(True)
            img, _ = clf.encode_image(xr)
            loss = F.cross_entropy(clf.logits_from(img, txt), y)
            torch.autograd.grad(loss, xr)

        floor = timed(floor_step, device, args.repeats + 1)
        toolkit = timed(lambda: pgd(clf, x, y, 4 / 255, 1 / 255, k, seeds=list(range(args.batch))),
                        device, args.repeats) / k
        naive_t = timed(lambda: pgd(naive, x, y, 4 / 255, 1 / 255, k, seeds=list(range(args.batch))),
                        device, 1) / k
        rows.append((n, floor, toolkit, naive_t))
        print(f"{n:5d} classes: floor {floor:.3f}s  toolkit {toolkit:.3f}s/step  naive {naive_t:.3f}s/step  "
              f"toolkit/floor {toolkit / floor:.2f}  naive/toolkit {naive_t / toolkit:.1f}x", flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\nViT-B-32 random init, batch {args.batch}, PGD-{k} ℓ∞, float32, {where}, torch {torch.__version__}\n")
    print("| classes | floor fwd+bwd (s) | toolkit (s/step) | naive (s/step) | toolkit / floor | naive / toolkit |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, f, t, nv in rows:
        print(f"| {n} | {f:.3f} | {t:.3f} | {nv:.3f} | {t / f:.2f} | {nv / t:.1f}× |")


if __name__ == "__main__":
    main()
