"""Compute cost of the models: forward FLOPs and parameters.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which
counts the operations that dominate a CNN's cost (convolutions, matrix
multiplications, attention) at ``2`` FLOPs per multiply-add. It does **not**
count bias additions, normalisations, activations, pooling, interpolation,
concatenation or element-wise ops, so figures are slightly below a full
operation count, and match the usual "2 x MACs" figures of papers.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from paser.errors import ConfigError
from paser.models.registry import count_parameters
from paser.runtime import interrupts_held

__all__ = ["FLOP_CONVENTION", "at_least", "count_flops", "count_parameters", "gflops_per_sample"]

FLOP_CONVENTION = "torch.utils.flop_counter; one multiply-add counts as 2 FLOPs"


def at_least(x: float) -> str:
    """``x`` in 6 significant digits, rounded up: the least a message can ask for (an error
    that says 'give at least 10.4361' for 10.43612 refuses that figure too)."""
    if not math.isfinite(x) or x <= 0 or float(f"{x:.6g}") >= x:
        return f"{x:.6g}"
    step = 10.0 ** (math.floor(math.log10(x)) - 5)
    up = f"{math.ceil(x / step) * step:.6g}"
    return up if float(up) >= x else f"{float(up) + step:.6g}"


def _example_input(model: nn.Module, inputs: Tensor | Sequence[int]) -> Tensor:
    if isinstance(inputs, Tensor):
        return inputs
    shape = tuple(inputs)
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ConfigError(
            f"count_flops: input shape {shape!r} must be positive integers, e.g. (1, 1, 224, 256)"
        )
    # Match the model's parameters so the forward runs where and in the precision it will.
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return torch.zeros(shape, device=device, dtype=dtype)


def count_flops(model: nn.Module, input_shape: Sequence[int] | Tensor, *, meta: bool = True) -> int:
    """Forward FLOPs of one call ``model(x)``, under :data:`FLOP_CONVENTION`.

    Args:
        model: any module taking one tensor.
        input_shape: the input shape (e.g. ``(B, C, H, W)``), from which a zero tensor is
            built on the model's device and dtype, or an example tensor. FLOPs of a convolutional
            network depend only on the shape, and grow linearly with the batch size ``B``.
        meta: run the forward on the ``meta`` device (shapes only: no arithmetic, no memory,
            the model's weights untouched), which gives the same count in milliseconds. A
            model that the meta device cannot run (an op without a meta kernel, a forward
            that reads tensor values) is run for real instead; ``meta=False`` forces that.

    Returns:
        Total FLOPs of the forward pass (convolutions and matmuls only, see the module
        docstring). Runs under ``torch.no_grad`` with every submodule in eval mode (dropout
        off, as at inference); each submodule's train/eval mode is restored afterwards.
    """
    x = _example_input(model, input_shape)
    # Record each module's mode, not just the root's: a model may have frozen (eval) parts.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if meta:
            try:
                return _count(model, x, on_meta=True)
            except (NotImplementedError, RuntimeError):
                pass  # fall back to the real forward below
        return _count(model, x, on_meta=False)
    finally:
        for module, training in modes:
            module.training = training


def _count(model: nn.Module, x: Tensor, on_meta: bool) -> int:
    # here: it imports triton (0.15 s), with Ctrl-C and SIGTERM held: triton's C extension
    # turns a KeyboardInterrupt raised while it loads into an ImportError, which torch takes
    # for no triton, and the command went on (a paser run interrupted as its calibration
    # began: 2 times in 30, one more line, 'triton not found'; stopped by SIGTERM, 1 in 25)
    with interrupts_held():
        from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if on_meta:
            # Swap in shape-only copies of the weights for this call; the model is not modified.
            state = {
                name: torch.empty_like(t, device="meta")
                for name, t in (*model.named_parameters(), *model.named_buffers())
            }
            functional_call(model, state, (torch.empty_like(x, device="meta"),))
        else:
            model(x)
    return int(counter.get_total_flops())


def gflops_per_sample(model: nn.Module, in_channels: int, height: int, width: int) -> float:
    """Forward cost of one ``in_channels x height x width`` image or patch, in GFLOP (1e9).

    Same convention as :func:`count_flops`. Reference values (1 input channel, 3 classes):
    ``unet_tiny`` on 224x256 ~ 0.598, ``unet_small`` on 56x64 ~ 0.280, ``unet_large`` on
    56x64 ~ 4.475.

    Counted once per module, input size and shapes of its parameters: a module whose cost
    changes with a plain attribute (not a parameter) set after its first count is counted
    with :func:`count_flops` instead.
    """
    # a module's FLOPs depend on its structure and the input's shape, not on its weights:
    # counted once per module (and per shape of its parameters, should they be replaced)
    key = (in_channels, height, width, tuple(tuple(p.shape) for p in model.parameters()))
    try:
        counted = _COUNTED.setdefault(model, {})
    except TypeError:  # a module that cannot be weakly referenced: counted each time
        counted = {}
    if key not in counted:
        counted[key] = count_flops(model, (1, in_channels, height, width)) / 1e9
    return counted[key]


#: :func:`gflops_per_sample`'s counts, per module while it lives
_COUNTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
