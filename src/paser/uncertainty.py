"""Monte Carlo dropout: T stochastic passes of f0 -> mean probabilities, prediction, entropy.

Where the stochastic passes go is a setting (``mc_dropout``): every dropout of f0 (the
paper), only its last one (the layers before it run once), or none (one deterministic
pass, ``mc_samples=1``). The uncertainty map the policy sees is the entropy of the mean
probabilities (the paper) or one minus the margin between the two most likely classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from paser.errors import ConfigError
from paser.metrics import predicted_classes

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
Dropout = Literal["all", "last", "none"]
Signal = Literal["entropy", "margin"]


def kept_on(model: nn.Module, active: bool = True, last_only: bool = False
            ) -> list[tuple[str, nn.Module]]:
    """The dropouts of ``model`` that Monte Carlo passes keep on, with their names: every
    one, or with ``last_only`` the last in module order alone; none unless ``active``."""
    drops = [(name, m) for name, m in model.named_modules()
             if active and isinstance(m, _DROPOUT)]
    return drops[-1:] if last_only else drops


@contextmanager
def mc_dropout(model: nn.Module, active: bool = True, last_only: bool = False
               ) -> Iterator[nn.Module]:
    """Eval mode for everything except dropout, which stays on when ``active`` (with
    ``last_only``, only the last dropout module in module order).

    Restores every module's previous mode on exit.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for _, m in kept_on(model, active, last_only):
        m.train()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def shares_masks(model: nn.Module) -> bool:
    """Whether :func:`one_mask_per_image` can run ``model``: its dropouts are all
    element-wise (``nn.Dropout``)."""
    return all(type(m) is nn.Dropout for m in model.modules() if isinstance(m, _DROPOUT))


class NotBatchFirst(Exception):  # noqa: N818  a signal to fall back, not an error
    """A dropout of the model saw a tensor whose first dimension is not the batch's (a
    sequence-first layer): :func:`one_mask_per_image` cannot run it."""


@contextmanager
def one_mask_per_image(model: nn.Module, batch: int, samples: int = 1) -> Iterator[None]:
    """Each active dropout of ``model`` (all ``nn.Dropout``: :func:`shares_masks`) draws,
    at each call on ``[T * B, ...]`` (T Monte Carlo passes of a batch of ``batch`` images,
    pass-major, or one pass, T = 1), the masks of one image and applies them to every image
    of the batch: from one seed, every image of a batch gets the masks it gets alone
    (:meth:`paser.routing.Router.observe`), in one pass over the batch. They are drawn as
    ``F.dropout`` draws them for the image alone on the CPU (``empty_like(x)
    .bernoulli_(1 - p)``, divided by ``1 - p``): the masks an image gets alone. A dropout
    that sees another first dimension than ``batch`` or ``samples * batch`` raises
    :class:`NotBatchFirst`. The modules are changed while it lasts: one call at a time
    (the caller holds a lock)."""
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]

    def shared(m: nn.Dropout):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not m.training or m.p == 0:
                return x
            if m.p == 1:
                return x * 0
            if x.shape[0] not in (batch, samples * batch):
                raise NotBatchFirst(f"a dropout saw {tuple(x.shape)} in a batch of {batch}")
            passes = x.unflatten(0, (x.shape[0] // batch, batch))  # [T, B, ...], pass-major
            # one image's masks drawn as F.dropout draws them for it alone (empty_like: its
            # shape and memory layout)
            noise = torch.empty_like(passes[:, 0]).bernoulli_(1 - m.p).div_(1 - m.p)
            return (passes * noise[:, None]).flatten(0, 1)
        return forward

    for m in drops:
        m.forward = shared(m)
    try:
        yield
    finally:
        for m in drops:
            del m.forward


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

    def uncertainty(self, signal: Signal = "entropy") -> torch.Tensor:
        """The uncertainty map ``[B, H, W]``: the entropy, or ``1 - margin`` (one minus
        the gap between the two most likely classes' probabilities; 1 = a tie)."""
        if signal == "entropy":
            return self.entropy
        top2 = self.probs.topk(2, dim=1).values
        return 1.0 - (top2[:, 0] - top2[:, 1])

    def state(self, kind: StateKind = "paper", image: torch.Tensor | None = None,
              signal: Signal = "entropy") -> torch.Tensor:
        """The policy's input ``[B, S, H, W]`` (:func:`state_channels` gives ``S``):

        - ``paper``: f0's prediction and the uncertainty map (the reference, ``S = 2``);
        - ``probs``: f0's class probabilities and the uncertainty map;
        - ``image``: the (padded) input ``image`` too, first.
        """
        u = self.uncertainty(signal)[:, None]
        if kind == "paper":
            return torch.cat([self.pred[:, None].to(u.dtype), u], 1)
        parts = [self.probs.to(u.dtype), u]
        if kind == "image":
            if image is None:
                raise ValueError("state 'image' needs the padded input image")
            parts.insert(0, image.to(u.dtype))
        elif kind != "probs":
            raise ValueError(f"policy state '{kind}': use paper, probs or image")
        return torch.cat(parts, 1)


StateKind = Literal["paper", "probs", "image"]


def state_channels(kind: StateKind, in_channels: int, num_classes: int) -> int:
    """Channels of :meth:`MCOutput.state` for a state kind."""
    return {"paper": 2, "probs": num_classes + 1, "image": in_channels + num_classes + 1}[kind]


def entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


def mc_predict(model: nn.Module, x: torch.Tensor, samples: int = 5,
               dropout: Dropout = "all") -> MCOutput:
    """T = ``samples`` Monte Carlo dropout passes of ``model`` on ``x`` [B, C, H, W].

    ``dropout``: which dropouts stay on, ``all`` (the paper), ``last`` (only the last one)
    or ``none`` (one deterministic pass; ``samples`` must be 1).
    A model with ``mc_probs(x, samples, last_only)`` (the UNet) shares what comes before
    the first active dropout across the passes; any other model runs the T passes as one
    batched forward of ``[T * B, C, H, W]`` (dropout masks differ across the copies).
    """
    if samples < 1:
        raise ConfigError(f"mc_samples={samples}: the number of Monte Carlo passes must be >= 1")
    if dropout == "none" and samples != 1:
        raise ConfigError(f"mc_dropout=none runs one deterministic pass, but mc_samples={samples}"
                          "; set mc_samples=1 (or mc_dropout to all or last)")
    b = x.shape[0]
    if dropout == "none":
        with mc_dropout(model, active=False):
            probs = model(x).float().softmax(1)
        return MCOutput(probs, predicted_classes(probs), entropy(probs))
    last_only = dropout == "last"
    with mc_dropout(model, active=True, last_only=last_only):
        if hasattr(model, "mc_probs"):
            probs = (model.mc_probs(x, samples, last_only=True) if last_only
                     else model.mc_probs(x, samples))
        else:
            logits = model(x.repeat(samples, 1, 1, 1))  # [T*B, K, H, W]
            probs = logits.float().softmax(1).unflatten(0, (samples, b)).mean(0)
    return MCOutput(probs, predicted_classes(probs), entropy(probs))
