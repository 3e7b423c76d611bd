"""From HU frames to contrast-enhancement ("concentration") curves, on the real frame times.

CT attenuation rises linearly with iodine concentration (about 25 HU per mg I/ml at 80 kVp; Miles
1991), so the enhancement over the pre-contrast baseline, in HU, *is* the concentration up to a
constant that cancels in deconvolution (:mod:`stm_dlp.perfusion.physics`).

Steps offered here (all pure torch, any device, any leading dims; times may be irregular):

* :func:`detect_arrival` — bolus arrival on a reference curve: the first frame of the *sustained*
  rise that ends at the peak, above ``baseline + max(k_sigma * sigma, min_rise_frac * rise)``,
  searched backwards from the peak on the running median of 3; ``sigma`` is a robust noise estimate
  (:func:`curve_noise`), so a single noisy frame cannot trigger it. :func:`study_arrival` does it
  for a whole study (reference = the study's most enhancing pixels) and gives each slice's
  pre-bolus frame count.
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
from dataclasses import dataclass

import torch

from stm_dlp.curves import rise_time


def _as_times(times_s: torch.Tensor | object, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(times_s, device=like.device).to(like.dtype)


def median3(x: torch.Tensor) -> torch.Tensor:
    """Running median of 3 along the last axis: removes one-frame spikes, keeps edges.

    The ends follow Tukey's end-point rule, ``m_0 = median(x_0, m_1, 3 m_1 - 2 m_2)``, so a spike in
    the first or last frame is removed too (replicated ends would keep it).
    """
    if x.shape[-1] < 3:
        return x

    med = _med3
    m = x.clone()
    m[..., 1:-1] = med(x[..., :-2], x[..., 1:-1], x[..., 2:])
    if x.shape[-1] >= 4:
        m[..., 0] = med(x[..., 0], m[..., 1], 3 * m[..., 1] - 2 * m[..., 2])
        m[..., -1] = med(x[..., -1], m[..., -2], 3 * m[..., -2] - 2 * m[..., -3])
    return m


def despike_smooth(x: torch.Tensor) -> torch.Tensor:
    """Curves ``(..., T)`` through :func:`median3` then a [1, 2, 1] / 4 filter (ends replicated): a
    one-frame spike or noise excursion is removed, not halved, so it can pass neither for a vessel's peak
    nor for a bolus arrival (the arterial reference and the calc's AIF arrival window use it)."""
    if x.shape[-1] < 3:
        return x
    m = median3(x)
    padded = torch.cat([m[..., :1], m, m[..., -1:]], dim=-1)
    return 0.25 * padded[..., :-2] + 0.5 * padded[..., 1:-1] + 0.25 * padded[..., 2:]


def curve_noise(x: torch.Tensor) -> torch.Tensor:
    """Robust per-frame noise level ``(...)`` of curves ``(..., T)``: 1.4826 MAD of second differences / √6.

    Second differences cancel the slowly varying signal (baseline, tissue bolus), so the estimate does
    not need to know where the bolus is; the MAD ignores the few frames where the signal bends (the
    arterial peak) and impulses.
    """
    if x.shape[-1] < 4:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    d2 = x[..., 2:] - 2 * x[..., 1:-1] + x[..., :-2]
    med = d2.median(-1, keepdim=True).values
    return 1.4826 * (d2 - med).abs().median(-1).values / math.sqrt(6.0)


#: Pixels sampled to estimate the study's per-frame noise (deterministic stride).
NOISE_SAMPLE: int = 4096


def noise_sample(frames: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """Curves ``(P, T)`` of up to :data:`NOISE_SAMPLE` pixels of ``region`` (default: pixels whose first
    frame is soft tissue), taken at a deterministic stride without copying the study."""
    s_count, n_t, h, w = frames.shape
    if region is None:
        first = frames[:, 0]
        region = (first > -100) & (first < 150)
    idx = torch.nonzero(region.reshape(-1)).flatten()
    if idx.numel() == 0:
        return frames.new_zeros((0, n_t))
    idx = idx[:: max(1, idx.numel() // NOISE_SAMPLE)]
    x = frames.reshape(s_count, n_t, h * w)
    return x[idx // (h * w), :, idx % (h * w)].to(torch.float64)


def frame_noise(frames: torch.Tensor, region: torch.Tensor | None = None) -> float:
    """The study's per-frame noise (HU): median of :func:`curve_noise` over up to
    :data:`NOISE_SAMPLE` pixels of ``region`` (default: pixels whose first frame is soft tissue)."""
    curves = noise_sample(frames, region)
    return float(curve_noise(curves).median()) if curves.shape[0] else 0.0


def trimmed_mean(x: torch.Tensor, dim: int, trim: float = 0.1) -> torch.Tensor:
    """Mean along ``dim`` without the lowest and highest ``trim`` fraction of the values (robust to impulses)."""
    n = x.shape[dim]
    k = int(math.floor(trim * n))
    if k == 0 or n - 2 * k < 1:
        return x.mean(dim)
    return x.sort(dim).values.narrow(dim, k, n - 2 * k).mean(dim)


def _med3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # median(a, b, c) = max(min(a, b), min(max(a, b), c)): elementwise, no sort
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def sustained_peak(c: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The highest level curves hold for 3 consecutive frames: ``max_t min(c[t-1], c[t], c[t+1])``.

    A bolus holds its level for several frames, an impulse or a motion spike of one or two frames
    does not — so this ranks arteries above spikes, elementwise (no sort). Curves of fewer than 3
    frames: their maximum.
    """
    n = c.shape[dim]
    if n < 3:
        return c.amax(dim)
    lo = torch.minimum(torch.minimum(c.narrow(dim, 0, n - 2), c.narrow(dim, 1, n - 2)), c.narrow(dim, 2, n - 2))
    return lo.amax(dim)


def _enhancement_score(c: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """How strongly curves enhance: their :func:`sustained_peak` over the median of their first 3 frames."""
    n = c.shape[dim]
    if n < 3:
        return c.amax(dim) - c.narrow(dim, 0, 1).squeeze(dim)
    first = _med3(c.select(dim, 0), c.select(dim, 1), c.select(dim, 2))
    return sustained_peak(c, dim) - first


def arrival_details(curve: torch.Tensor, k_sigma: float = 3.0, min_rise_frac: float = 0.05,
                    times_s: torch.Tensor | None = None) -> dict:
    """The sustained-rise rule of :func:`detect_arrival` on ``curve`` ``(T,)``: a dict with ``index``
    (first bolus frame), ``baseline_hu``, ``level_hu``, ``noise_hu``, ``amplitude_hu`` and ``peak_index``."""
    c = torch.nan_to_num(curve.detach().to(torch.float64).cpu())
    n_t = c.shape[-1]
    if n_t < 3:
        return {"index": 1, "baseline_hu": float(c[0]), "level_hu": float(c[0]), "noise_hu": 0.0,
                "amplitude_hu": float(c.max() - c[0]), "peak_index": int(c.argmax())}
    s = median3(c)
    p = int(torch.argmax(s))
    sigma = float(curve_noise(c))
    lo_pre = float(s[: p + 1].min())
    half = 0.5 * (lo_pre + float(s[p]))
    below = torch.nonzero(s[:p] <= half).flatten()
    i_half = int(below[-1]) if below.numel() else 0
    b = float(c[: max(i_half, 1)].quantile(0.5))  # frames before the half-way crossing: the pre-bolus level
    amp = max(float(s[p]) - b, 0.0)
    level = b + max(k_sigma * sigma, min_rise_frac * amp)
    j = p
    while j > 0 and float(s[j - 1]) > level:
        j -= 1
    # then down to the foot of the rise: while the raw curve keeps falling and stays above a low level
    # (three noise sigmas, 1 % of the rise), so a slow (tissue-like) rise is not cut at its 5 % point.
    # Raw, not median-3, values: next to the rise the running median is the larger of two noisy
    # pre-bolus frames, which would pass the level far more often than one frame does.
    foot = b + max(k_sigma * sigma, 0.01 * amp)
    while j > 0 and foot < float(c[j - 1]) < float(c[j]):
        j -= 1
    # a slow (sigmoid) rise, as of a population AIF, is still under the level for seconds after it
    # began: the rising edge through its 20 % and 50 % points, extrapolated back to the baseline,
    # gives the foot, and frames from the foot on are not baseline either
    t = (torch.arange(n_t, dtype=torch.float64) if times_s is None
         else torch.as_tensor(times_s, dtype=torch.float64).detach().cpu().reshape(-1))

    def crossing(frac: float) -> float | None:
        lv = b + frac * amp
        for i in range(max(j, 1), p + 1):
            if float(s[i]) >= lv > float(s[i - 1]):
                return float(t[i - 1] + (lv - s[i - 1]) / (s[i] - s[i - 1]) * (t[i] - t[i - 1]))
        return None

    t20, t50 = crossing(0.2), crossing(0.5)
    if amp > 0 and t20 is not None and t50 is not None and t50 > t20:
        t_foot = t20 - (t50 - t20) * (0.2 / 0.3)
        j = min(j, int((t < t_foot - 1e-9).sum()))
    return {"index": int(min(max(j, 1), n_t - 1)), "baseline_hu": b, "level_hu": level, "noise_hu": sigma,
            "amplitude_hu": amp, "peak_index": p}


def detect_arrival(
    curve: torch.Tensor,
    times_s: torch.Tensor | None = None,
    k_sigma: float = 3.0,
    min_rise_frac: float = 0.05,
) -> int:
    """Index of the first frame of the bolus rise on one reference curve (frames before it are pre-bolus).

    The rise is the **sustained** run of frames above a noise-scaled level that ends at the peak,
    followed *backwards from the peak* on the curve's running median of 3 (:func:`median3`):

    * ``level = b + max(k_sigma * sigma, min_rise_frac * (peak - b))``, where ``sigma`` is the robust
      per-frame noise (:func:`curve_noise`) and ``b`` the median of the frames before the curve's
      half-way crossing (the pre-bolus level);
    * walking back from the peak, the first frame of the rise is the earliest frame of the unbroken
      run above ``level``.

    A single noisy or spiking frame cannot trigger it: an early spike is separated from the peak by
    frames below the level (and the running median removes one-frame spikes anyway), and noise that
    lifts the first frames of a few pixels does not move the run that ends at the peak.

    Args:
        curve: ``(T,)`` HU (or enhancement) of a curve that sees the bolus early and clearly (e.g. the
            mean of the most enhancing pixels, or an AIF).
        times_s: ``(T,)`` frame times (s) for the foot of a slow rise (default: frame indices).
        k_sigma: level in units of the noise.
        min_rise_frac: level as a fraction of the peak enhancement (floor for clean curves).

    Returns:
        ``i`` in ``[1, T-1]``: frames ``0 .. i-1`` are pre-bolus.
    """
    return int(arrival_details(curve, k_sigma, min_rise_frac, times_s)["index"])


@dataclass
class BolusArrival:
    """The study's bolus arrival (:func:`study_arrival`).

    Attributes:
        n_baseline: pre-bolus frame count per slice (>= 1): every frame before the arrival.
        arrival_time_s: time (study clock, as given) of the first frame of the rise.
        reference: ``(L,)`` reference curve (HU) the arrival was detected on, at ``reference_times_s``.
        noise_hu: robust per-frame noise of the reference curve.
        level_hu, baseline_hu, amplitude_hu: the detection level, pre-bolus level and rise of the reference.
        n_pixels: pixels averaged into the reference.
    """

    n_baseline: list[int]
    arrival_time_s: float
    reference: torch.Tensor
    reference_times_s: torch.Tensor
    noise_hu: float
    level_hu: float
    baseline_hu: float
    amplitude_hu: float
    n_pixels: int

    def to_dict(self) -> dict:
        return {"n_baseline": list(self.n_baseline), "arrival_time_s": round(self.arrival_time_s, 3),
                "reference_noise_hu": round(self.noise_hu, 3), "reference_level_hu": round(self.level_hu, 2),
                "reference_baseline_hu": round(self.baseline_hu, 2),
                "reference_amplitude_hu": round(self.amplitude_hu, 2), "reference_pixels": self.n_pixels}


#: Candidates for the arrival reference: pixels whose early frames are in this HU range (no air, no
#: bone: a moving skull edge "enhances" by hundreds of HU) ...
REFERENCE_HU_RANGE: tuple[float, float] = (-100.0, 150.0)
#: ... and farther than this fraction of the image size from bone (the head may move that much).
BONE_MARGIN_FRAC: float = 0.04
#: The arrival reference's pool keeps only pixels whose enhancement score is at least this many per-frame
#: noise levels (:func:`frame_noise`) when ``min_pixels`` do, else the ``min_pixels`` strongest. At 6 the
#: pool of a 30 HU classic study with impulses shrank to its 32 strongest and the baseline lost a frame.
POOL_NOISE_GATE: float = 5.0


def study_arrival(
    frames: torch.Tensor,
    times_s: torch.Tensor,
    region: torch.Tensor | None = None,
    top_frac: float = 0.01,
    min_pixels: int = 32,
    k_sigma: float = 3.0,
    min_rise_frac: float = 0.05,
) -> BolusArrival:
    """Bolus arrival of a whole study and the pre-bolus frames of each slice.

    The reference curve is the mean of the earliest-rising quarter of the study's most enhancing pixels
    (arteries, and the sinus, which enhances more than partial-volumed arteries but seconds later;
    only curves with at least half the 90th-percentile enhancement compete on earliness),
    ranked by :func:`_enhancement_score` among those scoring :data:`POOL_NOISE_GATE` noise levels or more,
    earliest by :func:`~stm_dlp.curves.rise_time` (searched backwards from each curve's peak, so noise
    before the bolus cannot make a pixel "early"), and averaged with :func:`trimmed_mean` — impulse noise and
    motion spikes in a few frames neither rank a pixel high nor move the mean. Pixels are taken from the
    whole study (slices without a large artery do not get a late, venous arrival of their own);
    the arrival is detected on it with :func:`detect_arrival`, and each slice's baseline is every
    frame acquired before the first frame of the rise.

    Args:
        frames: ``(S, T, H, W)`` HU.
        times_s: ``(S, T)`` frame times (s), strictly increasing per slice.
        region: optional ``(S, H, W)`` bool candidates (default: pixels whose first frames are in
            :data:`REFERENCE_HU_RANGE`).
        top_frac, min_pixels: the reference averages the top ``top_frac`` of the candidates (at least
            ``min_pixels``).
        k_sigma, min_rise_frac: see :func:`detect_arrival`.
    """
    s_count, n_t, h, w = frames.shape
    tt = times_s.to(torch.float64).reshape(s_count, n_t)
    x = frames.reshape(s_count, n_t, h * w)  # a view: no copy of the study
    early = (_med3(x[:, 0], x[:, 1], x[:, 2]) if n_t >= 3 else x[:, 0]).reshape(s_count, h, w)
    if region is None:
        region = (early > REFERENCE_HU_RANGE[0]) & (early < REFERENCE_HU_RANGE[1])
        # and away from bone: a moving skull edge "enhances" by hundreds of HU for as long as the
        # head stays moved — a sustained fake bolus (the arteries are deep inside the head)
        from stm_dlp.perfusion.mask import dilate

        near_bone = dilate(early >= REFERENCE_HU_RANGE[1], max(2, int(round(BONE_MARGIN_FRAC * min(h, w)))))
        if int((region & ~near_bone).sum()) >= min_pixels:
            region = region & ~near_bone
        if int(region.sum()) < min_pixels:
            region = torch.ones_like(region)
    # slice by slice: the score's temporaries of one slice stay in cache, the whole study's would not
    score = torch.cat([torch.where(region[s].reshape(-1), _enhancement_score(x[s], 0),
                                   torch.full((), float("-inf"), dtype=x.dtype, device=x.device))
                       for s in range(s_count)])
    n_cand = int(region.sum())
    n_ref = int(min(n_cand, max(min_pixels, round(top_frac * n_cand))))
    # the pool: twice the reference's size by enhancement; the reference: its earliest-rising half —
    # the sinus and large veins enhance more than partial-volumed arteries but arrive seconds later
    pool = torch.topk(score, int(min(n_cand, 2 * n_ref))).indices
    # ... of the pixels that enhance beyond noise: a pure-noise pixel scores up to ~4 noise levels (the
    # highest 3-frame run over its lowest first frames; the maximum of 2 x 10^5 white-noise curves of 30-60
    # frames); with few arteries against 15 HU noise those filled the pool, and their chance "rise" right
    # after the first frames set the arrival 6-13 s early (ribbon phantom)
    gate = POOL_NOISE_GATE * frame_noise(frames, region)
    strong = pool[score[pool] >= gate]
    pool = strong if strong.numel() >= min_pixels else pool[:min_pixels]  # topk: sorted, the strongest first
    pc = x[pool // (h * w), :, pool % (h * w)].to(torch.float64)  # (P, T)
    p_base = pc[:, : min(3, n_t)].median(-1).values
    amp = (sustained_peak(pc) - p_base).clamp_min(1e-6)
    # when each rises through 30 % of its peak, searched backwards from the peak (rise_time, the arterial
    # reference's rule): a forward search for the first crossing can fire on a noise excursion before the
    # bolus (on the ribbon phantom at 15 HU the gate above made the difference; this rule alone did not)
    t_rise = rise_time(despike_smooth(pc - p_base[:, None]), tt[pool // (h * w)])
    # only clear boluses compete on earliness (a dim curve — tissue, or streak artefacts that vary
    # from frame to frame — crosses 30 % of its "peak" early by chance): at least half the pool's
    # 90th-percentile enhancement
    t_rise = torch.where(amp >= 0.5 * amp.quantile(0.9), t_rise, torch.full_like(t_rise, float("inf")))
    order = torch.argsort(t_rise, stable=True)
    n_keep = max(min(n_ref // 2, int(torch.isfinite(t_rise).sum())), min(min_pixels // 2, pool.numel()), 1)
    top = pool[order[:n_keep]]
    n_ref = int(top.numel())
    slice_of = top // (h * w)
    same_times = bool(torch.all(tt == tt[:1]))
    if same_times:
        ref_t = tt[0]
        ref = trimmed_mean(x[slice_of, :, top % (h * w)].to(torch.float64), 0, 0.2)
    else:  # per-slice times (shuttle mode): each curve onto one grid at the median frame interval
        dt = float(torch.diff(tt, dim=1).median())
        ref_t = torch.arange(float(tt[:, 0].max()), float(tt[:, -1].min()) + 1e-9, max(dt, 1e-3),
                             dtype=torch.float64, device=frames.device)
        if ref_t.numel() < 3:
            ref_t = tt[0]
        on_grid = torch.empty((n_ref, ref_t.numel()), dtype=torch.float64, device=frames.device)
        for s in torch.unique(slice_of).tolist():
            sel = slice_of == s
            on_grid[sel] = x[s, :, top[sel] % (h * w)].T.to(torch.float64) @ interp_matrix(tt[s], ref_t).T
        ref = trimmed_mean(on_grid, 0, 0.2)
    det = arrival_details(ref, k_sigma, min_rise_frac, ref_t)
    j = det["index"]
    t_first = float(ref_t[j])
    t_last_pre = float(ref_t[j - 1])
    n_base = [int(min(max(int((tt[s] <= t_last_pre + 1e-6).sum()), 1), n_t - 1)) for s in range(s_count)]
    return BolusArrival(n_baseline=n_base, arrival_time_s=t_first, reference=ref.to(torch.float32),
                        reference_times_s=ref_t, noise_hu=det["noise_hu"], level_hu=det["level_hu"],
                        baseline_hu=det["baseline_hu"], amplitude_hu=det["amplitude_hu"], n_pixels=n_ref)


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


def gaussian_smooth_space(x: torch.Tensor, sigma_px: float | tuple[float, float],
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """Separable in-plane Gaussian over the last two axes ``(..., H, W)`` (reflect padding).

    ``sigma_px`` is one σ or ``(σ_rows, σ_cols)`` in pixels (anisotropic pixels: a σ in mm divided by
    each axis' spacing); ``<= 0`` returns ``x`` unchanged. Kernel radius ``ceil(3 σ)``.

    With ``weights`` (``(H, W)`` or broadcastable to ``x``'s leading dims + ``(H, W)``, e.g. a 0/1
    tissue mask) this is a *normalised convolution* (Knutsson & Westin 1993):
    ``y = G * (w x) / G * w`` — pixels with weight 0 (vessels, background) neither contribute to
    their neighbours nor are changed themselves (they keep ``x``), so smoothing does not spread a
    vessel's enhancement into tissue or blur tissue across the brain edge.
    """
    s_h, s_w = (float(sigma_px), float(sigma_px)) if isinstance(sigma_px, (int, float)) else map(float, sigma_px)
    if max(s_h, s_w) <= 0:
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
        g_h = _gaussian_band(r1 - r0, s_h, x.dtype, x.device)
        g_w = _gaussian_band(c1 - c0, s_w, x.dtype, x.device)
        num = g_h @ (xc * wc) @ g_w
        den = g_h @ wc @ g_w
        keep = (wc > 0) & (den > 1e-3)
        out = x.clone()
        out[..., r0:r1, c0:c1] = torch.where(keep, num / den.clamp_min(1e-3), xc)
        return out
    shape = x.shape
    h, w = shape[-2:]
    y = x.reshape(-1, 1, h, w)
    if s_w > 0:
        g = _gaussian_taps(s_w, x.dtype, x.device)
        radius = g.shape[0] // 2
        pad_w = min(radius, w - 1)
        y = torch.nn.functional.pad(y, (pad_w, pad_w, 0, 0), mode="reflect")
        y = torch.nn.functional.conv2d(y, g[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    if s_h > 0:
        g = _gaussian_taps(s_h, x.dtype, x.device)
        radius = g.shape[0] // 2
        pad_h = min(radius, h - 1)
        y = torch.nn.functional.pad(y, (0, 0, pad_h, pad_h), mode="reflect")
        y = torch.nn.functional.conv2d(y, g[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))
    return y.reshape(shape)


def _gaussian_taps(sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised Gaussian kernel ``(2r+1,)``, radius ``r = ceil(3 σ)`` (at least 1)."""
    radius = max(1, int(math.ceil(3 * sigma_px)))
    g = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=device, dtype=dtype) / sigma_px) ** 2)
    return g / g.sum()


def _gaussian_band(n: int, sigma_px: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n, n)`` symmetric banded matrix of :func:`_gaussian_taps`, zero outside the image (identity for σ <= 0)."""
    if sigma_px <= 0:
        return torch.eye(n, dtype=dtype, device=device)
    g = _gaussian_taps(sigma_px, dtype, device)
    radius = g.shape[0] // 2
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return torch.where(d.abs() <= radius, g[(d + radius).clamp(0, 2 * radius)], torch.zeros((), dtype=dtype,
                                                                                           device=device))


def reference_curve(frames: torch.Tensor, top_frac: float = 0.01, min_pixels: int = 5) -> torch.Tensor:
    """Mean ``(T,)`` curve of the most enhancing curves of ``frames`` ``(P, T)``.

    Ranked by :func:`_enhancement_score` (spikes and single noisy frames cannot rank a curve high) and
    averaged with :func:`trimmed_mean` (nor move the mean); the top ``top_frac`` (at least
    ``min_pixels``) are mostly vessels, so the mean sees
    the bolus arrive at the earliest (arterial) time.
    """
    n = int(min(frames.shape[0], max(min_pixels, round(top_frac * frames.shape[0]))))
    idx = torch.topk(_enhancement_score(frames), n).indices
    return trimmed_mean(frames[idx], 0)


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
