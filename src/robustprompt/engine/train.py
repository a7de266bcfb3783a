"""`robustprompt train`: few-shot prompt tuning with one method on one dataset.

SGD + cosine schedule with a constant warm-up epoch (CoOp's recipe), only prompt parameters
trainable, one checkpoint of the prompt tensors (+ optimiser momentum) per epoch, resume from the
last checkpoint with the same result as an uninterrupted run: every epoch reseeds its data order,
augmentation and attack randomness from (seed, epoch), so nothing depends on where a run stopped.
Several processes split each global batch and average prompt gradients (accelerate's `reduce`);
the training attack runs inside each process on the plain classifier, with no gradient sync.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from ..api import get_backbone, resolve_templates
from ..config import AttackSpec, ModelSpec, check_resize_mode, replace, to_dict
from ..data import base_new_split, build_dataset, few_shot_indices
from ..data.transforms import Preprocess
from ..errors import ConfigError, RobustPromptError
from ..methods import build_method
from ..methods.base import Method
from ..models import PromptedClassifier
from ..paths import atomic_save_tensors, atomic_write_text
from .evaluate import check_seed, check_tf32, environment, precision_omitted
from .grad_share import share_record
from .identity import model_fingerprint, split_fingerprint
from . import runlog
from .runlog import progress_bar
from .runtime import autocast, check_precision, process_state, set_tf32
from .rundir import RunDir, check_out_dir, config_hash
from .sharded import IndexedImages
from .tasks import preprocess_of

log = logging.getLogger("robustprompt")


class TrainingError(RobustPromptError):
    """Training cannot go on (a non-finite loss)."""


@dataclass
class TrainDataSpec:
    dataset: str = "fashion_mnist"
    root: Optional[str] = None
    split: str = "train"
    shots: Optional[int] = 16           # per class; null = the whole split
    classes: str = "all"                # all | base (base-to-new protocol trains on base)
    batch_size: int = 32
    workers: int = 0
    augment: str = "coop"               # coop (random resized crop + flip) | flip | none
    download: bool = False
    resize_mode: str = "auto"           # with augment flip/none: auto (the backbone's own) | shortest | squash | longest
    few_shot_source: str = "auto"       # auto (Dassl's split_fewshot pkl if present) | dassl | seeded-draw

    def __post_init__(self) -> None:
        if self.classes not in ("all", "base", "new"):
            raise ConfigError(f"data.classes must be all, base or new, got {self.classes!r}")
        if self.augment not in ("coop", "flip", "none"):
            raise ConfigError(f"data.augment must be coop, flip or none, got {self.augment!r}")
        check_resize_mode(self.resize_mode)
        if self.few_shot_source not in ("auto", "dassl", "seeded-draw"):
            raise ConfigError(f"data.few_shot_source must be auto, dassl or seeded-draw, "
                              f"got {self.few_shot_source!r}")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"data.shots must be >= 1 (or null for all), got {self.shots}")


@dataclass
class OptimSpec:
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    schedule: str = "cosine"            # cosine | constant

    def __post_init__(self) -> None:
        for key in ("lr", "momentum", "weight_decay", "warmup_lr"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"optim.{key} must be a finite number, got {getattr(self, key)}")
        if self.epochs < 1 or self.lr <= 0 or self.warmup_epochs < 0:
            raise ConfigError(f"optim needs epochs >= 1, lr > 0, warmup_epochs >= 0 (got {self.epochs}, "
                              f"{self.lr}, {self.warmup_epochs})")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        if self.schedule == "constant":
            return self.lr
        return 0.5 * self.lr * (1 + math.cos(math.pi * (epoch - self.warmup_epochs) / self.epochs))


@dataclass
class MethodSpec:
    name: str = "cba_fapt"
    params: dict = field(default_factory=dict)


def _default_train_attack() -> AttackSpec:
    return AttackSpec(attack="pgd", eps=1.0, alpha=1.0, steps=2)


@dataclass
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: TrainDataSpec = field(default_factory=TrainDataSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train_attack: AttackSpec = field(default_factory=_default_train_attack)
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"   # the training step's autocast: fp32, bf16, fp16 (with loss scaling)
    tf32: bool = False        # TF32 for CUDA matmuls and cuDNN convolutions

    def __post_init__(self) -> None:
        check_seed(self.seed, "seed")
        check_precision(self.precision)
        check_tf32(self.tf32)

    def omitted_fields(self) -> tuple[str, ...]:
        """precision and tf32 at their defaults stay out of the run identity (existing runs keep theirs)."""
        return precision_omitted(self)


def _train_transform(preprocess: Preprocess | int, augment: str, resize_mode: str = "auto",
                     interpolation: Optional[str] = None):
    """coop: RandomResizedCrop + flip. flip / none: the deterministic resize — the backbone's
    own (``preprocess``; resize_mode "auto") or ``resize_mode`` forced (FAP's configs: none +
    squash, i.e. Dassl's train transform with INPUT.TRANSFORMS = []). The interpolation is the
    backbone's unless ``interpolation`` is given; a bare image size means bicubic, shortest side."""
    import torchvision.transforms as T

    pre = preprocess_of(preprocess).forced(resize_mode, interpolation)
    if augment == "coop":
        return pre.transform(train=True)
    base = pre.transform(train=False)
    if augment == "flip":
        return T.Compose([base, T.RandomHorizontalFlip()])
    return base


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_train_dir(cfg_dict: dict, cfg: TrainConfig) -> Path:
    shots = "all" if cfg.data.shots is None else f"{cfg.data.shots}shot"
    ds = cfg.data.dataset.replace(":", "_").replace("/", "_")
    return Path("runs") / "train" / f"{cfg.method.name}-{ds}-{shots}-seed{cfg.seed}-{config_hash(cfg_dict)}"


def train(cfg: TrainConfig, out: Optional[str | Path] = None, *, overwrite: bool = False,
          progress: bool = True, wait_for_lock: bool = False,
          report_to: Sequence[str] | str | None = None) -> Optional[dict[str, Any]]:
    """Train (or resume, or return the finished) run; returns its summary on the main process.

    The run's identity covers everything that changes the prompts it computes: every setting
    except device and progress (batch size and workers included: they change the data order
    and augmentation), the backbone weights (SHA-256 of a weight file) and the training images
    (ids and labels, class names). The run directory is locked for the whole run: another process
    on it is refused with a ConfigError naming its PID, unless `wait_for_lock`.
    report_to: "tensorboard" also writes the scalars (always in scalars.csv) as TensorBoard events."""
    if out is not None:
        check_out_dir(out)   # before any work
    report_to = runlog.require_reporters(report_to)   # before any work: a missing tensorboard
    state, device = process_state(cfg.device)
    set_tf32(cfg.tf32)
    method = build_method(cfg.method.name, cfg.method.params, cfg.train_attack.threat())
    prompt_cfg = cfg.model.prompt or method.default_prompt
    config = {"kind": "train", **to_dict(cfg)}
    config["model"]["prompt"] = prompt_cfg.to_dict()   # record what was used, not "default"
    config["method"]["params"] = to_dict(method.params)

    # ---------------------------------------------------------------- data
    dataset = build_dataset(cfg.data.dataset, cfg.data.root, download=cfg.data.download)
    if cfg.data.classes != "all":
        dataset = base_new_split(dataset, cfg.data.classes)
    split = dataset.split(cfg.data.split)
    indices, few_shot_source = _train_indices(cfg, dataset, split)
    # weights, and the open_clip config of a hf-hub:/local-dir: backbone (training loads no run's prompts)
    config["model"]["fingerprint"] = model_fingerprint(replace(cfg.model, run=None), with_prompts=False)
    config["data"]["fingerprint"] = split_fingerprint(split.ids, split.labels, indices, dataset.classnames)

    run = RunDir(out or default_train_dir(config, cfg), config, overwrite=overwrite)
    with run.open(state, wait_for_lock=wait_for_lock), \
            runlog.run_logging(run.path, "train", main_process=state.is_main_process, report_to=report_to):
        if (run.path / "prompts.safetensors").exists() and run.metrics() is not None:
            return run.metrics() if state.is_main_process else None
        return _train(cfg, run, state, device, method, prompt_cfg, dataset, split, indices, few_shot_source,
                      progress)


def _train(cfg: TrainConfig, run: RunDir, state, device, method: Method, prompt_cfg, dataset, split,
           indices: list[int], few_shot_source: Optional[str], progress: bool) -> Optional[dict[str, Any]]:
    from accelerate.utils import reduce

    # ---------------------------------------------------------------- model and method
    backbone = get_backbone(cfg.model.name, cfg.model.pretrained, cfg.model.quick_gelu, device)
    templates = resolve_templates(cfg.model.templates, dataset)

    def make_classifier(prompt) -> PromptedClassifier:
        return PromptedClassifier(backbone, dataset.classnames, prompt, templates).to(device)

    _seed_everything(cfg.seed)   # prompt initialisation
    clf = make_classifier(prompt_cfg)
    method.setup(clf, make_classifier)
    groups = [g for g in method.trainable_groups(clf) if g]
    t_start = time.time()
    if not method.trains or not groups:
        return _finish(run, clf, method, cfg, dataset, indices, [], t_start, state, few_shot_source)

    opt = cfg.optim
    optimizer = torch.optim.SGD([{"params": g} for g in groups], lr=opt.lr, momentum=opt.momentum,
                                weight_decay=opt.weight_decay)
    params = [p for g in groups for p in g]
    # fp16 needs loss scaling (its gradients underflow); bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    history, start_epoch = _resume(run, clf, method, optimizer, state.is_main_process)
    if start_epoch and state.is_main_process and progress:
        log.info("resuming %s after epoch %d", run.path, start_epoch)   # stderr and the run's log.txt

    transform = _train_transform(backbone.preprocess, cfg.data.augment, cfg.data.resize_mode)
    data = IndexedImages(split, indices, transform)
    B, W, rank = cfg.data.batch_size, state.num_processes, state.process_index
    steps_per_epoch = math.ceil(len(indices) / B)
    bar = progress_bar((opt.epochs - start_epoch) * steps_per_epoch, f"train {method.name} {dataset.name}",
                       "step", disable=not (progress and state.is_main_process))
    scalars = runlog.active()
    clf.train()
    for epoch in range(start_epoch, opt.epochs):
        lr = opt.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_seed = cfg.seed * 100_003 + epoch
        order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        batches = [order[s * B:(s + 1) * B][rank::W] for s in range(steps_per_epoch)]
        _seed_everything(epoch_seed * 31 + rank)
        loader = DataLoader(data, batch_sampler=[b for b in batches if b], num_workers=cfg.data.workers)
        it = iter(loader)
        t_epoch = time.time()
        sums: dict[str, float] = {}
        counts = {"n": 0, "clean": 0, "adv": 0, "n_clean": 0, "n_adv": 0}
        shares: dict[str, float] = {}
        for s, local in enumerate(batches):
            n_global = min(B, len(indices) - s * B)
            optimizer.zero_grad(set_to_none=False)
            if local:
                x, y, _ = next(it)
                x, y = x.to(device), y.to(device)
                with autocast(device, cfg.precision):   # the attack inside keeps its own precision
                    result = method.step(clf, x, y)
                _check_finite(result.terms, result.loss, epoch, s, run)
                if s == 0:  # is each term alive? (extra backwards on one step per epoch only)
                    shares = share_record(result, params)
                scaler.scale(result.loss * (len(local) / n_global)).backward()
                _accumulate(sums, counts, result, y)
                if scalars is not None:   # this process's batch loss (the main process's shard)
                    scalars.add("train/loss", float(result.loss.detach()), epoch * steps_per_epoch + s + 1)
                    scalars.add("train/lr", lr, epoch * steps_per_epoch + s + 1)
            if W > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = reduce(p.grad, reduction="sum")
            scaler.step(optimizer)   # optimizer.step(), unless fp16 gradients overflowed
            scaler.update()
            bar.update(1)
            bar.set_postfix(epoch=epoch, **_postfix(sums, counts))
        summary = _epoch_summary(sums, counts, epoch, lr, state, reduce)
        summary.update(shares)  # this process's first batch of the epoch
        summary["time_s"] = round(time.time() - t_epoch, 3)
        history.append(summary)
        if scalars is not None:   # the epoch's summary (loss, accuracies, term shares) by epoch number
            scalars.add_many(summary, epoch + 1, prefix="epoch/")
        _check_params_finite(clf, method, epoch)   # every process holds the same prompts: all stop
        if state.is_main_process:
            _save_checkpoint(run, clf, method, optimizer, epoch, summary)
        state.wait_for_everyone()
    bar.close()
    clf.eval()
    return _finish(run, clf, method, cfg, dataset, indices, history, t_start, state, few_shot_source)


# -------------------------------------------------------------------- helpers
def _train_indices(cfg: TrainConfig, dataset, split) -> tuple[list[int], Optional[str]]:
    """The training images and where the subset came from: ``dassl:<file>`` (Dassl's
    split_fewshot pickle of this dataset, shots and seed — FAP's/MaPLe's images for that seed),
    ``seeded-draw`` (our own seeded draw), or None for the whole split."""
    from ..data.dassl import coop_dataset_dir, dassl_fewshot_path, match_dassl_items, read_dassl_fewshot

    if cfg.data.shots is None:
        return list(range(len(split))), None
    folder = coop_dataset_dir(cfg.data.dataset, cfg.data.root) if cfg.data.few_shot_source != "seeded-draw" else None
    pkl = dassl_fewshot_path(folder, cfg.data.shots, cfg.seed) if folder is not None else None
    if pkl is not None and pkl.is_file() and cfg.data.split == "train":
        items = read_dassl_fewshot(pkl).train
        full = None
        if cfg.data.classes != "all":   # the file covers every class; keep this subset's, as CoOp does
            full = build_dataset(cfg.data.dataset, cfg.data.root, download=cfg.data.download).split(cfg.data.split)
        return sorted(match_dassl_items(items, split, pkl, full)), f"dassl:{pkl}"
    if cfg.data.few_shot_source == "dassl":
        raise ConfigError(f"data.few_shot_source is dassl but no Dassl few-shot file was found"
                          f"{f' at {pkl}' if pkl is not None else ' (not a CoOp-layout dataset with a root)'}"
                          f"{'' if cfg.data.split == 'train' else ' (Dassl files hold the train split)'}")
    indices = few_shot_indices(split, cfg.data.shots, cfg.seed,
                               cache_key=f"{dataset.name}/{cfg.data.split}", classnames=dataset.classnames)
    return indices, "seeded-draw"



def _check_finite(terms: dict[str, torch.Tensor], loss: torch.Tensor, epoch: int, step: int, run: RunDir) -> None:
    named = {**{k: v for k, v in terms.items() if isinstance(v, torch.Tensor)}, "loss": loss}
    if torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in named.values()])).all():
        return  # one check (one device sync) per step; names are looked up only on failure
    name, value = next((k, v) for k, v in named.items() if not torch.isfinite(v).all())
    last = sorted((run.path / "checkpoints").glob("epoch-*.safetensors"))
    where = f"the last good checkpoint is {last[-1].name}" if last else "no checkpoint was written yet"
    raise TrainingError(f"loss term '{name}' is {value.item()} at epoch {epoch}, step {step}; "
                        f"stopping ({where}). Lower optim.lr or check the data.")


