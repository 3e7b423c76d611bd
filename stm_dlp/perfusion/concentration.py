"""From HU frames to contrast-enhancement ("concentration") curves, on the real frame times.

CT attenuation rises linearly with iodine concentration (about 25 HU per mg I/ml at 80 kVp; Miles
1991), so the enhancement over the pre-contrast baseline, in HU, *is* the concentration up to a
constant that cancels in deconvolution (:mod:`stm_dlp.perfusion.physics`).

Steps offered here (all pure torch, any device, any leading dims; times may be irregular):

* :func:`detect_arrival` — bolus arrival on a reference curve: the first frame of the rise that
  leads to the peak above ``baseline + max(k_sigma * sigma, min_rise_frac * (peak - baseline))``.
  ``sigma`` is a robust (MAD of first differences) noise estimate, so clean and noisy curves work.
* :func:`concentration_from_hu` — per-pixel baseline = mean of the frames *before* the detected
  arrival (minus a safety margin), enhancement = frames - baseline; optional temporal smoothing.
* :func:`gaussian_smooth_time` — Gaussian kernel smoothing in **seconds** that respects irregular
  frame times (each neighbour weighted by its share of the time axis).
* :func:`gaussian_smooth_space` — separable in-plane Gaussian (pixels).
* :func:`uniform_grid`, :func:`interp_matrix`, :func:`resample_uniform` — exact handling of
  non-uniform framing: curves are linearly interpolated at their *real* times onto a uniform grid
  of step ``dt_s`` (default 0.5 s, finer than clinical frames, which also shrinks the
  discretisation bias of the deconvolution; Fieselmann et al. 2011, §4.3).
"""

from __future__ import annotations

import math

import torch


