"""Arterial input function (AIF) and venous output function (VOF) selection.

Automatic selection follows the criteria used by most automatic CTP/DSC AIF methods (Mouridsen et
al., MRM 2006;55:524; Peruzzo et al., Comput Methods Programs Biomed 2011;104:e148; Fieselmann et
al. 2011, §5.1): an arterial curve arrives **early**, peaks **high**, is **narrow** (small full
width at half maximum) and **smooth**. Candidates are the most enhancing pixels inside the head
(not only the brain mask: large vessels are often excluded from it); each feature is standardised
robustly (median / MAD) over the candidates and combined into one score

    score = z(peak) - z(arrival) - z(fwhm) - 0.5 z(roughness),

pixels that peak low (below ``min_peak_frac`` of the ``n_aif``-th highest peak), too late (more
than ``max_late_s`` after the early (10th percentile) remaining peaks) or are too rough (roughness above
``max_roughness``) are excluded; of the rest only the **earliest arrivals** are AIF candidates — those
whose bolus arrives (:func:`stm_dlp.curves.rise_time` of the smoothed curve, searched backwards from the
peak) within ``early_window_s`` of the ``max(2, n_aif // 4)``-th earliest; near bone too, see
``aif_allowed`` — and the AIF is the mean of the ``n_aif`` best-scoring of them (resampled from their real
frame times onto the uniform grid).

The arrival window is what keeps the sinus out when the arteries are partial-volumed. On pixels of
3 mm (the ribbon phantom resampled to the model's grid) its arteries (1.6-4 mm) read 20-50 % of their
enhancement (peaks 100-250 HU) beside a full-volume sinus of 250-430 HU that arrives 2.5-3 s later and
peaks 3-5 s later: ``z(peak)`` outweighs ``z(arrival)`` and ``z(fwhm)``, ``max_late_s`` (6 s) does not
exclude it, and in 3 of 6 studies the AIF was mostly sinus (arrival +1.3..+3.1 s late; TMAX biased
-2 s in normal tissue and -5 s in lesions). The arteries' own arrivals spread by < 0.6 s. The 2-pixel
bone margin of :func:`stm_dlp.perfusion.maps.choose_aif` (6 mm there) leaves too few allowed arteries
to outnumber the sinus, hence the window is set on every plausible candidate (docs/calc/issue14_targets.md §4).

The VOF (superior sagittal sinus) is the mean of the ``n_vof`` candidates with the highest peak
among those that peak at least ``vof_min_lag_s`` after the AIF and reach half its peak. Ranking by
peak rather than by area matters with noise: the area's noise is dominated by the pre-bolus baseline
error times the scan duration, so the largest-area pixels are the ones whose baseline came out low,
and their area overestimates the sinus's (phantom, 3 / 6 HU: VOF area +7..11 % / +14..21 % ranked by
area, +3..5 % / +7..10 % ranked by peak).

**Partial-volume correction** (``pv_correction=True``): small arteries are partly volume-averaged
with tissue, which lowers the AIF and inflates CBF/CBV, whereas the large sinus is not; since
tracer is conserved, the AIF and VOF areas should be equal (Fieselmann 2011, §5.2; Bleeker et al.,
MRM 2011), so the AIF is scaled by ``max(1, area(VOF) / area(AIF))`` (capped at ``max_pv_scale``; the areas
cover the same stretch of the bolus, :func:`lag_matched_areas`, so a scan that ends on the sinus's
down-slope does not hide the partial volume);
it is never scaled down (a smaller VOF area means the VOF, not the AIF, is partial-volumed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from stm_dlp.curves import rise_time
from stm_dlp.perfusion.concentration import despike_smooth, interp_matrix


@dataclass
class AIFSelection:
    """A chosen AIF (and VOF), all curves on the uniform deconvolution grid.

    Attributes:
        curve: ``(L,)`` AIF enhancement (HU) used for deconvolution (after partial-volume scaling).
        curve_raw: ``(L,)`` AIF before scaling.
        grid_s: ``(L,)`` the uniform grid (s from the study's first frame).
        pixels: chosen AIF pixels ``(slice, row, col)`` (empty for a user curve).
        scores: score of each chosen pixel (NaN-free; 0 for user-given pixels).
        vof_curve: ``(L,)`` VOF or ``None``.
        vof_pixels: chosen VOF pixels.
        pv_scale: factor applied to ``curve_raw`` (1.0 when no correction).
        source: ``"auto"``, ``"pixels"`` or ``"curve"``.
        fallback: ``None`` when the first automatic choice was used; otherwise ``{"used": "relaxed" |
            "reference", "tried": [why each earlier choice was unusable]}``
            (:func:`stm_dlp.perfusion.maps.choose_aif`).
    """

    curve: torch.Tensor
    curve_raw: torch.Tensor
    grid_s: torch.Tensor
    pixels: list[tuple[int, int, int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    vof_curve: torch.Tensor | None = None
    vof_pixels: list[tuple[int, int, int]] = field(default_factory=list)
    pv_scale: float = 1.0
    source: str = "auto"
    fallback: dict | None = None

    def to_dict(self) -> dict:
        """JSON-friendly summary (lists of floats / ints)."""
        return {
            "source": self.source,
            "fallback": self.fallback,
            "pixels_slice_row_col": [list(p) for p in self.pixels],
            "scores": [round(float(s), 4) for s in self.scores],
            "vof_pixels_slice_row_col": [list(p) for p in self.vof_pixels],
            "pv_scale": round(float(self.pv_scale), 4),
            "grid_s": [round(float(t), 4) for t in self.grid_s.cpu()],
            "aif_hu": [round(float(v), 3) for v in self.curve.cpu()],
            "aif_raw_hu": [round(float(v), 3) for v in self.curve_raw.cpu()],
            "vof_hu": None if self.vof_curve is None else [round(float(v), 3) for v in self.vof_curve.cpu()],
        }


def _time_shares(times: torch.Tensor) -> torch.Tensor:
    """Trapezoid weight of each sample ``(P, T)``: half the distance between its neighbours."""
    gaps = torch.diff(times, dim=-1)
    share = torch.zeros_like(times)
    share[..., :-1] += 0.5 * gaps
    share[..., 1:] += 0.5 * gaps
    return share


def curve_features(conc: torch.Tensor, times: torch.Tensor) -> dict[str, torch.Tensor]:
    """Shape features of enhancement curves on their real (possibly irregular) times.

    Args:
        conc: ``(P, T)`` enhancement (HU).
        times: ``(P, T)`` or ``(T,)`` frame times (s).
    Returns:
        dict of ``(P,)`` tensors: ``peak`` (HU), ``t_peak`` (s), ``arrival`` (s, first sample above 10 %
        of the peak), ``fwhm`` (s, time spent above half the peak), ``area`` (HU·s, trapezoid) and
        ``roughness`` (mean squared second difference / peak², dimensionless) and ``support`` (the
        larger of the two frames next to the peak, / peak: a bolus, even sampled every 3 s, keeps
        a neighbour well above a quarter of its peak; a one-frame spike — motion bringing bone into
        the pixel — does not).
    """
    t = times.to(conc.dtype).expand_as(conc)
    peak, ipk = conc.max(-1)
    t_peak = t.gather(-1, ipk[:, None])[:, 0]
    safe = peak.clamp_min(1e-6)[:, None]
    rel = conc / safe
    ar = torch.arange(conc.shape[-1], device=conc.device)[None]
    above10 = (rel >= 0.1) & (ar <= ipk[:, None])
    first = torch.where(above10, ar, torch.full_like(ar, conc.shape[-1])).min(-1).values.clamp(max=conc.shape[-1] - 1)
    arrival = t.gather(-1, first[:, None])[:, 0]
    share = _time_shares(t)
    fwhm = ((rel >= 0.5).to(conc.dtype) * share).sum(-1)
    area = (conc * share).sum(-1)
    d2 = rel[:, 2:] - 2 * rel[:, 1:-1] + rel[:, :-2] if conc.shape[-1] >= 3 else torch.zeros_like(rel)
    roughness = (d2**2).mean(-1)
    n_t = conc.shape[-1]
    left = rel.gather(-1, (ipk - 1).clamp(min=0)[:, None])[:, 0]
    right = rel.gather(-1, (ipk + 1).clamp(max=n_t - 1)[:, None])[:, 0]
    support = torch.maximum(torch.where(ipk > 0, left, right), torch.where(ipk < n_t - 1, right, left))
    return {"peak": peak, "t_peak": t_peak, "arrival": arrival, "fwhm": fwhm, "area": area,
            "roughness": roughness, "support": support}


def _robust_z(x: torch.Tensor) -> torch.Tensor:
    """``(x - median) / (1.4826 MAD)``, the scale floored at 1 % of ``|median|`` and z clipped to ±10.

    The floor keeps identical candidates (clean phantoms) from producing huge or NaN scores.
    """
    x = x.to(torch.float64)
    med = x.median()
    mad = (x - med).abs().median() * 1.4826
    scale = torch.maximum(mad, 0.01 * med.abs() + 1e-9)
    return torch.nan_to_num((x - med) / scale, 0.0, 10.0, -10.0).clamp(-10.0, 10.0)


def _to_grid(conc: torch.Tensor, times: torch.Tensor, grid_s: torch.Tensor) -> torch.Tensor:
    """Resample each curve ``(P, T)`` (own times ``(P, T)``) onto ``grid_s`` ``(L,)`` → ``(P, L)``."""
    out = torch.empty((conc.shape[0], grid_s.shape[0]), dtype=conc.dtype, device=conc.device)
    uniq, inv = torch.unique(times.to(torch.float64), dim=0, return_inverse=True)
    for u in range(uniq.shape[0]):
        sel = inv == u
        w = interp_matrix(uniq[u], grid_s.to(torch.float64)).to(conc.dtype)
        out[sel] = conc[sel] @ w.T
    return out


#: A bolus rises from :data:`~stm_dlp.curves.ARRIVAL_FRACTION` of its peak to the peak within this multiple of
#: the median rise of the study's brightest candidates (arteries and sinus, 3-12 s); a curve whose "arrival"
#: lies further before its peak is noise over a baseline that came out low (15-30 HU noise: 10-70 s).
MAX_RISE_FACTOR: float = 1.5


def early_arrivals(conc: torch.Tensor, times: torch.Tensor, ok: torch.Tensor, window_s: float,
                   min_count: int = 2, n_bright: int = 8) -> torch.Tensor:
    """``(P,)`` bool: the ``ok`` curves whose bolus arrives within ``window_s`` of the earliest ones.

    Arrival is :func:`stm_dlp.curves.rise_time` of the smoothed curve (searched backwards from its peak).
    Only **bolus-like** candidates count: the curve rises through the level after its first frame, and
    its rise (arrival to peak) takes at most :data:`MAX_RISE_FACTOR` times the median rise of the
    ``n_bright`` highest-peaking candidates — with 15-30 HU noise and a short baseline, many pixels sit
    above 30 % of their (noise) peak from the start and would otherwise "arrive" first.

    Args:
        conc: ``(P, T)`` enhancement (HU); times ``(P, T)`` (s).
        ok: ``(P,)`` bool, the candidates considered (the others are never early).
        window_s: half-width (s) of the window around the earliest arrival, which is the
            ``min_count``-th earliest of the bolus-like candidates' — not the first, so that one pixel
            whose noise rises early cannot rule out every real artery, and not a percentile, since on a
            small or coarse image the arteries may be a few of the candidates beside dozens of sinus
            pixels. (The window is two-sided: the few candidates before the ``min_count``-th count only
            when close to it.)
        min_count: see ``window_s``.
        n_bright: see above.
    Returns:
        ``ok`` restricted to the early bolus-like candidates (``ok`` itself when fewer than two are
        bolus-like).
    """
    if int(ok.sum()) < 2:
        return ok
    sm = despike_smooth(conc)
    t = times.to(conc.dtype).expand_as(conc)
    arrival = rise_time(sm, t).to(torch.float64)
    t_peak = t.gather(-1, sm.argmax(-1, keepdim=True))[:, 0].to(torch.float64)
    rise = t_peak - arrival
    bright = torch.where(ok, sm.max(-1).values, torch.full_like(sm[:, 0], float("-inf")))
    top = torch.topk(bright, min(max(1, n_bright), int(ok.sum()))).indices
    bolus = ok & (arrival > t[:, 0].to(torch.float64)) & (rise <= MAX_RISE_FACTOR * rise[top].median())
    n_bolus = int(bolus.sum())
    if n_bolus < 2:
        return ok
    first = torch.kthvalue(arrival[bolus], min(max(1, min_count), n_bolus)).values
    return bolus & ((arrival - first).abs() <= window_s)


def _trapz(curve: torch.Tensor, dt: float) -> torch.Tensor:
    return (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) * dt


def lag_matched_areas(aif: torch.Tensor, vof: torch.Tensor, grid_s: torch.Tensor) -> tuple[float, float]:
    """Areas (HU·s) of ``aif`` and ``vof`` ``(L,)`` on ``grid_s`` that cover the same stretch of the bolus:
    the VOF over the whole scan, the AIF up to the scan's end minus the VOF's lag (peak to peak).

    The VOF is the AIF delayed by its transit (and dispersed): its area over ``[0, t_end]`` equals the AIF's
    over ``[0, t_end - lag]``. Comparing whole-scan areas asks the later curve to be as complete as the
    earlier one, which it is not when the scan stops on the sinus's down-slope (the ribbon phantom's
    ``truncated`` studies end at 30 s with the sinus peaking at ~29 s: half its area is missing and the
    partial-volume scale came out 1.0 instead of ~1.5, docs/calc/issue14_targets.md §4)."""
    dt = float(grid_s[1] - grid_s[0])
    lag = max(0.0, float(grid_s[int(vof.argmax())] - grid_s[int(aif.argmax())]))
    keep = grid_s <= grid_s[-1] - lag
    if int(keep.sum()) < 2:
        return 0.0, 0.0
    return float(_trapz(aif[keep], dt)), float(_trapz(vof, dt))


def select_aif(
    conc: torch.Tensor,
    times: torch.Tensor,
    coords: torch.Tensor,
    grid_s: torch.Tensor,
    n_aif: int = 8,
    n_vof: int = 8,
    pool_frac: float = 0.02,
    pool_min: int = 40,
    min_peak_frac: float = 0.5,
    max_late_s: float = 6.0,
    max_roughness: float = 0.5,
    min_support: float = 0.25,
    vof_min_lag_s: float = 1.0,
    pv_correction: bool = True,
    max_pv_scale: float = 3.0,
    aif_allowed: torch.Tensor | None = None,
    early_window_s: float | None = 1.5,
) -> AIFSelection:
    """Automatic AIF (and VOF) from candidate curves.

    Args:
        conc: ``(P, T)`` enhancement (HU) of the candidate-region pixels.
        times: ``(P, T)`` frame times (s, study clock) of each pixel (its slice's times).
        coords: ``(P, 3)`` int ``(slice, row, col)`` of each pixel.
        grid_s: ``(L,)`` uniform deconvolution grid (s).
        n_aif, n_vof: pixels averaged into the AIF / VOF (Mouridsen 2006 used clusters of ~5-10).
        pool_frac, pool_min: candidates = the top ``pool_frac`` (at least ``pool_min``) by peak.
        min_peak_frac: exclude candidates peaking below this fraction of the ``n_aif``-th highest peak
            (an artery is a high peak first; noise can make a dim tissue curve look early and narrow).
        max_late_s: exclude candidates whose peak is this much later than the early candidates' peaks
            (their 10th percentile).
        max_roughness: exclude candidates with a larger roughness (noisy or artefact curves).
        min_support: exclude candidates whose peak's larger neighbour is below this fraction of the
            peak (one-frame spikes), and candidates with a non-positive area.
        vof_min_lag_s: VOF candidates peak at least this long after the AIF.
        pv_correction: scale the AIF area up to the VOF's (see module docstring).
        max_pv_scale: cap of that scale.
        aif_allowed: optional ``(P,)`` bool: candidates that may be AIF pixels (e.g. not next to
            bone, where motion makes curves spike); the others may still be VOF pixels. Ignored when
            it would leave no early AIF candidate (an early artery next to bone is a better AIF than
            the later sinus).
        early_window_s: AIF pixels arrive within this many seconds of the ``max(2, n_aif // 4)``-th
            earliest candidate (:func:`early_arrivals`; see the module docstring); ``None``: no arrival
            window (the score alone). The arteries' arrivals spread by < 0.6 s, the sinus's comes
            2.5-3 s later.

    Raises:
        ValueError: when no pixel enhances (no bolus in the study).
    """
    if conc.shape[0] == 0:
        raise ValueError("no candidate pixels for the arterial input function (empty head/brain mask)")
    t = times.to(conc.dtype).expand_as(conc)
    feats = curve_features(conc, t)
    peak = feats["peak"]
    if float(peak.max()) <= 0:
        raise ValueError("no pixel enhances after the first frame: is there a contrast bolus in this study?")
    n_pool = int(min(conc.shape[0], max(pool_min, round(pool_frac * conc.shape[0]), n_aif + n_vof)))
    pool = torch.topk(peak, n_pool).indices
    f = {k: v[pool] for k, v in feats.items()}
    ref_peak = torch.topk(f["peak"], min(n_aif, n_pool)).values[-1]
    # plausible boluses only: enhancement over the baseline overall (a motion artefact can corrupt
    # the baseline and leave a negative area) and not a one-frame spike
    plausible = (f["area"] > 0) & (f["support"] >= min_support)
    ok = (f["peak"] >= min_peak_frac * ref_peak) & (f["peak"] > 0) & (f["roughness"] <= max_roughness) & plausible
    # "late" relative to the early candidates' peak time: the 10th percentile rather than the minimum,
    # so one pixel whose noise or an impulse peaks early cannot rule out every real artery
    ok &= f["t_peak"] <= f["t_peak"][ok].quantile(0.1) + max_late_s if bool(ok.any()) else ok
    if int(ok.sum()) == 0:
        ok = (f["peak"] > 0) & plausible
    if int(ok.sum()) == 0:
        ok = f["peak"] > 0
    # the earliest arrivals of every plausible candidate (near bone too): the study's first bolus is
    # a fact about the study, not about the pixels allowed — measured on the allowed ones alone, a
    # sinus that outnumbers the few allowed arteries would set the window
    # (the n_aif // 4-th earliest: two when 8 pixels are averaged; more with noise, when n_aif grows)
    if early_window_s is not None:
        ok = early_arrivals(conc[pool], t[pool], ok, early_window_s, min_count=max(2, n_aif // 4), n_bright=n_aif)
    if aif_allowed is not None and bool((ok & aif_allowed[pool]).any()):
        ok = ok & aif_allowed[pool]
    score = _robust_z(f["peak"]) - _robust_z(f["arrival"]) - _robust_z(f["fwhm"]) - 0.5 * _robust_z(f["roughness"])
    score = torch.where(ok, score, torch.full_like(score, -1e9))
    n_take = int(min(n_aif, int(ok.sum())))
    best = torch.topk(score, n_take).indices
    chosen = pool[best]
    aif_raw = _to_grid(conc[chosen], t[chosen], grid_s).mean(0)

    # VOF: later-peaking, high curves among the remaining candidates (by peak, see module docstring).
    vof_curve, vof_pixels, pv_scale = None, [], 1.0
    aif_tpk = float(f["t_peak"][best].median())
    aif_peak = float(f["peak"][best].mean())
    rest = torch.ones(n_pool, dtype=torch.bool, device=conc.device)
    rest[best] = False
    vsel = rest & (f["t_peak"] >= aif_tpk + vof_min_lag_s) & (f["peak"] >= 0.5 * aif_peak)
    vsel &= (f["roughness"] <= max_roughness) & plausible
    if n_vof > 0 and int(vsel.sum()) > 0:
        vpeak = torch.where(vsel, f["peak"], torch.full_like(f["peak"], float("-inf")))
        vbest = torch.topk(vpeak, int(min(n_vof, int(vsel.sum())))).indices
        vchosen = pool[vbest]
        vof_curve = _to_grid(conc[vchosen], t[vchosen], grid_s).mean(0)
        vof_pixels = [tuple(int(v) for v in coords[i]) for i in vchosen.cpu()]
        a_area, v_area = lag_matched_areas(aif_raw, vof_curve, grid_s)
        if pv_correction and a_area > 0 and v_area > 0:
            pv_scale = float(min(max(1.0, v_area / a_area), max_pv_scale))
    return AIFSelection(
        curve=aif_raw * pv_scale,
        curve_raw=aif_raw,
        grid_s=grid_s,
        pixels=[tuple(int(v) for v in coords[i]) for i in chosen.cpu()],
        scores=[float(v) for v in score[best].cpu()],
        vof_curve=vof_curve,
        vof_pixels=vof_pixels,
        pv_scale=pv_scale,
        source="auto",
    )


def aif_from_pixels(conc: torch.Tensor, times: torch.Tensor, pixels: Sequence[Sequence[int]],
                    grid_s: torch.Tensor) -> AIFSelection:
    """AIF = mean of user-chosen pixels' curves ``conc`` ``(P, T)`` (times ``(P, T)``), no PV scaling."""
    curve = _to_grid(conc, times.to(conc.dtype).expand_as(conc), grid_s).mean(0)
    return AIFSelection(curve=curve, curve_raw=curve, grid_s=grid_s,
                        pixels=[tuple(int(v) for v in p) for p in pixels], scores=[0.0] * len(pixels),
                        source="pixels")


def aif_from_curve(curve: torch.Tensor, times_s: torch.Tensor, grid_s: torch.Tensor) -> AIFSelection:
    """AIF given as enhancement values ``(T',)`` at ``times_s`` ``(T',)`` (study clock), resampled."""
    if curve.shape != times_s.shape or curve.dim() != 1:
        raise ValueError(f"an AIF curve needs one value per time point, got {tuple(curve.shape)} values "
                         f"and {tuple(times_s.shape)} times")
    if not bool(torch.all(torch.diff(times_s) > 0)):
        raise ValueError("the AIF curve's times must be strictly increasing")
    w = interp_matrix(times_s.to(torch.float64), grid_s.to(torch.float64)).to(curve.dtype)
    g = w @ curve
    return AIFSelection(curve=g, curve_raw=g, grid_s=grid_s, source="curve")