def _accumulate(sums: dict[str, float], counts: dict[str, int], result, y: torch.Tensor) -> None:
    n = len(y)
    counts["n"] += n
    for k, v in {**result.terms, "loss": result.loss}.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v) * n
    if result.clean_logits is not None:
        counts["clean"] += int((result.clean_logits.argmax(1) == y).sum())
        counts["n_clean"] += n
    if result.adv_logits is not None:
        counts["adv"] += int((result.adv_logits.argmax(1) == y).sum())
        counts["n_adv"] += n
    for name, logits in result.aux_logits.items():   # e.g. APD's teacher, under its own name
        counts[name] = counts.get(name, 0) + int((logits.argmax(1) == y).sum())
        counts[f"n_{name}"] = counts.get(f"n_{name}", 0) + n


def _postfix(sums: dict[str, float], counts: dict[str, int]) -> dict[str, str]:
    out = {"loss": f"{sums.get('loss', 0.0) / max(1, counts['n']):.3f}"}
    if counts["n_clean"]:
        out["acc"] = f"{100 * counts['clean'] / counts['n_clean']:.1f}"
    if counts["n_adv"]:
        out["adv_acc"] = f"{100 * counts['adv'] / counts['n_adv']:.1f}"
    return out


def _epoch_summary(sums, counts, epoch, lr, state, reduce) -> dict[str, Any]:
    keys = sorted(sums)
    aux = sorted(k for k in counts if k not in _BASE_COUNTS and not k.startswith("n_"))
    count_keys = list(_BASE_COUNTS) + [c for a in aux for c in (a, f"n_{a}")]
    vec = torch.tensor([sums[k] for k in keys] + [counts[k] for k in count_keys], dtype=torch.float64)
    if state.num_processes > 1:
        vec = reduce(vec.to(state.device), reduction="sum").cpu()
    c = dict(zip(count_keys, vec[len(keys):].tolist()))
    out: dict[str, Any] = {"epoch": epoch, "lr": lr}
    out.update({k: vec[i].item() / max(1.0, c["n"]) for i, k in enumerate(keys)})
    if c["n_clean"]:
        out["train_clean_acc"] = 100 * c["clean"] / c["n_clean"]
    if c["n_adv"]:
        out["train_adv_acc"] = 100 * c["adv"] / c["n_adv"]
    for a in aux:
        if c[f"n_{a}"]:
            out[f"train_{a}_acc"] = 100 * c[a] / c[f"n_{a}"]
    return out


