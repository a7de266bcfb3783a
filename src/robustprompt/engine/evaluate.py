"""`robustprompt eval`: clean and robust accuracy of a (prompted) classifier on a dataset split."""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..api import classifier_from_spec, resolved_prompt
from ..config import AttackSpec, DataSpec, ModelSpec, to_dict
from .runtime import process_state
from .rundir import RunDir, config_hash
from .sharded import run_per_image
from .tasks import load_task, method_of


@dataclass
class EvalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    seed: int = 0
    device: str = "auto"


def image_seed(seed: int, index: int) -> int:
    """The attack's random start for an image depends only on (seed, image index)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def default_run_dir(kind: str, cfg_dict: dict, model: ModelSpec, data: DataSpec) -> Path:
    name = model.name.replace("/", "-")
    return Path("runs") / kind / f"{data.dataset.replace(':', '_').replace('/', '_')}-{name}-{config_hash(cfg_dict)}"


def environment() -> dict[str, Any]:
    return {"robustprompt": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}


def evaluate(cfg: EvalConfig, out: Optional[str | Path] = None, *, overwrite: bool = False,
             progress: bool = True) -> Optional[dict[str, Any]]:
    """Run (or resume) an evaluation; returns the metrics on the main process."""
    state, device = process_state(cfg.device)
    config = {"kind": "eval", **to_dict(cfg)}
    config["model"]["prompt"] = resolved_prompt(cfg.model).to_dict()
    run = RunDir(out or default_run_dir("eval", config, cfg.model, cfg.data), config, overwrite=overwrite)
    resumed = run.prepare(is_main=state.is_main_process)
    state.wait_for_everyone()
    if resumed and run.metrics() is not None:
        return run.metrics() if state.is_main_process else None

    task = load_task(cfg.data)
    clf = classifier_from_spec(cfg.model, task.dataset, device)
    clf.eval()
    threat = cfg.attack.threat()
    transform = task.transform(clf.image_size)
    t_start = time.time()

    def process(x: torch.Tensor, y: torch.Tensor, idx: list[int]) -> list[dict]:
        with torch.no_grad():
            clean = clf(x).argmax(1)
        x_adv = threat.run(clf, x, y, seeds=[image_seed(cfg.seed, i) for i in idx], seed=cfg.seed)
        with torch.no_grad():
            adv = clf(x_adv).argmax(1)
        return [{"clean_pred": int(c), "adv_pred": int(a)} for c, a in zip(clean.tolist(), adv.tolist())]

    records = run_per_image(run, state, task.split, task.indices, transform, process,
                            batch_size=cfg.data.batch_size, workers=cfg.data.workers,
                            desc=f"eval {cfg.data.dataset} {threat.short()}", progress=progress)
    if records is None:
        return None
    metrics = summarize(records, task, clf, threat, cfg, method_of(cfg.model), time.time() - t_start)
    run.finalize(records, metrics)
    return metrics


def summarize(records: dict[int, dict], task, clf, threat, cfg, method: dict, elapsed: float) -> dict[str, Any]:
    recs = list(records.values())
    n = len(recs)
    clean = sum(r["clean_pred"] == r["label"] for r in recs)
    robust = sum(r["adv_pred"] == r["label"] for r in recs)
    return {
        "kind": "eval",
        "dataset": cfg.data.dataset,
        "split": cfg.data.split,
        "classes": cfg.data.classes,
        "n_classes": len(task.dataset.classnames),
        "backbone": clf.backbone_info,
        **method,
        "seed": cfg.seed,
        "threat": threat.describe(len(task.dataset.classnames)),
        "adaptive": False,
        "clean_acc": 100.0 * clean / n,
        "robust_acc": 100.0 * robust / n,
        "n": n,
        "subset": cfg.data.subset,
        "wall_time_s": round(sum(r.get("sec", 0.0) for r in recs), 3),
        "wall_time_this_session_s": round(elapsed, 3),
        "environment": environment(),
    }
