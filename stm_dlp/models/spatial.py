"""Spatial encoder of STM-DLP (paper §3.2.1): a small 2-D U-Net with a residual output.

The U-Net halves H and W ``depth`` times, so its input must have H and W divisible by
``2 ** depth``; :func:`pad_to_multiple` and :func:`crop_to` let callers run it on any size
(pad the bottom/right with zeros, run, crop back).

Normalisation is :class:`torch.nn.GroupNorm` (never BatchNorm): statistics are computed per
sample (per frame, when frames are folded into the batch), so a frame's features never depend
on the other frames or slices in the batch. That is what keeps the whole model invariant to
zero-padding of the time axis and to the batch composition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_count(channels: int, max_groups: int = 8) -> int:
    """Number of GroupNorm groups for ``channels`` channels: the largest divisor ≤ ``max_groups``."""
    return math.gcd(channels, max_groups)


def pad_to_multiple(x: Tensor, m: int) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad the last two dims of ``x`` (bottom/right) up to multiples of ``m``.

    Args:
        x: ``(..., H, W)`` tensor.
        m: the multiple (e.g. ``2 ** depth`` of a U-Net).

    Returns:
        ``(padded, (H, W))``: the padded ``(..., H', W')`` tensor and the original size,
        to pass to :func:`crop_to`.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


def crop_to(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Crop the last two dims of ``x`` to ``hw`` (undoes :func:`pad_to_multiple`)."""
    return x[..., : hw[0], : hw[1]]


class ConvBlock2d(nn.Sequential):
    """(3×3 conv → GroupNorm → ReLU) × 2; keeps H, W."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(group_count(out_ch), out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.GroupNorm(group_count(out_ch), out_ch),
            nn.ReLU(inplace=True),
        )


class UNet2d(nn.Module):
    """2-D U-Net with skip connections and a residual output connection.

    Encoder: ``depth`` levels of :class:`ConvBlock2d` each followed by 2×2 max-pooling, then a
    bottleneck block; channels ``base * 2**level``. Decoder: 2×2 transposed convolutions, concat
    with the encoder feature of the same scale, :class:`ConvBlock2d`. Output: a 1×1 convolution
    plus the input (projected by a 1×1 convolution when ``in_ch != out_ch``), which is
    ``F_spatial`` in the paper.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        base: channels of the first level.
        depth: number of pooling steps; H and W must be multiples of ``2 ** depth``.

    Shapes: ``(N, in_ch, H, W) -> (N, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, base: int = 16, depth: int = 2) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"UNet2d depth must be >= 0, got {depth}")
        self.depth = depth
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c_prev = in_ch
        for c in chans[:-1]:
            self.down.append(ConvBlock2d(c_prev, c))
            c_prev = c
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock2d(c_prev, chans[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose2d(chans[level + 1], chans[level], 2, stride=2))
            self.dec.append(ConvBlock2d(2 * chans[level], chans[level]))
        self.out = nn.Conv2d(chans[0], out_ch, 1)
        self.skip: nn.Module = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    @property
    def multiple(self) -> int:
        """H and W of the input must be divisible by this."""
        return 2**self.depth

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, in_ch, H, W) with H, W multiples of :attr:`multiple` -> (N, out_ch, H, W)."""
        if x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(
                f"UNet2d of depth {self.depth} needs H, W divisible by {self.multiple}, got "
                f"{tuple(x.shape[-2:])}; pad with pad_to_multiple first"
            )
        skips = []
        h = x
        for block in self.down:
            h = block(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottleneck(h)
        for up, dec in zip(self.up, self.dec):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
        return self.out(h) + self.skip(x)