_BASE_COUNTS = ("n", "clean", "adv", "n_clean", "n_adv")


def _ckpt_name(epoch: int) -> str:
    return f"epoch-{epoch:03d}"


def _check_params_finite(clf, method: Method, epoch: int) -> None:
    """TrainingError, before anything is written, when the prompts or the method's extra state
    (e.g. APD's teacher prompts) hold NaN or ±inf: saving them would turn a diverged run into a
    result that evaluates to chance without a word."""
    named = {**{f"prompts ({k})": v for k, v in clf.prompt_state_dict().items()},
             **{f"method state ({k})": v for k, v in method.extra_state().items()}}
    for name, tensor in named.items():
        t = tensor.detach()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "infinity"
            raise TrainingError(f"training diverged at epoch {epoch}: {name} hold {kind}; nothing was saved for "
                                "this epoch — lower optim.lr (--lr) or check the data")


def _save_checkpoint(run: RunDir, clf, method: Method, optimizer, epoch: int, summary: dict) -> None:
    ckdir = run.path / "checkpoints"
    tensors = {f"prompt.{k}": v for k, v in clf.prompt_state_dict().items()}
    tensors.update({f"extra.{k}": v for k, v in method.extra_state().items()})
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optim.{gi}.{pi}"] = buf
    base = ckdir / _ckpt_name(epoch)
    atomic_save_tensors(base.with_suffix(".safetensors"), tensors)
    # the json is written last: a checkpoint counts only once both files exist
    atomic_write_text(base.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")


def _read_checkpoint(json_file: Path, epoch: int) -> tuple[Optional[dict], Optional[dict], str]:
    """(summary, tensors, "") of epoch `epoch`'s checkpoint pair, or (None, None, why) when either
    file is missing, truncated or does not hold that epoch."""
    try:
        summary = json.loads(json_file.read_text())
        if not isinstance(summary, dict) or summary.get("epoch") != epoch:
            return None, None, f"{json_file.name} does not describe epoch {epoch}"
        tensors = load_file(str(json_file.with_suffix(".safetensors")))
    except FileNotFoundError as exc:
        return None, None, f"{Path(exc.filename or json_file).name} is missing"
    except Exception as exc:  # noqa: BLE001 — any failure to parse a file we wrote means it is damaged
        return None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}"
    return summary, tensors, ""


