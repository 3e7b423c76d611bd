"""Perfusion maps from a CTP study by deconvolution — "the calculation approach" (paper §2.1).

:func:`calculate_maps` is the one entry point (used by ``python -m stm_dlp.calc``, by the DataModule
with ``label_source=calc`` and by the benchmarks):

1. brain mask (given, or :func:`auto_brain_mask`); AIF/VOF search region = the mask grown by
   :data:`SEARCH_GROW_FRAC` of the image size (which also fills its holes up to that size), without
   bone and air (large vessels are often cut out of brain masks);
2. per-pixel pre-bolus baseline and enhancement curves (:mod:`~stm_dlp.perfusion.concentration`),
   arrival detected per slice on its most enhancing pixels;
3. AIF (and VOF) selection (:mod:`~stm_dlp.perfusion.aif`) or a user AIF;
   3b. CSF (pre-bolus HU < ``csf_max_hu``) is marked as no tissue; optional in-plane smoothing of
   the tissue curves (default σ = 1.5 px), a normalised convolution inside the brain mask that
   leaves vessels (peak > :data:`VESSEL_PEAK_FRAC` of the AIF's) and CSF out — after AIF selection,
   which wants unsmoothed arteries;
4. tissue curves resampled from their real frame times onto a uniform grid (``dt_s``, default
   0.5 s) and deconvolved (:mod:`~stm_dlp.perfusion.deconv`), in chunks, on CPU or GPU; the
   acquisition's frame interval (band limit, OI sampling) is the **median** interval, i.e. that of
   the fast bolus phase of a two-phase protocol;
5. maps in the units of the model (:data:`stm_dlp.types.UNITS`):

   * ``k = TISSUE_SCALE * CBF * R`` (enhancement is ``TISSUE_SCALE * CBF * (AIF ⊛ R)``, with
     ``TISSUE_SCALE = rho / kappa_H / 6000``; :mod:`stm_dlp.perfusion.physics`), so
     **CBF = max k / TISSUE_SCALE** ml/100g/min (rho = 1.04 g/ml, kappa_H = 0.733);
   * **CBV** (ml/100g) = ``∫C_t / ∫C_a / (60 * TISSUE_SCALE)`` = area ratio * kappa_H / rho * 100
     (``cbv_method="area"``, default: it does not depend on the regularisation) or ``∫k`` scaled the
     same way (``cbv_method="residue"``; for circulant engines both agree up to the truncated DC
     term);
   * **MTT** = CBV / CBF * 60 s (central volume theorem; :func:`stm_dlp.types.mtt_from_cbv_cbf`);
   * **TMAX** (s) = the peak time of ``k``: by default the half-rise time of its leading edge, an
     unbiased estimate of ``argmax k`` (see :class:`~stm_dlp.perfusion.deconv.DeconvParams`).

Pixels outside the mask, and CSF inside it (pre-bolus HU below ``csf_max_hu``), are 0; no NaN or
inf ever leaves this module; negative CBF/CBV/TMAX are
clipped to 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from stm_dlp.perfusion.aif import AIFSelection, aif_from_curve, aif_from_pixels, select_aif
from stm_dlp.perfusion.concentration import (
    detect_arrival,
    gaussian_smooth_space,
    gaussian_smooth_time,
    interp_matrix,
    reference_curve,
    uniform_grid,
)
from stm_dlp.perfusion.deconv import OSVD_THRESHOLDS, Deconvolver, DeconvParams
from stm_dlp.perfusion.physics import TISSUE_SCALE
from stm_dlp.types import mtt_from_cbv_cbf

#: Auto brain mask: mean pre-bolus HU strictly inside this range (brain parenchyma ~20-45 HU,
#: CSF ~0-15 HU; excludes air, fat and bone; Hounsfield scale).
BRAIN_HU_RANGE: tuple[float, float] = (0.0, 80.0)
#: The AIF/VOF search region excludes pre-bolus HU above this (bone, calcification) ...
MAX_VESSEL_BASE_HU: float = 150.0
#: ... and below this (air, fat).
MIN_VESSEL_BASE_HU: float = -50.0
#: The search region is the brain mask grown by this fraction of the image size (~9 mm at a 220 mm
#: field of view), so that vessels cut out of the mask (holes for the arteries, a notch at the brain
#: surface for the superior sagittal sinus, the VOF) are candidates.
SEARCH_GROW_FRAC: float = 0.04
#: With spatial smoothing, brain pixels whose peak enhancement exceeds this fraction of the AIF's
#: (unscaled) peak are vessels: left out of the smoothing and kept as they are. Tissue peaks at
#: well under 15 % of the AIF (CBV <= 8 ml/100g), partial-volume arteries far above.
VESSEL_PEAK_FRAC: float = 0.3
#: The CSF test (``csf_max_hu``) looks at the pre-bolus image smoothed this much (px, inside the brain):
#: enough to keep per-pixel noise from punching holes in parenchyma (clinical noise ~5 HU on a
#: 4-frame baseline -> ~2 HU), little enough that CSF one pixel from tissue still counts as CSF.
CSF_SMOOTH_PX: float = 0.7
#: More than this fraction of the brain mask below ``csf_max_hu`` means the data are not head-CT HU
#: (ventricles and sulci are ~5-15 % of a slice): refuse rather than return empty maps.
CSF_MAX_FRAC: float = 0.5
#: Automatic AIF/VOF candidates: the most enhancing AIF_POOL_FRAC of the search region (at least
#: AIF_POOL_MIN pixels); arteries and the sinus are a few per mille of a head slice.
AIF_POOL_FRAC: float = 0.02
AIF_POOL_MIN: int = 40


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``(..., H, W)`` by a ``(2r+1)²`` square (two separable max-pools)."""
    if radius <= 0:
        return mask
    x = mask.to(torch.float32).reshape(-1, 1, *mask.shape[-2:])
    k = 2 * radius + 1
    x = torch.nn.functional.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    x = torch.nn.functional.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))
    return x.reshape(mask.shape) > 0.5


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return ~_dilate(~mask, radius)


