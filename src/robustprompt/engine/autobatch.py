"""`--batch-size auto`: the largest attack batch that fits the accelerator's memory.

The rule (also in the CLI help): on CUDA, run one attack step — forward and backward w.r.t. the
images, the class text features pinned — at batch sizes start, 2·start, 4·start, … up to `limit`,
stop at the first torch.cuda.OutOfMemoryError, and keep `margin` (default ¾) of the largest size
that ran, rounded down to a multiple of 8 (at least 1): activations of a real run vary a little
with the images, other allocations come and go, and a batch right at the edge would OOM later.
On a CPU there is no memory wall worth probing (time per image is flat in batch size there), so
`auto` means CPU_AUTO_BATCH. The probe's result is recorded in the run's metrics.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("robustprompt")

CPU_AUTO_BATCH = 64      # data.batch_size's default: what `auto` means without CUDA
DEFAULT_START = 16
DEFAULT_LIMIT = 4096     # above this a ViT step is long enough that a bigger batch gains nothing
DEFAULT_MARGIN = 0.75


@dataclass(frozen=True)
class BatchProbe:
    """Outcome of a probe: `batch` is what the run uses; `largest_ok` the largest size that ran,
    `first_oom` the first that did not (None: the limit was reached without one)."""

    batch: int
    largest_ok: Optional[int]
    first_oom: Optional[int]
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_oom(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (torch.cuda.OutOfMemoryError, or the
    RuntimeError older builds and other backends raise with 'out of memory' in it)."""
    # torch.cuda.OutOfMemoryError is a RuntimeError whose message says so
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def probe_batch_size(step: Callable[[int], None], *, start: int = DEFAULT_START, limit: int = DEFAULT_LIMIT,
                     margin: float = DEFAULT_MARGIN, on_oom: Optional[Callable[[], None]] = None) -> BatchProbe:
    """Largest batch `step(batch)` runs at, by doubling from `start` up to `limit`, times `margin`.

    step: runs one attack step at the given batch size; raises an OOM error (`is_oom`) when it
    does not fit; any other exception propagates. on_oom: called after each OOM (on CUDA:
    free the cache). Raises RuntimeError when even `start` does not fit and batch 1 does not
    either (the model does not fit at all)."""
    if start < 1 or limit < start or not 0 < margin <= 1:
        raise ValueError(f"probe needs 1 <= start <= limit and 0 < margin <= 1 (got {start}, {limit}, {margin})")
    def fits(size: int) -> bool:
        try:
            step(size)
            return True
        except Exception as exc:   # noqa: BLE001 — only OOM is expected; others are re-raised
            if not is_oom(exc):
                raise
            if on_oom is not None:
                on_oom()
            return False

    largest_ok: Optional[int] = None
    first_oom: Optional[int] = None
    size = start
    while size <= limit:
        if not fits(size):
            first_oom = size
            break
        largest_ok, size = size, size * 2
    size = start // 2
    while largest_ok is None and size >= 1:   # start itself did not fit: halve down to 1
        largest_ok = size if fits(size) else None
        size //= 2
    if largest_ok is None:
        raise RuntimeError("not even a batch of 1 fits in the accelerator's memory")
    if first_oom is None:   # never hit the wall: the largest size tried is safe as it is
        batch = largest_ok
    else:
        kept = int(largest_ok * margin)
        batch = kept // 8 * 8 if kept >= 8 else max(1, kept)
    rule = (f"doubling from {start} to {limit}; largest that ran {largest_ok}, first OOM {first_oom}; "
            f"kept {batch}" + ("" if first_oom is None else f" (×{margin:g}, down to a multiple of 8)"))
    return BatchProbe(batch=batch, largest_ok=largest_ok, first_oom=first_oom, rule=rule)


def attack_step_fn(model: torch.nn.Module, image_size: int, n_classes: int, device: torch.device,
                   precision: str = "fp32") -> Callable[[int], None]:
    """A step function for `probe_batch_size`: one forward + backward w.r.t. a random batch of
    images through `model` (its class text pinned, as inside an attack), then the memory freed."""
    import torch.nn.functional as F

    from ..attacks.base import fixed_text

    def step(batch: int) -> None:
        x = torch.rand(batch, 3, image_size, image_size, device=device, requires_grad=True)
        y = torch.arange(batch, device=device) % n_classes
        amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with fixed_text(model):
            with amp:
                logits = model(x).float()
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
        del grad, logits, x
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def auto_batch_size(model: torch.nn.Module, image_size: int, n_classes: int, device: torch.device,
                    precision: str = "fp32", **kw: Any) -> BatchProbe:
    """The batch size `--batch-size auto` gives on `device` (see the module docstring)."""
    if device.type != "cuda":
        return BatchProbe(batch=CPU_AUTO_BATCH, largest_ok=None, first_oom=None,
                          rule=f"no CUDA device: the CPU default {CPU_AUTO_BATCH}")

    def free() -> None:
        torch.cuda.empty_cache()

    probe = probe_batch_size(attack_step_fn(model, image_size, n_classes, device, precision), on_oom=free, **kw)
    free()
    log.info("batch size auto: %d (%s)", probe.batch, probe.rule)
    return probe