def _usable_checkpoints(run: RunDir, is_main: bool) -> tuple[list[dict], Optional[dict]]:
    """The epoch summaries 0..k of the latest checkpoint k from which a resume can go on, and k's
    tensors. Epochs must be consecutive from 0; a damaged pair (a truncated .safetensors or .json
    from a kill or a full disk) ends the usable run of epochs: it is deleted (main process) and
    the run resumes from the previous good checkpoint, with a note."""
    ckdir = run.path / "checkpoints"
    if not ckdir.is_dir():
        return [], None
    stems = [p.stem.split("-")[1] for p in ckdir.glob("epoch-*.json")]
    numbers = sorted(int(s) for s in stems if s.isdigit())
    history: list[dict] = []
    tensors: Optional[dict] = None
    for epoch in range(len(numbers)):
        if numbers[epoch] != epoch:
            break
        json_file = ckdir / f"{_ckpt_name(epoch)}.json"
        summary, loaded, why = _read_checkpoint(json_file, epoch)
        if summary is None:
            if is_main:
                for f in (json_file, json_file.with_suffix(".safetensors")):
                    with contextlib.suppress(OSError):
                        f.unlink()
                back = f"epoch {epoch - 1}'s checkpoint" if epoch else "the start"
                print(f"note: checkpoint {_ckpt_name(epoch)} of {run.path} is damaged ({why}); deleted it and "
                      f"resuming from {back}", file=sys.stderr, flush=True)
            break
        history.append(summary)
        tensors = loaded
    return history, tensors


