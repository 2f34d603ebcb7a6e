"""The inference fast paths give what the plain PyTorch ops give, to the bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from paser.models import create_model
from paser.models.unet import pool2


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (1, 1, 5, 4), (1, 2, 2, 3)])
def test_pool2_is_max_pool2d_without_gradients(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(pool2(x), F.max_pool2d(x, 2))
    x.requires_grad_(True)
    pool2(x).sum().backward()  # training keeps max_pool2d's gradient: one input per window
    assert x.grad.sum().item() == (shape[2] // 2) * (shape[3] // 2) * shape[0] * shape[1]


def test_a_unet_infers_what_it_computes_with_gradients():
    model = create_model("unet_tiny", 1, 3).eval()
    x = torch.rand(2, 1, 36, 44, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(x)
    slow = model(x)  # gradients on: F.max_pool2d
    assert torch.equal(fast, slow.detach())