def _as_times(times_s: torch.Tensor | object, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(times_s, device=like.device).to(like.dtype)


def detect_arrival(
    curve: torch.Tensor,
    times_s: torch.Tensor | None = None,
    k_sigma: float = 3.0,
    min_rise_frac: float = 0.05,
) -> int:
    """Index of the first frame of the bolus rise on one reference curve.

    Two thresholds (hysteresis): the rise is *detected* where the curve last crosses the high
    threshold ``c0 + max(k_sigma*sigma, min_rise_frac*rise)`` before its peak, then followed back
    while it stays above the low threshold ``c0 + max(sigma, 0.1*min_rise_frac*rise)``, so the
    detected start is the foot of the rise, not its 5 % point. ``c0`` is the median of the frames
    before the high crossing, ``sigma`` a robust noise level (MAD of first differences), ``rise`` the
    peak enhancement over ``c0``.

    Args:
        curve: ``(T,)`` HU (or enhancement) of a curve that sees the bolus early and clearly (e.g. the
            mean of the most enhancing pixels, or an AIF).
        times_s: ``(T,)`` frame times (s); unused (frames are ordered), kept for API symmetry.
        k_sigma: high threshold in units of the noise level.
        min_rise_frac: high threshold as a fraction of the peak enhancement (floor for clean curves).

    Returns:
        ``i`` in ``[1, T-1]``: frames ``0 .. i-1`` are pre-bolus.
    """
    c = curve.detach().to(torch.float64).cpu()
    t = c.shape[-1]
    if t < 3:
        return 1
    p = int(torch.argmax(c))
    d = torch.diff(c[: max(p, 2) + 1])
    sigma = float((d - d.median()).abs().median()) * 1.4826 / math.sqrt(2.0) if d.numel() else 0.0

    def crossing(c0: float) -> tuple[int, float, float]:
        rise = max(float(c[p]) - c0, 0.0)
        hi = c0 + max(k_sigma * sigma, min_rise_frac * rise)
        below = torch.nonzero(c[: p + 1] <= hi).flatten()
        i_hi = int(below[-1]) + 1 if below.numel() else 1
        return min(max(i_hi, 1), t - 1), rise, c0

    i_hi, rise, c0 = crossing(float(c[0]))
    i_hi, rise, c0 = crossing(float(c[:i_hi].median()))
    lo = c0 + max(sigma, 0.1 * min_rise_frac * rise)
    i = i_hi
    while i > 1 and float(c[i - 1]) > lo:
        i -= 1
    return int(min(max(i, 1), t - 1))


def gaussian_smooth_time(x: torch.Tensor, times_s: torch.Tensor, sigma_s: float) -> torch.Tensor:
    """Gaussian smoothing along the last axis with a kernel in seconds, for irregular frame times.

    ``y_i = Σ_j w_ij x_j / Σ_j w_ij`` with ``w_ij = exp(-(t_i - t_j)^2 / 2σ^2) * Δ_j`` where ``Δ_j``
    is frame j's share of the time axis (half the distance between its neighbours), so densely
    sampled stretches do not dominate sparse ones.

    Args:
        x: ``(..., T)``.
        times_s: ``(T,)`` shared times, or ``(..., T)`` per-curve times (broadcastable to ``x``).
        sigma_s: kernel width (s); ``<= 0`` returns ``x`` unchanged.
    """
    if sigma_s <= 0:
        return x
    t = _as_times(times_s, x)
    tt = t if t.dim() > 1 else t[None]
    gaps = torch.diff(tt, dim=-1)
    share = torch.zeros_like(tt)
    share[..., :-1] += 0.5 * gaps
    share[..., 1:] += 0.5 * gaps
    share = share.clamp_min(1e-6)
    w = torch.exp(-0.5 * ((tt[..., :, None] - tt[..., None, :]) / sigma_s) ** 2) * share[..., None, :]
    w = w / w.sum(-1, keepdim=True)  # (..., T, T)
    if t.dim() == 1:
        return x @ w[0].T
    return torch.einsum("...ij,...j->...i", w, x)


def gaussian_smooth_space(x: torch.Tensor, sigma_px: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Separable in-plane Gaussian over the last two axes ``(..., H, W)`` (reflect padding).

    ``sigma_px <= 0`` returns ``x`` unchanged. Kernel radius ``ceil(3 σ)``.

    With ``weights`` (``(H, W)`` or broadcastable to ``x``'s leading dims + ``(H, W)``, e.g. a 0/1
    tissue mask) this is a *normalised convolution* (Knutsson & Westin 1993):
    ``y = G * (w x) / G * w`` — pixels with weight 0 (vessels, background) neither contribute to
    their neighbours nor are changed themselves (they keep ``x``), so smoothing does not spread a
    vessel's enhancement into tissue or blur tissue across the brain edge.
    """
    if sigma_px <= 0:
        return x
    if weights is not None:
        # Zero padding is exact here (the weights say what is outside), so each axis is one banded
        # matrix product: far faster on CPU than a one-channel conv2d over every frame.
        w = weights.to(x.dtype)
        w3 = w.reshape(-1, w.shape[-2], w.shape[-1])
        rows = torch.nonzero(w3.amax((0, 2)) > 0).flatten()
        cols = torch.nonzero(w3.amax((0, 1)) > 0).flatten()
        if rows.numel() == 0:
            return x
        # only the bounding box of the weighted pixels changes: crop to it
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        xc, wc = x[..., r0:r1, c0:c1], w[..., r0:r1, c0:c1]
        g_h = _gaussian_band(r1 - r0, sigma_px, x.dtype, x.device)
        g_w = _gaussian_band(c1 - c0, sigma_px, x.dtype, x.device)
        num = g_h @ (xc * wc) @ g_w
        den = g_h @ wc @ g_w
        keep = (wc > 0) & (den > 1e-3)
        out = x.clone()
        out[..., r0:r1, c0:c1] = torch.where(keep, num / den.clamp_min(1e-3), xc)
        return out
    g = _gaussian_taps(sigma_px, x.dtype, x.device)
    radius = g.shape[0] // 2
    shape = x.shape
    h, w = shape[-2:]
    y = x.reshape(-1, 1, h, w)
    pad_h, pad_w = min(radius, h - 1), min(radius, w - 1)
    y = torch.nn.functional.pad(y, (pad_w, pad_w, 0, 0), mode="reflect")
    y = torch.nn.functional.conv2d(y, g[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    y = torch.nn.functional.pad(y, (0, 0, pad_h, pad_h), mode="reflect")
    y = torch.nn.functional.conv2d(y, g[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))
    return y.reshape(shape)


def _gaussian_taps(sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised Gaussian kernel ``(2r+1,)``, radius ``r = ceil(3 σ)`` (at least 1)."""
    radius = max(1, int(math.ceil(3 * sigma_px)))
    g = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=device, dtype=dtype) / sigma_px) ** 2)
    return g / g.sum()


