"""A label-free arterial reference curve for a slice: the model's arterial context.

TMAX is a delay *relative to the arterial input*, which a pixel's neighbourhood (a U-Net's receptive
field, a 16² training crop) does not contain. The deconvolution knows it because it is given the AIF.
:func:`arterial_reference` gives the model the same information: from a whole slice, before any crop,
the mean enhancement curve of its earliest-peaking, most-enhancing pixels (arteries peak first and
highest; the sinus peaks as high but later), on the slice's own frame times.

It needs no labels and no AIF search of the calculation approach (which refuses implausible curves and
may fail): it always returns a curve, and says how good it is (peak enhancement, how many pixels), so a
poor estimate (heavy noise, motion) degrades the context instead of failing the study.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Candidates: the most enhancing fraction of the slice's pixels (at least ``MIN_PIXELS``); arteries
#: and the sinus are a few per mille of a head slice.
TOP_FRACTION = 0.01
MIN_PIXELS = 4
#: Of the candidates, the earliest-peaking share is kept (arteries before veins).
EARLY_SHARE = 0.5
#: Frames averaged for the pre-bolus baseline (the models' input normalisation uses the same count).
BASELINE_FRAMES = 2


@dataclass
class ArterialReference:
    """``curve_hu`` ``(T,)`` enhancement over baseline (HU) at the slice's frame times; ``peak_hu`` its
    maximum; ``n_pixels`` how many pixels were averaged; ``time_to_peak_s``."""

    curve_hu: torch.Tensor
    peak_hu: float
    n_pixels: int
    time_to_peak_s: float


def _smooth3(x: torch.Tensor) -> torch.Tensor:
    """A 3-frame median then a [1, 2, 1] / 4 filter along the first axis (edges replicated): a one-frame
    spike (impulse noise, a motion jump) is removed, not halved, so it cannot pass for an artery's peak."""
    if x.shape[0] < 3:
        return x
    med = _median3(x)
    padded = torch.cat([med[:1], med, med[-1:]], dim=0)
    return 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]


def _median3(x: torch.Tensor) -> torch.Tensor:
    """3-frame running median along the first axis (edges replicated)."""
    if x.shape[0] < 3:
        return x
    padded = torch.cat([x[:1], x, x[-1:]], dim=0)
    return torch.stack([padded[:-2], padded[1:-1], padded[2:]]).median(0).values


@torch.no_grad()
def arterial_reference(frames_hu: torch.Tensor, times_s: torch.Tensor, mask: torch.Tensor | None = None,
                       top_fraction: float = TOP_FRACTION, min_pixels: int = MIN_PIXELS,
                       early_share: float = EARLY_SHARE, baseline_frames: int = BASELINE_FRAMES) -> ArterialReference:
    """The arterial reference of one slice.

    Args:
        frames_hu: ``(T, H, W)`` HU (valid frames only).
        times_s: ``(T,)`` seconds.
        mask: optional bool ``(H, W)`` search region (e.g. the head); ``None``: every finite pixel.
        top_fraction, min_pixels: the candidates, by peak enhancement.
        early_share: share of the candidates, by time to peak, that is averaged.
        baseline_frames: frames averaged for each pixel's baseline.

    Returns:
        :class:`ArterialReference`; ``curve_hu`` is float32 ``(T,)``.
    """
    if frames_hu.ndim != 3 or times_s.shape != frames_hu.shape[:1]:
        raise ValueError(f"frames must be (T, H, W) with times (T,), got {tuple(frames_hu.shape)}, "
                         f"{tuple(times_s.shape)}")
    t = frames_hu.shape[0]
    x = frames_hu.to(torch.float32).reshape(t, -1)
    ok = torch.isfinite(x).all(0)
    if mask is not None:
        ok &= mask.reshape(-1).to(torch.bool)
    x = x[:, ok] if bool(ok.any()) else x.nan_to_num(0.0)
    base = x[: max(1, min(baseline_frames, t))].mean(0, keepdim=True)
    enh = _smooth3(x - base)  # (T, N)
    peak, ttp = enh.max(0)
    k = min(enh.shape[1], max(min_pixels, int(round(top_fraction * enh.shape[1]))))
    cand = torch.topk(peak, k).indices
    k_early = max(1, min(k, int(round(early_share * k))))
    order = torch.argsort(ttp[cand].to(torch.float32) + peak[cand] * 1e-6, descending=False)  # ties: highest first
    chosen = cand[order[:k_early]]
    # the median over the chosen pixels, frame by frame: a spike in one of them does not reach the curve
    # (partial-volume copies of one AIF share its shape, so its timing is kept exactly)
    curve = (x - base)[:, chosen].median(1).values
    i_peak = int(torch.argmax(curve))
    return ArterialReference(curve_hu=curve.to(torch.float32), peak_hu=float(curve[i_peak]), n_pixels=int(k_early),
                             time_to_peak_s=float(times_s[i_peak] - times_s[0]))
