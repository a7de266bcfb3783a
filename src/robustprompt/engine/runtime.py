"""Process set-up shared by the engines: the device and accelerate's process state."""
from __future__ import annotations

import torch

from ..api import resolve_device


def process_state(device: str) -> tuple["object", torch.device]:
    """accelerate's PartialState (rank, world size, barriers; gloo on CPU) and this process's device."""
    from accelerate import PartialState

    dev = resolve_device(device)
    state = PartialState(cpu=dev.type == "cpu")
    return state, (state.device if dev.type == "cuda" else dev)
