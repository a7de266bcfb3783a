"""`robustprompt eval`: clean and robust accuracy of a (prompted) classifier on a dataset split.

With several attacks (`attack` plus `also`, e.g. PGD-100 and AutoAttack standard), an image counts
as robust only if every attack fails on it: `robust_acc` is that worst case, `attacks` lists each
attack's own accuracy, and each record keeps every attack's prediction (`adv_preds`).
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import __version__
from ..api import classifier_from_spec, resolved_prompt
from ..attacks.threat import ThreatModel
from ..config import SEED_LIMIT, AttackSpec, DataSpec, ModelSpec, to_dict
from ..errors import ConfigError
from ..models.sources import model_slug
from .identity import model_fingerprint, split_fingerprint
from . import runlog
from .runtime import autocast, check_precision, process_state, set_tf32
from .rundir import RunDir, check_out_dir, config_hash
from .sharded import aa_chunk, run_per_image
from .tasks import Task, load_task, method_of

log = logging.getLogger("robustprompt")


@dataclass
class EvalConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    attack: AttackSpec = field(default_factory=AttackSpec)
    also: list[AttackSpec] = field(default_factory=list)   # further attacks: robust_acc is the worst case
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"   # clean forward passes: fp32, or bf16/fp16 autocast (attacks: attack.precision)
    tf32: bool = False        # TF32 for CUDA matmuls and cuDNN convolutions

    def __post_init__(self) -> None:
        check_seed(self.seed, "seed")
        check_precision(self.precision)
        check_tf32(self.tf32)

    def omitted_fields(self) -> tuple[str, ...]:
        """precision and tf32 at their defaults stay out of the record (and run identity), so
        existing configs keep theirs."""
        return precision_omitted(self)

    def threats(self) -> dict[str, "ThreatModel"]:
        """Every attack by a short unique key ('pgd', 'autoattack', 'pgd-2', …), in order."""
        out: dict[str, ThreatModel] = {}
        for spec in [self.attack, *self.also]:
            key, n = spec.attack, 2
            while key in out:
                key, n = f"{spec.attack}-{n}", n + 1
            out[key] = spec.threat()
        return out


def check_seed(value: object, key: str = "seed") -> None:
    """ConfigError unless `value` is an integer in [0, 2**31)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{key} must be an integer from 0 to {SEED_LIMIT - 1}, got {str(value)[:40]}")


IMAGE_SEED_MODULUS = 2**52


def image_seed(seed: int, index: int) -> int:
    """The attack's random start for an image depends only on (seed, image index).

    seed·1000003 + index, reduced into [0, 2**52): for every valid seed (< 2**31) and index
    (< 2**31) the reduction changes nothing (the value stays below 2.2e15 < 2**52), and for any
    other integer it keeps the seeds derived downstream (PGD's ×1009 + restart, ℓ2's + 7919)
    inside int64, which torch.Generator.manual_seed needs."""
    return (int(seed) * 1_000_003 + int(index)) % IMAGE_SEED_MODULUS


def eval_identity(config: dict, model: ModelSpec, task: Task) -> None:
    """Add the run's fingerprints to `config` (in place): the prompts and backbone weights it
    loads (SHA-256) and the images it works on (ids and labels at its indices, class names)."""
    config["model"]["fingerprint"] = model_fingerprint(model)
    config["data"]["fingerprint"] = split_fingerprint(task.split.ids, task.split.labels, task.indices,
                                                      task.dataset.classnames)


def default_run_dir(kind: str, cfg_dict: dict, model: ModelSpec, data: DataSpec) -> Path:
    name = model_slug(model.name)   # hf-hub:ORG/REPO, local-dir:PATH → one safe path component
    return Path("runs") / kind / f"{data.dataset.replace(':', '_').replace('/', '_')}-{name}-{config_hash(cfg_dict)}"


def check_tf32(value: object, key: str = "tf32") -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {str(value)[:40]}")


def precision_omitted(cfg: Any) -> tuple[str, ...]:
    """The names among precision/tf32 that hold their defaults (fp32, False)."""
    return tuple(k for k, default in (("precision", "fp32"), ("tf32", False)) if getattr(cfg, k) == default)


