"""The UNet family of the reference implementation, with Monte Carlo dropout.

Layout (bilinear UNet): a 1x1 input conv to ``c0`` channels, a DoubleConv stem to
``widths[0]``, one max-pool + DoubleConv per level down to ``widths[-1]``, then
bilinear upsampling + skip concatenation + DoubleConv (mid channels = in / 2)
back up, and a 1x1 output conv. DoubleConv is conv3x3 -> InstanceNorm -> ReLU,
twice. With bilinear upsampling the bottom width equals the one above it
(``widths[-1] == widths[-2]``), as in the reference.

Dropout (p = 0.5) follows every down block except the first and the first up
block. It is an ``nn.Dropout`` module, so Monte Carlo sampling keeps it active at
inference by putting just the dropout modules in training mode (InstanceNorm
has no running statistics, so nothing else changes). The layers before the first
dropout are deterministic: :meth:`UNet.mc_probs` computes them once for all T passes.
With only the last dropout on (``mc_dropout: last``), the decoder up to it is shared too.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from paser.errors import ConfigError


class InstanceNorm(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` without affine parameters or running statistics, computed as a
    group norm with one channel per group: the same statistics (mean and biased variance
    over each channel of each image), so the same values to rounding, and several times
    faster on CPU, where ``instance_norm`` reshapes the batch into channels and takes a slow
    path (3.6 ms against 0.97 ms at 8 x 8 x 224 x 256; docs/benchmarks.md). In ONNX export,
    ``nn.InstanceNorm2d`` itself, which maps to ONNX's ``InstanceNormalization``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or self.affine or self.track_running_stats or \
                torch.onnx.is_in_onnx_export():
            return super().forward(x)
        return F.group_norm(x, x.shape[1], eps=self.eps)


NORMS = {"instance": InstanceNorm, "batch": nn.BatchNorm2d}


def pool2(x: torch.Tensor) -> torch.Tensor:
    """2 x 2 max pooling, stride 2 (odd rows and columns dropped, as ``F.max_pool2d``).

    Without gradients (inference), the maximum of the four strided views: the same values
    to the bit, and several times faster on CPU, where ``max_pool2d`` on NCHW tensors takes
    a slow path (docs/benchmarks.md). With gradients, ``F.max_pool2d`` itself, so training
    is unchanged (its gradient picks one of tied inputs; the maxima would split it).
    """
    if torch.is_grad_enabled() or x.dim() != 4:
        return F.max_pool2d(x, 2)
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                         torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class DoubleConv(nn.Sequential):
    """(conv3x3 -> norm -> ReLU) x 2. Convs keep their bias, norms have no affine."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None,
                 norm: str = "instance"):
        mid_ch = mid_ch or out_ch
        layer = NORMS[norm]
        super().__init__(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1),
            layer(mid_ch, affine=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1),
            layer(out_ch, affine=False),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Bilinear x2 upsampling, pad to the skip's size, concatenate, DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "instance"):
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch, in_ch // 2, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dy or dx:  # odd sizes: pad the upsampled map to the skip's size
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Configurable bilinear UNet with Monte Carlo dropout.

    Args:
        in_channels: input channels (1 for grayscale tomography).
        num_classes: output classes (3: pore, carbon, nickel).
        c0: channels of the 1x1 input conv.
        widths: channels of the stem and of each level, top to bottom; the last
            two must be equal (bilinear bottleneck). ``len(widths) - 1`` levels.
        dropout: dropout probability (reference: 0.5).
        norm: ``instance`` (reference) or ``batch``; both without affine parameters, so
            the parameter count is the same. On patches, instance statistics change with
            each patch's content (a patch of pore only is normalised unlike one of
            nickel); batch statistics do not.

    Input ``[B, in_channels, H, W]``, output logits ``[B, num_classes, H, W]``.
    H and W should be divisible by ``2 ** levels``; other sizes work (padding in
    the up path) but cost slightly different FLOPs.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        c0: int = 32,
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        dropout: float = 0.5,
        norm: str = "instance",
    ):
        super().__init__()
        # a string is a sequence too: "16,32,32" would be read as its characters
        iterable = hasattr(widths, "__iter__") and not isinstance(widths, (str, bytes))
        counts = [c0, *widths] if iterable else []
        if not counts or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                                 and n >= 1 for n in counts):
            raise ConfigError(
                f"UNet c0={c0!r}, widths={widths!r}: channel counts must be integers >= 1, "
                "e.g. c0=8, widths=[16, 32, 32]"
            )
        widths = list(widths)
        if len(widths) < 2 or widths[-1] != widths[-2]:
            raise ConfigError(
                f"UNet widths {widths}: need at least two entries and the last two equal "
                "(the bilinear bottleneck keeps the width), e.g. [8, 16, 16]"
            )
        if norm not in NORMS:
            raise ConfigError(f"UNet norm='{norm}': use one of {', '.join(NORMS)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"UNet dropout={dropout}: must be in [0, 1)")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.levels = len(widths) - 1
        self.inconv = nn.Conv2d(in_channels, c0, 1)
        self.stem = DoubleConv(c0, widths[0], norm=norm)
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1], norm=norm)
                                   for i in range(self.levels))
        # Up block j takes the current map (widths[L-j]) + the skip (widths[L-j-1]) channels,
        # outputs the width of the level below the skip, or widths[0] at the top.
        ups = []
        for j in range(self.levels):
            skip = widths[self.levels - 1 - j]
            out = widths[self.levels - 2 - j] if j < self.levels - 1 else widths[0]
            ups.append(Up(2 * skip, out, norm))
        self.ups = nn.ModuleList(ups)
        self.outconv = nn.Conv2d(widths[0], num_classes, 1)
        self.dropout = nn.Dropout(dropout)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The deterministic part, up to the first dropout: the stem's and the first two
        down blocks' outputs (the last one is the current map)."""
        skips = [self.stem(self.inconv(x))]
        for down in self.downs[:2]:
            skips.append(down(pool2(skips[-1])))
        return skips

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """The rest, from the first dropout on: ``forward(x) == decode(encode(x))``."""
        x, rest = self.decode_trunk(skips, self.dropout)
        return self.decode_tail(self.dropout(x), rest)

    def decode_trunk(self, skips: list[torch.Tensor], drop: nn.Module
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """From the first dropout to the first up block, whose output (before the last
        dropout) comes back with the skips the rest of the decoder takes. ``drop`` is
        applied at every dropout site on the way (``nn.Identity()``: all off)."""
        skips = list(skips)
        x = skips.pop()
        if self.levels > 1:
            x = drop(x)
        skips.append(x)
        for down in self.downs[2:]:
            x = drop(down(pool2(x)))
            skips.append(x)
        skips.pop()  # the bottom map is x itself
        return self.ups[0](x, skips.pop()), skips

    def decode_tail(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """After the last dropout: the remaining up blocks and the output conv."""
        skips = list(skips)
        for up in self.ups[1:]:
            x = up(x, skips.pop())
        return self.outconv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def shared(self, x: torch.Tensor, last_only: bool = False) -> list[torch.Tensor]:
        """What every Monte Carlo pass shares: the encoder, and with ``last_only`` (only
        the last dropout active) the decoder up to it too, computed with the other
        dropouts off. :meth:`mc_probs` takes it back."""
        skips = self.encode(x)
        if not last_only:
            return skips
        trunk, rest = self.decode_trunk(skips, nn.Identity())
        return [*rest, trunk]

    def last_pass(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One pass from :meth:`shared` ``(last_only=True)``: the last dropout and on."""
        return self.decode_tail(self.dropout(parts[-1]), parts[:-1])

    def mc_probs(self, x: torch.Tensor, samples: int, last_only: bool = False) -> torch.Tensor:
        """Mean softmax of ``samples`` passes with dropout as set (Monte Carlo when on).

        Everything before the first dropout is the same in every pass, so it runs once;
        with ``last_only`` every dropout but the last is off (their expectation, the
        identity) and the decoder up to the last one runs once too.
        On CPU the passes then run one after another (a T-times larger batch runs slower
        there: it no longer fits the caches); on an accelerator as one batch.
        """
        parts = self.shared(x, last_only)
        one = self.last_pass if last_only else self.decode
        if x.device.type == "cpu":
            total = one(parts).float().softmax(1)
            for _ in range(samples - 1):
                total += one(parts).float().softmax(1)
            return total / samples
        logits = one([s.repeat(samples, 1, 1, 1) for s in parts])
        return logits.float().softmax(1).unflatten(0, (samples, x.shape[0])).mean(0)


# The reference sizes (1 input channel, 3 classes): 16,571 / 1,080,595 / 17,275,459 parameters.
UNET_SIZES: dict[str, dict] = {
    "tiny": {"c0": 4, "widths": (8, 16, 16)},
    "small": {"c0": 8, "widths": (16, 32, 64, 128, 128)},
    "large": {"c0": 32, "widths": (64, 128, 256, 512, 512)},
}
