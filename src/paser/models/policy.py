"""The routing policy of the reference implementation.

conv3x3 (2 -> 64, stride 1) -> BN -> ReLU -> max-pool 3/2 -> one residual basic block
64 -> 16 (1x1 projection) -> global average pool -> linear 16 -> P x (K+1).
14,736 parameters for P = 16 patches and K + 1 = 3 models; about 0.49 GFLOP on a
224 x 256 state (a multiply-add counts 2).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class RoutingPolicy(nn.Module):
    """State ``[B, in_channels, H, W]`` -> logits ``[B, num_patches, num_models]``.

    Args:
        num_patches: P, patches per image.
        num_models: K + 1, f0 included (action 0 keeps f0's prediction).
        in_channels: state channels (2: f0's prediction and its entropy map).
    """

    def __init__(self, num_patches: int, num_models: int, in_channels: int = 2):
        super().__init__()
        self.num_patches, self.num_models = num_patches, num_models
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        project = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.block = BasicBlock(64, 16, downsample=project)
        self.head = nn.Linear(16, num_patches * num_models)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(state)).mean(dim=(2, 3))  # [B, 16]
        return self.head(x).view(-1, self.num_patches, self.num_models)  # [B, P, K+1]
