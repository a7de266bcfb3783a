"""Robust evaluation near the hardware's limit: image-steps per second of one PGD step.

One PGD step = forward of x + δ through the image tower, logits against class text features
computed once (pinned, as inside `rp.attacks.pgd`), cross-entropy, backward w.r.t. the images
only (the backbone is frozen: no weight gradients), sign step and projection. Every combination
of model × arithmetic × eager/compiled × batch size is timed in one run, so the ratios
(bf16/fp32, compiled/eager, batch scaling) come from the same machine and moment.

  models     ViT-B-32, ViT-B-16 (random-init open_clip: weights do not change the cost), demo
  arithmetic fp32; tf32 (CUDA only: TF32 matmuls and convolutions); bf16 (autocast, as
             --attack-precision bf16)
  compile    eager; compiled (`robustprompt.engine.compiled.CompiledAttackModel`, what --compile
             uses: torch.compile of the image forward, eager after a failure — marked "fell back")
  batch      CUDA: 32, 64, … doubling until torch.cuda.OutOfMemoryError (or --max-batch);
             CPU: --batches (default 1 4 16; --quick: 2 8)

Per row: image-steps/s, and on CUDA the fraction of the GPU's dense bf16 peak (PEAK_BF16_TFLOPS,
by device name; "n/a" for an unknown device) with FLOPs per image-step counted by
torch.utils.flop_counter on one eager fp32 step (forward + the backward w.r.t. the input; the
weight-gradient matmuls do not run) — the same count is used for every arithmetic, so the
fraction says how far each row is from what bf16 tensor cores could do. The last column is
the extrapolated wall time of PGD-100 on 50,000 images (5·10⁶ image-steps) at the row's rate.

Usage: python benchmarks/eval_throughput.py [--quick] [--models ViT-B-32 demo] [--device cpu]
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from _bench import device as device_arg, positive, sync
import torch.nn.functional as F

from robustprompt.attacks.pgd import project
from robustprompt.engine.autobatch import is_oom
from robustprompt.engine.compiled import CompiledAttackModel
from robustprompt.models import PromptedClassifier, load_backbone

# dense (no sparsity) bf16 tensor-core peaks with fp32 accumulation, TFLOP/s, from the vendors'
# datasheets; matched by substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe"
# before "H100"; GH200 matches "H200")
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 35.6),
)
PGD100_IMAGENET_STEPS = 100 * 50_000


def peak_bf16(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


@dataclass
class Row:
    model: str
    arith: str
    mode: str
    batch: int
    rate: Optional[float]        # image-steps per second; None: OOM
    note: str = ""


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One PGD step on the whole batch, as rp.attacks.pgd takes it (ℓ∞, α = 1/255, ε = 4/255)."""
    delta = torch.zeros_like(x)
    amp = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        nonlocal delta
        delta.requires_grad_(True)
        with amp:
            logits = model(x + delta).float()
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), delta)
        with torch.no_grad():
            delta = project(delta.detach() + grad.sign() / 255, x, 4 / 255, "linf")

    return step


