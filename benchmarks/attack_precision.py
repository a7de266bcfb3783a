"""What a cheaper attack gives up: robust accuracy and time of fp32 vs bf16 PGD on the same images.

Both attacks run in one process on the same images, model and per-image seeds; the adversarial
images of both are judged by the same fp32 forward, so the only difference is the arithmetic
inside the attack (`--attack-precision`). Also reported: on how many images the two verdicts
differ. TF32 is off for both (the toolkit's default) unless --tf32.

One untimed attack of each precision comes first, and the two alternate which goes first per
batch. Default: the demo backbone (Fashion-MNIST; built and cached on first use) with 64 test images on
CPU; on a GPU pass e.g. --model ViT-B-32 --pretrained openai --dataset <name> --root DIR.
Usage: python benchmarks/attack_precision.py [--n 64] [--eps 1] [--steps 10] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from _bench import positive, sync

from robustprompt.api import classifier_from_spec, resolve_device
from robustprompt.config import AttackSpec, DataSpec, ModelSpec
from robustprompt.engine.evaluate import image_seed
from robustprompt.engine.runtime import set_tf32
from robustprompt.engine.sharded import IndexedImages
from robustprompt.engine.tasks import load_task
from robustprompt.errors import RobustPromptError


def main() -> None:
    try:
        run()
    except RobustPromptError as exc:   # a user's input (device, dataset, model): one line
        raise SystemExit(f"attack_precision.py: error: {exc}") from None


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--pretrained")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--root")
    ap.add_argument("--n", type=positive, default=64, help="test images (a fixed seeded subset)")
    ap.add_argument("--batch", type=positive, default=32)
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"])
    ap.add_argument("--eps", type=float, default=1.0, help="ℓ∞: /255 units; ℓ2: pixel units")
    ap.add_argument("--steps", type=positive, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tf32", action="store_true")
    args = ap.parse_args()

    device = resolve_device(args.device)
    tf32 = set_tf32(args.tf32)
    task = load_task(DataSpec(dataset=args.dataset, root=args.root, subset=args.n))
    clf = classifier_from_spec(ModelSpec(name=args.model, pretrained=args.pretrained), task.dataset, device).eval()
    data = IndexedImages(task.split, task.indices, task.transform(clf))
    batches = [[data[i] for i in range(s, min(s + args.batch, len(data)))] for s in range(0, len(data), args.batch)]
    threats = {p: AttackSpec(norm=args.norm, eps=args.eps, steps=args.steps, precision=p).threat()
               for p in ("fp32", "bf16")}
    correct = {p: [] for p in threats}
    seconds = dict.fromkeys(threats, 0.0)
    clean = []
    with torch.no_grad():
        clf.text_features()   # warm the text cache once, in fp32, as an evaluation run does
    x0 = torch.stack([b[0] for b in batches[0]]).to(device)   # untimed: one attack of each precision on
    y0 = torch.tensor([b[1] for b in batches[0]], device=device)   # the first batch, so neither pays for
    for threat in threats.values():                                # kernel loading and allocator growth
        threat.run(clf, x0, y0, seeds=[0] * len(x0))
    for k, batch in enumerate(batches):
        x = torch.stack([b[0] for b in batch]).to(device)
        y = torch.tensor([b[1] for b in batch], device=device)
        seeds = [image_seed(0, b[2]) for b in batch]
        with torch.no_grad():
            clean.append(clf(x).argmax(1) == y)
        order = list(threats.items())[::(1 if k % 2 == 0 else -1)]   # alternating, so neither always goes first
        for p, threat in order:   # same images, same seeds; timed per attack
            sync(device)
            t0 = time.perf_counter()
            x_adv = threat.run(clf, x, y, seeds=seeds)
            sync(device)
            seconds[p] += time.perf_counter() - t0
            with torch.no_grad():   # one fp32 judge for both
                correct[p].append(clf(x_adv).argmax(1) == y)
    n = len(data)
    ok = {p: torch.cat(c) for p, c in correct.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"model {args.model} on {args.dataset}, {n} images, {threats['fp32'].short()} | device {where} "
          f"| torch {torch.__version__}, threads {torch.get_num_threads()}, TF32 {tf32}")
    print(f"clean accuracy {100 * float(torch.cat(clean).float().mean()):.2f}%")
    print("| attack precision | robust acc. (%) | attack time (s) | s / image |")
    print("|---|---|---|---|")
    for p in threats:
        print(f"| {p} | {100 * float(ok[p].float().mean()):.2f} | {seconds[p]:.2f} | {seconds[p] / n:.4f} |")
    print(f"verdicts that differ between fp32 and bf16: {int((ok['fp32'] != ok['bf16']).sum())} of {n}; "
          f"bf16 time / fp32 time = {seconds['bf16'] / seconds['fp32']:.2f}")


if __name__ == "__main__":
    main()
