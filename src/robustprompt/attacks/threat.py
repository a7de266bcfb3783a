"""The threat model: which attack, norm, budget and steps — the thing every number is tied to."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from numbers import Integral, Real
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .autoattack import autoattack, autoattack_info, check_version
from .losses import ATTACK_LOSSES
from .pgd import NORMS, pgd

ATTACKS = ("none", "fgsm", "pgd", "autoattack")
# AutoAttack attacks fixed chunks of this many consecutive images (one pyautoattack run each, seeded
# with the chunk's first image seed): per image is exact but 3-7x slower on CPU and far slower on a
# GPU; a fixed chunk keeps resume and sharding exact as long as the engine aligns batches to chunks.
AA_CHUNK = 64
# Attack precisions: fp32 (the default, and what every published robust accuracy assumes) or bf16
# autocast of the model's forward/backward inside PGD/FGSM (cheaper, possibly a weaker attack).
ATTACK_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class ThreatModel:
    """An attack and its budget. eps and alpha are in pixel units of [0,1] images (ℓ∞: 1/255 ≈
    0.0039; ℓ2: the norm of δ over all of one image's pixels and channels, e.g. 3.0); build an
    ℓ∞ one from /255 units with `ThreatModel.from_255`. alpha None means eps/4 (both norms).
    precision: "fp32" or "bf16" (autocast of the model inside PGD/FGSM; recorded by `describe`)."""

    attack: str = "pgd"
    norm: str = "linf"
    eps: float = 1 / 255
    alpha: Optional[float] = None
    steps: int = 100
    restarts: int = 1
    loss: str = "ce"
    random_start: bool = True
    aa_version: str = "standard"
    aa_chunk: int = AA_CHUNK
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ConfigError(f"unknown attack {_quote(self.attack)}; choose one of {', '.join(ATTACKS)}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {_quote(self.norm)}; choose one of {', '.join(NORMS)}")
        if self.loss not in ATTACK_LOSSES:
            raise ConfigError(f"unknown attack loss {_quote(self.loss)}; choose one of {', '.join(ATTACK_LOSSES)}")
        _check_finite("eps", self.eps)
        if self.eps < 0:
            raise ConfigError(f"eps must be >= 0, got {self.eps}")
        if self.norm == "linf" and self.eps > 1:   # an ℓ2 ball of radius > 1 is an ordinary budget
            raise ConfigError(f"eps={self.eps} is larger than the whole [0,1] pixel range; "
                              "in Python eps is in pixel units (4/255), at the CLI in /255 units (4)")
        if self.precision not in ATTACK_PRECISIONS:
            raise ConfigError(f"unknown attack precision {_quote(self.precision)}; choose one of "
                              f"{', '.join(ATTACK_PRECISIONS)}")
        if self.precision != "fp32" and self.attack == "autoattack":
            raise ConfigError("attack precision bf16 is for pgd and fgsm; AutoAttack runs in fp32")
        if self.alpha is not None:
            _check_finite("alpha", self.alpha)
            if self.alpha <= 0:
                raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise ConfigError(f"{name} must be an integer, got {_quote(value)}")
        if self.attack == "pgd" and (self.steps < 1 or self.restarts < 1):
            raise ConfigError(f"pgd needs steps >= 1 and restarts >= 1 (got {self.steps}, {self.restarts})")
        if self.attack == "autoattack":
            check_version(self.aa_version)
            if isinstance(self.aa_chunk, bool) or not isinstance(self.aa_chunk, Integral) or self.aa_chunk < 1:
                raise ConfigError(f"aa_chunk must be an integer >= 1, got {_quote(self.aa_chunk)}")

    @classmethod
    def from_255(cls, eps: float, alpha: Optional[float] = None, **kw: Any) -> "ThreatModel":
        """eps and alpha given in /255 units, as users write them (eps=4 means 4/255)."""
        _check_finite("eps", eps)
        if alpha is not None:
            _check_finite("alpha", alpha)
        return cls(eps=eps / 255, alpha=None if alpha is None else alpha / 255, **kw)

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else self.eps / 4

    @property
    def is_clean(self) -> bool:
        return self.attack == "none" or self.eps == 0

    def with_(self, **kw: Any) -> "ThreatModel":
        return replace(self, **kw)

    def describe(self, n_classes: Optional[int] = None) -> dict[str, Any]:
        d = asdict(self)
        d["alpha"] = self.step_size
        d["eps_255"] = round(self.eps * 255, 6)
        d["alpha_255"] = round(self.step_size * 255, 6)
        if self.attack == "autoattack":
            d["autoattack"] = autoattack_info(self.norm, self.aa_version, n_classes)
            d["autoattack"]["seeding"] = ("per image" if self.aa_chunk == 1 else
                                          f"per chunk of {self.aa_chunk} consecutive images, seeded with "
                                          "its first image's seed")
            for k in ("alpha", "alpha_255", "steps", "restarts", "loss", "random_start"):
                d.pop(k)
        elif self.attack == "fgsm":
            for k in ("alpha", "alpha_255", "steps", "restarts", "random_start"):
                d.pop(k)
        if self.attack != "autoattack":
            d.pop("aa_version")
            d.pop("aa_chunk")
        d["precision"] = ATTACK_PRECISIONS[self.precision]   # "float32" as every record before it said
        return d

    def short(self) -> str:
        """A compact label for tables: 'PGD-100 ℓ∞ ε=1/255 α=0.25/255', 'PGD-10 ℓ2 ε=3 α=0.75'."""
        if self.is_clean:
            return "clean"
        linf = self.norm == "linf"
        n = "ℓ∞" if linf else "ℓ2"
        e = f"{self.eps * 255:g}/255" if linf else f"{self.eps:g}"   # ℓ2 in pixel units, as users give it
        bf = "" if self.precision == "fp32" else f" {self.precision}"
        if self.attack == "autoattack":
            return f"AutoAttack-{self.aa_version} {n} ε={e}"
        if self.attack == "fgsm":
            return f"FGSM {n} ε={e}{bf}"
        extra = "" if self.loss == "ce" else f" {self.loss}"
        rs = "" if self.restarts == 1 else f" ×{self.restarts}"
        a = f"{self.step_size * 255:g}/255" if linf else f"{self.step_size:g}"
        return f"PGD-{self.steps}{rs}{extra} {n} ε={e} α={a}{bf}"

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            seeds: Optional[Sequence[int]] = None, seed: int = 0,
            clean_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Adversarial images for (x, y) (B×3×H×W, B); x itself when the threat model is clean.
        seeds: one per image (the engine's image seeds), so an image's example does not depend on
        the batch it is in. AutoAttack runs once per chunk of `aa_chunk` consecutive images of x,
        seeded with the chunk's first seed (without seeds: seed·1000003 + the image's position in
        x); the engine starts every batch on a chunk boundary of the evaluation's image list, so
        chunks, and examples, do not depend on batch size, resume or sharding. clean_logits (detached) spare the kl loss a
        clean forward."""
        if self.is_clean:
            return x.detach()
        if self.attack == "fgsm":
            return pgd(model, x, y, self.eps, self.eps, 1, norm=self.norm, loss=self.loss, random_start=False,
                       clean_logits=clean_logits, precision=self.precision)
        if self.attack == "pgd":
            return pgd(model, x, y, self.eps, self.step_size, self.steps, norm=self.norm, loss=self.loss,
                       random_start=self.random_start, restarts=self.restarts, seeds=seeds,
                       clean_logits=clean_logits, precision=self.precision)
        if seeds is None:   # without the engine's seeds, by position in x
            seeds = [seed * 1_000_003 + i for i in range(x.shape[0])]
        if len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}")
        if self.aa_chunk == 1:
            return autoattack(model, x, y, self.eps, norm=self.norm, version=self.aa_version, seeds=seeds)
        c = self.aa_chunk
        return torch.cat([autoattack(model, x[g:g + c], y[g:g + c], self.eps, norm=self.norm,
                                     version=self.aa_version, seed=int(seeds[g]))
                          for g in range(0, x.shape[0], c)])


