"""What the benchmark scripts share: argument types (a mistyped flag is one line, not a traceback)
and the device synchronisation every timing needs."""
from __future__ import annotations

import argparse

import torch


def positive(text: str) -> int:
    """A whole number ≥ 1 (counts of images, steps, batches)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def device(text: str) -> torch.device:
    """cpu, cuda, cuda:1 …; CUDA only where there is one."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here")
    return dev


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must not stop early)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
