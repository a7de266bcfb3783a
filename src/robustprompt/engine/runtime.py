"""Process set-up shared by the engines: the device, accelerate's process state, TF32."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch

from ..api import resolve_device


def process_state(device: str) -> tuple["object", torch.device]:
    """accelerate's PartialState (rank, world size, barriers; gloo on CPU) and this process's device."""
    from accelerate import PartialState

    dev = resolve_device(device)
    state = PartialState(cpu=dev.type == "cpu")
    dev = process_device(dev, state.num_processes, state.device)
    if dev.type == "cuda" and dev.index is not None:
        # what a bare "cuda" means from here on (kernels, torch.cuda.* calls, pyautoattack)
        torch.cuda.set_device(dev)
    return state, dev


def process_device(asked: torch.device, num_processes: int, accelerate_device: torch.device) -> torch.device:
    """The device this process runs on. accelerate's single-process device is a bare "cuda"
    (device 0), which would drop the index of `--device cuda:1`: one process keeps the device
    asked for. Under a multi-process launch each process takes accelerate's device (its local
    rank's GPU), as every launcher expects."""
    if asked.type != "cuda":
        return asked
    if num_processes > 1:
        return accelerate_device
    return asked if asked.index is not None else accelerate_device


def set_tf32(enabled: bool) -> dict[str, Any]:
    """Set TF32 for CUDA matmuls and cuDNN convolutions (the ViT patch embedding) explicitly,
    rather than inherit PyTorch's defaults (matmul off, cuDNN on); returns what is now set, for
    the run's record."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


# --precision: autocast dtype of training and clean evaluation (attacks have their own, see
# attacks.threat.ATTACK_PRECISIONS)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(value: Any, key: str = "precision") -> str:
    """`value` if it names a precision, else a one-line ConfigError naming `key`."""
    from ..errors import ConfigError

    if value not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {', '.join(PRECISIONS)}, got {str(value)[:40]!r}")
    return value


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The forward passes' autocast for `precision` on `device`; fp32: nothing at all (so that
    fp32 runs compute exactly what they computed before the option existed)."""
    dtype = PRECISIONS[check_precision(precision)]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)