def _resume(run: RunDir, clf, method: Method, optimizer, is_main: bool = True) -> tuple[list[dict], int]:
    history, tensors = _usable_checkpoints(run, is_main)
    if tensors is None:
        return [], 0
    device = clf.mean.device
    clf.load_prompt_state_dict({k[len("prompt."):]: v.to(device) for k, v in tensors.items() if k.startswith("prompt.")})
    method.load_extra_state({k[len("extra."):]: v.to(device) for k, v in tensors.items() if k.startswith("extra.")})
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            key = f"optim.{gi}.{pi}"
            if key in tensors:
                optimizer.state[p]["momentum_buffer"] = tensors[key].to(device).clone()
    return history, history[-1]["epoch"] + 1


def _finish(run: RunDir, clf, method: Method, cfg: TrainConfig, dataset, indices, history, t_start, state,
            few_shot_source: Optional[str] = None):
    _check_params_finite(clf, method, history[-1]["epoch"] if history else 0)   # on every process
    if not state.is_main_process:
        state.wait_for_everyone()
        return None
    extra = method.extra_state()
    if extra:  # e.g. APD's teacher prompts: kept, but not part of the trained classifier
        atomic_save_tensors(run.path / "method_state.safetensors", extra)
    _write_prompt_file(run, clf, method, cfg, dataset, few_shot_source)
    metrics = {
        "kind": "train",
        "method": method.name,
        "dataset": dataset.name,
        "classes": cfg.data.classes,
        "n_classes": len(dataset.classnames),
        "shots": cfg.data.shots,
        "n_train": len(indices),
        "few_shot_source": few_shot_source,
        "seed": cfg.seed,
        "backbone": clf.backbone_info,
        "prompt": clf.prompt_cfg.to_dict(),
        "n_prompt_parameters": sum(p.numel() for p in clf.prompt_parameters()),
        "train_threat": method.train_threat.describe() if method.adversarial else None,
        "precision": cfg.precision,   # the training step's autocast (the attack's: train_threat.precision)
        "epochs": history,
        "wall_time_s": round(sum(h.get("time_s", 0.0) for h in history), 3),
        "wall_time_this_session_s": round(time.time() - t_start, 3),
        "environment": environment(),
    }
    run.write_json("metrics.json", metrics)
    state.wait_for_everyone()
    return metrics


