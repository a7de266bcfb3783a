"""`robustprompt demo`: the main job on the embedded default, end to end, offline, on a CPU."""
from __future__ import annotations

from pathlib import Path

from ..config import AttackSpec, DataSpec, ModelSpec
from ..paths import atomic_write_text
from ..report.console import format_table
from .backbone import ensure_demo_backbone

EPS_SWEEP = (1, 2, 4, 8)   # /255
PGD_STEPS = 10


def run_demo(out: str | Path = "runs/demo", subset: int = 1000, progress: bool = True, device: str = "auto") -> str:
    """Zero-shot clean and PGD-10 accuracy of the demo backbone on a fixed Fashion-MNIST test
    subset; returns (and prints) the table. Every number comes from a resumable run directory."""
    from ..engine.evaluate import EvalConfig, evaluate

    out = Path(out)
    ensure_demo_backbone(progress=progress)
    data = DataSpec(dataset="fashion_mnist", split="test", subset=subset, batch_size=250)
    row: list = ["zero-shot CLIP (demo backbone)"]
    clean = None
    for eps in EPS_SWEEP:
        cfg = EvalConfig(model=ModelSpec(name="demo"), data=data,
                         attack=AttackSpec(attack="pgd", eps=eps, steps=PGD_STEPS), device=device)
        m = evaluate(cfg, out / f"zeroshot-pgd{PGD_STEPS}-eps{eps}", progress=progress)
        clean = m["clean_acc"] if clean is None else clean
        row.append(m["robust_acc"])
    header = ["model", "clean"] + [f"PGD-{PGD_STEPS} ε={e}/255" for e in EPS_SWEEP]
    table = format_table(header, [[row[0], clean, *row[1:]]])
    note = (f"Fashion-MNIST test, fixed random subset of {subset} images (seed 0); "
            f"ℓ∞ PGD-{PGD_STEPS}, α = ε/4, random start, float32. Accuracies in %.")
    text = f"{table}\n\n{note}\n"
    atomic_write_text(out / "summary.md", text)
    print(text)
    return text
