"""The embedded default backbone: a small CLIP of open_clip's own architecture (ViT image tower,
text transformer, open_clip BPE tokenizer), trained contrastively on Fashion-MNIST by this code,
so that everything runs offline and without a GPU.

Built on first use (`robustprompt pretrain-demo`), cached with its recipe and a content hash in
the user cache directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import filelock
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.fashion_mnist import CLASSNAMES, TEMPLATES, build_fashion_mnist
from ..errors import ModelError
from ..models.backbone import Backbone, load_backbone
from ..models.safe_archive import first_non_finite
from ..paths import atomic_write_text, cache_dir

log = logging.getLogger("robustprompt")

# Everything that determines the weights. Changing any value builds (and caches) a new backbone.
RECIPE: dict[str, Any] = {
    "recipe_version": 1,
    "arch": "rp-demo",
    "data": "fashion_mnist/train",
    "epochs": 3,
    "batch_size": 256,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 50,
    "schedule": "cosine",
    "hflip": True,
    "seed": 0,
    "mean": 0.2860,   # Fashion-MNIST pixel statistics
    "std": 0.3530,
    "templates": TEMPLATES,
    "classnames": CLASSNAMES,
    "loss": "cross-entropy of image features against the 10 class captions under one random template per step",
}


def recipe_hash(recipe: dict[str, Any] = RECIPE) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def demo_dir(recipe: dict[str, Any] = RECIPE) -> Path:
    return cache_dir() / "demo" / f"{recipe['arch']}-{recipe_hash(recipe)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Several processes (a distributed run, parallel tests) may ask for the backbone at once:
    one builds, the others wait and then load."""
    directory.mkdir(parents=True, exist_ok=True)
    # the platform lock (flock / LockFileEx): the OS drops it if the builder dies, even on kill -9
    with filelock.FileLock(directory / ".lock", timeout=-1, thread_local=False):
        yield


def _is_built(directory: Path) -> bool:
    cfg, weights = directory / "config.json", directory / "model.safetensors"
    if not (cfg.is_file() and weights.is_file()):
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):   # torn or garbled config.json: rebuilt, as corrupt weights are
        return False
    return (isinstance(meta, dict) and meta.get("recipe") == json.loads(json.dumps(RECIPE))
            and meta.get("sha256") == _sha256(weights))


def ensure_demo_backbone(*, data_root: Optional[str] = None, download: bool = False, force: bool = False,
                         progress: bool = True) -> Path:
    """Train the demo backbone unless a matching, intact copy is cached; returns its directory."""
    directory = demo_dir()
    with _build_lock(directory):
        if not force and _is_built(directory):
            return directory
        if (directory / "model.safetensors").exists() and not force:
            log.warning("cached demo backbone in %s is incomplete or corrupt: rebuilding", directory)
        state, meta = train_demo_backbone(data_root=data_root, download=download, progress=progress)
        weights = directory / "model.safetensors"
        tmp = directory / ".model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(weights)
        meta["sha256"] = _sha256(weights)
        atomic_write_text(directory / "config.json", json.dumps(meta, indent=2) + "\n")
    return directory


def load_demo_backbone(device: str | torch.device = "cpu", **build_kw: Any) -> Backbone:
    directory = ensure_demo_backbone(**build_kw)
    meta = json.loads((directory / "config.json").read_text())
    bb = load_backbone(RECIPE["arch"], None, device="cpu")
    missing, unexpected = bb.model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    if [k for k in missing if k != "logit_bias"] or unexpected:
        raise ModelError(f"demo backbone in {directory} does not match {RECIPE['arch']}; delete the folder")
    bad = first_non_finite(bb.model)
    if bad is not None:   # a hash-checked file of our own training: only a bug gets here
        raise ModelError(f"demo backbone in {directory} holds NaN or inf in {bad}; delete the folder to rebuild it")
    bb.model.to(device)
    bb.name, bb.weights = "demo", f"robustprompt demo ({directory.name})"
    bb.mean, bb.std = (RECIPE["mean"],) * 3, (RECIPE["std"],) * 3
    bb.extra = {"arch": RECIPE["arch"], "recipe_hash": recipe_hash(), "sha256": meta["sha256"],
                "zero_shot_test_acc": meta.get("zero_shot_test_acc")}
    return bb


def _normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """N×28×28 uint8 → N×3×28×28 normalised float."""
    x = x_uint8.float().div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - RECIPE["mean"]) / RECIPE["std"]


def train_demo_backbone(*, data_root: Optional[str] = None, download: bool = False, progress: bool = True
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Contrastive training of rp-demo on Fashion-MNIST train; returns (state dict, metadata)."""
    r = RECIPE
    data = build_fashion_mnist(data_root, download=download)
    train, test = data.split("train"), data.split("test")
    x_train = torch.from_numpy(train.load.images.copy())
    y_train = torch.tensor(train.labels)
    torch.manual_seed(r["seed"])
    model = open_clip.create_model(r["arch"], pretrained=None)
    model.train()
    tokenizer = open_clip.get_tokenizer(r["arch"])
    captions = tokenizer([t.format(c) for t in r["templates"] for c in r["classnames"]])
    captions = captions.view(len(r["templates"]), len(r["classnames"]), -1)

    steps_per_epoch = len(x_train) // r["batch_size"]
    total = steps_per_epoch * r["epochs"]
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    warm = r["warmup_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(r["seed"])
    t0 = time.time()
    bar = tqdm(total=total, desc="pretrain demo backbone", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(r["epochs"]):
        perm = torch.randperm(len(x_train), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * r["batch_size"]:(s + 1) * r["batch_size"]]
            x = x_train[idx]
            if r["hflip"]:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip[:, None, None], x.flip(-1), x)
            template = int(torch.randint(len(r["templates"]), (1,), generator=gen))
            img = F.normalize(model.encode_image(_normalize(x)), dim=-1)
            txt = F.normalize(model.encode_text(captions[template]), dim=-1)
            loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.t(), y_train[idx])
            if not torch.isfinite(loss):
                raise RuntimeError(f"demo pretraining diverged at epoch {epoch} step {s}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    train_time = time.time() - t0
    model.eval()
    acc = _zero_shot_accuracy(model, tokenizer, test)
    if acc < 0.75:
        log.warning("demo backbone reached only %.1f%% zero-shot accuracy (expected >= 75%%)", 100 * acc)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"recipe": json.loads(json.dumps(r)), "model_cfg": open_clip.get_model_config(r["arch"]),
            "train_time_s": round(train_time, 1),
            "zero_shot_test_acc": round(100 * acc, 2), "torch": torch.__version__,
            "open_clip": open_clip.__version__}
    return state, meta


@torch.no_grad()
def _zero_shot_accuracy(model, tokenizer, test) -> float:
    txt = F.normalize(model.encode_text(tokenizer([RECIPE["templates"][0].format(c) for c in RECIPE["classnames"]])),
                      dim=-1)
    images = torch.from_numpy(test.load.images.copy())
    labels = torch.tensor(test.labels)
    correct = 0
    for i in range(0, len(images), 1000):
        img = F.normalize(model.encode_image(_normalize(images[i:i + 1000])), dim=-1)
        correct += int(((img @ txt.t()).argmax(1) == labels[i:i + 1000]).sum())
    return correct / len(images)