def _quote(value: Any) -> str:
    """A user's value for a one-line message: repr, at most ~80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_finite(name: str, value: Any) -> None:
    """eps and alpha must be real, finite numbers: NaN passes every range check written as a
    comparison and would turn every adversarial pixel into NaN (a silent 0% robust accuracy);
    infinity is no budget. Worded as the config's own check (`robustprompt.config.finite`)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{name}: expected a number, got {_quote(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:   # an integer beyond float range
        finite = False
    if not finite:
        raise ConfigError(f"{name}: {_quote(value)} is not a finite number")


def eps_text(threat: Mapping[str, Any], name: str = "eps") -> str:
    """A recorded threat's budget (name "eps") or step size ("alpha") as users write it: "4/255"
    for ℓ∞ (from eps_255 / alpha_255), "3" for ℓ2 (pixel units, as --eps takes it). Reads a
    `describe()` dict or a report's threat key (which keeps only the /255 values)."""
    value = threat.get(f"{name}_255")
    if threat.get("norm") == "l2":
        value = value / 255 if value is not None else threat.get(name)
        return "?" if value is None else f"{float(value):g}"
    return "?/255" if value is None else f"{float(value):g}/255"


def cli_eps(threat: Mapping[str, Any]) -> str:
    """The `--norm/--eps` flags that give a recorded threat's budget at the command line."""
    text = eps_text(threat)
    if threat.get("norm") == "l2":
        return f"--norm l2 --eps {text}"
    return f"--eps {text.removesuffix('/255')}"
