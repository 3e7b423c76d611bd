"""Impulse Response Feature Encoder (IRFE, paper §3.2) and the models' input normalisation.

The IRFE turns a slice's frames and frame times into one feature map ``F_st`` (B, C', H, W).
Three orders of the spatial and temporal parts are available (paper §4.3, Table 2):

* ``"spatial_first"`` (the paper's design): a 2-D U-Net on every frame independently gives
  ``F_spatial`` (B, T, C, H, W); a per-pixel temporal encoder reads each pixel's T×(C[+1])
  sequence and gives ``F_st``.
* ``"temporal_first"``: the per-pixel temporal encoder reads the raw (normalised) intensity and
  the time (T×2 per pixel) → (B, C', H, W), then a 2-D U-Net over that map gives ``F_st``.
* ``"joint"``: one spatio-temporal encoder, a 3-D U-Net over (T, H, W) with intensity and time
  as its two input channels, pooling only over H, W; every layer is masked along T by
  ``lengths`` (masked GroupNorm statistics too); a masked mean and max over T, then a 1×1 conv,
  give ``F_st``.

Where the time goes (``time_input``): ``"temporal"`` (paper default: the time is the +1 channel
of the temporal encoder), ``"spatial"`` (a constant extra input channel of the per-frame U-Net),
``"both"``. For ``temporal_first`` and ``joint`` the paper feeds the time together with the
frames at the beginning, which is what ``time_input="temporal"`` means there; other values
raise ``ValueError``.

All parts are convolutional or per-pixel, and none mixes information across padded frames, so the
IRFE output does not depend on how far the time axis is zero-padded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stm_dlp.curves import ARRIVAL_FRACTION, rise_time
from stm_dlp.models.spatial import UNet2d, group_count
from stm_dlp.models.temporal import ENCODERS, build_temporal_encoder, valid_mask

#: IRFE orders (paper §4.3).
ORDERS: tuple[str, ...] = ("spatial_first", "temporal_first", "joint")
#: Where the frame times are given to the network.
TIME_INPUTS: tuple[str, ...] = ("temporal", "spatial", "both")


def normalise_frames(
    frames: Tensor,
    times_s: Tensor,
    lengths: Tensor,
    hu_scale: float = 50.0,
    time_scale_s: float = 60.0,
    baseline_frames: int = 2,
) -> tuple[Tensor, Tensor]:
    """The models' input normalisation.

    Intensities become the contrast enhancement over the pre-bolus baseline, in units of
    ``hu_scale`` HU: ``x = (frames - baseline) / hu_scale`` where ``baseline`` is, per pixel, the
    mean of the first ``min(baseline_frames, length)`` valid frames. Padded frames are set to 0.
    Times become ``t = times_s / time_scale_s`` (padded entries are left as they are; every
    encoder masks them).

    Args:
        frames: ``(B, T, H, W)`` HU.
        times_s: ``(B, T)`` seconds from the slice's first frame.
        lengths: int ``(B,)`` valid frames per slice.

    Returns:
        ``x`` ``(B, T, H, W)`` (dimensionless) and ``t`` ``(B, T)`` (units of ``time_scale_s``).
    """
    t_max = frames.shape[1]
    valid = valid_mask(lengths, t_max).to(frames.dtype)  # (B, T)
    first = valid * (torch.arange(t_max, device=frames.device) < baseline_frames).to(frames.dtype)
    baseline = (frames * first[:, :, None, None]).sum(1, keepdim=True) / first.sum(1).clamp_min(1.0)[
        :, None, None, None
    ]
    x = (frames - baseline) / hu_scale * valid[:, :, None, None]
    return x, times_s / time_scale_s


#: Channels of the arterial context at each time step: the arterial curve's shape (over its own peak), its
#: amplitude, and the time since the arterial arrival.
ARTERIAL_CHANNELS = 3


def arterial_arrival(arterial_hu: Tensor, times: Tensor, valid: Tensor, fraction: float = ARRIVAL_FRACTION) -> Tensor:
    """``(B,)`` time (in the units of ``times`` ``(B, T)``) at which each curve ``(B, T)`` rises through
    ``fraction`` of its peak, searched backwards from the peak (:func:`stm_dlp.curves.rise_time`:
    a noisy baseline cannot set it); ``valid`` ``(B, T)`` float marks real frames."""
    return rise_time(arterial_hu * valid, times, valid > 0, fraction)


def arterial_channels(arterial_hu: Tensor, lengths: Tensor, times: Tensor, scale_hu: float = 300.0) -> Tensor:
    """The arterial context ``(B, T, 3)`` from reference curves ``(B, T)`` (HU over baseline) at ``times``
    ``(B, T)`` (the model's normalised time input): the curve over its own peak (timing and shape,
    amplitude-free), over ``scale_hu`` (amplitude, which CBF and CBV scale with), and the time since the
    arterial arrival (:func:`arterial_arrival`) — TMAX is the delay of a pixel's bolus on that clock; zero past
    ``lengths``."""
    valid = valid_mask(lengths, arterial_hu.shape[1]).to(arterial_hu.dtype)
    a = arterial_hu * valid
    peak = a.amax(1, keepdim=True).clamp_min(1.0)  # a flat (failed) estimate stays small, never divides by ~0
    since = (times - arterial_arrival(a, times, valid)[:, None]) * valid
    return torch.stack([a / peak, a / scale_hu, since], dim=-1)


#: Arterial curve area (HU s) at which :func:`arterial_gain` is 1: a 350 HU first pass of ~8 s plus its
#: recirculation and steady state.
ARTERIAL_AREA_HU_S = 4000.0
#: :func:`arterial_gain` stays in this range: a failed (flat) or implausible estimate is bounded.
ARTERIAL_GAIN_RANGE = (0.2, 5.0)


def arterial_gain(arterial_hu: Tensor, times_s: Tensor, lengths: Tensor) -> Tensor:
    """``(B,)`` ``ARTERIAL_AREA_HU_S / area`` of each reference curve ``(B, T)`` (HU over baseline, negative
    values as 0) over its valid frames at ``times_s`` ``(B, T)`` seconds, clamped to ``ARTERIAL_GAIN_RANGE``:
    the factor that puts every slice's enhancement on one injection's scale."""
    valid = valid_mask(lengths, arterial_hu.shape[1]).to(arterial_hu.dtype)
    a = arterial_hu.clamp_min(0.0) * valid
    dt = torch.diff(times_s, dim=1) * valid[:, 1:]
    area = (0.5 * (a[:, 1:] + a[:, :-1]) * dt).sum(1)
    lo, hi = ARTERIAL_GAIN_RANGE
    return (ARTERIAL_AREA_HU_S / area.clamp_min(1e-6)).clamp(lo, hi)


class MaskedGroupNorm3d(nn.GroupNorm):
    """GroupNorm on ``(B, C, T, H, W)`` whose statistics use only the valid frames.

    ``forward(x, mask)`` with float ``mask`` ``(B, 1, T, 1, 1)``; the output is zero at padded frames.
    """

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        b, c, t, h, w = x.shape
        g = self.num_groups
        xg = x.reshape(b, g, c // g, t, h, w)
        m = mask.reshape(b, 1, 1, t, 1, 1)
        count = m.sum(dim=3, keepdim=True) * (c // g) * h * w  # (B, 1, 1, 1, 1, 1)
        dims = (2, 3, 4, 5)
        mean = (xg * m).sum(dims, keepdim=True) / count
        var = (((xg - mean) * m) ** 2).sum(dims, keepdim=True) / count
        y = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(b, c, t, h, w)
        y = y * self.weight.view(1, c, 1, 1, 1) + self.bias.view(1, c, 1, 1, 1)
        return y * mask


class MaskedConvBlock3d(nn.Module):
    """(3×3×3 conv → masked GroupNorm → ReLU → zero padded frames) × 2."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = MaskedGroupNorm3d(group_count(out_ch), out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = MaskedGroupNorm3d(group_count(out_ch), out_ch)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = F.relu(self.norm1(self.conv1(x), mask))
        return F.relu(self.norm2(self.conv2(x), mask))


