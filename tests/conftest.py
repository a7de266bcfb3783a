import os

import pytest
import torch


def _threads_from_env() -> int:
    """RP_TEST_THREADS=N runs the suite with N intra-op threads (and one inter-op thread), to check
    that no float tolerance depends on the reduction order; default min(2, #CPUs)."""
    raw = os.environ.get("RP_TEST_THREADS", "").strip()
    if not raw:
        return min(2, os.cpu_count() or 1)
    if not raw.isdigit() or int(raw) < 1:
        raise pytest.UsageError(f"RP_TEST_THREADS must be a positive integer, got {raw[:40]!r}")
    return int(raw)


torch.set_num_threads(_threads_from_env())
if os.environ.get("RP_TEST_THREADS", "").strip():
    try:
        torch.set_num_interop_threads(1)   # only possible before any inter-op work has started
    except RuntimeError:
        pass

# RP_TEST_TOLERANCE_LOG=path.jsonl records each float comparison's error and its margin to the bound
_set_test = None
if os.environ.get("RP_TEST_TOLERANCE_LOG"):
    from tolerance_log import install

    _set_test = install(os.environ["RP_TEST_TOLERANCE_LOG"])


@pytest.fixture(autouse=True)
def _tolerance_log_test_id(request):
    if _set_test is not None:
        _set_test(request.node.nodeid)
    yield


@pytest.fixture(scope="session")
def tiny_backbone():
    """A random-init 3-block, width-32 CLIP of open_clip's own architecture (rp-tiny)."""
    from robustprompt.models import load_backbone

    torch.manual_seed(0)
    return load_backbone("rp-tiny")


@pytest.fixture(scope="session")
def vitb32_backbone():
    from robustprompt.models import load_backbone

    torch.manual_seed(0)
    return load_backbone("ViT-B-32")


@pytest.fixture
def tiny_images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=g)