def _gaussian_band(n: int, sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, n)`` symmetric banded matrix of :func:`_gaussian_taps`, zero outside the image."""
    g = _gaussian_taps(sigma_px, dtype, device)
    radius = g.shape[0] // 2
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return torch.where(d.abs() <= radius, g[(d + radius).clamp(0, 2 * radius)], torch.zeros((), dtype=dtype,
                                                                                           device=device))


def reference_curve(frames: torch.Tensor, top_frac: float = 0.01, min_pixels: int = 5) -> torch.Tensor:
    """Mean ``(T,)`` curve of the most enhancing curves of ``frames`` ``(P, T)`` (max - first frame).

    The top ``top_frac`` (at least ``min_pixels``) are mostly vessels, so the mean sees the bolus
    arrive at the earliest (arterial) time.
    """
    enh = frames.max(dim=-1).values - frames[..., 0]
    n = int(min(frames.shape[0], max(min_pixels, round(top_frac * frames.shape[0]))))
    idx = torch.topk(enh, n).indices
    return frames[idx].mean(0)


def concentration_from_hu(
    frames: torch.Tensor,
    times_s: torch.Tensor,
    arrival_index: int | None = None,
    reference: torch.Tensor | None = None,
    margin_frames: int = 1,
    k_sigma: float = 3.0,
    min_rise_frac: float = 0.05,
    temporal_sigma_s: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Enhancement curves (HU over a per-pixel pre-bolus baseline).

    Args:
        frames: ``(..., T)`` HU curves (flatten images to pixels first; see
            :func:`gaussian_smooth_space` for optional in-plane smoothing beforehand).
        times_s: ``(T,)`` or ``(..., T)`` frame times (s), strictly increasing, any spacing.
        arrival_index: first frame of the bolus if known; otherwise detected with
            :func:`detect_arrival` on ``reference`` (or on :func:`reference_curve` of ``frames``).
        reference: ``(T,)`` curve to detect arrival on (e.g. an AIF in HU).
        margin_frames: frames dropped before the arrival for safety (the bolus may reach some
            pixels up to a frame before the reference curve shows it). At least one baseline frame
            is always kept.
        k_sigma, min_rise_frac: arrival thresholds (see :func:`detect_arrival`).
        temporal_sigma_s: optional Gaussian smoothing of the enhancement in seconds (0 = off).

    Returns:
        ``(conc, baseline, arrival_index)``: ``conc`` ``(..., T)`` enhancement (HU), ``baseline``
        ``(...)`` HU, and the detected/used arrival index.
    """
    if frames.shape[-1] < 2:
        raise ValueError(f"need at least 2 frames to find a baseline, got {frames.shape[-1]}")
    t = _as_times(times_s, frames)
    if arrival_index is None:
        ref = reference
        if ref is None:
            flat = frames.reshape(-1, frames.shape[-1])
            ref = reference_curve(flat)
        t_ref = t if t.dim() == 1 else t.reshape(-1, t.shape[-1])[0]
        arrival_index = detect_arrival(ref, t_ref, k_sigma, min_rise_frac)
    n_base = int(max(1, min(arrival_index - margin_frames, frames.shape[-1] - 1)))
    baseline = frames[..., :n_base].mean(-1)
    conc = frames - baseline[..., None]
    if temporal_sigma_s > 0:
        conc = gaussian_smooth_time(conc, t, temporal_sigma_s)
    return conc, baseline, int(arrival_index)


def uniform_grid(t_end_s: float, dt_s: float, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform times ``0, dt, 2dt, ...`` covering ``[0, t_end_s]`` (last point >= t_end - dt/2)."""
    if dt_s <= 0:
        raise ValueError(f"the deconvolution time step must be > 0 s, got {dt_s}")
    n = int(math.floor(t_end_s / dt_s + 0.5)) + 1
    return torch.arange(max(n, 2), device=device, dtype=dtype) * dt_s


def interp_matrix(times_s: torch.Tensor, grid_s: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation weights ``W`` ``(L, T)``: ``y_grid = W @ y_frames`` for curves on ``times_s``.

    Grid points before the first frame take the first frame's value (enhancement is ~0 there), points
    after the last frame hold the last value.
    """
    t = times_s.to(grid_s.dtype)
    n_t = t.shape[0]
    idx = torch.searchsorted(t.contiguous(), grid_s.contiguous()).clamp(1, n_t - 1)
    t0, t1 = t[idx - 1], t[idx]
    w = ((grid_s - t0) / (t1 - t0)).clamp(0.0, 1.0)
    mat = torch.zeros(grid_s.shape[0], n_t, dtype=grid_s.dtype, device=grid_s.device)
    rows = torch.arange(grid_s.shape[0], device=grid_s.device)
    mat[rows, idx - 1] += 1.0 - w
    mat[rows, idx] += w
    return mat


def resample_uniform(x: torch.Tensor, times_s: torch.Tensor, grid_s: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``x`` ``(..., T)`` sampled at ``times_s`` ``(T,)`` onto ``grid_s`` ``(L,)``."""
    w = interp_matrix(_as_times(times_s, grid_s), grid_s).to(x.dtype)
    return x @ w.T