def time_step(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Best (least) seconds per call after `warmup` calls (compiled rows compile in the warm-up:
    the forward at the first call, the backward at the first backward, a dynamic-shape graph at
    the second batch size). The least is the least disturbed by other work on a shared machine."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def flops_per_image_step(clf: PromptedClassifier, device: torch.device) -> float:
    """FLOPs of one image's PGD step (batch 2, halved), counted by torch's FlopCounterMode with
    attention on the math kernel: the counter has no formula for the CPU's fused attention kernel
    (it would count attention as 0), and the math kernel does the same matmuls as any fused one."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(2, 3, clf.image_size, clf.image_size, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    step = make_step(clf, x, y, bf16=False)
    with clf.static_text(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 2


def formula_flops(clf: PromptedClassifier) -> Optional[float]:
    """The stated formula, for ViTs: forward = patch embedding 2·P·(3p²)·C + per block
    (24·N·C² linear + 4·N²·C attention), N = P + 1 tokens. The backward w.r.t. the input costs one
    matmul per weight matmul (no weight gradients) but two per attention matmul (both of QKᵀ's and
    of A·V's operands depend on the input): a step = 2 × linear + 3 × attention."""
    v = clf.model.clip.visual
    if not hasattr(v, "conv1") or not hasattr(v, "transformer"):
        return None
    C = v.transformer.width
    L = len(v.transformer.resblocks)
    p = v.conv1.kernel_size[0]
    P = (clf.image_size // p) ** 2
    N = P + 1
    linear = 2 * P * 3 * p * p * C + L * 24 * N * C * C
    attention = L * 4 * N * N * C
    return 2.0 * linear + 3.0 * attention


def cuda_batches(start: int, cap: int) -> list[int]:
    out, b = [], start
    while b <= cap:
        out.append(b)
        b *= 2
    return out


def build(model: str, device: torch.device, n_classes: int) -> PromptedClassifier:
    torch.manual_seed(0)
    if model == "demo":   # the trained demo backbone (Fashion-MNIST, 28 px; built on first use)
        from robustprompt.demo.backbone import load_demo_backbone

        bb = load_demo_backbone(device=device)
    else:
        bb = load_backbone(model, device=device)
    clf = PromptedClassifier(bb, [f"class number {i}" for i in range(n_classes)]).to(device).eval()
    with torch.no_grad():
        clf.text_features()   # once, as an evaluation run does
    return clf


def run_model(name: str, args, device: torch.device) -> tuple[list[Row], float, Optional[float]]:
    clf = build(name, device, args.classes)
    flops = flops_per_image_step(clf, device)
    formula = formula_flops(clf)
    ariths = [a for a in args.ariths if device.type == "cuda" or a != "tf32"]   # TF32 is a CUDA switch
    batches = cuda_batches(args.start_batch, args.max_batch) if device.type == "cuda" else args.batches
    rows: list[Row] = []
    for mode in args.modes:
        model = clf if mode == "eager" else CompiledAttackModel(clf)
        for arith in ariths:
            torch.backends.cuda.matmul.allow_tf32 = arith == "tf32"
            torch.backends.cudnn.allow_tf32 = arith == "tf32"
            for b in batches:
                x = torch.rand(b, 3, clf.image_size, clf.image_size, device=device)
                y = torch.arange(b, device=device) % args.classes
                try:
                    with clf.static_text():
                        sec = time_step(make_step(model, x, y, arith == "bf16"), device, args.warmup, args.iters)
                except Exception as exc:   # noqa: BLE001
                    if not is_oom(exc):
                        raise
                    del x, y
                    torch.cuda.empty_cache()
                    rows.append(Row(name, arith, mode, b, None, "OOM"))
                    break
                note = "fell back to eager" if mode == "compiled" and not model.active else ""
                rows.append(Row(name, arith, mode, b, b / sec, note))
                print(f"  {name} {arith} {mode} batch {b}: {b / sec:.2f} image-steps/s {note}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return rows, flops, formula


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def report(rows: list[Row], flops: dict[str, float], formula: dict[str, Optional[float]],
           device: torch.device, where: str) -> None:
    peak = peak_bf16(where) if device.type == "cuda" else None
    print(f"\n{where} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"bf16 dense peak: {f'{peak:g} TFLOP/s' if peak else 'n/a'}")
    for m in flops:
        f = formula[m]
        print(f"{m}: {flops[m] / 1e9:.2f} GFLOP per image-step (FlopCounterMode)"
              + (f", formula {f / 1e9:.2f}" if f else ""))
    print("\n| model | arithmetic | mode | batch | image-steps/s | % of bf16 peak | PGD-100 × 50k images |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r.rate is None:
            print(f"| {r.model} | {r.arith} | {r.mode} | {r.batch} | OOM | | |")
            continue
        frac = (f"{100 * r.rate * flops[r.model] / (peak * 1e12):.1f}" if peak else
                ("n/a" if device.type == "cuda" else "— (CPU)"))
        extra = f" ({r.note})" if r.note else ""
        print(f"| {r.model} | {r.arith} | {r.mode}{extra} | {r.batch} | {r.rate:.2f} | {frac} | "
              f"{fmt_time(PGD100_IMAGENET_STEPS / r.rate)} |")
    ratios(rows)
    if device.type != "cuda":
        print("\nGPU figures: not yet measured (this run was on a CPU); "
              "rerun with --device cuda on a GPU for image-steps/s, % of peak and the PGD-100 wall time there.")


def ratios(rows: list[Row]) -> None:
    """bf16/fp32, compiled/eager (speed-ups, >1 = faster) and batch scaling, per model."""
    rate = {(r.model, r.arith, r.mode, r.batch): r.rate for r in rows if r.rate is not None}
    print("\n| model | batch | bf16 / fp32 (eager) | compiled / eager (fp32) | compiled / eager (bf16) |")
    print("|---|---:|---:|---:|---:|")
    for (m, a, mode, b), v in rate.items():
        if a != "fp32" or mode != "eager":
            continue

        def ratio(num, den):
            return f"{num / den:.2f}×" if num and den else "—"
        print(f"| {m} | {b} | {ratio(rate.get((m, 'bf16', 'eager', b)), v)} | "
              f"{ratio(rate.get((m, 'fp32', 'compiled', b)), v)} | "
              f"{ratio(rate.get((m, 'bf16', 'compiled', b)), rate.get((m, 'bf16', 'eager', b)))} |")
    for (m, a, mode) in dict.fromkeys((k[0], k[1], k[2]) for k in rate):
        bs = sorted(b for (mm, aa, md, b) in rate if (mm, aa, md) == (m, a, mode))
        if len(bs) > 1:
            print(f"batch scaling {m} {a} {mode}: batch {bs[-1]} / batch {bs[0]} = "
                  f"{rate[(m, a, mode, bs[-1])] / rate[(m, a, mode, bs[0])]:.2f}× image-steps/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16", "demo"])
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=positive, nargs="+", default=[1, 4, 16], help="CPU batch sizes")
    ap.add_argument("--start-batch", type=positive, default=32, help="CUDA: first batch size, then doubling")
    ap.add_argument("--max-batch", type=positive, default=4096, help="CUDA: stop doubling here (or at OOM)")
    ap.add_argument("--ariths", nargs="+", default=["fp32", "tf32", "bf16"], choices=["fp32", "tf32", "bf16"],
                    help="arithmetic (tf32 only on CUDA)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--classes", type=positive, default=1000)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=positive, default=5, help="timed steps per row (the best is reported)")
    ap.add_argument("--quick", action="store_true",
                    help="a CPU run of about 5 minutes on 2 idle cores (7.7 CPU-minutes measured): ViT-B-32 and demo, "
                         "batches 2 8, 2 warm-up, best of 3 steps")
    args = ap.parse_args()
    if args.quick:
        args.models = [m for m in args.models if m != "ViT-B-16"]
        args.batches, args.warmup, args.iters = [2, 8], 2, 3
    if args.warmup < 0:
        ap.error(f"--warmup must be ≥ 0, got {args.warmup}")
    if args.max_batch < args.start_batch:
        ap.error(f"--max-batch {args.max_batch} is below --start-batch {args.start_batch}")
    device = args.device
    if device.type != "cuda" and set(args.ariths) <= {"tf32"}:
        ap.error("--ariths tf32 is a CUDA switch: on a CPU choose fp32 and/or bf16")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()})"
    rows, flops, formula = [], {}, {}
    for name in args.models:
        r, flops[name], formula[name] = run_model(name, args, device)
        rows += r
    report(rows, flops, formula, device, where)


if __name__ == "__main__":
    main()
