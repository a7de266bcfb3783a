"""AutoAttack through the PyPI package `pyautoattack` (the official AutoAttack is git-only).

Why each image is attacked on its own: inside one pyautoattack call the images of a batch share
randomness and work. Every attack reseeds torch's global generator once per call and then draws
its random start (APGD, FAB's restarts) for the whole batch at once, so an image's start depends
on which images share its call and where; Square draws each query's square position once for the
whole batch; each attack only runs on the images that the previous ones left robust, so the batch
an image is attacked in depends on how its neighbours fared; and the model sees batches whose
shape depends on all of that (float kernels may round a row differently at another batch shape).
A run that resumes, shards or changes its batch size would then give some images other examples.
One call per image, seeded with that image's seed, removes all of these couplings.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from importlib.metadata import version as pkg_version
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import fixed_text

_NORMS = {"linf": "Linf", "l2": "L2"}
# pyautoattack's versions and the attacks each runs, in order
VERSIONS = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
            "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"],
            "rand": ["apgd-ce", "apgd-dlr"]}
# fewest classes each version works with: the targeted DLR loss uses the 4th-largest logit, the
# untargeted DLR loss the 3rd
_MIN_CLASSES = {"standard": 4, "plus": 4, "rand": 3}
_SEED_RANGE = 2**64   # torch.manual_seed takes [-2**63, 2**64); reduce any integer into it


def check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ConfigError(f"unknown AutoAttack version {str(version)[:40]!r}; choose one of {', '.join(VERSIONS)}")


def autoattack_info(norm: str = "linf", version: str = "standard", n_classes: int | None = None) -> dict[str, Any]:
    """What a result records about the AutoAttack that ran."""
    info: dict[str, Any] = {"package": "pyautoattack", "package_version": pkg_version("pyautoattack"),
                            "version": version, "norm": norm, "seeding": "per image"}
    if version in VERSIONS:
        info["attacks"] = list(VERSIONS[version])
        if n_classes is not None and any(a in ("apgd-t", "fab-t") for a in VERSIONS[version]):
            info["n_target_classes"] = min(9, n_classes - 1)
    return info


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
               version: str = "standard", seeds: Optional[Sequence[int]] = None, seed: int = 0,
               batch_size: int = 256) -> torch.Tensor:
    """AutoAttack ("standard": APGD-CE, APGD-T, FAB-T, Square). x B×3×H×W in [0,1], y B → x̃ B×3×H×W.

    seeds (one integer per image): each image is attacked by its own pyautoattack run seeded with
    its seed, so its example depends only on (seed, image, model) — not on the batch it is in, its
    position, the other images, or how a run is resumed or sharded. What stays outside that
    promise: results are bit-identical on the same device type, PyTorch and pyautoattack
    versions and thread count (float reductions may round differently elsewhere); on a GPU, only
    with PyTorch's deterministic algorithms. seeds None: one batched pyautoattack run over x
    (in chunks of `batch_size`) seeded with `seed` — faster, but an image's example then depends
    on the images batched with it. Either way torch's global generator is left as it was.

    With fewer than 10 classes the targeted attacks get n_classes − 1 targets instead of 9
    (the package default would index past the logits). "standard" and "plus" need at least 4
    classes (the targeted DLR loss uses the 4th-largest logit), "rand" at least 3.
    """
    if norm not in _NORMS:
        raise ConfigError(f"AutoAttack norm must be one of {', '.join(_NORMS)}, got {str(norm)[:40]!r}")
    check_version(version)
    if seeds is not None and len(seeds) != x.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
    if x.shape[0] == 0:
        return x.detach().clone()
    with fixed_text(model), _own_generator(x.device), _each_warning_once():
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        least = _MIN_CLASSES[version]
        if n_classes < least:
            raise ConfigError(f"AutoAttack {version!r} needs at least {least} classes (its DLR loss uses the "
                              f"{'3rd' if least == 3 else '4th'}-largest logit); this task has {n_classes}. "
                              "Use PGD instead.")
        if seeds is None:
            return _run(model, x, y, eps, norm, version, n_classes, seed, batch_size)
        # one image at a time: see the module docstring for what a shared call would couple
        return torch.cat([_run(model, x[i:i + 1], y[i:i + 1], eps, norm, version, n_classes, int(s), 1)
                          for i, s in enumerate(seeds)])


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, version: str,
         n_classes: int, seed: int, batch_size: int) -> torch.Tensor:
    """One pyautoattack run over x (B×3×H×W) with a fresh adversary, so that nothing but `seed`
    carries over from an earlier run."""
    from pyautoattack import AutoAttack

    adversary = AutoAttack(model, norm=_NORMS[norm], eps=eps, version=version, seed=seed % _SEED_RANGE,
                           device=x.device)
    targets = min(9, n_classes - 1)
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_target_classes = targets
    x_adv, _ = adversary.run_standard_evaluation(x, y.long(), batch_size=batch_size)
    return x_adv.detach()


@contextmanager
def _own_generator(device: torch.device) -> Iterator[None]:
    """pyautoattack reseeds torch's global CPU generator (and the current CUDA one) at each
    attack; restore them afterwards, so that what runs next does not depend on which image
    happened to be attacked last."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    if device.type == "cuda" and device.index is not None and device.index not in cuda:
        cuda.append(device.index)
    with torch.random.fork_rng(devices=cuda):
        yield


class _Once(logging.Filter):
    """Passes each distinct message once: a per-image run would repeat pyautoattack's checks'
    warnings (randomised defence, too many target classes, …) for every image."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


@contextmanager
def _each_warning_once() -> Iterator[None]:
    logger = logging.getLogger("auto-attack")
    level = logger.level
    logger.setLevel(logging.WARNING)   # pyautoattack logs its progress at debug/info
    once = _Once()
    logger.addFilter(once)
    try:
        yield
    finally:
        logger.removeFilter(once)
        logger.setLevel(level)
