"""Time per training step of every method relative to AdvMaPLe, same model and batch, one run.

Model: random-init open_clip ViT-B-32 with each method's default prompts (2 tokens × 9 blocks;
CoOp/APT: 16 text tokens), 100 classes, training attack PGD-2 ε = α = 1/255, float32. A step is
what the training loop does per batch: method.step (attack included), backward, SGD update.
CBA-FAPT's only extra work over FAP is its attribution terms; the target is ≤ 1.25× a FAP step.
Usage: python benchmarks/train_step.py [--batches 4 32] [--classes 100] [--steps 3] [--device cuda]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from _bench import sync

from robustprompt.attacks import ThreatModel
from robustprompt.methods import build_method, list_methods, method_class
from robustprompt.models import PromptedClassifier, load_backbone

ORDER = ["advmaple", "coop", "vpt", "ivlp", "maple", "advvp", "advvlp", "apt", "fap", "cba_fapt", "apd"]


def time_method(name: str, bb, classes: list[str], x, y, steps: int, device) -> float:
    threat = ThreatModel.from_255(1, 1, steps=2)
    method = build_method(name, {}, threat)
    torch.manual_seed(0)
    clf = PromptedClassifier(bb, classes, method.default_prompt).to(device)
    method.setup(clf, lambda p: PromptedClassifier(bb, classes, p).to(device))
    params = [p for g in method.trainable_groups(clf) for p in g]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        sync(device)
        t0 = time.perf_counter()
        result = method.step(clf, x, y)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=[m for m in ORDER if m in list_methods()])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-32", device=device)
    classes = [f"class number {i}" for i in range(args.classes)]
    results: dict[int, dict[str, float]] = {}
    for b in args.batches:
        x = torch.rand(b, 3, 224, 224, device=device)
        y = torch.arange(b, device=device) % args.classes
        results[b] = {}
        for name in args.methods:
            results[b][name] = time_method(name, bb, classes, x, y, args.steps, device)
            print(f"batch {b:3d} {name:9s} {results[b][name]:.3f} s/step", flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\nViT-B-32 random init, {args.classes} classes, PGD-2 training attack, float32, {where}, "
          f"torch {torch.__version__}, median of {args.steps} steps\n")
    head = "| method | " + " | ".join(f"batch {b}: s/step | ×AdvMaPLe" for b in args.batches) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(args.batches))
    for name in args.methods:
        cells = []
        for b in args.batches:
            t = results[b][name]
            cells += [f"{t:.3f}", f"{t / results[b]['advmaple']:.2f}"]
        print(f"| {method_class(name).title} | " + " | ".join(cells) + " |")
    if "fap" in args.methods and "cba_fapt" in args.methods:
        ratios = ", ".join(f"batch {b}: {results[b]['cba_fapt'] / results[b]['fap']:.2f}×" for b in args.batches)
        print(f"\nCBA-FAPT / FAP step time: {ratios}")


if __name__ == "__main__":
    main()
