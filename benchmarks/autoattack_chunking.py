"""What AutoAttack's batch independence costs: one pyautoattack run per image (aa_chunk=1)
against one run per fixed chunk of images (aa_chunk = the number of images, the default 64 covers
them), on the same images and model in the same run; both are exact under resume and sharding.

Model: the demo backbone (zero-shot prompts), Fashion-MNIST test images, AutoAttack standard ℓ∞.
Usage: python benchmarks/autoattack_chunking.py [--images 8] [--eps 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from robustprompt.attacks import ThreatModel
from robustprompt.data import build_dataset, clip_transform
from robustprompt.demo.backbone import load_demo_backbone
from robustprompt.engine.evaluate import image_seed
from robustprompt.engine.tasks import subset_indices
from robustprompt.models import PromptedClassifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--eps", type=float, default=4.0, help="/255 units")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    backbone = load_demo_backbone(device=device)
    data = build_dataset("fashion_mnist")
    split = data.split("test")
    clf = PromptedClassifier(backbone, data.classnames).to(device).eval()
    transform = clip_transform(clf.image_size, backbone.interpolation)
    idx = subset_indices(len(split), args.images, 0)
    x = torch.stack([transform(split.load(i)) for i in idx]).to(device)
    y = torch.tensor([split.labels[i] for i in idx], device=device)
    seeds = [image_seed(0, i) for i in idx]
    rows = []
    for chunk in (args.images, 1):
        threat = ThreatModel.from_255(args.eps, attack="autoattack", aa_chunk=chunk)
        t0 = time.perf_counter()
        x_adv = threat.run(clf, x, y, seeds=seeds)
        sec = time.perf_counter() - t0
        with torch.no_grad():
            acc = 100.0 * (clf(x_adv).argmax(1) == y).float().mean().item()
        rows.append((chunk, sec, acc))
    base = rows[0][1]
    print(f"demo backbone, {args.images} images, AutoAttack standard ℓ∞ ε={args.eps:g}/255, "
          f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print("| aa_chunk | seconds | × chunked | robust acc (%) |")
    print("|---:|---:|---:|---:|")
    for chunk, sec, acc in rows:
        print(f"| {chunk} | {sec:.1f} | {sec / base:.2f} | {acc:.1f} |")


if __name__ == "__main__":
    main()
