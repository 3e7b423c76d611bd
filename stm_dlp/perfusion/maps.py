"""Perfusion maps from a CTP study by deconvolution — "the calculation approach" (paper §2.1).

:func:`calculate_maps` is the one entry point (used by ``python -m stm_dlp.calc``, by the DataModule
with ``label_source=calc`` and by the benchmarks). Its options are the fields of :class:`CalcParams`
(pass ``params=CalcParams(...)``, keyword arguments, or both: keywords win). It runs these steps,
each a function of this module:

0. :func:`prepare_inputs` — tensors on the device, times checked; optional rigid **motion
   correction** (:func:`stm_dlp.perfusion.motion.correct_motion`, ``motion=True``): every frame
   registered in-plane to the mean pre-contrast frame before anything else;
1. :func:`find_baseline` — the bolus arrival on a robust reference curve (the study's most
   enhancing pixels, or the user's AIF), a sustained rise searched backwards from the peak
   (:func:`~stm_dlp.perfusion.concentration.study_arrival`); the baseline is **every** pre-bolus
   frame, averaged per pixel without outlier frames (impulses, motion spikes);
2. :func:`brain_and_region` — the brain mask (given, or :func:`~stm_dlp.perfusion.mask.brain_mask`:
   cortex next to the skull kept, noise-robust) and the AIF/VOF search region = the mask grown by
   :data:`SEARCH_GROW_FRAC` of the image size, without bone and air (large vessels are often cut
   out of brain masks);
3. :func:`enhancement_curves` — per-pixel enhancement over the baseline on the real frame times;
4. :func:`choose_aif` — automatic AIF (and VOF) selection (:mod:`~stm_dlp.perfusion.aif`) or the
   user's AIF; an unusable automatic AIF falls back to a relaxed search, then to the arrival
   reference curve — reported in ``info["aif"]["fallback"]`` and logged, never a silent failure;
5. :func:`exclusions` and :func:`smooth_tissue` — CSF (pre-bolus HU < ``csf_max_hu`` on a baseline
   smoothed enough for the study's noise) is no tissue; vessels (peak far above the tissue's, with a
   noise-aware threshold) are left out of the in-plane smoothing of the tissue curves (a
   normalised convolution inside the mask; σ in **mm**, converted with the pixel spacing), which
   runs after AIF selection, which wants unsmoothed arteries; one-frame impulses are removed from
   tissue curves (``despike_sigma``); counts and thresholds are in ``info["exclusions"]``;
6. :func:`deconvolve_tissue` — tissue curves resampled from their real frame times onto a uniform
   grid (``dt_s``, default 0.5 s) and deconvolved (:mod:`~stm_dlp.perfusion.deconv`), in chunks, on
   CPU or GPU; the acquisition's frame interval (band limit, OI sampling) is the **median**
   interval, i.e. that of the fast bolus phase of a two-phase protocol;
7. :func:`finish_maps` — maps in the units of the model (:data:`stm_dlp.types.UNITS`):

   * ``k = TISSUE_SCALE * CBF * R`` (enhancement is ``TISSUE_SCALE * CBF * (AIF ⊛ R)``, with
     ``TISSUE_SCALE = rho / kappa_H / 6000``; :mod:`stm_dlp.perfusion.physics`), so
     **CBF = max k / TISSUE_SCALE** ml/100g/min (rho = 1.04 g/ml, kappa_H = 0.733);
   * **CBV** (ml/100g) = ``∫C_t / ∫C_a / (60 * TISSUE_SCALE)`` = area ratio * kappa_H / rho * 100
     (``cbv_method="area"``, default: it does not depend on the regularisation) or ``∫k`` scaled the
     same way (``cbv_method="residue"``);
   * **MTT** = CBV / CBF * 60 s (central volume theorem; :func:`stm_dlp.types.mtt_from_cbv_cbf`);
   * **TMAX** (s) = the peak time of ``k``: by default its argmax minus the lag that this
     deconvolution gives known (undispersed and dispersed) residues, from a pass of its own —
     tissue curves smoothed less (``tmax_sigma_mm``), a smoother truncation (``tmax_oi_target``) —
     and a 9 x 9 median (see :class:`CalcParams`, :class:`~stm_dlp.perfusion.deconv.DeconvParams`).

Pixels outside the mask, and CSF inside it, are 0; no NaN or inf ever leaves this module; negative
CBF/CBV/TMAX are clipped to 0.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from stm_dlp.perfusion.aif import AIFSelection, aif_from_curve, aif_from_pixels, select_aif
from stm_dlp.perfusion.arterial import scan_window
from stm_dlp.perfusion.concentration import (
    NOISE_SAMPLE,  # noqa: F401  (re-exported)
    BolusArrival,
    arrival_details,
    frame_noise,
    gaussian_smooth_space,
    gaussian_smooth_time,
    interp_matrix,
    median3,
    noise_sample,
    study_arrival,
    sustained_peak,
    uniform_grid,
)
from stm_dlp.perfusion.deconv import OI_TARGET_CT, OSVD_THRESHOLDS, Deconvolver, DeconvParams
from stm_dlp.perfusion.mask import (
    CSF_MAX_FRAC,
    CSF_MAX_SMOOTH_PX,  # noqa: F401  (re-exported: documented CSF constants)
    CSF_NOISE_TARGET_HU,  # noqa: F401
    baseline_image,
    csf_mask,
    dilate,
    fill_holes,
    mask_from_baseline,
    median_filter,
)
from stm_dlp.perfusion.physics import TISSUE_SCALE
from stm_dlp.types import mtt_from_cbv_cbf, pixel_spacing_mm

log = logging.getLogger(__name__)

#: The AIF/VOF search region excludes pre-bolus HU above this (bone, calcification) ...
MAX_VESSEL_BASE_HU: float = 150.0
#: ... and below this (air, fat).
MIN_VESSEL_BASE_HU: float = -50.0
#: The search region is the brain mask grown by this fraction of the image size (~9 mm at a 220 mm
#: field of view), so that vessels cut out of the mask (holes for the arteries, a notch at the brain
#: surface for the superior sagittal sinus, the VOF) are candidates.
SEARCH_GROW_FRAC: float = 0.04
#: Brain pixels whose peak enhancement exceeds this fraction of the AIF's (unscaled) peak are vessels
#: (left out of the smoothing and kept as they are). Tissue peaks at well under 15 % of the AIF
#: (CBV <= 8 ml/100g), partial-volume arteries far above. With noise the threshold is raised to
#: :data:`VESSEL_NOISE_K` noise levels above the brain's median peak (see :func:`exclusions`).
VESSEL_PEAK_FRAC: float = 0.3
VESSEL_NOISE_K: float = 6.0
#: Pixels within this many pixels of bone (pre-bolus HU >= MAX_VESSEL_BASE_HU) are no AIF candidates,
#: and their tissue curves are cleaned of bone leaking in (:func:`clean_bone_leak`).
BONE_MARGIN_PX: int = 2
#: Automatic AIF/VOF candidates: the most enhancing AIF_POOL_FRAC of the search region (at least
#: AIF_POOL_MIN pixels); arteries and the sinus are a few per mille of a head slice.
AIF_POOL_FRAC: float = 0.02
AIF_POOL_MIN: int = 40
#: Pixel spacing assumed when the study's is unknown (mm): the classic phantom's 128² slice (220 mm
#: field of view).
FALLBACK_PIXEL_MM: float = 220.0 / 128.0
#: Largest widening of the in-plane smoothing for noisy studies (:attr:`CalcParams.noise_ref_hu`).
MAX_NOISE_WIDENING: float = 2.0
#: AIF/VOF candidates next to bone get the frames motion correction resampled interpolated in time
#: only while at least this fraction of their slice's frames was left as acquired (see choose_aif).
ACQUIRED_MIN_FRAC: float = 0.5


@dataclass
class CalcParams:
    """Every option of the calculation approach (:func:`calculate_maps`), with its default.

    The defaults of the smoothing, the TMAX estimator and its median and of motion correction were
    chosen across both phantom families — tuned on one, checked on the other
    (``python -m experiments.calc_settings``, docs/calc/calc_settings.md).

    Attributes:
        method: ``osvd`` (default), ``bcsvd``, ``ssvd`` or ``tikhonov``.
        dt_s: uniform deconvolution grid step (s).
        device: ``cpu``, ``cuda``, ``auto``.
        dtype: ``float32`` (default) or ``float64`` (a ``torch.dtype`` is accepted).
        threshold: ``ssvd``/``bcsvd`` relative SVD threshold (Østergaard 1996; Wu 2003: 0.2).
        oi_target: ``osvd`` oscillation-index target (CT 0.095, MR 0.035).
        thresholds: ``osvd`` candidate thresholds.
        tikhonov_lambda: Tikhonov λ relative to the largest singular value.
        aif_weights: ``rect`` or ``simpson`` (see :func:`~stm_dlp.perfusion.deconv.weighted_aif`).
        band_limit: circulant engines keep only frequencies up to the acquisition's Nyquist
            frequency ``1 / (2 * median frame interval)``.
        tmax_method: ``calibrated_dispersion`` (default), ``calibrated``, ``half_rise`` or ``argmax``
            (see :class:`DeconvParams`): across both phantom families the dispersion-aware calibrated
            argmax scored best held out (half-rise is unbiased on residues that jump at the delay but
            reads dispersed ones ~2 s early; the exponential-only calibration over-corrects dispersed
            lesions by 2-3 s).
        cbv_method: ``area`` (default) or ``residue``.
        temporal_sigma_s: Gaussian smoothing of the curves (tissue and AIF) in seconds (0 = off).
        spatial_sigma_mm: in-plane Gaussian smoothing of the tissue curves (mm; 0 = off), converted
            with the pixel spacing (``pixel_mm`` / ``affine`` of :func:`calculate_maps`; without one,
            :data:`FALLBACK_PIXEL_MM`). A normalised convolution inside the brain mask that leaves
            vessels and CSF out (step 5). Default 5.5 mm (2.9 px at 1.9 mm): wider smoothing scored
            better on both families up to 7 mm; 5.5 mm with the TMAX median was best held out.
        spatial_sigma_px: the same in pixels; when set it overrides ``spatial_sigma_mm``.
        noise_ref_hu: studies noisier than this (per-frame noise, HU) get the in-plane smoothing
            widened by ``sqrt(noise / noise_ref_hu)`` (at most :data:`MAX_NOISE_WIDENING`): at 15-30 HU
            the default σ leaves tissue whose baseline error exceeds its enhancement; ``None`` = off.
        n_aif, n_vof, pv_correction: automatic AIF options (:func:`select_aif`).
        cbf_floor: below this CBF (ml/100g/min) TMAX and MTT are set to 0 (no usable residue).
        csf_max_hu: brain pixels whose pre-bolus HU (smoothed: ``csf_smooth_mm``, more with noise) is
            below this are CSF: left out of the smoothing and 0 in every map, as clinical packages
            exclude them (CSF 0-15 HU, parenchyma 20-45 HU). ``None`` keeps CSF pixels.
        csf_smooth_mm: least smoothing (mm) of the baseline for the CSF test.
        despike_sigma: tissue-curve frames further than this many noise levels from their running
            median of 3 are replaced by it (impulse noise, motion spikes); 0 = off. Tissue curves
            are smooth on the frame scale, so at 6 noise levels nothing else is touched.
        tmax_median_mm: radius (mm) of a median filter of the TMAX map over the perfused brain (CSF and
            vessels out; 0 = off), converted with the pixel spacing and rounded to whole pixels (at least 1
            when on): TMAX outliers of low-flow tissue go, lesion edges stay. Default 7 mm, 4 px on the
            1.6-1.9 mm grids it was chosen on (9 x 9; the TMAX pass is smoothed less, so its map is noisier),
            2 px at 3 mm, 1 px at 9 mm — a radius in pixels would span 82 mm at 9.2 mm and wipe lesions
            (docs/reproducing.md, the CPU-scale run).
        tmax_median_px: the same in pixels; when set it overrides ``tmax_median_mm``.
        tmax_oi_target: TMAX from the oSVD truncation of this OI target (``None``: ``oi_target``).
            Default 0.03: a smoother residue, whose noise ripples in low-flow lesions cannot pass for
            its peak; CBF and CBV keep ``oi_target`` (their peak height would read low).
        tmax_sigma_mm: TMAX from tissue curves smoothed in-plane by this σ (mm) instead of
            ``spatial_sigma_mm`` — one more smoothing and deconvolution pass; ``None`` = the same
            curves; ignored when not below ``spatial_sigma_mm`` or when ``spatial_sigma_px`` is set.
            Default 1.5 mm: the CBF smoothing (5.5 mm) mixes a small lesion's late curves with the
            early, high-flow curves around it, whose peak then wins (ribbon phantom, clean: lesion
            TMAX bias -0.9 s at 0 mm, -3 s at 5.5 mm).
        tmax_noise_widening: exponent of the TMAX pass's widening with noise, ``(noise / noise_ref_hu) **
            exponent``, never past the CBF pass's widened σ. 0.5 (default, chosen with the other defaults by
            ``experiments.calc_settings`` on 1.6-1.9 mm grids) widens it as the CBF pass; 1 keeps the smoothed
            curve's noise constant (σ ∝ noise). The deconvolution prior of the model's 3 mm grid uses 1
            (:data:`stm_dlp.data.context.PRIOR_OPTIONS`, docs/tmax.md §16): under 30 HU a 3 mm TMAX pass of σ ≈ 1 px
            reads noise ripples as the residue's peak.
        tmax_median_noise_widening: exponent of the TMAX median's widening with noise, as
            ``tmax_noise_widening`` (at most :data:`MAX_NOISE_WIDENING`); 0 (default) = the radius of
            ``tmax_median_mm`` at any noise. 1 (14 mm at 30 HU: 5 px at 3 mm) lifts the model's prior on the classic
            phantom under noise and loses on the ribbon one's smaller lesions: not used by default (docs/tmax.md §16).
        tmax_median_noise_passes: on studies noisier than ``noise_ref_hu`` the TMAX median runs this many times
            (an iterated median: outliers go, edges and structures wider than the window stay, where one wider
            window erodes small lesions); 1 (default) = once at any noise (docs/tmax.md §16).
        motion: register every frame in-plane to the mean pre-contrast frame first
            (:func:`stm_dlp.perfusion.motion.correct_motion`; on by default: on moving studies CBF MAE
            37.2 -> 15.8 (classic; 15.2 still) and 14.3 -> 12.5 (ribbon), still studies unchanged;
            ~1-2 s per 128² x 4-slice study). The frames it resampled are not trusted next to bone
            for the AIF/VOF (:func:`choose_aif`).
        chunk_pixels: pixels deconvolved at once (0: 32768 on CPU, 2^20 on GPU).
    """

    method: str = "osvd"
    dt_s: float = 0.5
    device: str = "cpu"
    dtype: str = "float32"
    threshold: float = 0.2
    oi_target: float = OI_TARGET_CT
    thresholds: tuple[float, ...] = field(default_factory=lambda: OSVD_THRESHOLDS)
    tikhonov_lambda: float = 0.1
    aif_weights: str = "rect"
    band_limit: bool = True
    tmax_method: str = "calibrated_dispersion"
    cbv_method: str = "area"
    temporal_sigma_s: float = 0.0
    spatial_sigma_mm: float = 5.5
    spatial_sigma_px: float | None = None
    noise_ref_hu: float | None = 8.0
    n_aif: int = 8
    n_vof: int = 8
    pv_correction: bool = True
    cbf_floor: float = 0.5
    csf_max_hu: float | None = 15.0
    csf_smooth_mm: float = 1.2
    despike_sigma: float = 6.0
    motion: bool = True
    tmax_median_mm: float = 7.0
    tmax_median_px: int | None = None
    tmax_oi_target: float | None = 0.03
    tmax_sigma_mm: float | None = 1.5
    tmax_noise_widening: float = 0.5
    tmax_median_noise_widening: float = 0.0
    tmax_median_noise_passes: int = 1
    chunk_pixels: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).replace("torch.", "")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        self.cbv_method = str(self.cbv_method).lower()
        if self.cbv_method not in ("area", "residue"):
            raise ValueError(f"cbv_method must be 'area' or 'residue', got {self.cbv_method!r}")
        self.thresholds = tuple(float(x) for x in self.thresholds)
        self.device = str(self.device)
        # a bad method / TMAX estimator / weights is reported before any work is done
        DeconvParams(method=self.method, threshold=self.threshold, thresholds=self.thresholds,
                     tmax_method=self.tmax_method, aif_weights=self.aif_weights)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def widening(self, noise_hu: float, exponent: float = 0.5) -> float:
        """Factor the in-plane smoothing widens by for per-frame noise ``noise_hu``: ``(noise / noise_ref_hu) **
        exponent``, at least 1, at most :data:`MAX_NOISE_WIDENING` for ``exponent`` 0.5 (the CBF/CBV pass)."""
        if not self.noise_ref_hu or noise_hu <= self.noise_ref_hu:
            return 1.0
        widen = (noise_hu / self.noise_ref_hu) ** exponent
        return min(widen, MAX_NOISE_WIDENING) if exponent <= 0.5 else widen

    def sigma_px(self, pixel_mm: tuple[float, float] | None, noise_hu: float = 0.0) -> tuple[float, float]:
        """In-plane smoothing σ in pixels (rows, columns) for a study with per-frame noise ``noise_hu``."""
        widen = self.widening(noise_hu)
        if self.spatial_sigma_px is not None:
            return float(self.spatial_sigma_px) * widen, float(self.spatial_sigma_px) * widen
        mm = pixel_mm or (FALLBACK_PIXEL_MM, FALLBACK_PIXEL_MM)
        return self.spatial_sigma_mm / mm[0] * widen, self.spatial_sigma_mm / mm[1] * widen

    def median_px(self, pixel_mm: tuple[float, float] | None, noise_hu: float = 0.0) -> int:
        """Radius (px) of the TMAX median filter for pixels of ``pixel_mm`` (rows, columns; the finer one) on a
        study with per-frame noise ``noise_hu`` (``tmax_median_noise_widening``)."""
        if self.tmax_median_px is not None:
            return int(self.tmax_median_px)
        if self.tmax_median_mm <= 0:
            return 0
        mm = min(pixel_mm or (FALLBACK_PIXEL_MM, FALLBACK_PIXEL_MM))
        widen = 1.0
        if self.tmax_median_noise_widening > 0:
            widen = min(self.widening(noise_hu, self.tmax_median_noise_widening), MAX_NOISE_WIDENING)
        return max(1, round(self.tmax_median_mm * widen / mm))

    def tmax_params(self, noise_hu: float = 0.0) -> CalcParams | None:
        """The parameters of the TMAX pass's smoothing (``tmax_sigma_mm`` widened for a study with per-frame
        noise ``noise_hu`` by :meth:`widening` with ``tmax_noise_widening``), or ``None`` when TMAX comes from the
        same smoothing as CBF and CBV: ``tmax_sigma_mm`` is ``None``, its widened σ not below the CBF pass's
        widened σ (the TMAX pass is never smoothed more), or the smoothing is given in pixels
        (``spatial_sigma_px``: the user's smoothing, for every map)."""
        if self.tmax_sigma_mm is None or self.spatial_sigma_px is not None:
            return None
        sigma = self.tmax_sigma_mm * self.widening(noise_hu, self.tmax_noise_widening)
        if sigma >= self.spatial_sigma_mm * self.widening(noise_hu):
            return None
        return replace(self, spatial_sigma_mm=float(sigma), spatial_sigma_px=None, tmax_sigma_mm=None,
                       noise_ref_hu=None)

    def deconv_params(self, frame_dt_s: float) -> DeconvParams:
        """The :class:`DeconvParams` for an acquisition whose median frame interval is ``frame_dt_s``."""
        return DeconvParams(method=self.method, threshold=self.threshold, oi_target=self.oi_target,
                            thresholds=self.thresholds, oi_stride=max(1, int(round(frame_dt_s / self.dt_s))),
                            tikhonov_lambda=self.tikhonov_lambda, aif_weights=self.aif_weights,
                            max_freq_hz=(0.5 / frame_dt_s) if self.band_limit else None,
                            tmax_method=self.tmax_method, tmax_oi_target=self.tmax_oi_target)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


#: The field names of :class:`CalcParams` (the keyword options of :func:`calculate_maps`).
PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(CalcParams))


