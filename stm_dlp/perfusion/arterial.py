"""A label-free arterial reference curve for a slice: the model's arterial context.

TMAX is a delay *relative to the arterial input*, which a pixel's neighbourhood (a U-Net's receptive
field, a 16² training crop) does not contain. The deconvolution knows it because it is given the AIF.
:func:`arterial_reference` gives the model the same information, from a whole slice before any crop:

1. **search region**: the automatic brain mask of the slice's pre-contrast image
   (:func:`~stm_dlp.perfusion.mask.mask_from_baseline`, holes filled, so vessels are in it) eroded by
   :data:`ERODE_PX`: a frame that moved leaves bone-edge jumps of hundreds of HU next to the skull,
   which must not pass for an artery. The venous search (step 5) uses the mask uneroded: the sinus lies
   against the skull.
2. **baseline**: the median of every pre-bolus frame (before the rise of the most enhancing pixels), not
   of the first two: with 15 HU noise a two-frame baseline is off by ~10 HU per pixel, and the
   pixels whose baseline came out low look like enhancing ones.
3. **candidates**: pixels whose smoothed enhancement (a 3-frame median, then [1, 2, 1]:
   :func:`~stm_dlp.perfusion.concentration.despike_smooth`) peaks at least
   :data:`PEAK_FRACTION` of the ``min_pixels``-th highest peak (at most :data:`MAX_CANDIDATES` of the
   region) and at least :data:`NOISE_GATE` noise levels of a smoothed curve: vessels and their
   partial-volume neighbours, not noise. The noise gate matters where arteries are small against the
   noise (ribbon phantom at 3 mm, 15 HU: the 4th highest peak is the sinus, 30 % of it lets noise peaks
   through, whose chance "arrival" at the first frames then passes for the earliest artery).
4. **arteries**: of those, the pixels whose bolus arrives (:func:`rise_time`, searched backwards from the
   peak so that no baseline excursion can trigger it) within :data:`EARLY_WINDOW_S` of the earliest
   (10th percentile) arrival — the sinus arrives seconds later — and of these the
   :data:`TOP_SHARE` most enhancing (the least partial-volumed). The curve is their frame-by-frame
   median: partial-volume copies of one AIF share its timing, and a spike in one pixel is dropped.
5. **partial-volume correction**: arteries of 1.5-4 mm on 1.5-3 mm pixels read a fraction of their
   true enhancement, while the large sinus does not; the indicator is conserved, so the curve is scaled
   by ``area(venous) / area(arterial)`` (between 1 and :data:`MAX_PV_SCALE`; Fieselmann et al. 2011,
   §5.2 — what the calculation approach's AIF does with its VOF). The venous curve is the mean of the
   :data:`VENOUS_PIXELS` most enhancing candidates arriving :data:`VENOUS_LAG_S` or more after the arteries
   (once ``min_pixels`` such candidates exist).

Measured against the phantoms' true AIF (``python -m experiments.arterial_check``; docs/tmax.md §6):
arrival within 0.3 s and peak within ~10 % on both phantom families at their own pixel size, where the
previous estimator (the median of the earliest-peaking half of the top 1 % of pixels) read the second
family's AIF at 6 % of its peak and 1.7 s late.

It needs no labels and no AIF search of the calculation approach (which refuses implausible curves and
may fail): it always returns a curve, and says how it was obtained, so a poor estimate (heavy noise,
motion) degrades the context instead of failing the study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from stm_dlp.curves import rise_time
from stm_dlp.perfusion.concentration import despike_smooth, frame_noise
from stm_dlp.perfusion.mask import erode, mask_from_baseline
from stm_dlp.perfusion.readout import ReadoutThresholds
from stm_dlp.types import ARTERIAL_POOLING

#: At least this many pixels are averaged (and the ``MIN_PIXELS``-th highest peak is the reference).
MIN_PIXELS = 4
#: Candidates peak at least this fraction of the reference peak...
PEAK_FRACTION = 0.3
#: ... and are at most this share of the search region (vessels are a few per mille of a head slice), or
#: ``4 * min_pixels`` on a small image.
MAX_CANDIDATES = 0.02
#: ... and peak at least this many noise levels of a smoothed curve (the search region's per-frame noise,
#: :func:`~stm_dlp.perfusion.concentration.frame_noise`, times :data:`SMOOTHED_NOISE`): the highest of
#: 10^5 smoothed white-noise samples (2500 curves x 40 frames) lies at 4.8 of them. Without the gate the ribbon
#: phantom's reference arrived 1.6 / 3.8 s off (mean absolute error, two cohort seeds) at 3 mm under 15 HU
#: white noise and 9.1 / 15.0 s under 30 HU; with it 0.63 / 1.47 s and 2.2 / 5.4 s. Regular data and the
#: classic phantom are unchanged (docs/tmax.md §13).
NOISE_GATE = 8.0
#: Standard deviation of white noise of unit σ after :func:`despike_smooth` (measured: 0.553).
SMOOTHED_NOISE = 0.55
#: Arteries arrive within this many seconds of the earliest candidates.
EARLY_WINDOW_S = 1.0
#: Of the early candidates this share, the most enhancing, is averaged.
TOP_SHARE = 0.5
#: The venous curve arrives at least this long after the arterial one.
VENOUS_LAG_S = 1.5
#: The venous curve is the mean of this many most enhancing late pixels: on 3 mm pixels the sinus has one
#: or two near-full-volume pixels per slice (ribbon phantom: the brightest one's area is 0.75-0.98 of the
#: true AIF's, the median of the four brightest 0.5-0.7).
VENOUS_PIXELS = 2
#: Largest partial-volume scale applied to the arterial curve.
MAX_PV_SCALE = 8.0
#: The arterial search region is the brain mask eroded by this many pixels (motion's bone edges).
ERODE_PX = 1
#: Frames whose median is the first estimate of the pre-bolus baseline (before the bolus arrival is
#: known): a median of three, so that one frame's impulse cannot set a pixel's baseline.
BASELINE_FRAMES = 3


#: Seconds a scan must go on after the arterial peak for tissue at the TMAX > 6 s threshold to show its
#: first pass: such a residue peaks 6 s after the artery's, and the tissue curve's rise must follow inside the
#: scan. Shorter scans read late tissue early (docs/calc/issue14_targets.md §6: measured on truncated studies).
MIN_SCAN_AFTER_ARTERIAL_PEAK_S = 12.0


def scan_window(arterial_peak_s: float, scan_end_s: float,
                min_after_peak_s: float = MIN_SCAN_AFTER_ARTERIAL_PEAK_S,
                lesion_tmax_s: float = ReadoutThresholds().hypoperfusion_tmax_s) -> dict[str, Any]:
    """Whether a scan lasted long enough after its arterial peak (both in seconds on the same clock) to
    measure delayed tissue: ``{"arterial_peak_s", "scan_end_s", "after_peak_s", "short", "warning"}``;
    ``warning`` is a sentence for the log and ``summary.json`` when ``after_peak_s < min_after_peak_s``
    (tissue delayed beyond about ``after_peak_s`` − ``lesion_tmax_s`` reads too early: the volume of
    TMAX > ``lesion_tmax_s`` (s, the readout's hypoperfusion threshold) is low), else ``None``."""
    after = float(scan_end_s) - float(arterial_peak_s)
    short = after < min_after_peak_s
    warning = (f"the scan ends {after:.1f} s after the arterial peak (at least {min_after_peak_s:g} s are needed "
               f"to see tissue delayed past the TMAX > {lesion_tmax_s:g} s threshold): TMAX of delayed tissue "
               f"reads too early and the TMAX > {lesion_tmax_s:g} s volume is underestimated") if short else None
    return {"arterial_peak_s": round(float(arterial_peak_s), 3), "scan_end_s": round(float(scan_end_s), 3),
            "after_peak_s": round(after, 3), "short": bool(short), "warning": warning}


@dataclass
class ArterialReference:
    """``curve_hu`` ``(T,)`` enhancement over baseline (HU, partial-volume corrected) at the slice's frame
    times; ``peak_hu`` its maximum; ``n_pixels`` how many pixels were averaged; ``time_to_peak_s`` and
    ``arrival_s`` (:func:`rise_time`) from the first frame; ``pv_scale`` the partial-volume factor applied
    (1: none, or no venous curve found); ``n_baseline`` the pre-bolus frames of the baseline; ``noise_hu`` the
    per-frame noise of the search region's curves (what the candidates' noise gate scaled with)."""

    curve_hu: torch.Tensor
    peak_hu: float
    n_pixels: int
    time_to_peak_s: float
    arrival_s: float = 0.0
    pv_scale: float = 1.0
    n_baseline: int = BASELINE_FRAMES
    noise_hu: float = 0.0


def _smooth3(x: torch.Tensor) -> torch.Tensor:
    """:func:`~stm_dlp.perfusion.concentration.despike_smooth` along the first (time) axis of ``(T, N)``."""
    return despike_smooth(x.T).T


def _search_regions(frames: torch.Tensor, n_pre: int, min_pixels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(arterial, venous) search regions ``(H*W,)`` bool from the brain mask of the pre-contrast image, or
    ``None`` when the slice has no usable brain mask (not head-CT HU, an empty slice)."""
    pre = torch.nan_to_num(frames[: max(1, n_pre)], nan=-1000.0).median(0).values
    head = mask_from_baseline(pre[None])[0]
    arterial = erode(head[None], ERODE_PX)[0] if ERODE_PX > 0 else head
    if int(arterial.sum()) < 4 * min_pixels:
        return None
    return arterial.reshape(-1), head.reshape(-1)


def _enhancement(x: torch.Tensor, n_pre: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Enhancement over the pre-bolus baseline ``(T, N)`` (raw, smoothed) of ``x`` ``(T, N)`` HU."""
    raw = x - x[:n_pre].median(0, keepdim=True).values
    return raw, _smooth3(raw)


def _area(curve: torch.Tensor, times: torch.Tensor) -> float:
    return float(torch.trapezoid(_smooth3(curve[:, None])[:, 0].clamp_min(0.0), times))


def arterial_reference(frames_hu: torch.Tensor, times_s: torch.Tensor, mask: torch.Tensor | None = None,
                       min_pixels: int = MIN_PIXELS) -> ArterialReference:
    """The arterial reference of one slice (the steps are in the module docstring).

    Args:
        frames_hu: ``(T, H, W)`` HU (valid frames only).
        times_s: ``(T,)`` seconds.
        mask: optional bool ``(H, W)``, a further restriction of the search region; ``None``: the automatic
            brain mask (or every finite pixel when the frames give none, e.g. data not in HU).
        min_pixels: fewest pixels averaged.

    Returns:
        :class:`ArterialReference`; ``curve_hu`` is float32 ``(T,)``.
    """
    if frames_hu.ndim != 3 or times_s.shape != frames_hu.shape[:1]:
        raise ValueError(f"frames must be (T, H, W) with times (T,), got {tuple(frames_hu.shape)}, "
                         f"{tuple(times_s.shape)}")
    t_n = frames_hu.shape[0]
    times = times_s.to(torch.float32)
    frames = frames_hu.to(torch.float32)
    x_all = frames.reshape(t_n, -1)
    finite = torch.isfinite(x_all).all(0)
    if mask is not None:
        finite &= mask.reshape(-1).to(torch.bool)
    if not bool(finite.any()):
        finite = torch.ones_like(finite)
        x_all = x_all.nan_to_num(0.0)
    def regions(n_pre: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = _search_regions(frames, n_pre, min_pixels)
        return (finite, finite) if found is None else (finite & found[0], finite & found[1])

    n_pre = min(BASELINE_FRAMES, max(1, t_n // 2))
    arterial_px, venous_px = regions(n_pre)
    x = x_all[:, arterial_px]
    # the pre-bolus frames: before the rise of the most enhancing pixels' median curve
    _, enh0 = _enhancement(x, n_pre)
    top0 = torch.topk(enh0.max(0).values, min(x.shape[1], 2 * min_pixels)).indices
    arrival0 = float(rise_time(_smooth3(enh0[:, top0].median(1).values[:, None])[:, 0], times))
    n_found = int((times < arrival0).sum()) - 1
    if n_found > n_pre:
        n_pre = n_found  # the brain mask again, from the better pre-contrast image
        arterial_px, venous_px = regions(n_pre)
        x = x_all[:, arterial_px]
    raw, enh = _enhancement(x, n_pre)
    peak = enh.max(0).values
    k_max = min(peak.numel(), max(4 * min_pixels, int(round(MAX_CANDIDATES * peak.numel()))))
    top_peaks, top_idx = torch.topk(peak, k_max)
    noise_hu = frame_noise(x_all.reshape(1, t_n, *frames.shape[1:]), arterial_px.reshape(1, *frames.shape[1:]))
    level = max(PEAK_FRACTION * float(top_peaks[min(min_pixels, k_max) - 1]), NOISE_GATE * SMOOTHED_NOISE * noise_hu)
    cand = top_idx[top_peaks >= level]
    if cand.numel() < min_pixels:
        cand = top_idx[:min_pixels]
    arrival = rise_time(enh[:, cand].T, times)
    early = cand[arrival <= torch.quantile(arrival, 0.1) + EARLY_WINDOW_S]
    n_top = max(min(min_pixels, early.numel()), int(round(TOP_SHARE * early.numel())))
    chosen = early[torch.topk(peak[early], n_top).indices]
    curve = raw[:, chosen].median(1).values
    arrival_s = float(rise_time(curve, times))

    # partial-volume correction from the venous curve (the mask uneroded: the sinus lies against the skull)
    pv_scale = 1.0
    raw_v, enh_v = _enhancement(x_all[:, venous_px], n_pre)
    top_v = torch.topk(enh_v.max(0).values, min(enh_v.shape[1], k_max)).indices  # sorted by peak
    late = top_v[rise_time(enh_v[:, top_v].T, times) > arrival_s + VENOUS_LAG_S]
    if late.numel() >= min_pixels:
        venous = raw_v[:, late[:VENOUS_PIXELS]].mean(1)
        pv_scale = min(MAX_PV_SCALE, max(1.0, _area(venous, times) / max(_area(curve, times), 1e-6)))
        curve = curve * pv_scale
    i_peak = int(torch.argmax(curve))
    return ArterialReference(curve_hu=curve.to(torch.float32), peak_hu=float(curve[i_peak]), n_pixels=int(n_top),
                             time_to_peak_s=float(times[i_peak] - times[0]), arrival_s=arrival_s - float(times[0]),
                             pv_scale=float(pv_scale), n_baseline=int(n_pre),
                             noise_hu=noise_hu)



def pool_references(curves_hu: torch.Tensor, times_s: torch.Tensor, pooling: str = "study") -> torch.Tensor:
    """Each slice's arterial reference ``(S, T)`` from every slice's own (``curves_hu`` ``(S, T)`` HU at
    ``times_s`` ``(S, T)`` s, :func:`arterial_reference`).

    ``pooling="study"``: every slice gets the frame-by-frame median of the study's curves. One bolus feeds every
    slice of a study, so their curves differ by noise and by how well each slice's search went; a slice without
    a large artery, or a noise peak passing for one, reads the bolus seconds off, while the median of S slices
    does not (held-out ribbon phantom under 15 HU noise: Dice(TMAX > 6 s) 0.45-0.47 -> 0.64-0.66 at test time,
    docs/tmax.md §13). Slices scanned at different times (shuttle mode: ``times_s`` rows differ) keep their own,
    as does ``pooling="slice"``."""
    if pooling not in ARTERIAL_POOLING:
        raise ValueError(f"arterial pooling must be one of {ARTERIAL_POOLING}, got {pooling!r}")
    if curves_hu.ndim != 2 or times_s.shape != curves_hu.shape:
        raise ValueError(f"curves must be (S, T) with times (S, T), got {tuple(curves_hu.shape)}, "
                         f"{tuple(times_s.shape)}")
    same_times = bool(torch.allclose(times_s, times_s[:1].expand_as(times_s), atol=1e-3))
    if pooling == "slice" or curves_hu.shape[0] < 2 or not same_times:
        return curves_hu.clone()
    return torch.quantile(curves_hu.to(torch.float32), 0.5, dim=0).expand_as(curves_hu).clone()
