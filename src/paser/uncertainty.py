"""Monte Carlo dropout: T stochastic passes of f0 -> mean probabilities, prediction, entropy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from paser.errors import ConfigError
from paser.metrics import predicted_classes

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@contextmanager
def mc_dropout(model: nn.Module, active: bool = True) -> Iterator[nn.Module]:
    """Eval mode for everything except dropout, which stays on when ``active``.

    Restores every module's previous mode on exit.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    if active:
        for m in model.modules():
            if isinstance(m, _DROPOUT):
                m.train()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Draw random numbers (dropout masks) from ``seed`` without touching the global
    generators; ``None`` draws from them as usual."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, _DROPOUT) and m.p > 0 for m in model.modules())


@dataclass
class MCOutput:
    """``probs`` [B, K, H, W] mean of the T softmax maps, ``pred`` [B, H, W] its argmax,
    ``entropy`` [B, H, W] per-pixel entropy of the mean (nats)."""

    probs: torch.Tensor
    pred: torch.Tensor
    entropy: torch.Tensor

    def state(self) -> torch.Tensor:
        """The policy's input ``[B, 2, H, W]``: f0's prediction and the entropy map."""
        return torch.stack([self.pred.to(self.entropy.dtype), self.entropy], dim=1)


def entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


def mc_predict(model: nn.Module, x: torch.Tensor, samples: int = 5) -> MCOutput:
    """T = ``samples`` Monte Carlo dropout passes of ``model`` on ``x`` [B, C, H, W].

    A model with ``mc_probs(x, samples)`` (the UNet) shares the layers before its first
    dropout across the passes; any other model runs the T passes as one batched forward
    of ``[T * B, C, H, W]`` (dropout masks differ across the copies). ``samples=1`` with
    dropout off is the deterministic single pass.
    """
    if samples < 1:
        raise ConfigError(f"mc_samples={samples}: the number of Monte Carlo passes must be >= 1")
    b = x.shape[0]
    with mc_dropout(model, active=True):
        if hasattr(model, "mc_probs"):
            probs = model.mc_probs(x, samples)
        else:
            logits = model(x.repeat(samples, 1, 1, 1))  # [T*B, K, H, W]
            probs = logits.float().softmax(1).unflatten(0, (samples, b)).mean(0)
    return MCOutput(probs, predicted_classes(probs), entropy(probs))