class JointEncoder3d(nn.Module):
    """Joint spatio-temporal encoder: a 3-D U-Net over (T, H, W), pooled over T at the end.

    Convolutions are 3×3×3 (so they mix neighbouring frames); down/up-sampling is over H, W
    only (max-pool and transposed conv with kernel (1, 2, 2)), so T is never resampled. After
    every layer the padded frames are zeroed, and normalisation statistics use valid frames only,
    so the first padded frame acts exactly as the convolution's own zero padding. The result is
    the masked mean and masked max over T, concatenated and projected by a 1×1 conv.

    Shapes: ``x`` (B, in_ch, T, H, W), ``lengths`` (B,) -> (B, out_ch, H, W);
    H, W multiples of ``2 ** depth``.
    """

    def __init__(self, in_ch: int, out_ch: int, base: int = 16, depth: int = 2) -> None:
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        c_prev = in_ch
        for c in chans[:-1]:
            self.down.append(MaskedConvBlock3d(c_prev, c))
            c_prev = c
        self.bottleneck = MaskedConvBlock3d(c_prev, chans[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for level in reversed(range(depth)):
            self.up.append(nn.ConvTranspose3d(chans[level + 1], chans[level], (1, 2, 2), stride=(1, 2, 2)))
            self.dec.append(MaskedConvBlock3d(2 * chans[level], chans[level]))
        self.out = nn.Conv2d(2 * chans[0], out_ch, 1)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        mask = valid_mask(lengths, x.shape[2]).to(x.dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1)
        h = x * mask
        skips = []
        for block in self.down:
            h = block(h, mask)
            skips.append(h)
            h = F.max_pool3d(h, (1, 2, 2))
        h = self.bottleneck(h, mask)
        for up, dec in zip(self.up, self.dec):
            h = dec(torch.cat([up(h) * mask, skips.pop()], dim=1), mask)
        mean = (h * mask).sum(2) / mask.sum(2)
        peak = h.masked_fill(mask == 0, float("-inf")).amax(2)
        return self.out(torch.cat([mean, peak], dim=1))


class IRFE(nn.Module):
    """Impulse Response Feature Encoder: normalised frames and times -> ``F_st``.

    Args:
        encoder: temporal encoder, one of ``"cnn"``, ``"mlp_mixer"``, ``"lstm"`` (ignored for
            ``order="joint"``).
        order: ``"spatial_first"``, ``"temporal_first"`` or ``"joint"`` (see the module docstring).
        time_input: ``"temporal"``, ``"spatial"`` or ``"both"`` (only ``"temporal"`` for
            ``temporal_first`` and ``joint``).
        spatial_channels: U-Net base channels; also ``C`` of ``F_spatial`` for spatial_first.
        unet_depth: U-Net pooling steps (H, W must be multiples of ``2 ** unet_depth``).
        temporal_hidden: hidden size of the temporal encoder and ``C'`` of ``F_st``.
        temporal_layers: temporal encoder depth (None: the encoder's default).
        chunk_size: encode at most this many pixel sequences at once (None: all).
        max_tokens: longest sequence for ``mlp_mixer``.
        context_channels: per-slice channels given at every time step to every pixel's temporal encoder
            (the arterial context, :func:`arterial_channels`); 0 for the paper's IRFE.

    Forward: ``x`` (B, T, H, W) normalised intensities (zero past lengths), ``t`` (B, T)
    normalised times, ``lengths`` (B,), ``context`` (B, T, context_channels) or ``None`` ->
    ``F_st`` (B, :attr:`out_channels`, H, W).
    """

    def __init__(
        self,
        encoder: str = "lstm",
        order: str = "spatial_first",
        time_input: str = "temporal",
        spatial_channels: int = 16,
        unet_depth: int = 2,
        temporal_hidden: int = 64,
        temporal_layers: int | None = None,
        chunk_size: int | None = None,
        max_tokens: int = 128,
        context_channels: int = 0,
    ) -> None:
        super().__init__()
        check_irfe_args(encoder, order, time_input)
        self.context_channels = int(context_channels)
        k = self.context_channels
        self.order = order
        self.time_input = time_input
        self.out_channels = temporal_hidden
        self.multiple = 2**unet_depth
        self.spatial: nn.Module | None = None
        self.temporal: nn.Module | None = None
        self.joint: JointEncoder3d | None = None
        self.time_in_temporal = time_input in ("temporal", "both")
        tkw = dict(
            hidden=temporal_hidden, layers=temporal_layers, chunk_size=chunk_size, max_tokens=max_tokens
        )
        if order == "spatial_first":
            time_in_spatial = time_input in ("spatial", "both")
            self.spatial = UNet2d(1 + time_in_spatial, spatial_channels, spatial_channels, unet_depth)
            self.temporal = build_temporal_encoder(encoder, spatial_channels + self.time_in_temporal + k, **tkw)
        elif order == "temporal_first":
            self.temporal = build_temporal_encoder(encoder, 2 + k, **tkw)
            self.spatial = UNet2d(temporal_hidden, temporal_hidden, spatial_channels, unet_depth)
        else:
            self.joint = JointEncoder3d(2 + k, temporal_hidden, spatial_channels, unet_depth)

    def _per_pixel(self, context: Tensor, b: int, h: int, w: int) -> Tensor:
        """``(B, T, K)`` slice context → ``(B*H*W, T, K)``, the same for every pixel of a slice."""
        t_max, k = context.shape[1:]
        return context[:, None].expand(b, h * w, t_max, k).reshape(b * h * w, t_max, k)

    def forward(self, x: Tensor, t: Tensor, lengths: Tensor, context: Tensor | None = None) -> Tensor:
        b, t_max, h, w = x.shape
        if self.context_channels and (context is None or context.shape != (b, t_max, self.context_channels)):
            raise ValueError(f"this IRFE needs a context of shape {(b, t_max, self.context_channels)}, got "
                             f"{None if context is None else tuple(context.shape)}")
        if not self.context_channels:
            context = None
        if self.order == "joint":
            assert self.joint is not None
            channels = [x, t[:, :, None, None].expand(b, t_max, h, w)]
            if context is not None:
                channels += [context[..., i, None, None].expand(b, t_max, h, w) for i in range(context.shape[-1])]
            return self.joint(torch.stack(channels, dim=1), lengths)
        assert self.spatial is not None and self.temporal is not None
        pix_lengths = lengths.repeat_interleave(h * w)  # (B*H*W,)
        if self.order == "temporal_first":
            seq = torch.stack([x, t[:, :, None, None].expand(b, t_max, h, w)], dim=-1)  # (B, T, H, W, 2)
            seq = seq.permute(0, 2, 3, 1, 4).reshape(b * h * w, t_max, 2)
            if context is not None:
                seq = torch.cat([seq, self._per_pixel(context, b, h, w)], dim=-1)
            feat = self.temporal(seq, pix_lengths).reshape(b, h, w, -1).permute(0, 3, 1, 2)
            return self.spatial(feat.contiguous())
        # spatial_first: the U-Net runs on the valid frames only (padded frames stay zero features).
        valid = valid_mask(lengths, t_max)  # (B, T)
        inp = x[valid][:, None]  # (Nv, 1, H, W)
        if self.time_input in ("spatial", "both"):
            inp = torch.cat([inp, t[valid][:, None, None, None].expand_as(inp)], dim=1)
        f_valid = self.spatial(inp)  # (Nv, C, H, W)
        c = f_valid.shape[1]
        f_spatial = f_valid.new_zeros(b, t_max, c, h, w)
        f_spatial[valid] = f_valid
        seq = f_spatial.permute(0, 3, 4, 1, 2).reshape(b * h * w, t_max, c)  # (B*H*W, T, C)
        if self.time_in_temporal:
            tt = t[:, None, :, None].expand(b, h * w, t_max, 1).reshape(b * h * w, t_max, 1)
            seq = torch.cat([seq, tt], dim=-1)
        if context is not None:
            seq = torch.cat([seq, self._per_pixel(context, b, h, w)], dim=-1)
        feat = self.temporal(seq, pix_lengths)  # (B*H*W, C')
        return feat.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def check_irfe_args(encoder: str, order: str, time_input: str) -> None:
    """Raise ``ValueError`` (listing the valid values) for an unknown or unsupported combination."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; valid values: {', '.join(ENCODERS)}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid values: {', '.join(ORDERS)}")
    if time_input not in TIME_INPUTS:
        raise ValueError(f"unknown time_input {time_input!r}; valid values: {', '.join(TIME_INPUTS)}")
    if order != "spatial_first" and time_input != "temporal":
        raise ValueError(
            f"order={order!r} feeds the time together with the frames at the beginning; the only valid "
            f"time_input for it is 'temporal' (got {time_input!r}). time_input 'spatial' and 'both' "
            "need order='spatial_first'"
        )