def make_params(params: CalcParams | None = None, **options: Any) -> CalcParams:
    """``params`` (default :class:`CalcParams`) with ``options`` replacing fields; unknown names are an error."""
    unknown = sorted(set(options) - set(PARAM_NAMES))
    if unknown:
        raise TypeError(f"unknown calculation option(s) {', '.join(unknown)}; valid: {', '.join(PARAM_NAMES)}")
    return replace(params or CalcParams(), **options)


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


# -- the steps --------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Step 0's result: the study as tensors. ``frames`` ``(S, T, H, W)``, ``times`` ``(S, T)`` float64
    seconds from the study's first frame (``t0``, the original clock's value of that instant)."""

    frames: torch.Tensor
    times: torch.Tensor
    t0: float
    device: torch.device
    dtype: torch.dtype
    #: ``(S, T)`` bool: frames that motion correction resampled (``None``: none). Next to bone their
    #: values carry the resampling's blur of the skull edge (hundreds of HU over a pixel).
    resampled: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        s, t, h, w = self.frames.shape
        return int(s), int(t), int(h), int(w)


def prepare_inputs(frames: Any, times_s: Any, p: CalcParams) -> Inputs:
    """Frames and times as tensors on ``p.device``; shapes and strictly increasing times checked."""
    dev = resolve_device(p.device)
    dtype = p.torch_dtype
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
    if not math.isfinite(float(fr.sum())):  # one pass; NaN / inf (or an absurd overflow) make the sum non-finite
        fr = torch.nan_to_num(fr, nan=0.0, posinf=0.0, neginf=0.0)
    t0 = float(tt.min())
    return Inputs(frames=fr, times=(tt - t0).contiguous(), t0=t0, device=dev, dtype=dtype)


def impulse_fraction(frames: torch.Tensor, noise_hu: float, k: float = 6.0) -> float:
    """Fraction of the samples of :func:`~stm_dlp.perfusion.concentration.noise_sample` further than ``k``
    noise levels from their running median of 3: ~0 for Gaussian noise on smooth curves, the impulse rate otherwise."""
    curves = noise_sample(frames, None)
    if curves.numel() == 0 or noise_hu <= 0:
        return 0.0
    return float(((curves - median3(curves)).abs() > k * noise_hu).to(torch.float64).mean())


#: Despiking runs when more than this fraction of the sampled frames are impulses (:func:`impulse_fraction`;
#: an arterial peak sampled coarsely also stands out from its neighbours, in a few per ten thousand).
IMPULSE_MIN_FRAC: float = 1e-3


def _user_reference(aif: Any, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The user's AIF as ``(curve, times)`` to detect the arrival on (``None`` for ``"auto"``)."""
    fr, tt = inp.frames, inp.times
    if isinstance(aif, str):
        return None
    if isinstance(aif, dict):
        return (_as_tensor(aif["aif"], inp.device, torch.float64),
                _as_tensor(aif["times_s"], inp.device, torch.float64) - inp.t0)
    arr = np.asarray(aif.cpu() if isinstance(aif, torch.Tensor) else aif, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 3 and np.allclose(arr, np.round(arr)):
        pix = arr.astype(np.int64)
        s_count, _, h, w = fr.shape
        if not ((pix >= 0).all() and (pix[:, 0] < s_count).all() and (pix[:, 1] < h).all() and (pix[:, 2] < w).all()):
            return None  # reported by choose_aif
        curves = fr[pix[:, 0], :, pix[:, 1], pix[:, 2]].to(torch.float64)
        return curves.mean(0), tt[int(pix[0, 0])]
    if arr.ndim == 1 and arr.shape[0] == fr.shape[1]:
        return torch.as_tensor(arr, device=inp.device), tt[0]
    return None


def find_baseline(inp: Inputs, aif: Any = "auto") -> tuple[BolusArrival, torch.Tensor, torch.Tensor, float]:
    """Step 1: bolus arrival, pre-bolus frames and the two pre-contrast images.

    Returns ``(arrival, baseline, baseline_median, noise_hu)``: ``baseline`` ``(S, H, W)`` is each
    pixel's mean over every pre-bolus frame without outlier frames (further than
    ``max(4 noise, 10 HU)`` from the pixel's median; impulses, motion spikes) — what the enhancement
    is measured against; ``baseline_median`` the per-pixel median, what the brain mask is made from;
    ``noise_hu`` the study's per-frame noise (:func:`frame_noise`).
    """
    fr, tt = inp.frames, inp.times
    s_count, n_t, h, w = inp.shape
    arrival = study_arrival(fr, tt)
    user = _user_reference(aif, inp)
    if user is not None:
        # a user AIF is the earliest curve there is: detect on it, keep the auto reference's report
        curve, times = user
        det = arrival_details(curve, times_s=times)
        # frames before the first sample above the level: a user curve is often given on a fine grid
        # (linearly interpolated frames), where the rise starts right at the last pre-bolus frame
        t_first = float(times[det["index"]])
        arrival = replace(arrival, arrival_time_s=t_first,
                          n_baseline=[int(min(max(int((tt[s] < t_first - 1e-6).sum()), 1), n_t - 1))
                                      for s in range(s_count)])
    noise = frame_noise(fr)
    base_med = baseline_image(fr, arrival.n_baseline)
    base = torch.empty_like(base_med)
    tol = max(4.0 * noise, 10.0)
    for s, nb in enumerate(arrival.n_baseline):
        pre = fr[s, :nb]
        if nb >= 3:
            keep = ((pre - base_med[s]).abs() <= tol).to(pre.dtype)
            n_keep = keep.sum(0)
            base[s] = torch.where(n_keep > 0, (pre * keep).sum(0) / n_keep.clamp_min(1), base_med[s])
        else:
            base[s] = pre.mean(0)
    return arrival, base, base_med, noise


def brain_and_region(base_med: torch.Tensor, mask: Any, inp: Inputs) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Step 2: ``(brain, region, mask_source)``: the brain mask (given or automatic) and the AIF/VOF
    search region (the mask grown by :data:`SEARCH_GROW_FRAC`, no bone, no air, and inside the skull
    where the skull is closed)."""
    s_count, _, h, w = inp.shape
    if mask is None:
        brain = mask_from_baseline(base_med)
        source = "auto"
    else:
        brain = _as_tensor(mask, inp.device, torch.float32) > 0.5
        if brain.shape != (s_count, h, w):
            raise ValueError(f"mask must have shape {(s_count, h, w)}, got {tuple(brain.shape)}")
        source = "given"
    grow = max(2, int(round(SEARCH_GROW_FRAC * min(h, w))))
    region = dilate(brain, grow) & (base_med > MIN_VESSEL_BASE_HU) & (base_med < MAX_VESSEL_BASE_HU)
    # inside the skull where it is closed: the scalp beyond it holds no artery of the brain, and next
    # to a moving skull it spikes like one
    bone = base_med >= MAX_VESSEL_BASE_HU  # a temporal median already: no impulse makes bone
    inside = fill_holes(bone) & ~bone
    closed = inside.sum((1, 2)) >= 0.5 * brain.sum((1, 2))
    region = torch.where(closed[:, None, None], region & inside, region) | brain
    return brain, region, source


@dataclass
class Curves:
    """Step 3's result: per slice, the flat pixel indices of the region (brain pixels first), their
    enhancement curves ``(P_s, T)`` (HU over the baseline) and how many of them are brain."""

    flat_idx: list[torch.Tensor]
    conc: list[torch.Tensor]
    n_brain: list[int]
    #: per slice, the brain pixels (local row indices) whose curves :func:`clean_bone_leak` changed
    cleaned: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def n_region(self) -> int:
        return sum(int(i.numel()) for i in self.flat_idx)


def enhancement_curves(inp: Inputs, base: torch.Tensor, brain: torch.Tensor, region: torch.Tensor,
                       p: CalcParams) -> Curves:
    """Step 3: enhancement curves of the region pixels, slice by slice (brain pixels first, so that
    the deconvolution takes contiguous row ranges)."""
    fr, tt = inp.frames, inp.times
    s_count, n_t = inp.shape[:2]
    out = Curves([], [], [])
    for s in range(s_count):
        in_brain = brain[s].reshape(-1)
        idx = torch.cat([torch.nonzero(in_brain).flatten(),
                         torch.nonzero(region[s].reshape(-1) & ~in_brain).flatten()])
        out.n_brain.append(int(in_brain.sum()))
        c = fr[s].reshape(n_t, -1)[:, idx].T - base[s].reshape(-1)[idx][:, None]
        if p.temporal_sigma_s > 0:
            c = gaussian_smooth_time(c, tt[s].to(inp.dtype), p.temporal_sigma_s)
        out.flat_idx.append(idx)
        out.conc.append(c.contiguous())
    if out.n_region == 0:
        raise ValueError("the brain mask is empty: no pixel to compute perfusion for")
    return out


def _aif_problem(sel: AIFSelection, dt_s: float, noise_hu: float) -> str | None:
    """Why an AIF cannot be deconvolved with, or ``None`` when it can."""
    c = sel.curve
    if not bool(torch.isfinite(c).all()):
        return "its curve is not finite"
    peak = float(c.max())
    area = float(_trapz_grid(c, dt_s))
    if peak <= 0 or area <= 0:
        return f"it has no positive enhancement (peak {peak:.1f} HU, area {area:.1f} HU·s)"
    if peak < 5.0 * noise_hu:
        return f"its peak ({peak:.1f} HU) is within 5 noise levels ({noise_hu:.1f} HU)"
    return None


def choose_aif(aif: Any, inp: Inputs, curves: Curves, grid: torch.Tensor, arrival: BolusArrival,
               base: torch.Tensor, p: CalcParams, noise_hu: float) -> AIFSelection:
    """Step 4: the AIF (and VOF) — the user's, or automatic with fallbacks.

    Automatic selection sees the most enhancing :data:`AIF_POOL_FRAC` of the region (gathered across
    slices). When its AIF is unusable (no positive area, peak within the noise) the search is
    relaxed (a larger pool, no plausibility limits but a positive area), then the arrival reference
    curve (the mean of the study's most enhancing pixels) is used. Each fallback is logged and
    recorded in ``AIFSelection.fallback``; only a study without any usable bolus fails.
    """
    tt = inp.times
    s_count, n_t, h, w = inp.shape
    dev, dtype = inp.device, inp.dtype
    if not isinstance(aif, str):
        sel = _user_aif(aif, inp, base, grid)
        if p.temporal_sigma_s > 0:
            # a user AIF gets the tissue curves' temporal smoothing too: smoothing only one side of
            # the deconvolution would blur the residue and read CBF low.
            sel.curve = gaussian_smooth_time(sel.curve, grid.to(sel.curve.dtype), p.temporal_sigma_s)
            sel.curve_raw = gaussian_smooth_time(sel.curve_raw, grid.to(sel.curve_raw.dtype), p.temporal_sigma_s)
        problem = _aif_problem(sel, p.dt_s, 0.0)
        if problem is not None:
            raise ValueError(f"the arterial input function given cannot be used: {problem}; choose another AIF")
        return sel
    if aif != "auto":
        raise ValueError(f"aif must be 'auto', a pixel list, a curve or a dict; got {aif!r}")
    n_region = curves.n_region
    # candidates ranked by their sustained peak: a bolus lasts several frames, an impulse or motion
    # spike (which outscores any artery on its peak) one or two
    peaks = torch.cat([sustained_peak(c) for c in curves.conc])
    slice_of = torch.cat([torch.full((int(i.numel()),), s, device=dev) for s, i in enumerate(curves.flat_idx)])
    local = torch.cat([torch.arange(int(i.numel()), device=dev) for i in curves.flat_idx])

    # pixels next to bone may be VOF pixels (the sinus lies against the skull) but not AIF pixels: a
    # moving skull edge spikes by hundreds of HU
    near_bone = dilate(base >= MAX_VESSEL_BASE_HU, BONE_MARGIN_PX)

    def pool(frac: float, minimum: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = int(min(n_region, max(minimum, round(frac * n_region), p.n_aif + p.n_vof)))
        top = torch.topk(peaks, size).indices
        conc = torch.empty((size, n_t), dtype=dtype, device=dev)
        flat = torch.empty((size,), dtype=torch.long, device=dev)
        for s in range(s_count):
            m = slice_of[top] == s
            conc[m] = curves.conc[s][local[top][m]]
            flat[m] = curves.flat_idx[s][local[top][m]]
        coords = torch.stack([slice_of[top], flat // w, flat % w], dim=1)
        if inp.resampled is not None:
            # candidates next to bone (the VOF: the sinus lies against the skull) in frames that motion
            # correction resampled carry the skull edge's blur, which a peak- and area-ranked VOF takes
            # for venous enhancement (PV scale 1.03 -> 2.6 on the classic motion studies): those
            # frames are interpolated in time from the frames left as acquired — when those are the
            # majority (a head that moved for good has most frames resampled alike: no spikes, and
            # too few frames left to interpolate a bolus from)
            nb_rows = near_bone[coords[:, 0], coords[:, 1], coords[:, 2]]
            valid = ~inp.resampled[coords[:, 0]]
            fix = nb_rows & (valid.to(torch.float32).mean(-1) >= ACQUIRED_MIN_FRAC) & ~valid.all(-1)
            if bool(fix.any()):
                conc[fix] = _interpolate_invalid(conc[fix], valid[fix])
        return conc, tt[slice_of[top]], coords

    nb_of_slice = torch.tensor(arrival.n_baseline, device=dev)
    t_idx = torch.arange(n_t, device=dev)

    def allowed(coords: torch.Tensor, conc: torch.Tensor) -> torch.Tensor:
        """Not next to bone, and quiet before the bolus: an artery is flat until the arrival, a pixel
        that bone moves into (motion, or a registration a fraction of a pixel off) spikes at any time."""
        pre = t_idx[None] < nb_of_slice[coords[:, 0]][:, None]
        pre_max = torch.where(pre, conc.abs(), torch.zeros((), dtype=conc.dtype, device=dev)).amax(-1)
        quiet = pre_max <= torch.clamp(0.2 * sustained_peak(conc), min=6.0 * noise_hu)
        return ~near_bone[coords[:, 0], coords[:, 1], coords[:, 2]] & quiet

    tried: list[str] = []
    conc, times, coords = pool(AIF_POOL_FRAC, AIF_POOL_MIN)
    if p.despike_sigma > 0:
        conc = _despike_candidates(conc, p.despike_sigma * noise_hu)
    # with noise, more pixels are averaged (~4 HU noise on the AIF; at most 4 x n_aif)
    n_aif = int(min(max(p.n_aif, math.ceil((noise_hu / 4.0) ** 2)), 4 * p.n_aif))
    sel = select_aif(conc, times, coords, grid, n_aif=n_aif, n_vof=p.n_vof, pv_correction=p.pv_correction,
                     pool_frac=1.0, aif_allowed=allowed(coords, conc))
    problem = _aif_problem(sel, p.dt_s, noise_hu)
    if problem is None:
        return sel
    tried.append(f"automatic: {problem}")
    # relaxed: five times the pool, curves cleaned of one-frame spikes, any shape with a positive area
    conc, times, coords = pool(5 * AIF_POOL_FRAC, 5 * AIF_POOL_MIN)
    conc = median3(conc)
    n_aif = 2 * n_aif
    area = (conc * torch.diff(times, dim=-1, prepend=times[:, :1]).to(dtype)).sum(-1)
    keep = area > 0
    if int(keep.sum()) >= 1:
        sel = select_aif(conc[keep], times[keep], coords[keep], grid, n_aif=n_aif, n_vof=p.n_vof,
                         pv_correction=p.pv_correction, pool_frac=1.0, pool_min=1, min_peak_frac=0.3,
                         max_late_s=float("inf"), max_roughness=float("inf"), min_support=0.0,
                         aif_allowed=allowed(coords[keep], conc[keep]))
        problem = _aif_problem(sel, p.dt_s, noise_hu)
        if problem is None:
            sel.fallback = {"used": "relaxed", "tried": tried}
            log.warning("automatic AIF unusable (%s); used the relaxed search", tried[-1])
            return sel
        tried.append(f"relaxed: {problem}")
    else:
        tried.append("relaxed: no candidate with a positive area")
    # the arrival reference: the mean of the study's most enhancing pixels, over its own baseline
    ref = arrival.reference.to(torch.float64)
    nb = max(1, int((arrival.reference_times_s < arrival.arrival_time_s).sum()))
    curve = ref - ref[:nb].mean()
    sel = aif_from_curve(curve, arrival.reference_times_s.to(torch.float64), grid)
    sel.source = "auto"
    problem = _aif_problem(sel, p.dt_s, noise_hu)
    if problem is None:
        sel.fallback = {"used": "reference", "tried": tried}
        log.warning("automatic AIF unusable (%s); used the arrival reference curve", "; ".join(tried))
        return sel
    tried.append(f"reference: {problem}")
    raise ValueError("no usable arterial input function: " + "; ".join(tried)
                     + " — is there a contrast bolus in this study? (or give aif=...)")


def _user_aif(aif: Any, inp: Inputs, base: torch.Tensor, grid: torch.Tensor) -> AIFSelection:
    """The ``aif`` argument (pixels, a curve, or a dict with its own times) as an :class:`AIFSelection`."""
    fr, tt = inp.frames, inp.times
    s_count, n_t, h, w = fr.shape
    if isinstance(aif, dict):
        times = _as_tensor(aif["times_s"], fr.device, torch.float64) - inp.t0
        return aif_from_curve(_as_tensor(aif["aif"], fr.device, torch.float64), times, grid)
    arr = np.asarray(aif.cpu() if isinstance(aif, torch.Tensor) else aif, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 3 and np.allclose(arr, np.round(arr)):
        pix = [tuple(int(v) for v in q) for q in arr]
        for q in pix:
            if not (0 <= q[0] < s_count and 0 <= q[1] < h and 0 <= q[2] < w):
                raise ValueError(f"AIF pixel {q} (slice, row, col) is outside the study of shape {(s_count, h, w)}")
        sl = torch.tensor([q[0] for q in pix], device=fr.device)
        rr = torch.tensor([q[1] for q in pix], device=fr.device)
        cc = torch.tensor([q[2] for q in pix], device=fr.device)
        curves = fr[sl, :, rr, cc] - base[sl, rr, cc][:, None]
        return aif_from_pixels(curves, tt[sl], pix, grid)
    if arr.ndim == 1:
        if arr.shape[0] != n_t:
            raise ValueError(f"an AIF curve must have one value per frame ({n_t}), got {arr.shape[0]}")
        return aif_from_curve(torch.as_tensor(arr, device=fr.device), tt[0], grid)
    raise ValueError("aif must be 'auto', a list of (slice, row, col) pixels, a (T,) curve or "
                     "{'times_s': [...], 'aif': [...]}")


def clean_bone_leak(curves: Curves, base: torch.Tensor, limit_hu: float) -> int:
    """Step 4b: brain pixels next to bone whose enhancement leaves ``±limit_hu`` in some frames (bone
    moved into the pixel: the head moved, or a registration left a fraction of a pixel) get those
    frames replaced by linear interpolation in time from the frames that are plausible — tissue
    never enhances by a third of the arterial peak. Modifies ``curves`` in place; returns how many
    samples were replaced."""
    near_bone = dilate(base >= MAX_VESSEL_BASE_HU, BONE_MARGIN_PX)
    n_fixed = 0
    for s, idx in enumerate(curves.flat_idx):
        nb = curves.n_brain[s]
        if nb == 0:
            continue
        near = near_bone[s].reshape(-1)[idx[:nb]]
        rows = torch.nonzero(near).flatten()
        if rows.numel() == 0:
            continue
        c = curves.conc[s][rows]
        bad = c.abs() > limit_hu
        has = bad.any(-1) & ~bad.all(-1)
        if not bool(has.any()):
            continue
        rows, c, bad = rows[has], c[has], bad[has]
        n_fixed += int(bad.sum())
        curves.conc[s][rows] = _interpolate_invalid(c, ~bad)
        curves.cleaned[s] = rows
    return n_fixed


def _interpolate_invalid(c: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Curves ``(P, T)`` with invalid samples replaced by linear interpolation (in frame index) between
    the nearest valid ones (held constant beyond the first / last valid sample)."""
    n_t = c.shape[-1]
    ar = torch.arange(n_t, device=c.device).expand_as(c)
    last = torch.where(valid, ar, torch.full_like(ar, -1)).cummax(-1).values
    nxt = torch.where(valid, ar, torch.full_like(ar, n_t)).flip(-1).cummin(-1).values.flip(-1)
    lo = torch.where(last >= 0, last, nxt).clamp(0, n_t - 1)
    hi = torch.where(nxt < n_t, nxt, last).clamp(0, n_t - 1)
    c_lo, c_hi = c.gather(-1, lo), c.gather(-1, hi)
    span = (hi - lo).to(c.dtype)
    wgt = torch.where(span > 0, (ar - lo).to(c.dtype) / span.clamp_min(1), torch.zeros_like(c))
    return torch.where(valid, c, c_lo + wgt * (c_hi - c_lo))


@dataclass
class Exclusions:
    """Step 5's result: CSF ``(S, H, W)`` bool, vessel flags per slice (over its brain pixels) and the
    report for ``info["exclusions"]``."""

    csf: torch.Tensor
    vessel: list[torch.Tensor]
    report: dict[str, Any]


def exclusions(inp: Inputs, base: torch.Tensor, brain: torch.Tensor, curves: Curves, aif_sel: AIFSelection,
               arrival: BolusArrival, noise_hu: float, p: CalcParams,
               pixel_mm: tuple[float, float] | None) -> Exclusions:
    """Step 5a: CSF and vessels inside the brain mask, both noise-aware.

    * CSF: :func:`~stm_dlp.perfusion.mask.csf_mask` (the one CSF test, shared with the model's maps) with
      at least ``csf_smooth_mm`` of smoothing, below ``csf_max_hu``.
    * Vessels: the sustained peak (:func:`~stm_dlp.perfusion.concentration.sustained_peak`) above
      ``max(VESSEL_PEAK_FRAC * AIF peak, brain median of the same + VESSEL_NOISE_K * noise)`` —
      noisy or spiking frames cannot make a tissue pixel a vessel.
    """
    s_count, n_t, h, w = inp.shape
    n_brain_total = int(brain.sum())
    nb_min = max(1, min(arrival.n_baseline))
    base_noise = noise_hu / math.sqrt(nb_min)
    report: dict[str, Any] = {"brain_pixels": n_brain_total, "frame_noise_hu": round(noise_hu, 3),
                              "baseline_noise_hu": round(base_noise, 3)}
    if p.csf_max_hu is not None:
        mm = pixel_mm or (FALLBACK_PIXEL_MM, FALLBACK_PIXEL_MM)
        csf, report["csf"] = csf_mask(base, brain, base_noise, p.csf_smooth_mm / float(np.mean(mm)), p.csf_max_hu)
        if report["csf"]["pixels"] > CSF_MAX_FRAC * max(n_brain_total, 1):
            raise ValueError(
                f"{100 * report['csf']['pixels'] / n_brain_total:.0f} % of the brain mask is below {p.csf_max_hu:g} "
                f"HU before the bolus (median {float(base[brain].median()):.1f}): the frames do not look like "
                "Hounsfield units of a head CT (check the rescale slope/intercept), or pass csf_max_hu=None to keep "
                "low-density pixels")
    else:
        csf = torch.zeros_like(brain)
        report["csf"] = {"pixels": 0, "reason": "csf_max_hu=None: CSF kept"}
    aif_peak = float(aif_sel.curve_raw.max())
    # the sustained peak: impulses and motion spikes of 1-2 frames make no vessel
    peaks = [sustained_peak(curves.conc[s][: curves.n_brain[s]]) for s in range(s_count)]
    allp = torch.cat(peaks) if peaks else torch.zeros(0)
    med_peak = float(allp.median()) if allp.numel() else 0.0
    vessel_hu = max(VESSEL_PEAK_FRAC * aif_peak, med_peak + VESSEL_NOISE_K * noise_hu)
    vessel = [pk > vessel_hu for pk in peaks]
    n_vessel = int(sum(int(v.sum()) for v in vessel))
    report["vessels"] = {"pixels": n_vessel, "threshold_hu": round(vessel_hu, 2),
                         "reason": f"peak enhancement > {vessel_hu:.1f} HU (max of {VESSEL_PEAK_FRAC:g} x AIF peak, "
                                   f"brain median peak + {VESSEL_NOISE_K:g} noise levels): not smoothed"}
    return Exclusions(csf=csf, vessel=vessel, report=report)


def smooth_tissue(inp: Inputs, base: torch.Tensor, brain: torch.Tensor, curves: Curves, exc: Exclusions,
                  p: CalcParams, noise_hu: float, pixel_mm: tuple[float, float] | None) -> list[torch.Tensor]:
    """Step 5b: the brain pixels' curves for deconvolution: despiked (``despike_sigma``) and smoothed
    in-plane (σ from :meth:`CalcParams.sigma_px`) by a normalised convolution inside the mask with
    vessels and CSF left out, so neither a vessel's enhancement, CSF nor the skull edge leaks into
    tissue. Vessel pixels are kept as they are."""
    fr, tt = inp.frames, inp.times
    s_count, n_t, h, w = inp.shape
    sig = p.sigma_px(pixel_mm, noise_hu)
    despike = p.despike_sigma > 0 and noise_hu > 0 and exc.report.get("impulse_fraction", 1.0) > IMPULSE_MIN_FRAC
    tissue = []
    for s in range(s_count):
        nb = curves.n_brain[s]
        c = curves.conc[s][:nb]
        if nb == 0:
            tissue.append(c)
            continue
        if max(sig) > 0:
            idx = curves.flat_idx[s][:nb]
            weights = torch.zeros(h * w, dtype=inp.dtype, device=inp.device)
            weights[idx] = (~exc.vessel[s] & ~exc.csf[s].reshape(-1)[idx]).to(inp.dtype)
            enh = fr[s] - base[s]
            if s in curves.cleaned:  # curves cleaned of bone leaking in: the smoothing must not see the leak
                rows = curves.cleaned[s]
                enh = enh.reshape(n_t, -1).clone()
                enh[:, idx[rows]] = c[rows].T.to(enh.dtype)
                enh = enh.reshape(n_t, h, w)
            if despike:
                enh = _despike(enh.reshape(n_t, -1).T, p.despike_sigma * noise_hu).T.reshape(n_t, h, w)
            smoothed = gaussian_smooth_space(enh, sig, weights.reshape(h, w))
            c_new = smoothed.reshape(n_t, -1)[:, idx].T
            if p.temporal_sigma_s > 0:
                c_new = gaussian_smooth_time(c_new, tt[s].to(inp.dtype), p.temporal_sigma_s)
            ves = exc.vessel[s]
            if despike and bool(ves.any()):
                c_new[ves] = _despike_candidates(c[ves], p.despike_sigma * noise_hu)
            else:
                c_new[ves] = c[ves]
            c = c_new
        elif despike:
            ves = exc.vessel[s]
            c = _despike(c, p.despike_sigma * noise_hu)
            if bool(ves.any()):
                c[ves] = _despike_candidates(curves.conc[s][:nb][ves], p.despike_sigma * noise_hu)
        tissue.append(c.contiguous())
    return tissue


def _despike_candidates(c: torch.Tensor, tol: float) -> torch.Tensor:
    """:func:`_despike` for AIF candidates ``(P, T)``: a frame is a spike only when it is also more than
    half the curve's running-median peak away from its running median (an arterial peak sampled
    every 1-3 s stands out from its neighbours by far less; impulses and motion spikes by more)."""
    m = median3(c)
    rel = 0.5 * m.amax(-1, keepdim=True).clamp_min(0.0)
    return torch.where((c - m).abs() > torch.clamp(rel, min=tol), m, c)


def _despike(c: torch.Tensor, tol: float) -> torch.Tensor:
    """Frames of curves ``(P, T)`` further than ``tol`` from their running median of 3 replaced by it."""
    m = median3(c)
    return torch.where((c - m).abs() > tol, m, c)


def deconvolve_tissue(inp: Inputs, curves: Curves, tissue: list[torch.Tensor], aif_grid: torch.Tensor,
                      grid: torch.Tensor, dec: Deconvolver, p: CalcParams,
                      progress: Callable[[int, int], None] | None = None,
                      tmax_only: bool = False, cbf_only: bool = False) -> dict[str, torch.Tensor]:
    """Step 6: ``cbf``, ``cbv``, ``tmax``, ``thr`` ``(S, H, W)`` of the brain pixels (raw, before clean-up);
    ``tmax_only``: a TMAX pass (:meth:`Deconvolver.analyse`), whose other maps are not to be used;
    ``cbf_only``: TMAX (0) comes from a TMAX pass."""
    s_count, n_t, h, w = inp.shape
    dev, dtype, dt_s = inp.device, inp.dtype, p.dt_s
    aif_area = float(_trapz_grid(aif_grid, dt_s))
    trapz_w = torch.full((grid.shape[0],), dt_s, dtype=torch.float64, device=dev)
    trapz_w[0] = trapz_w[-1] = 0.5 * dt_s
    out = {k: torch.zeros((s_count, h * w), dtype=dtype, device=dev) for k in ("cbf", "cbv", "tmax", "thr")}
    total = sum(curves.n_brain)
    done = 0
    chunk = p.chunk_pixels if p.chunk_pixels > 0 else (1 << 20 if dev.type == "cuda" else 32768)
    for s in range(s_count):
        n_b = curves.n_brain[s]
        if n_b == 0:
            continue
        wmat = interp_matrix(inp.times[s], grid)  # (L, T) float64
        area_w = (wmat.T @ trapz_w).to(dtype)  # (T,): ∫ of the resampled curve
        for start in range(0, n_b, chunk):
            stop = min(start + chunk, n_b)
            x = tissue[s][start:stop]
            res = dec.analyse(x, wmat, inp.times[s], tmax_only=tmax_only, cbf_only=cbf_only)
            num = x @ area_w if p.cbv_method == "area" else res["kint"] * aif_area
            pix = curves.flat_idx[s][start:stop]
            out["cbf"][s, pix] = res["kmax"] / TISSUE_SCALE
            out["cbv"][s, pix] = num / aif_area / (60.0 * TISSUE_SCALE)
            out["tmax"][s, pix] = res["tmax_s"].to(dtype)
            out["thr"][s, pix] = res["threshold"].to(dtype)
            done += stop - start
            if progress is not None:
                progress(done, total)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {k: v.reshape(s_count, h, w) for k, v in out.items()}


def finish_maps(raw: dict[str, torch.Tensor], brain: torch.Tensor, csf: torch.Tensor,
                p: CalcParams, median_px: int = 0, median_passes: int = 1) -> dict[str, np.ndarray]:
    """Step 7: finite, non-negative maps, 0 outside the mask, in CSF and (TMAX, MTT) where there is no flow;
    TMAX median-filtered ``median_passes`` times over the perfused brain with radius ``median_px``
    (:meth:`CalcParams.median_px`)."""
    cbf = torch.nan_to_num(raw["cbf"], 0.0, 0.0, 0.0).clamp_min(0.0)
    cbv = torch.nan_to_num(raw["cbv"], 0.0, 0.0, 0.0).clamp_min(0.0)
    tmax = torch.nan_to_num(raw["tmax"], 0.0, 0.0, 0.0).clamp_min(0.0)
    zero = torch.zeros_like(cbf)
    cbf = torch.where(csf, zero, cbf)
    cbv = torch.where(csf, zero, cbv)
    flow = brain & ~csf & (cbf >= p.cbf_floor)
    tmax = torch.where(flow, tmax, zero)
    for _ in range(median_passes if median_px > 0 else 0):
        tmax = torch.where(flow, median_filter(tmax, median_px, flow), zero)
    mtt = torch.where(flow, mtt_from_cbv_cbf(cbv, cbf), zero)
    return {
        "cbv": cbv.float().cpu().numpy(),
        "cbf": cbf.float().cpu().numpy(),
        "tmax": tmax.float().cpu().numpy(),
        "mtt": torch.nan_to_num(mtt, 0.0, 0.0, 0.0).float().cpu().numpy(),
        "mask": brain.cpu().numpy(),
    }


# -- the entry point --------------------------------------------------------------------------------


def calculate_maps(
    frames: np.ndarray | torch.Tensor,
    times_s: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    method: str | None = None,
    aif: str | Sequence[Sequence[int]] | np.ndarray | torch.Tensor | dict = "auto",
    *,
    params: CalcParams | None = None,
    pixel_mm: float | Sequence[float] | None = None,
    affine: Any = None,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """CBV, CBF, MTT and TMAX maps of one study by deconvolution (steps in the module docstring).

    Args:
        frames: ``(S, T, H, W)`` HU (numpy or torch).
        times_s: ``(S, T)`` (or ``(T,)``) frame times (s), strictly increasing per slice, any spacing;
            slices may have their own times (the study clock is shared: times are used as given).
        mask: ``(S, H, W)`` bool brain mask, or ``None`` for :func:`~stm_dlp.perfusion.mask.brain_mask`.
        method: shorthand for ``params.method`` (``osvd``, ``bcsvd``, ``ssvd``, ``tikhonov``).
        aif: ``"auto"``; a list of ``(slice, row, col)`` pixels; a curve ``(T,)`` of enhancement (HU)
            at slice 0's times; or ``{"times_s": (T',), "aif": (T',)}`` (enhancement at given times on
            the same clock as ``times_s``).
        params: a :class:`CalcParams` (default: its defaults).
        pixel_mm: in-plane pixel spacing (mm): one number or ``(row, column)``; or give ``affine``
            (a :class:`~stm_dlp.types.Study` affine) instead. Converts the mm options to pixels.
        progress: optional ``callback(done_pixels, total_pixels)``.
        **options: :class:`CalcParams` fields, overriding ``params`` (e.g. ``spatial_sigma_px=0``).

    Returns:
        ``(maps, info)``: ``maps`` has ``cbv``, ``cbf``, ``tmax``, ``mtt`` float32 ``(S, H, W)`` numpy
        arrays and ``mask`` bool ``(S, H, W)`` (the mask used); ``info`` is JSON-serialisable: the AIF
        (pixels, scores, curves on the grid, VOF, PV scale, any fallback), the bolus arrival and
        baseline frames, the pixels excluded and why (``exclusions``), motion correction, the
        parameters, timings (s) and the device.
    """
    t_start = time.perf_counter()
    if method is not None:
        options["method"] = method
    p = make_params(params, **options)
    if pixel_mm is None and affine is not None:
        pixel_mm = pixel_spacing_mm(affine)
    mm: tuple[float, float] | None = None
    if pixel_mm is not None:
        v = np.atleast_1d(np.asarray(pixel_mm, np.float64))
        mm = (float(v[0]), float(v[-1]))
        if not all(math.isfinite(x) and x > 0 for x in mm):
            raise ValueError(f"pixel spacing must be positive millimetres, got {pixel_mm}")
    inp = prepare_inputs(frames, times_s, p)
    s_count, n_t, h, w = inp.shape
    motion_info: dict[str, Any] = {"enabled": bool(p.motion)}
    if p.motion:
        from stm_dlp.perfusion.motion import correct_motion

        corrected, mreport = correct_motion(inp.frames, None, inp.times)
        resampled = torch.zeros((s_count, n_t), dtype=torch.bool, device=inp.device)
        for s_, t_ in mreport.get("resampled_frames", []):
            resampled[s_, t_] = True
        inp = replace(inp, frames=corrected, resampled=resampled if bool(resampled.any()) else None)
        motion_info.update(mreport)
    t_motion = time.perf_counter()

    arrival, base, base_med, noise = find_baseline(inp, aif)
    brain, region, mask_source = brain_and_region(base_med, mask, inp)
    curves = enhancement_curves(inp, base, brain, region, p)
    t_conc = time.perf_counter()

    grid = uniform_grid(float(inp.times[:, -1].max()), p.dt_s, device=inp.device)
    frame_dt = float(torch.diff(inp.times, dim=1).median())
    aif_sel = choose_aif(aif, inp, curves, grid, arrival, base, p, noise)
    aif_grid = aif_sel.curve.to(inp.dtype)
    t_aif = time.perf_counter()

    n_leak = clean_bone_leak(curves, base, VESSEL_PEAK_FRAC * float(aif_sel.curve_raw.max()))
    exc = exclusions(inp, base, brain, curves, aif_sel, arrival, noise, p, mm)
    exc.report["bone_leak_samples_replaced"] = n_leak
    exc.report["impulse_fraction"] = round(impulse_fraction(inp.frames, noise, p.despike_sigma or 6.0), 6)
    exc.report["despiked"] = bool(p.despike_sigma > 0 and exc.report["impulse_fraction"] > IMPULSE_MIN_FRAC)
    tissue = smooth_tissue(inp, base, brain, curves, exc, p, noise, mm)
    p_tmax = p.tmax_params(noise)
    tissue_tmax = None if p_tmax is None else smooth_tissue(inp, base, brain, curves, exc, p_tmax, noise, mm)
    t_smooth = time.perf_counter()

    dparams = p.deconv_params(frame_dt)
    dec = Deconvolver(aif_grid, p.dt_s, dparams)
    raw = deconvolve_tissue(inp, curves, tissue, aif_grid, grid, dec, p, progress, cbf_only=tissue_tmax is not None)
    if tissue_tmax is not None:  # TMAX from its own, lighter smoothing (CalcParams.tmax_sigma_mm)
        raw["tmax"] = deconvolve_tissue(inp, curves, tissue_tmax, aif_grid, grid, dec, p, tmax_only=True)["tmax"]
    t_dec = time.perf_counter()

    median_px = p.median_px(mm, noise)
    passes = p.tmax_median_noise_passes if p.noise_ref_hu and noise > p.noise_ref_hu else 1
    maps = finish_maps(raw, brain, exc.csf, p, median_px, passes)
    window = scan_window(float(grid[int(torch.argmax(aif_sel.curve))]), float(inp.times[:, -1].min()))
    if window["warning"]:
        log.warning("calculation approach: %s", window["warning"])
    brain_np = maps["mask"]
    zero_all = brain_np & (maps["cbf"] == 0) & (maps["cbv"] == 0)
    exc.report["zero_pixels"] = int(zero_all.sum())
    thr_used = raw["thr"][brain]
    sig = p.sigma_px(mm, noise)
    info: dict[str, Any] = {
        "method": dparams.method,
        "params": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(dparams).items()},
                   **{k: v for k, v in p.to_dict().items() if k not in ("device", "chunk_pixels", "thresholds")},
                   "spatial_sigma_px_used": [round(sig[0], 4), round(sig[1], 4)],
                   "tmax_median_px_used": median_px, "tmax_median_passes_used": passes,
                   # the TMAX pass's σ after its noise widening; None: TMAX from the CBF pass's curves
                   "tmax_sigma_mm_used": None if p_tmax is None else round(p_tmax.spatial_sigma_mm, 4)},
        "pixel_mm": list(mm) if mm else None,
        "aif": aif_sel.to_dict(),
        "time_origin_s": inp.t0,
        "median_frame_interval_s": frame_dt,
        "arrival": arrival.to_dict(),
        "arrival_frame": list(arrival.n_baseline),
        "baseline_frames": list(arrival.n_baseline),
        "mask_source": mask_source,
        "exclusions": exc.report,
        "n_vessel_pixels_unsmoothed": exc.report["vessels"]["pixels"],
        "n_csf_pixels": exc.report["csf"]["pixels"],
        "n_brain_pixels": int(brain.sum()),
        "motion": motion_info,
        "scan_window": window,
        "threshold_used": {"mean": float(thr_used.mean()) if thr_used.numel() else 0.0,
                           "median": float(thr_used.median()) if thr_used.numel() else 0.0},
        "device": str(inp.device),
        "timing_s": {"motion": round(t_motion - t_start, 4), "concentration": round(t_conc - t_motion, 4),
                     "aif": round(t_aif - t_conc, 4), "smoothing": round(t_smooth - t_aif, 4),
                     "deconvolution": round(t_dec - t_smooth, 4),
                     "total": round(time.perf_counter() - t_start, 4)},
    }
    return maps, info
