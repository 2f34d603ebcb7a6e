"""The routing policy of the reference implementation, and a patch-aware variant.

Reference (``head="global"``): conv3x3 (2 -> 64, stride 1) -> BN -> ReLU -> max-pool 3/2
-> one residual basic block 64 -> 16 (1x1 projection) -> global average pool -> linear
16 -> P x (K+1). 14,736 parameters for P = 16 patches and K + 1 = 3 models; about
0.49 GFLOP on a 224 x 256 state (a multiply-add counts 2).

The global average pool leaves the linear head no way to tell *which* patch is hard;
it can only learn per-position habits and image-level cues. ``head="local"`` adds, to
the same logits, a 1x1 conv (16 -> K+1, shared by all patches) over the features
average-pooled to the patch grid, so each patch's logits also see its own content
(+ 17 (K+1) parameters).

``stride`` is the stride of the first convolution (reference: 1). Its features and
everything after them are computed on a quarter of the positions at ``stride=2``, so the
policy costs about a quarter of the reference's FLOPs (0.141 -> 0.035 GFLOP on a
128 x 128 state); the parameters are the same. The policy decides once per patch, so
it does not need full-resolution features.

Weights and states are kept channels-last: the 64-channel convolutions at full
resolution train faster that way on CPU (docs/benchmarks.md); the numbers are the same up
to float rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from paser.metrics import reward

Head = Literal["global", "local"]


class RoutingPolicy(nn.Module):
    """State ``[B, in_channels, H, W]`` -> logits ``[B, num_patches, num_models]``.

    Args:
        num_patches: P, patches per image.
        num_models: K + 1, f0 included (action 0 keeps f0's prediction).
        in_channels: state channels (2: f0's prediction and its entropy map).
        head: ``"global"`` (the reference) or ``"local"`` (patch-aware, see module doc).
        grid: ``(rows, cols)`` with ``rows * cols == num_patches``; needed by ``"local"``.
        stride: stride of the first convolution (1, the reference; 2 for a quarter of
            the FLOPs, see module doc).
        gain_head: read the outputs as predicted gains over f0 (each model's output minus
            f0's) and return the predicted reward at the buffers ``lam`` and ``cost``, as
            :class:`PooledPolicy` does (``stage2.objective gain``).
    """

    def __init__(self, num_patches: int, num_models: int, in_channels: int = 2,
                 head: Head = "global", grid: tuple[int, int] | None = None, stride: int = 1,
                 gain_head: bool = False):
        super().__init__()
        self.num_patches, self.num_models, self.head_kind = num_patches, num_models, head
        self.gain_head = gain_head
        if gain_head:  # only then: the reference policy's checkpoints keep their keys
            self.register_buffer("lam", torch.zeros(()))
            self.register_buffer("cost", torch.zeros(num_models))
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        project = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.block = BasicBlock(64, 16, downsample=project)
        self.head = nn.Linear(16, num_patches * num_models)
        if head == "local":
            if grid is None or grid[0] * grid[1] != num_patches:
                raise ValueError(f"head='local' needs grid=(rows, cols) with rows * cols = "
                                 f"{num_patches}, got {grid}")
            self.grid = tuple(grid)
            self.local = nn.Conv2d(16, num_models, 1)
        elif head != "global":
            raise ValueError(f"policy head '{head}': use 'global' or 'local'")
        self.to(memory_format=torch.channels_last)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        state = state.contiguous(memory_format=torch.channels_last)
        features = self.block(self.stem(state))  # [B, 16, H/(2 stride), W/(2 stride)]
        logits = self.head(features.mean(dim=(2, 3))).view(-1, self.num_patches, self.num_models)
        if self.head_kind == "local":
            local = self.local(F.adaptive_avg_pool2d(features, self.grid))  # [B, K+1, R, C]
            logits = logits + local.flatten(2).transpose(1, 2)  # [B, P, K+1], row-major
        if self.gain_head:
            return reward(logits - logits[..., :1], self.cost, self.lam)
        return logits


class BasicBlock(nn.Module):
    """ResNet's basic block, as ``torchvision.models.resnet.BasicBlock(inplanes, planes,
    downsample=downsample)`` builds it at stride 1: the same submodules, created in the same
    order (the same initial weights from one seed, and the same checkpoint keys), and the
    same forward (``tests/test_models.py`` checks both against torchvision's). Written out
    because importing torchvision (or timm's, alike) loads ``torch._dynamo``: 3 to 4 s at
    the start of every ``paser`` process that loads a run routed by this policy, more than
    the block's whole work in one command."""

    def __init__(self, inplanes: int, planes: int, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class EnsembleLinear(nn.Module):
    """``members`` independent linear layers applied at once: ``[M or 1, ..., in] -> [M, ...,
    out]`` (one batched product instead of M modules), each initialised as ``nn.Linear``."""

    def __init__(self, members: int, in_features: int, out_features: int):
        super().__init__()
        layers = [nn.Linear(in_features, out_features) for _ in range(members)]
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # M o i
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))  # M o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, middle = self.weight.shape[0], x.shape[1:-1]
        flat = x.expand(m, *x.shape[1:]).reshape(m, -1, x.shape[-1])  # [M, n, in]
        out = torch.baddbmm(self.bias[:, None], flat, self.weight.transpose(1, 2))  # [M, n, o]
        return out.view(m, *middle, -1)


class PooledPolicy(nn.Module):
    """State ``[B, S, H, W]`` -> per patch the mean, standard deviation and maximum of every
    state channel over the patch -> standardised, beside the image's mean over its patches
    (context) -> MLPs shared by all patches -> scores ``[B, P, K+1]``.

    It costs almost nothing to run (the MLPs' FLOPs are counted; the pooling, one pass over
    the state, is not, as norms and activations are not), so routing pays from the first
    patches it moves. The statistics are read off the patch grid by reshaping (the padded
    state divides exactly into it), which exports to ONNX as it is. :meth:`forward` also
    takes the statistics themselves ``[B, P, 3S]`` (training computes them once per split).

    ``members`` MLPs start from different weights and their outputs are averaged (an
    ensemble: a router trained on a few hundred patches varies with its initialisation).
    In training mode each member's output comes back on its own, ``[M, B, P, K+1]``, so
    each learns from its own error; in eval mode, their mean.

    With ``gain_head`` the MLPs predict each pool model's gain over f0 (K outputs; f0's is
    0 by definition) and :meth:`forward` returns the predicted reward at the buffers
    ``lam`` and ``cost`` [K+1]: ``(1 - lam) * gain - lam * cost``, so the argmax is the
    action of highest predicted reward. Otherwise the K+1 outputs are logits.

    Args:
        grid: ``(rows, cols)`` of the patch grid.
        num_models: K + 1.
        in_channels: state channels S.
        hidden: MLP width.
        gain_head: predict gains (see above) instead of logits.
        members: MLPs averaged.
    """

    def __init__(self, grid: tuple[int, int], num_models: int, in_channels: int,
                 hidden: int = 64, gain_head: bool = False, members: int = 1):
        super().__init__()
        self.grid, self.num_models, self.gain_head = tuple(grid), num_models, gain_head
        self.num_patches = grid[0] * grid[1]
        d = 3 * in_channels
        # standardisation of the statistics, fitted on the training states (standardise_on)
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))
        self.register_buffer("lam", torch.zeros(()))
        self.register_buffer("cost", torch.zeros(num_models))
        out = num_models - 1 if gain_head else num_models
        self.members = members
        self.mlp = nn.Sequential(EnsembleLinear(members, 2 * d, hidden), nn.ReLU(inplace=True),
                                 EnsembleLinear(members, hidden, hidden), nn.ReLU(inplace=True),
                                 EnsembleLinear(members, hidden, out))

    def statistics(self, state: torch.Tensor) -> torch.Tensor:
        """Mean, std and max of each channel on each patch ``[B, P, 3S]`` (patches in
        row-major order)."""
        b, s, h, w = state.shape
        rows, cols = self.grid
        if h % rows or w % cols:
            raise ValueError(f"state of {h} x {w} does not divide into the {rows} x {cols} grid")
        cells = state.float().reshape(b, s, rows, h // rows, cols, w // cols)
        cells = cells.permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, s, -1)  # [B, P, S, n]
        mean = cells.mean(-1)
        std = (cells.square().mean(-1) - mean.square()).clamp_min(0).sqrt()
        return torch.cat([mean, std, cells.amax(-1)], -1)

    @torch.no_grad()
    def all_statistics(self, states: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """:meth:`statistics` of many states ``[N, S, H, W]``, batch by batch ``[N, P, 3S]``."""
        return torch.cat([self.statistics(states[i:i + batch_size].to(self.shift.device))
                          for i in range(0, len(states), batch_size)])

    @torch.no_grad()
    def standardise_on(self, states: torch.Tensor, batch_size: int = 64) -> None:
        """Fit the standardisation to training states ``[N, S, H, W]``."""
        stats = self.all_statistics(states, batch_size).flatten(0, 1)
        self.shift.copy_(stats.mean(0))
        self.scale.copy_(stats.std(0).clamp_min(1e-6))

    def raw(self, state: torch.Tensor) -> torch.Tensor:
        """Each member's outputs ``[M, B, P, K]`` (``gain_head``: gains) or ``[M, B, P,
        K+1]`` (logits), from a state or its statistics."""
        stats = state if state.dim() == 3 else self.statistics(state)
        f = (stats - self.shift) / self.scale
        x = torch.cat([f, f.mean(1, keepdim=True).expand_as(f)], -1)
        return self.mlp(x[None])

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        out = self.raw(state)
        if not (self.training and self.members > 1):
            out = out.mean(0)
        if not self.gain_head:
            return out
        gains = torch.cat([torch.zeros_like(out[..., :1]), out], -1)
        return reward(gains, self.cost, self.lam)