def environment() -> dict[str, Any]:
    """What a result records about the software and arithmetic it came from: versions (None for
    what is not installed), CUDA/cuDNN when present, the TF32 switches as they were when the run
    ended, and the project's git commit when it runs from a checkout."""
    cuda = torch.cuda.is_available()
    return {"robustprompt": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "open_clip": _version_of("open_clip_torch"), "torchvision": _version_of("torchvision"),
            "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "git_commit": git_commit(),
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"}


def _version_of(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    """HEAD of the git checkout holding this package, or None (an installed wheel, no git, …)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, timeout=10,
                             capture_output=True, text=True, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def evaluate(cfg: EvalConfig, out: Optional[str | Path] = None, *, overwrite: bool = False,
             progress: bool = True, wait_for_lock: bool = False,
             report_to: Sequence[str] | str | None = None, compile: bool = False,
             auto_batch: bool = False) -> Optional[dict[str, Any]]:
    """Run (or resume) an evaluation; returns the metrics on the main process.

    The run directory is locked for the whole run: another process on it is refused with a
    ConfigError naming its PID, unless `wait_for_lock` (then this one waits for it). log.txt and
    scalars.csv are written in the run directory; report_to="tensorboard" adds TensorBoard events.
    compile: the attacks call the classifier through `torch.compile` (engine.compiled; eager
    after a failure, with a warning). auto_batch: the batch size is probed on CUDA
    (engine.autobatch; CPU: its default) instead of data.batch_size. Neither is part of the run's
    identity (batch size never changes an image's result; compiled arithmetic matches eager to
    rounding); both are recorded in metrics.environment when used."""
    if out is not None:
        check_out_dir(out)   # before any work
    report_to = runlog.require_reporters(report_to)   # before any work: a missing tensorboard
    state, device = process_state(cfg.device)
    set_tf32(cfg.tf32)
    config = {"kind": "eval", **to_dict(cfg)}
    if not cfg.also:  # a single-attack run keeps the config (and run directory) it always had
        del config["also"]
    config["model"]["prompt"] = resolved_prompt(cfg.model).to_dict()
    task = load_task(cfg.data)
    eval_identity(config, cfg.model, task)
    run = RunDir(out or default_run_dir("eval", config, cfg.model, cfg.data), config, overwrite=overwrite)
    with run.open(state, wait_for_lock=wait_for_lock) as resumed, \
            runlog.run_logging(run.path, "eval", main_process=state.is_main_process, report_to=report_to):
        if resumed and run.metrics() is not None:
            return run.metrics() if state.is_main_process else None
        return _evaluate(cfg, run, state, device, task, progress, compile, auto_batch)


def _evaluate(cfg: EvalConfig, run: RunDir, state, device, task: Task, progress: bool,
              compile: bool = False, auto_batch: bool = False) -> Optional[dict[str, Any]]:
    from .autobatch import auto_batch_size
    from .compiled import attack_model, compile_record

    clf = classifier_from_spec(cfg.model, task.dataset, device)
    clf.eval()
    threat = cfg.attack.threat()
    threats = cfg.threats()
    attacker = attack_model(clf, compile)   # the model the attacks call; clean and judging forwards stay eager
    batch_size, probe = cfg.data.batch_size, None
    chunk = aa_chunk(threats.values())
    if auto_batch and chunk is not None:   # every batch is one AutoAttack chunk: nothing to choose
        log.warning("--batch-size auto: with AutoAttack every batch is one chunk of %d images (aa_chunk); "
                    "no batch size is probed", chunk)
    elif auto_batch:
        # the widest arithmetic any attack uses: an fp32 attack beside a bf16 one must fit too
        attacking = [t for t in threats.values() if not t.is_clean]
        precision = "bf16" if attacking and all(t.precision == "bf16" for t in attacking) else "fp32"
        probe = auto_batch_size(clf, clf.image_size, len(task.dataset.classnames), device, precision)
        batch_size = probe.batch
    transform = task.transform(clf)   # the backbone's preprocessing unless data.resize_mode forces one
    t_start = time.time()

    def process(x: torch.Tensor, y: torch.Tensor, idx: list[int]) -> list[dict]:
        with torch.no_grad(), autocast(device, cfg.precision):
            clean = clf(x).argmax(1)
        seeds = [image_seed(cfg.seed, i) for i in idx]
        preds = {}
        for key, t in threats.items():
            x_adv = t.run(attacker, x, y, seeds=seeds, seed=cfg.seed)
            with torch.no_grad():
                preds[key] = clf(x_adv).argmax(1)
        # worst case per image: the first attack (in order) that fools the model, else the first's
        worst = preds[next(iter(threats))].clone()
        for key in reversed(list(threats)):
            fooled = preds[key] != y
            worst[fooled] = preds[key][fooled]
        recs = [{"clean_pred": int(clean[b]), "adv_pred": int(worst[b])} for b in range(len(y))]
        if len(threats) > 1:
            for b, r in enumerate(recs):
                r["adv_preds"] = {k: int(p[b]) for k, p in preds.items()}
        return recs

    records = run_per_image(run, state, task.split, task.indices, transform, process,
                            batch_size=batch_size, workers=cfg.data.workers,
                            chunk=chunk,
                            desc=f"eval {cfg.data.dataset} {threat.short()}"
                                 + (f" + {len(threats) - 1} more" if len(threats) > 1 else ""), progress=progress)
    if records is None:
        return None
    metrics = summarize(records, task, clf, threat, cfg, method_of(cfg.model), time.time() - t_start)
    if compile:   # recorded only when asked, so runs without it keep the record they always had
        metrics["environment"]["compile"] = compile_record(attacker)
    if probe is not None:
        metrics["environment"]["batch_size"] = {"auto": True, **probe.to_dict()}
    if len(threats) > 1:
        recs, n_cls = list(records.values()), len(task.dataset.classnames)
        metrics["attacks"] = [{"key": k, "title": t.short(), "randomness": None,
                               "acc": 100.0 * sum(r["adv_preds"][k] == r["label"] for r in recs) / len(recs),
                               "threat": t.describe(n_cls)} for k, t in threats.items()]
        metrics["worst_case"] = {"acc": metrics["robust_acc"], "over": list(threats)}
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
        "preprocess": task.preprocess(clf).to_dict(),   # as applied: the backbone's, or data.resize_mode's
        **method,
        "seed": cfg.seed,
        "threat": threat.describe(len(task.dataset.classnames)),
        "precision": getattr(cfg, "precision", "fp32"),   # the clean forwards' (the attack's: threat.precision)
        "adaptive": False,
        "clean_acc": 100.0 * clean / n,
        "robust_acc": 100.0 * robust / n,
        "n": n,
        "subset": cfg.data.subset,
        "wall_time_s": round(sum(r.get("sec", 0.0) for r in recs), 3),
        "wall_time_this_session_s": round(elapsed, 3),
        "environment": environment(),
    }
