import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