def _write_prompt_file(run: RunDir, clf: PromptedClassifier, method: Method, cfg: TrainConfig, dataset,
                       few_shot_source: Optional[str]) -> None:
    """prompts.safetensors with its own description (models.prompt_file): enough to rebuild the
    classifier from the file alone, and to refuse it on other backbone weights."""
    from ..models.prompt_file import write_prompts

    write_prompts(run.path / "prompts.safetensors", clf.prompt_state_dict(), prompt=clf.prompt_cfg, model=cfg.model,
                  classnames=clf.classnames, templates=clf.templates, method=method.name,
                  method_params=to_dict(method.params), train_threat=method.train_threat if method.adversarial else None,
                  dataset={"name": dataset.name, "spec": cfg.data.dataset, "classes": cfg.data.classes,
                           "split": cfg.data.split, "shots": cfg.data.shots, "seed": cfg.seed,
                           "few_shot_source": few_shot_source},
                  backbone_info=clf.backbone_info)


def train_config_from_dict(raw: dict, where: str = "config") -> TrainConfig:
    """Build a TrainConfig from YAML-style data. A partial `model.prompt` (say `{depth: 3}`)
    adjusts the method's default prompt layout rather than replacing it."""
    from ..config import from_dict
    from ..methods import method_class

    raw = json.loads(json.dumps(raw or {}))
    prompt = (raw.get("model") or {}).get("prompt")
    if isinstance(prompt, dict):
        name = (raw.get("method") or {}).get("name", MethodSpec.name)
        raw["model"]["prompt"] = {**method_class(name).default_prompt.to_dict(), **prompt}
    cfg = from_dict(TrainConfig, raw, where)
    build_method(cfg.method.name, cfg.method.params, cfg.train_attack.threat())  # validates params now
    return cfg
