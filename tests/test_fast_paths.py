"""The fast paths give what the plain PyTorch ops give: to the bit, or to rounding where
the order of a sum changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from paser.models import count_parameters, create_model
from paser.models.unet import InstanceNorm, pool2
from paser.routing import weights_digest
from paser.runtime import place


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


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 16, 7, 9), (1, 1, 5, 4)])
def test_instance_norm_is_torch_instance_norm_values_and_gradients(shape, monkeypatch):
    x = (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(2)) + 1).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    norm, plain = InstanceNorm(shape[1]), torch.nn.InstanceNorm2d(shape[1])
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    (norm(x) * w).sum().backward()
    (plain(ref) * w).sum().backward()
    assert norm(x).detach() == pytest.approx(F.instance_norm(ref.detach()), abs=1e-5)
    assert x.grad == pytest.approx(ref.grad, abs=1e-5)
    # each channel of each image: mean 0, biased variance 1 (up to eps)
    y = norm(x).detach()
    assert y.mean((2, 3)).abs().max() < 1e-5
    assert y.var((2, 3), unbiased=False) == pytest.approx(torch.ones(shape[:2]), abs=1e-3)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # export: the module
    assert torch.equal(norm(x).detach(), plain(x).detach())


@pytest.mark.parametrize("name", ["unet_tiny", "unet_small"])
def test_channels_last_on_cpu_changes_the_layout_not_the_model(name):
    torch.manual_seed(0)
    model = create_model(name, 1, 3).eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    before = (count_parameters(model), weights_digest(model), model.state_dict().keys())
    with torch.inference_mode():
        ref = model(x)
        placed = place(model, "cpu")
        out = placed(x)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in placed.parameters() if p.dim() == 4)
    assert (count_parameters(placed), weights_digest(placed), placed.state_dict().keys()) == before
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out == pytest.approx(ref, abs=1e-3)
    # the label changes only where an untrained model's two best classes nearly tie
    top2 = ref.topk(2, dim=1).values
    differs = out.max(1).indices != ref.max(1).indices
    assert ((top2[:, 0] - top2[:, 1])[differs] < 1e-3).all()


def test_the_benchmarks_baseline_layout_is_torchs_instance_norm(monkeypatch):
    """`make bench` part 1a compares against the model with torch's own instance norm."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench

    torch.manual_seed(0)
    model = create_model("unet_tiny", 1, 3).eval()
    old = bench.with_torch_instance_norm(model)
    norms = [type(m) for m in old.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and set(norms) == {torch.nn.InstanceNorm2d}  # every one replaced
    assert sum(isinstance(m, InstanceNorm) for m in model.modules()) == len(norms)  # a copy
    assert count_parameters(old) == count_parameters(model)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert old(x) == pytest.approx(model(x), abs=1e-4)
