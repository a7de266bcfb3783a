"""Opt-in record of how close each float comparison in the suite comes to its bound.

Enabled by ``RP_TEST_TOLERANCE_LOG=path.jsonl`` (see conftest.py). Every call of
``torch.testing.assert_close``, ``numpy.testing.assert_allclose`` and ``torch.allclose`` made from a
test file appends one JSON line: the test, the call site, the dtypes, the thread count, the largest
absolute error and ``ratio`` = max over elements of |a − b| / (atol + rtol·|b|) with the call's own
(or the library's default) tolerances. A passing ``assert_close`` has ratio ≤ 1; the margin to the
bound is 1 / ratio. ``torch.allclose`` is logged whether the test wants True or False (``not
allclose`` needs ratio > 1). Nothing is changed about what the comparisons decide.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import numpy as np
import torch

_CURRENT_TEST = {"id": ""}

# the libraries' defaults (torch.testing.assert_close: per dtype; numpy: rtol 1e-7, atol 0)
_TORCH_DEFAULTS = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5),
                   torch.float32: (1.3e-6, 1e-5), torch.float64: (1e-7, 1e-7)}


def _call_site() -> str | None:
    """file:line of the wrapper's caller when that is a test file, else None (library code's own
    calls of torch.allclose are not the suite's comparisons)."""
    frame = sys._getframe(3)    # _call_site ← _write ← wrapper ← caller
    name = frame.f_code.co_filename.replace(os.sep, "/")
    if "/tests/" in name and not name.endswith("tolerance_log.py"):
        return f"{os.path.basename(name)}:{frame.f_lineno}"
    return None


def _ratio(actual: Any, expected: Any, rtol: float, atol: float) -> tuple[float, float]:
    """(max |a − b|, max |a − b| / (atol + rtol·|b|)) in float64; inf where only one side is finite."""
    a = torch.as_tensor(np.asarray(actual) if not torch.is_tensor(actual) else actual.detach()).cpu().double()
    b = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected.detach()).cpu().double()
    a, b = torch.broadcast_tensors(a, b)
    if a.numel() == 0:
        return 0.0, 0.0
    same = (a == b) | (a.isnan() & b.isnan())
    err = torch.where(same, torch.zeros_like(a), (a - b).abs())
    bound = atol + rtol * b.abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)
    return float(err.max()), float(ratio.max())


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "") if hasattr(x, "dtype") else type(x).__name__


def _write(path: str, fn: str, actual: Any, expected: Any, rtol: float, atol: float) -> None:
    site = _call_site()
    if site is None:
        return
    try:
        err, ratio = _ratio(actual, expected, rtol, atol)
    except (TypeError, ValueError, RuntimeError):   # non-numeric inputs (e.g. nested lists of str)
        return
    rec = {"test": _CURRENT_TEST["id"], "site": site, "fn": fn, "threads": torch.get_num_threads(),
           "dtype": f"{_dtype_name(actual)}/{_dtype_name(expected)}", "rtol": rtol, "atol": atol,
           "max_abs_err": err, "ratio": ratio}
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def install(path: str) -> Callable[[str], None]:
    """Wrap the three comparison functions; returns a setter for the current test id."""
    torch_close, np_close, torch_allclose = torch.testing.assert_close, np.testing.assert_allclose, torch.allclose

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kw):
        try:
            return torch_close(actual, expected, *args, rtol=rtol, atol=atol, **kw)
        finally:
            if torch.is_tensor(actual) and actual.is_floating_point():
                d_rtol, d_atol = _TORCH_DEFAULTS.get(actual.dtype, (0.0, 0.0))
                if torch.is_tensor(expected) and expected.dtype in _TORCH_DEFAULTS:   # torch uses the looser
                    e_rtol, e_atol = _TORCH_DEFAULTS[expected.dtype]
                    d_rtol, d_atol = max(d_rtol, e_rtol), max(d_atol, e_atol)
                _write(path, "assert_close", actual, expected, d_rtol if rtol is None else rtol,
                       d_atol if atol is None else atol)

    def assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kw):
        try:
            return np_close(actual, desired, rtol, atol, *args, **kw)
        finally:
            _write(path, "np.assert_allclose", actual, desired, rtol, atol)

    def allclose(input, other, rtol=1e-5, atol=1e-8, equal_nan=False):
        out = torch_allclose(input, other, rtol=rtol, atol=atol, equal_nan=equal_nan)
        _write(path, f"allclose->{out}", input, other, rtol, atol)
        return out

    torch.testing.assert_close, np.testing.assert_allclose, torch.allclose = assert_close, assert_allclose, allclose

    def set_test(nodeid: str) -> None:
        _CURRENT_TEST["id"] = nodeid

    return set_test