def auto_brain_mask(baseline_hu: torch.Tensor, hu_range: tuple[float, float] = BRAIN_HU_RANGE,
                    erode_px: int = 1) -> torch.Tensor:
    """Brain mask ``(S, H, W)`` from the pre-bolus image: ``lo < HU < hi``, eroded by ``erode_px``.

    The erosion removes the partial-volume rim next to the skull. Holes (vessels, calcifications)
    are kept as holes; CSF (0-15 HU) is inside — its CBF/CBV come out ~0.
    """
    lo, hi = hu_range
    m = (baseline_hu > lo) & (baseline_hu < hi)
    return _erode(m, erode_px) if erode_px > 0 else m


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    arr = np.asarray(x)
    if not arr.flags.writeable:  # read-only (memory-mapped, cached) arrays: torch wants a writable buffer
        arr = arr.copy()
    return torch.as_tensor(arr, device=device).to(dtype)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available else CPU; otherwise ``torch.device(device)``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA GPU is available; use device=cpu or auto")
    return dev


def _trapz_grid(x: torch.Tensor, dt: float) -> torch.Tensor:
    return (x.sum(-1) - 0.5 * (x[..., 0] + x[..., -1])) * dt


def calculate_maps(
    frames: np.ndarray | torch.Tensor,
    times_s: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    method: str = "osvd",
    aif: str | Sequence[Sequence[int]] | np.ndarray | torch.Tensor | dict = "auto",
    *,
    dt_s: float = 0.5,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str = torch.float32,
    threshold: float = 0.2,
    oi_target: float = 0.095,
    thresholds: Sequence[float] = OSVD_THRESHOLDS,
    tikhonov_lambda: float = 0.1,
    aif_weights: str = "rect",
    band_limit: bool = True,
    tmax_method: str = "half_rise",
    cbv_method: str = "area",
    temporal_sigma_s: float = 0.0,
    spatial_sigma_px: float = 1.5,
    n_aif: int = 8,
    n_vof: int = 8,
    pv_correction: bool = True,
    cbf_floor: float = 0.5,
    csf_max_hu: float | None = 15.0,
    chunk_pixels: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """CBV, CBF, MTT and TMAX maps of one study by deconvolution.

    Args:
        frames: ``(S, T, H, W)`` HU (numpy or torch).
        times_s: ``(S, T)`` frame times (s), strictly increasing per slice, any spacing; slices may
            have their own times (the study clock is shared: times are used as given).
        mask: ``(S, H, W)`` bool brain mask, or ``None`` for :func:`auto_brain_mask`.
        method: ``osvd`` (default), ``bcsvd``, ``ssvd`` or ``tikhonov``.
        aif: ``"auto"``; a list of ``(slice, row, col)`` pixels; a curve ``(T,)`` of enhancement (HU)
            at slice 0's times; or ``{"times_s": (T',), "aif": (T',)}`` (enhancement at given times on
            the same clock as ``times_s``).
        dt_s: uniform deconvolution grid step (s).
        device: ``cpu``, ``cuda``, ``auto``; dtype: ``torch.float32`` (default) or ``float64``.
        threshold: ``ssvd``/``bcsvd`` relative SVD threshold (Østergaard 1996; Wu 2003: 0.2).
        oi_target: ``osvd`` oscillation-index target (CT 0.095, MR 0.035).
        thresholds: ``osvd`` candidate thresholds.
        tikhonov_lambda: Tikhonov λ relative to the largest singular value.
        aif_weights: ``rect`` or ``simpson`` (see :func:`~stm_dlp.perfusion.deconv.weighted_aif`).
        band_limit: circulant engines keep only frequencies up to the acquisition's Nyquist
            frequency ``1 / (2 * median frame interval)``.
        tmax_method: ``half_rise`` (default) or ``argmax`` — two estimators of the paper's
            ``TMAX = argmax k`` (see :class:`DeconvParams`; ``python -m experiments.calc_settings``).
        cbv_method: ``area`` (default) or ``residue``.
        temporal_sigma_s: Gaussian smoothing of the curves (tissue and AIF) in seconds (0 = off,
            default: on the phantom it blurs the residue more than it removes noise).
        spatial_sigma_px: in-plane Gaussian smoothing of the tissue curves in pixels (0 = off), a
            normalised convolution inside the brain mask that leaves vessels out (see step 3b).
            Default 1.5: per-pixel CT noise otherwise dominates every map (3 HU phantom noise:
            CBV MAE 1.9 -> 0.5 ml/100g, TMAX 9.0 -> 0.5 s; noise-free cost CBV +0.13 ml/100g;
            ``python -m experiments.calc_settings``).
        n_aif, n_vof, pv_correction: automatic AIF options (:func:`select_aif`).
        cbf_floor: below this CBF (ml/100g/min) TMAX and MTT are set to 0 (no usable residue).
        csf_max_hu: brain pixels whose pre-bolus HU (lightly smoothed, :data:`CSF_SMOOTH_PX`) is below this
            are CSF: left out of the smoothing and 0 in every map, as clinical packages exclude them
            (CSF 0-15 HU, brain parenchyma 20-45 HU). Without it CSF, which has no flow, gets a
            noise-driven TMAX (3 HU phantom: median +7 s, MAE 19 s) that reads like hypoperfusion.
            ``None`` keeps CSF pixels.
        chunk_pixels: pixels deconvolved at once (0: 32768 on CPU, where cache-sized chunks are
            fastest, 2^20 on GPU).
        progress: optional ``callback(done_pixels, total_pixels)``.

    Returns:
        ``(maps, info)``: ``maps`` has ``cbv``, ``cbf``, ``tmax``, ``mtt`` float32 ``(S, H, W)`` numpy
        arrays and ``mask`` bool ``(S, H, W)`` (the mask used); ``info`` is JSON-serialisable: the AIF
        (pixels, scores, curves on the grid, VOF, PV scale), arrival/baseline frames per slice, the
        deconvolution parameters, timings (s) and the device.
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    cbv_method = cbv_method.lower()
    if cbv_method not in ("area", "residue"):
        raise ValueError(f"cbv_method must be 'area' or 'residue', got {cbv_method!r}")
    fr = _as_tensor(frames, dev, dtype)
    if fr.dim() != 4:
        raise ValueError(f"frames must be (slices, frames, rows, cols), got shape {tuple(fr.shape)}")
    s_count, n_t, h, w = fr.shape
    tt = _as_tensor(times_s, dev, torch.float64)
    if tt.dim() == 1:
        tt = tt[None].expand(s_count, n_t)
    if tt.shape != (s_count, n_t):
        raise ValueError(f"times_s must have shape {(s_count, n_t)}, got {tuple(tt.shape)}")
    if n_t < 4:
        raise ValueError(f"a deconvolution needs at least 4 frames, got {n_t}")
    if not bool(torch.all(torch.diff(tt, dim=1) > 0)):
        raise ValueError("frame times must be strictly increasing within each slice")
    t0 = float(tt.min())
    tt = tt - t0

    # 1. arrival per slice (on its most enhancing pixels) and the pre-bolus baseline image.
    arrival, n_base = [], []
    base_img = torch.empty((s_count, h, w), dtype=dtype, device=dev)
    for s in range(s_count):
        flat = fr[s].reshape(n_t, -1).T
        a = detect_arrival(reference_curve(flat), tt[s])
        nb = max(1, min(a - 1, n_t - 1))
        arrival.append(a)
        n_base.append(nb)
        base_img[s] = fr[s, :nb].mean(0)
    if mask is None:
        brain = auto_brain_mask(base_img)
        mask_source = "auto"
    else:
        brain = _as_tensor(mask, dev, torch.float32) > 0.5
        if brain.shape != (s_count, h, w):
            raise ValueError(f"mask must have shape {(s_count, h, w)}, got {tuple(brain.shape)}")
        mask_source = "given"
    grow = max(2, int(round(SEARCH_GROW_FRAC * min(h, w))))
    region = (_dilate(brain, grow) & (base_img > MIN_VESSEL_BASE_HU)
              & (base_img < MAX_VESSEL_BASE_HU)) | brain

    # 2. enhancement curves, slice by slice: (P_s, T) for the region pixels of slice s (flat index),
    # brain pixels first so that step 4 deconvolves contiguous row ranges without another gather.
    flat_idx, conc, n_brain = [], [], []
    for s in range(s_count):
        in_brain = brain[s].reshape(-1)
        idx = torch.cat([torch.nonzero(in_brain).flatten(),
                         torch.nonzero(region[s].reshape(-1) & ~in_brain).flatten()])
        n_brain.append(int(in_brain.sum()))
        c = fr[s].reshape(n_t, -1)[:, idx].T - base_img[s].reshape(-1)[idx][:, None]
        if temporal_sigma_s > 0:
            c = gaussian_smooth_time(c, tt[s].to(dtype), temporal_sigma_s)
        flat_idx.append(idx)
        conc.append(c.contiguous())
    n_region = sum(int(i.numel()) for i in flat_idx)
    if n_region == 0:
        raise ValueError("the brain mask is empty: no pixel to compute perfusion for")
    t_conc = time.perf_counter()

    # 3. AIF (automatic selection sees only the most enhancing candidates, gathered across slices).
    grid = uniform_grid(float(tt[:, -1].max()), dt_s, device=dev)
    frame_dt = float(torch.diff(tt, dim=1).median())
    pool_size = int(min(n_region, max(AIF_POOL_MIN, round(AIF_POOL_FRAC * n_region), n_aif + n_vof)))
    peaks = torch.cat([c.amax(-1) for c in conc])
    slice_of = torch.cat([torch.full((int(i.numel()),), s, device=dev) for s, i in enumerate(flat_idx)])
    local = torch.cat([torch.arange(int(i.numel()), device=dev) for i in flat_idx])
    top = torch.topk(peaks, pool_size).indices
    pool_conc = torch.empty((pool_size, n_t), dtype=dtype, device=dev)
    pool_flat = torch.empty((pool_size,), dtype=torch.long, device=dev)
    for s in range(s_count):
        sel = slice_of[top] == s
        pool_conc[sel] = conc[s][local[top][sel]]
        pool_flat[sel] = flat_idx[s][local[top][sel]]
    pool_coords = torch.stack([slice_of[top], pool_flat // w, pool_flat % w], dim=1)
    aif_sel = _resolve_aif(aif, pool_conc, tt[slice_of[top]], pool_coords, fr, base_img, tt, t0, grid,
                           n_aif, n_vof, pv_correction)
    if temporal_sigma_s > 0 and aif_sel.source != "auto":
        # a user AIF gets the tissue curves' temporal smoothing too: smoothing only one side of the
        # deconvolution would blur the residue and read CBF low.
        aif_sel.curve = gaussian_smooth_time(aif_sel.curve, grid.to(aif_sel.curve.dtype), temporal_sigma_s)
        aif_sel.curve_raw = gaussian_smooth_time(aif_sel.curve_raw, grid.to(aif_sel.curve_raw.dtype),
                                                 temporal_sigma_s)
    aif_grid = aif_sel.curve.to(dtype)
    aif_area = float(_trapz_grid(aif_grid, dt_s))
    if not math.isfinite(aif_area) or aif_area <= 0:
        raise ValueError("the arterial input function has no positive enhancement; choose another AIF")
    t_aif = time.perf_counter()

    # 3b. CSF (no tissue), then the tissue curves' in-plane smoothing (after AIF selection, which
    # wants unsmoothed vessels): a normalised convolution inside the brain mask with vessels and CSF
    # left out, so neither a vessel's enhancement, CSF nor the skull edge leaks into tissue.
    tissue = [conc[s][: n_brain[s]] for s in range(s_count)]
    n_vessel = 0
    if csf_max_hu is not None:
        base_ref = gaussian_smooth_space(base_img, CSF_SMOOTH_PX, brain.to(dtype))
        csf = brain & (base_ref < csf_max_hu)
        if float(csf.sum()) > CSF_MAX_FRAC * float(brain.sum()):
            raise ValueError(
                f"{100 * float(csf.sum()) / float(brain.sum()):.0f} % of the brain mask is below {csf_max_hu:g} HU "
                f"before the bolus (median {float(base_img[brain].median()):.1f}): the frames do not look like "
                "Hounsfield units of a head CT (check the rescale slope/intercept), or pass csf_max_hu=None to "
                "keep low-density pixels")
    else:
        csf = torch.zeros_like(brain)
    if spatial_sigma_px > 0:
        vessel_hu = VESSEL_PEAK_FRAC * float(aif_sel.curve_raw.max())
        for s in range(s_count):
            if n_brain[s] == 0:
                continue
            idx = flat_idx[s][: n_brain[s]]
            not_vessel = tissue[s].amax(-1) < vessel_hu
            n_vessel += int((~not_vessel).sum())
            weights = torch.zeros(h * w, dtype=dtype, device=dev)
            weights[idx] = (not_vessel & ~csf[s].reshape(-1)[idx]).to(dtype)
            enh = fr[s] - base_img[s]
            smoothed = gaussian_smooth_space(enh, spatial_sigma_px, weights.reshape(h, w))
            c = smoothed.reshape(n_t, -1)[:, idx].T
            if temporal_sigma_s > 0:
                c = gaussian_smooth_time(c, tt[s].to(dtype), temporal_sigma_s)
            tissue[s] = c.contiguous()
    t_smooth = time.perf_counter()

    # 4. deconvolution of the brain pixels, slice by slice, in chunks.
    params = DeconvParams(method=method, threshold=threshold, oi_target=oi_target, thresholds=tuple(thresholds),
                          oi_stride=max(1, int(round(frame_dt / dt_s))), tikhonov_lambda=tikhonov_lambda,
                          aif_weights=aif_weights, max_freq_hz=(0.5 / frame_dt) if band_limit else None,
                          tmax_method=tmax_method)
    dec = Deconvolver(aif_grid, dt_s, params)
    trapz_w = torch.full((grid.shape[0],), dt_s, dtype=torch.float64, device=dev)
    trapz_w[0] = trapz_w[-1] = 0.5 * dt_s
    out = {k: torch.zeros((s_count, h * w), dtype=dtype, device=dev) for k in ("cbf", "cbv", "tmax", "thr")}
    total = int(brain.sum())
    done = 0
    if chunk_pixels <= 0:
        chunk_pixels = 1 << 20 if dev.type == "cuda" else 32768
    for s in range(s_count):
        if n_brain[s] == 0:
            continue
        wmat = interp_matrix(tt[s], grid)  # (L, T) float64
        area_w = (wmat.T @ trapz_w).to(dtype)  # (T,): ∫ of the resampled curve
        for start in range(0, n_brain[s], chunk_pixels):
            stop = min(start + chunk_pixels, n_brain[s])
            x = tissue[s][start:stop]
            res = dec.analyse(x, wmat)
            num = x @ area_w if cbv_method == "area" else res["kint"] * aif_area
            pix = flat_idx[s][start:stop]
            out["cbf"][s, pix] = res["kmax"] / TISSUE_SCALE
            out["cbv"][s, pix] = num / aif_area / (60.0 * TISSUE_SCALE)
            out["tmax"][s, pix] = res["tmax_s"].to(dtype)
            out["thr"][s, pix] = res["threshold"].to(dtype)
            done += stop - start
            if progress is not None:
                progress(done, total)
    out = {k: v.reshape(s_count, h, w) for k, v in out.items()}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_dec = time.perf_counter()

    # 5. clean-up: finite, non-negative, zero outside the mask and where there is no flow.
    cbf = torch.nan_to_num(out["cbf"], 0.0, 0.0, 0.0).clamp_min(0.0)
    cbv = torch.nan_to_num(out["cbv"], 0.0, 0.0, 0.0).clamp_min(0.0)
    tmax = torch.nan_to_num(out["tmax"], 0.0, 0.0, 0.0).clamp_min(0.0)
    cbf = torch.where(csf, torch.zeros_like(cbf), cbf)
    cbv = torch.where(csf, torch.zeros_like(cbv), cbv)
    flow = brain & ~csf & (cbf >= cbf_floor)
    tmax = torch.where(flow, tmax, torch.zeros_like(tmax))
    mtt = torch.where(flow, mtt_from_cbv_cbf(cbv, cbf), torch.zeros_like(cbf))
    maps = {
        "cbv": cbv.float().cpu().numpy(),
        "cbf": cbf.float().cpu().numpy(),
        "tmax": tmax.float().cpu().numpy(),
        "mtt": torch.nan_to_num(mtt, 0.0, 0.0, 0.0).float().cpu().numpy(),
        "mask": brain.cpu().numpy(),
    }
    thr_used = out["thr"][brain]
    info: dict[str, Any] = {
        "method": params.method,
        "params": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(params).items()},
                   "dt_s": dt_s, "cbv_method": cbv_method, "band_limit": band_limit,
                   "temporal_sigma_s": temporal_sigma_s, "spatial_sigma_px": spatial_sigma_px,
                   "n_aif": n_aif, "n_vof": n_vof, "pv_correction": pv_correction, "cbf_floor": cbf_floor,
                   "csf_max_hu": csf_max_hu,
                   "dtype": str(dtype).replace("torch.", "")},
        "aif": aif_sel.to_dict(),
        "time_origin_s": t0,
        "median_frame_interval_s": frame_dt,
        "arrival_frame": arrival,
        "baseline_frames": n_base,
        "mask_source": mask_source,
        "n_vessel_pixels_unsmoothed": n_vessel,
        "n_csf_pixels": int(csf.sum()),
        "n_brain_pixels": total,
        "threshold_used": {"mean": float(thr_used.mean()) if thr_used.numel() else 0.0,
                           "median": float(thr_used.median()) if thr_used.numel() else 0.0},
        "device": str(dev),
        "timing_s": {"concentration": round(t_conc - t_start, 4), "aif": round(t_aif - t_conc, 4),
                     "smoothing": round(t_smooth - t_aif, 4), "deconvolution": round(t_dec - t_smooth, 4),
                     "total": round(time.perf_counter() - t_start, 4)},
    }
    return maps, info


def _resolve_aif(aif: Any, conc: torch.Tensor, times_pix: torch.Tensor, coords: torch.Tensor, fr: torch.Tensor,
                 base_img: torch.Tensor, tt: torch.Tensor, t0: float, grid: torch.Tensor, n_aif: int,
                 n_vof: int, pv_correction: bool) -> AIFSelection:
    """Turn the ``aif`` argument of :func:`calculate_maps` into an :class:`AIFSelection`."""
    s_count, n_t, h, w = fr.shape
    if isinstance(aif, str):
        if aif != "auto":
            raise ValueError(f"aif must be 'auto', a pixel list, a curve or a dict; got {aif!r}")
        return select_aif(conc, times_pix, coords, grid, n_aif=n_aif, n_vof=n_vof, pv_correction=pv_correction,
                          pool_frac=1.0)
    if isinstance(aif, dict):
        times = _as_tensor(aif["times_s"], fr.device, torch.float64) - t0
        return aif_from_curve(_as_tensor(aif["aif"], fr.device, torch.float64), times, grid)
    arr = np.asarray(aif.cpu() if isinstance(aif, torch.Tensor) else aif, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 3 and np.allclose(arr, np.round(arr)):
        pix = [tuple(int(v) for v in p) for p in arr]
        for p in pix:
            if not (0 <= p[0] < s_count and 0 <= p[1] < h and 0 <= p[2] < w):
                raise ValueError(f"AIF pixel {p} (slice, row, col) is outside the study of shape "
                                 f"{(s_count, h, w)}")
        sl = torch.tensor([p[0] for p in pix], device=fr.device)
        rr = torch.tensor([p[1] for p in pix], device=fr.device)
        cc = torch.tensor([p[2] for p in pix], device=fr.device)
        curves = fr[sl, :, rr, cc] - base_img[sl, rr, cc][:, None]
        return aif_from_pixels(curves, tt[sl], pix, grid)
    if arr.ndim == 1:
        if arr.shape[0] != n_t:
            raise ValueError(f"an AIF curve must have one value per frame ({n_t}), got {arr.shape[0]}")
        return aif_from_curve(torch.as_tensor(arr, device=fr.device), tt[0], grid)
    raise ValueError("aif must be 'auto', a list of (slice, row, col) pixels, a (T,) curve or "
                     "{'times_s': [...], 'aif': [...]}")
