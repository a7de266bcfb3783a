"""`--compile`: the classifier's image forward compiled with `torch.compile` for attack loops.

An attack calls `model(x + δ)` hundreds of times with the class text features pinned, so the
image tower is the whole cost of a step. `CompiledAttackModel` wraps a `PromptedClassifier` and
runs that tower through `torch.compile`; the text side, the logits and the `static_text` pin stay
the classifier's own (eager), so the text cache and the attacks' fixed-text contract are
untouched. Traced forwards (`features(..., vision_trace=...)`, CBA-FAPT's maps, A-TPT's rollout)
never pass through it: they call the classifier directly and stay eager.

Compilation is lazy (it happens at the first call) and can fail in many ways: no C compiler for
inductor, an op dynamo cannot trace, an unsupported backend. Any exception from the compiled call
except running out of memory (re-raised: a batch too large is no compiler failure)
switches the wrapper to eager for good, with one logged warning; the eager forward then runs on
the same input, so a genuine input error (a wrong image size) is still raised, by eager code.
The backward graph is compiled lazily too, at the first backward — inside the attack's own
`autograd.grad`, where no fallback could catch it — so the first call at each new input shape
runs one forward + backward of its own on a detached copy (with grad mode on), which compiles
both graphs here.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from .autobatch import is_oom

log = logging.getLogger("robustprompt")

Backend = Union[str, Callable[..., Any]]


class CompiledAttackModel(nn.Module):
    """`clf(x)` (B×3×S×S in [0,1] → B×K logits) with `clf.encode_image` compiled.

    backend/mode are `torch.compile`'s (inductor, default mode). After a failure `active` is
    False and `fallback_reason` holds the one-line reason; `describe()` is what a run records."""

    def __init__(self, clf: nn.Module, *, backend: Backend = "inductor", mode: Optional[str] = None) -> None:
        super().__init__()
        self.clf = clf
        self.backend_name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        self.mode = mode
        self.active = True
        self.fallback_reason: Optional[str] = None
        # dynamic=None: one graph per batch shape at first, a dynamic one once a second shape
        # (the last, smaller batch) shows up; no recompilation for every new batch size
        self._compiled = torch.compile(self._image_features, backend=backend, mode=mode)
        self._probed: set[tuple] = set()   # input shapes (and dtype) whose forward and backward compiled

    def _image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.encode_image(x)[0]

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """B×D normalised image features: compiled while that works, eager after a failure."""
        if self.active:
            try:
                self._probe(x)
                return self._compiled(x)
            except Exception as exc:   # noqa: BLE001 — any compile failure means: run eager
                if is_oom(exc):   # a batch too large is not a compiler problem: eager would not fit either
                    raise
                self._fall_back(exc)
        return self._image_features(x)

    def _probe(self, x: torch.Tensor) -> None:
        """Compile the forward and the backward for x's shape now (one extra step per shape and
        arithmetic); without grad mode no backward will follow, and nothing is probed."""
        key = (tuple(x.shape), x.dtype, torch.is_autocast_enabled(x.device.type))
        if not torch.is_grad_enabled() or key in self._probed:
            return
        copy = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(self._compiled(copy).float().sum(), copy)
        self._probed.add(key)

    def _fall_back(self, exc: BaseException) -> None:
        self.active = False
        self.fallback_reason = _one_line(exc)
        log.warning("warning: torch.compile of the attack's image forward failed (%s); running eager",
                    self.fallback_reason)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.logits_from(self.image_features(x), self.clf.text_features())

    def static_text(self, features: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
        """The classifier's text pin (attacks.base.fixed_text looks for it on the model)."""
        return self.clf.static_text(features)

    def describe(self) -> dict[str, Any]:
        """{"enabled": True, "backend", "mode", "active", "fallback"} for a run's environment."""
        return {"enabled": True, "backend": self.backend_name, "mode": self.mode, "active": self.active,
                "fallback": self.fallback_reason}


def _one_line(exc: BaseException) -> str:
    """'Outer: Inner: first line of the inner message' — dynamo wraps a backend's error in
    BackendCompilerFailed whose own first line does not say what went wrong."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    text = (str(inner).strip().splitlines() or [""])[0][:200]
    name = type(exc).__name__ if inner is exc else f"{type(exc).__name__}: {type(inner).__name__}"
    return f"{name}: {text}"


def attack_model(clf: nn.Module, compile: bool, **kw: Any) -> nn.Module:
    """The model an attack loop should call: `clf` itself, or `CompiledAttackModel(clf)`."""
    return CompiledAttackModel(clf, **kw) if compile else clf


def compile_record(model: nn.Module) -> dict[str, Any]:
    """What a run records under environment.compile for the model its attacks used."""
    if isinstance(model, CompiledAttackModel):
        return model.describe()
    return {"enabled": False}
