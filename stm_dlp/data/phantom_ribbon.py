"""The "ribbon" phantom family: a second CTP generator, independent of the classic one.

Every benchmark of the project trains and tests on phantoms, so a model can learn a generator instead
of perfusion. This family shares nothing with :mod:`stm_dlp.data.phantom` (the "classic" family)
but the physics constants, the label codes and the :class:`~stm_dlp.types.Study` contract, so that a
model can be trained on one family and tested on the other. Select it with
``PhantomConfig(family="ribbon")`` (``data.phantom.family=ribbon``); its own options are
:class:`~stm_dlp.data.phantom.RibbonOptions`.

How it differs from the classic family
--------------------------------------

============  =============================================  =============================================
aspect        classic                                        ribbon
============  =============================================  =============================================
head          ellipse filling the FOV                        smooth random star-shaped outline (egg shape +
                                                             harmonics), head 130-160 x 160-205 mm, random
                                                             rotation/offset, skull 4.5-8 mm (thinner at
                                                             the temples) with diploe, scalp outside
cortex        ring at a fixed depth fraction                 gray-matter ribbon 2-4 mm thick (Fischl & Dale,
                                                             PNAS 2000;97:11050) that TOUCHES the inner skull,
                                                             following sulci (CSF clefts), interhemispheric
                                                             and Sylvian fissures
deep GM, CSF  two ellipses, fixed ventricles                 caudate, putamen, thalamus by slice level;
                                                             lateral / third ventricles and temporal horns
                                                             scaled 0.6-2x per patient (atrophy)
vessels       3 round arteries, full volume                  MCA branches in the Sylvian fissure, M1, ACA
                                                             pair, PCA, cortical branches in sulci; disks
                                                             1-4 mm with exact in-plane partial volume x a
                                                             through-plane factor; sinuses (SSS, straight,
                                                             transverse) as the VOF
lesion        ellipse, fixed core fraction                   thresholded smooth 3-D random field inside one
                                                             hemisphere's MCA / ACA / PCA territory
                                                             (sometimes two adjacent territories, never
                                                             both hemispheres), graded severity, oligemic
                                                             rim, sometimes none
AIF           gamma variate + gamma recirculation            Parker et al. population AIF (MRM
                                                             2006;56:993): two Gaussians + a sigmoid-
                                                             modulated exponential, random timing, width and
                                                             amplitude, arrival 2-15 s, peak 200-600 HU
residue       one of exponential / box / gamma               exponential, gamma or log-normal (per patient)
dispersion    none (TMAX = delay)                            normalised exponential (Calamante et al., MRM
                                                             2000;44:466) or gamma kernel, mean 0.25-1 s in
                                                             normal tissue growing to ~5 s in the core
noise         white Gaussian, fixed level                    spatially correlated Gaussian, level 0-8 HU per
                                                             patient, higher toward the head centre
                                                             (Poisson-like), beam-hardening streaks from the
                                                             skull + cupping, skull blooming (PSF)
geometry      FOV 220 mm, 5 mm slices                        pixel drawn in ``pixel_mm`` (0.5-2 mm), at least
                                                             what holds the head, at most a 300 mm FOV (so
                                                             ~1.8-2 mm at 128², 0.9-1.2 at 256², 0.5-0.6 at
                                                             512²); slices 4-10 mm; FOV = pixel x matrix
framing       fast 1-1.8 s then 2-3 s, jittered, 60-120 s    uniform with jitter, or exact 1 s then 2-3 s
                                                             (vendor-like), 1-3 s steps, total 50-90 s
============  =============================================  =============================================

Physics and the truth maps (exact by construction)
--------------------------------------------------

A perfused pixel with flow CBF (ml/100g/min), mean transit time MTT (s), dispersion mean β (s) and
delay d (s) has the impulse response

    k(t) = CBF · g(t − d),    g = h_β ⊛ R_MTT,

where ``R_MTT`` is the residue function (``R(0) = 1``, non-increasing, ``∫_0^∞ R dt = MTT``; the
survival function of an exponential, gamma (shape 1.5-3) or log-normal (σ 0.5-1.0) transit-time
distribution of mean MTT, Mouridsen et al., NeuroImage 2006;33:570 for the gamma) and ``h_β`` the
normalised dispersion kernel (``∫h = 1``, mean β). Its tissue curve is

    HU(t) = baseline + (ρ / κ_H) · (AIF ⊛ k)(t) + noise            (see :mod:`stm_dlp.perfusion.physics`).

The convolutions are computed once per patient on a fine grid (``RibbonOptions.fine_dt_s``,
trapezoid rule) for a table of MTT nodes (log-spaced, ≤ 3 % apart) and the dispersion values in use
(β is quantised to 0.25 s). A pixel's ``g`` is the blend of the two MTT nodes around its MTT with
weights *linear in MTT*, so the area of its k is exactly CBF · MTT. Definitions of the truth:

* **MTT** := ∫ k dt / CBF = ∫ R dt (the first moment of the transit-time distribution; dispersion
  does not change it because ∫h = 1). ``meta["mtt_s"]`` is this value.
* **CBV** := ∫ k dt / 60 = CBF · MTT / 60 (ml/100g) — exact, the central volume theorem.
* **TMAX** := argmax_t k(t) of the blended k actually simulated, searched on the fine grid (so its
  resolution is ``fine_dt_s``), i.e. d + argmax g — the paper's definition. With dispersion the
  peak of g lies after 0, so TMAX > d.
* **CBF** is the flow, the scale of k. Deconvolution reads it as max k, which dispersion lowers
  (Calamante et al. 2000), so a perfect deconvolution reads CBF low on this family by design: that is
  the known physical bias, not a generator error. Checked: on noise-free data with the true AIF and no
  smoothing, ``calculate_maps`` gives CBV r = 1.00 (median ratio 0.97-0.99), CBF r = 0.99, TMAX r 0.88-0.99.

Tissue values (per-patient means; each pixel varies by smooth random fields)
-----------------------------------------------------------------------------

==============  ================  =================  ==========  ===========  ======================
tissue          CBF ml/100g/min   CBV ml/100g        MTT s       delay s      dispersion mean β s
                                                                              (quantised to 0.25 s)
==============  ================  =================  ==========  ===========  ======================
cortical GM     50-75             ~3-5.5             3.3-4.6     0-0.9        0.25-0.75
deep GM         0.85-1.0 x GM     ~3-5               as GM       as GM        as GM
WM              18-30             ~1.3-3             4.2-6.0     GM + 0.1-0.5 0.375-0.875
oligemic rim    0.85-1 x normal   1-1.05 x normal    ~normal     + 0.8-2      + 0.5
penumbra        0.4-0.75 x normal 0.95-1.2 x normal  ~6-16       + 2-6        + 0.75-2.5
core            0.1-0.3 x normal  0.28-0.7 x normal  ~8-25       + 3.5-9      + 1.5-4
CSF             0                 0                  0           0            -
==============  ================  =================  ==========  ===========  ======================

Lesion delays are raised where needed so that every PENUMBRA and CORE pixel has TMAX > 6 s, the
clinical definition of critical hypoperfusion (Olivot et al., Stroke 2009;40:469); the core has
rCBF < 30 % (Campbell et al., Stroke 2011;42:3435) and CBV around or below 2 ml/100g, the penumbra a
prolonged MTT with preserved CBV (Wintermark et al., Stroke 2006;37:979). Normal values follow
Konstas et al., AJNR 2009;30:662 and 885. Unenhanced HU: GM 34-42, WM 6-10 below GM, CSF 2-12,
blood 38-50, bone 900-1500 with a diploe 200-500 HU lower, scalp -40-40; the core is 1-3 HU
hypodense (early edema).

Vessel pixels (label ``ARTERY`` / ``VEIN``, outside the brain mask, maps 0) hold
``pv · AIF (or VOF) + (1 − pv) · the tissue underneath``; ``meta["partial_volume"]`` is ``pv``
and ``meta["aif_hu"]`` the full-volume AIF. The VOF is the AIF dispersed by a gamma transit kernel
(mean 4-8 s, area 1). ``meta["baseline_hu"]`` is the unenhanced image as the frames contain it
(PSF blur, static streaks and cupping included); the per-frame part of the streaks is noise.
Label ``AIR`` is everything outside the skull, the scalp included. Deep gray matter is ``GM``.

Anatomy is scaled down to fit when ``matrix × max pixel size`` cannot hold a real head (tiny test
matrices only; ``meta["anatomy_scale"]`` < 1); the ribbon and the skull then keep at least one pixel
and the vessels ~1.5 pixels of diameter, and fewer sulci show. Use a matrix of 128 or more for life-size heads at 2 mm.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch

from stm_dlp.data.phantom import (
    AIR,
    ARTERY,
    CORE,
    CSF,
    GM,
    PENUMBRA,
    RIBBON_DISPERSIONS,
    RIBBON_RESIDUES,
    SKULL,
    VEIN,
    WM,
    PhantomConfig,
    RibbonOptions,
    axial_affine,
)
from stm_dlp.perfusion.physics import TISSUE_SCALE
from stm_dlp.types import PARAMS, Study

#: Default in-plane pixel range (mm) and slice thickness range (mm) of the ribbon family.
DEFAULT_PIXEL_MM: tuple[float, float] = (0.5, 2.0)
DEFAULT_SLICE_MM: tuple[float, float] = (4.0, 10.0)
#: Dispersion means are quantised to this step (s) so that each pixel's g is a tabulated row.
DISPERSION_STEP_S: float = 0.25
#: Largest ratio between neighbouring MTT nodes of the impulse-response table.
MTT_NODE_RATIO: float = 1.03
#: Largest field of view (mm) a pixel draw may give, as long as the head fits (clinical head FOVs: 200-280 mm).
MAX_FOV_MM: float = 300.0
#: Seed salt: the ribbon family never shares a random stream with the classic one.
_SALT = 0x52494242


# ----------------------------------------------------------------------------------------------- AIF
def parker_aif(t_s: np.ndarray, peak1_hu: float, t1_s: float, sigma1_s: float, ratio2: float, t2_s: float,
               sigma2_s: float, plateau: float, washout_per_s: float, slope_per_s: float, tau_s: float,
               arrival_s: float) -> np.ndarray:
    """Parker et al. (MRM 2006;56:993) population AIF in HU enhancement, re-timed for CT.

    ``p1 [G(t; t1, σ1) + ratio2 G(t; t2, σ2) + plateau · exp(−washout (t − τ)) / (1 + exp(−slope (t − τ)))]``
    with ``G`` unit-height Gaussians, multiplied by a smoothstep gate that is 0 before
    ``arrival_s − sigma1_s`` and 1 from ``arrival_s`` on (the Gaussians have tails before the bolus
    reaches the artery; real arterial curves do not). ``arrival_s`` is where the first pass reaches
    ~2 % of its height (``t1 = arrival + 2.8 σ1``).

    Args:
        t_s: times (s), any shape. Returns the same shape, float64.
    """
    t = np.asarray(t_s, dtype=np.float64)
    g1 = np.exp(-0.5 * ((t - t1_s) / sigma1_s) ** 2)
    g2 = np.exp(-0.5 * ((t - t2_s) / sigma2_s) ** 2)
    x = np.clip(-slope_per_s * (t - tau_s), -60.0, 60.0)
    tail = np.exp(-washout_per_s * (t - tau_s)) / (1.0 + np.exp(x))
    u = np.clip((t - (arrival_s - sigma1_s)) / sigma1_s, 0.0, 1.0)
    gate = u * u * (3.0 - 2.0 * u)
    return peak1_hu * (g1 + ratio2 * g2 + plateau * tail) * gate


def _draw_aif(rng: np.random.Generator, opts: RibbonOptions, recirculation: bool) -> dict[str, float]:
    """Random Parker parameters (s, HU); the peak of the whole curve is 200-600 HU."""
    width = rng.uniform(0.7, 1.5)
    sigma1 = 3.38 * width  # Parker: 0.0563 min
    arrival = rng.uniform(*opts.arrival_s)
    t1 = arrival + 2.8 * sigma1
    t2 = t1 + 11.7 * rng.uniform(0.8, 1.3)  # Parker: 0.365 - 0.170 min
    sigma2 = min(7.92 * width * rng.uniform(0.8, 1.2), (t2 - arrival) / 3.2)  # Parker: 0.132 min
    params = dict(peak1_hu=1.0, t1_s=t1, sigma1_s=sigma1, ratio2=rng.uniform(0.1, 0.3) if recirculation else 0.0,
                  t2_s=t2, sigma2_s=sigma2, plateau=rng.uniform(0.06, 0.18) if recirculation else 0.0,
                  washout_per_s=rng.uniform(0.002, 0.02), slope_per_s=0.635 * rng.uniform(0.7, 1.4),
                  tau_s=t1 + 18.8 * rng.uniform(0.8, 1.2), arrival_s=arrival)
    peak = rng.uniform(200.0, 600.0)
    grid = np.arange(0.0, t2 + 60.0, 0.01)
    params["peak1_hu"] = peak / float(parker_aif(grid, **params).max())
    return {k: float(v) for k, v in params.items()}


# ------------------------------------------------------------------------------ residue, dispersion
def ribbon_residue(t_s: np.ndarray, mtt_s: np.ndarray, kind: str, shape: float | None = None) -> np.ndarray:
    """Residue function ``R(t)`` (survival of the transit-time distribution), ``R(0)=1``, ``∫R = MTT``.

    Args:
        t_s: times (s) ≥ 0, broadcastable with ``mtt_s``.
        mtt_s: mean transit time(s) (s) > 0.
        kind: ``exponential``; ``gamma`` (``shape`` = gamma shape k); ``lognormal`` (``shape`` = σ of
            log transit time; the mean is kept at MTT: μ = ln MTT − σ²/2).
    Returns:
        float64 array of the broadcast shape; 0 for t < 0.
    """
    t = np.asarray(t_s, dtype=np.float64)
    m = np.asarray(mtt_s, dtype=np.float64)
    tp = np.clip(t, 0.0, None)
    if kind == "exponential":
        r = np.exp(-tp / m)
    elif kind == "gamma":
        k = float(shape)
        x = torch.from_numpy(np.broadcast_to(tp * k / m, np.broadcast_shapes(tp.shape, m.shape)).copy())
        r = 1.0 - torch.special.gammainc(torch.full_like(x, k), x).numpy()
    elif kind == "lognormal":
        sig = float(shape)
        mu = np.log(m) - 0.5 * sig * sig
        z = (np.log(np.clip(tp, 1e-300, None)) - mu) / (sig * math.sqrt(2.0))
        r = 0.5 * torch.special.erfc(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()
        r = np.where(tp > 0, r, 1.0)
    else:
        raise ValueError(f"unknown ribbon residue {kind!r}; valid: {', '.join(RIBBON_RESIDUES)}")
    return np.where(t >= 0, r, 0.0)


def dispersion_kernel(t_s: np.ndarray, mean_s: np.ndarray, kind: str) -> np.ndarray:
    """Dispersion kernel ``h(t)`` of mean ``mean_s`` (s): ``exponential`` (e^{-t/β}/β) or ``gamma`` (shape 2).

    Continuous normalisation (∫h = 1); callers renormalise on their grid. 0 for t < 0.
    """
    t = np.asarray(t_s, dtype=np.float64)
    b = np.asarray(mean_s, dtype=np.float64)
    tp = np.clip(t, 0.0, None)
    if kind == "exponential":
        h = np.exp(-tp / b) / b
    elif kind == "gamma":
        theta = b / 2.0
        h = tp * np.exp(-tp / theta) / theta**2
    else:
        raise ValueError(f"unknown dispersion kernel {kind!r}; valid: {', '.join(RIBBON_DISPERSIONS)}")
    return np.where(t >= 0, h, 0.0)


def _conv_trapezoid(f_hat: np.ndarray, g_hat: np.ndarray, f0: np.ndarray, g0: np.ndarray, f: np.ndarray,
                    g: np.ndarray, n: int, size: int, dt: float) -> np.ndarray:
    """Trapezoid-rule causal convolution from precomputed rFFTs (rows broadcast).

    ``dt [Σ_{k=0}^{j} f_k g_{j-k} − (f_0 g_j + f_j g_0) / 2]`` for j < n.
    """
    full = np.fft.irfft(f_hat * g_hat, size)[..., :n]
    return dt * (full - 0.5 * (f0 * g + g0 * f))


class _ImpulseTable:
    """Tabulated ``g = h_β ⊛ R_M`` and ``AIF ⊛ g`` on a fine grid for MTT nodes × dispersion values.

    Rows are indexed ``[dispersion index, MTT node]``; see the module docstring for the blend.
    """

    def __init__(self, aif_fine: np.ndarray, dt: float, kind: str, shape: float | None, disp_kind: str,
                 mtt_min: float, mtt_max: float, betas: np.ndarray):
        n = aif_fine.shape[0]
        self.dt, self.n = dt, n
        t = np.arange(n) * dt
        n_nodes = max(2, int(math.ceil(math.log(mtt_max / mtt_min) / math.log(MTT_NODE_RATIO))) + 1)
        self.nodes = np.exp(np.linspace(math.log(mtt_min), math.log(mtt_max), n_nodes))
        self.betas = np.asarray(betas, dtype=np.float64)
        size = 1 << (2 * n - 1).bit_length()
        r = ribbon_residue(t[None, :], self.nodes[:, None], kind, shape)  # (M, n)
        h = dispersion_kernel(t[None, :], self.betas[:, None], disp_kind)  # (B, n)
        # renormalise on the grid (trapezoid area 1): the discrete kernels keep ∫g = ∫R exactly
        h = h / (dt * (h.sum(1, keepdims=True) - 0.5 * (h[:, :1] + h[:, -1:])))
        r_hat, h_hat = np.fft.rfft(r, size), np.fft.rfft(h, size)
        self.g = _conv_trapezoid(h_hat[:, None], r_hat[None], h[:, None, :1], r[None, :, :1], h[:, None], r[None],
                                 n, size, dt)  # (B, M, n)
        a_hat = np.fft.rfft(aif_fine, size)
        ah = _conv_trapezoid(a_hat[None], h_hat, aif_fine[:1], h[:, :1], aif_fine[None], h, n, size, dt)  # (B, n)
        self.c = _conv_trapezoid(np.fft.rfft(ah, size)[:, None], r_hat[None], ah[:, None, :1], r[None, :, :1],
                                 ah[:, None], r[None], n, size, dt)  # (B, M, n)
        self.peak_idx = self.g.argmax(-1)  # (B, M)

    def locate(self, mtt: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dispersion index, lower MTT node, weight of the upper node) per pixel; weights linear in MTT."""
        b_idx = np.searchsorted(self.betas, beta)
        m0 = np.clip(np.searchsorted(self.nodes, mtt, side="right") - 1, 0, len(self.nodes) - 2)
        w = (mtt - self.nodes[m0]) / (self.nodes[m0 + 1] - self.nodes[m0])
        return b_idx, m0, np.clip(w, 0.0, 1.0)

    def tmax_offset(self, b_idx: np.ndarray, m0: np.ndarray, w: np.ndarray) -> np.ndarray:
        """argmax_t of the blended g (s), searched between the peaks of the two nodes (g is unimodal)."""
        p0, p1 = self.peak_idx[b_idx, m0], self.peak_idx[b_idx, m0 + 1]
        lo, hi = np.minimum(p0, p1), np.maximum(p0, p1)
        span = int((hi - lo).max()) + 1 if lo.size else 1
        idx = lo[:, None] + np.arange(span)[None, :]
        valid = idx <= hi[:, None]
        idx = np.minimum(idx, self.n - 1)
        g0 = self.g[b_idx[:, None], m0[:, None], idx]
        g1 = self.g[b_idx[:, None], m0[:, None] + 1, idx]
        blend = np.where(valid, (1 - w[:, None]) * g0 + w[:, None] * g1, -np.inf)
        return (lo + blend.argmax(1)) * self.dt

    def curves(self, times: np.ndarray, cbf: np.ndarray, delay: np.ndarray, b_idx: np.ndarray, m0: np.ndarray,
               w: np.ndarray) -> np.ndarray:
        """``(N, T)`` HU enhancement ``(ρ/κ_H) CBF (AIF ⊛ g)(t − delay)`` (linear interpolation in time)."""
        ts = times[None, :] - delay[:, None]
        f = np.clip(ts / self.dt, 0.0, self.n - 1.000001)
        j = f.astype(np.int64)
        wf = f - j
        out = np.zeros_like(ts)
        flat = self.c.reshape(-1)
        n_nodes = self.c.shape[1]
        for node, wn in ((m0, 1.0 - w), (m0 + 1, w)):
            start = ((b_idx * n_nodes + node) * self.n)[:, None]  # gather samples, never whole rows
            v = flat[start + j] * (1 - wf) + flat[start + j + 1] * wf
            out += wn[:, None] * v
        return TISSUE_SCALE * cbf[:, None] * np.where(ts > 0, out, 0.0)


# -------------------------------------------------------------------------------------------- framing
def ribbon_frame_times(rng: np.random.Generator, n_frames: int, opts: RibbonOptions) -> tuple[np.ndarray, str]:
    """Frame times (s from the first frame, float64 ``(n_frames,)``) and the pattern's name.

    ``uniform``: one interval (total / (n − 1)) with ±6 % jitter; ``two_phase``: exactly the shortest
    allowed interval (1 s by default) through the bolus, then a constant 2-3 s (vendor protocols).
    The total is drawn in ``opts.total_s`` and clipped to what ``n_frames`` steps in
    ``opts.interval_s`` can span; times are rounded to 1 ms as scanners store them.
    """
    i_lo, i_hi = opts.interval_s
    steps_n = n_frames - 1
    total = float(np.clip(rng.uniform(*opts.total_s), steps_n * i_lo, steps_n * i_hi))
    if rng.uniform() < 0.5 or n_frames < 4 or i_hi <= i_lo:
        pattern = "uniform"
        dt = total / steps_n
        steps = np.clip(dt * (1.0 + rng.normal(0.0, 0.06, steps_n)), i_lo, i_hi)
    else:
        pattern = "two_phase"
        dt_f = i_lo
        dt_s = float(np.clip(np.round(rng.uniform(max(2.0, i_lo), max(2.0, i_hi)) * 2) / 2, i_lo, i_hi))
        if dt_s <= dt_f:
            dt_s = i_hi
        n_fast = int(round((n_frames * dt_s - dt_f - total) / (dt_s - dt_f)))
        n_fast = int(np.clip(n_fast, 2, n_frames - 1))
        steps = np.concatenate([np.full(n_fast - 1, dt_f), np.full(n_frames - n_fast, dt_s)])
    times = np.round(np.concatenate([[0.0], np.cumsum(steps)]), 3)
    return times, pattern


# ------------------------------------------------------------------------------------- 2-D helpers
def _gaussian_filter(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing of the last two axes by FFT (periodic; callers keep air at the borders)."""
    if sigma_px <= 0:
        return img
    h, w = img.shape[-2:]
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    tf = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (kx**2 + ky**2)).astype(img.dtype)  # float32 stays float32
    return np.fft.irfft2(np.fft.rfft2(img) * tf, s=(h, w))


def _field(rng: np.random.Generator, shape: tuple[int, ...], length_px: tuple[float, ...]) -> np.ndarray:
    """Zero-mean unit-std Gaussian random field; correlation length per axis (pixels)."""
    spectrum = np.ones(())
    for ax, (n, ell) in enumerate(zip(shape, length_px)):
        k = np.fft.fftfreq(n).reshape([-1 if i == ax else 1 for i in range(len(shape))])
        spectrum = spectrum * np.exp(-2.0 * (math.pi * ell * k) ** 2)
    f = np.fft.ifftn(np.fft.fftn(rng.normal(size=shape)) * spectrum).real
    return (f - f.mean()) / (f.std() + 1e-12)


def _distance_to_surface(surface: np.ndarray, pixel_mm: float, max_mm: float) -> np.ndarray:
    """Euclidean distance (mm) from each pixel to the nearest ``surface`` pixel, exact up to ``max_mm``.

    Beyond ``max_mm`` the value is ``inf``; surface pixels have 0. Off-grid counts as surface.
    """
    r = max(1, int(math.ceil(max_mm / pixel_mm)))
    h, w = surface.shape
    pad = np.pad(surface, r, constant_values=True)
    dist = np.where(surface, 0.0, np.inf)
    offsets = [(di, dj) for di in range(-r, r + 1) for dj in range(-r, r + 1)
               if 0 < di * di + dj * dj and math.hypot(di, dj) * pixel_mm <= max_mm + 1e-9]
    for di, dj in offsets:
        d = math.hypot(di, dj) * pixel_mm
        shifted = pad[r + di: r + di + h, r + dj: r + dj + w]
        dist = np.where(shifted & (d < dist), d, dist)
    return dist


class _Grid:
    """Pixel centres of the matrix in the anatomy frame (mm; x: patient left, y: posterior).

    Scanner mm = (index − centre) × pixel; anatomy = rotate(scanner − offset) / scale.
    """

    def __init__(self, h: int, w: int, pixel: float, scale: float, rot: float, off: np.ndarray):
        self.h, self.w, self.pixel, self.scale, self.off = h, w, pixel, scale, off
        self.c, self.s = math.cos(rot), math.sin(rot)
        rows, cols = np.meshgrid((np.arange(h) - (h - 1) / 2) * pixel, (np.arange(w) - (w - 1) / 2) * pixel,
                                 indexing="ij")
        xs, ys = (cols - off[0]) / scale, (rows - off[1]) / scale
        self.x, self.y = xs * self.c + ys * self.s, -xs * self.s + ys * self.c

    def window(self, xmin: float, xmax: float, ymin: float, ymax: float) -> tuple[slice, slice]:
        """Row and column slices covering an anatomy-frame box (plus a 2-pixel margin)."""
        xa = np.array([xmin, xmin, xmax, xmax])
        ya = np.array([ymin, ymax, ymin, ymax])
        xs, ys = xa * self.c - ya * self.s, xa * self.s + ya * self.c
        cols = (xs * self.scale + self.off[0]) / self.pixel + (self.w - 1) / 2
        rows = (ys * self.scale + self.off[1]) / self.pixel + (self.h - 1) / 2
        r0, r1 = int(max(0, math.floor(rows.min()) - 2)), int(min(self.h, math.ceil(rows.max()) + 3))
        c0, c1 = int(max(0, math.floor(cols.min()) - 2)), int(min(self.w, math.ceil(cols.max()) + 3))
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _stroke(grid: _Grid, pts: np.ndarray, half_width: float) -> np.ndarray:
    """Boolean image of the pixels within ``half_width`` mm of the polyline ``pts`` (anatomy frame)."""
    out = np.zeros((grid.h, grid.w), bool)
    rs, cs = grid.window(pts[:, 0].min() - half_width, pts[:, 0].max() + half_width,
                         pts[:, 1].min() - half_width, pts[:, 1].max() + half_width)
    out[rs, cs] = _segment_distance(grid.x[rs, cs], grid.y[rs, cs], pts) <= half_width
    return out


def _segment_distance(x: np.ndarray, y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance (mm) from grid points to a polyline ``pts`` ``(K, 2)``."""
    best = np.full(x.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        L2 = dx * dx + dy * dy + 1e-12
        u = np.clip(((x - x0) * dx + (y - y0) * dy) / L2, 0.0, 1.0)
        best = np.minimum(best, np.hypot(x - x0 - u * dx, y - y0 - u * dy))
    return best


def _disk_coverage(grid: _Grid, cx: float, cy: float, radius: float, pixel: float) -> np.ndarray:
    """Fraction of each pixel (side ``pixel`` anatomy mm) inside a disk; 6 × 6 supersampling near it."""
    cov = np.zeros((grid.h, grid.w))
    rs, cs = grid.window(cx - radius - pixel, cx + radius + pixel, cy - radius - pixel, cy + radius + pixel)
    x, y = grid.x[rs, cs], grid.y[rs, cs]
    near = np.hypot(x - cx, y - cy) <= radius + pixel
    if not near.any():
        return cov
    sub = (np.arange(6) + 0.5) / 6 - 0.5
    ou, ov = np.meshgrid(sub * pixel, sub * pixel, indexing="ij")
    # sub-pixel offsets along the matrix axes, expressed in the anatomy frame (the grid is rotated)
    sx = x[near][:, None] + (ou.ravel() * grid.c - ov.ravel() * grid.s)[None]
    sy = y[near][:, None] + (ou.ravel() * grid.s + ov.ravel() * grid.c)[None]
    win = np.zeros(x.shape)
    win[near] = (np.hypot(sx - cx, sy - cy) <= radius).mean(1)
    cov[rs, cs] = win
    return cov


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
             ) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / max(ax, 1e-6)) ** 2 + (v / max(ay, 1e-6)) ** 2 < 1.0


def _profile(z: float, lo: float, hi: float) -> float:
    """Size factor of a structure spanning levels [lo, hi] mm: 1 in the middle, 0 outside."""
    if not lo < z < hi:
        return 0.0
    u = (z - 0.5 * (lo + hi)) / (0.5 * (hi - lo))
    return math.sqrt(max(0.0, 1.0 - u * u))


# -------------------------------------------------------------------------------------------- anatomy
def _draw_head(rng: np.random.Generator) -> dict:
    """Per-patient head shape (anatomical mm; x: patient left, y: posterior)."""
    a = rng.uniform(65.0, 80.0)  # outer half-breadth: head breadth 130-160 mm
    b = a * rng.uniform(1.15, 1.32)  # outer half-length: 160-205 mm
    ks = np.arange(2, 7)
    return dict(
        a=a, b=b,
        egg=rng.uniform(0.04, 0.09),  # posterior (parietal) wider than frontal
        harm_amp=rng.normal(0.0, 0.022, ks.size) / np.sqrt(ks - 1), harm_phase=rng.uniform(0, 2 * math.pi, ks.size),
        skull=rng.uniform(4.5, 8.0), scalp=rng.uniform(3.0, 7.0),
        rot=math.radians(rng.uniform(-7.0, 7.0)), off=rng.uniform(-4.0, 4.0, 2),
        vent=float(np.exp(rng.uniform(math.log(0.6), math.log(2.0)))),
        ribbon=rng.uniform(2.3, 3.5), ribbon_var=rng.uniform(0.3, 0.6),
        sulcus_spacing=rng.uniform(8.0, 12.0), fissure_a=rng.uniform(0.25, 0.45), fissure_p=rng.uniform(0.3, 0.5),
        sylvian_len=rng.uniform(20.0, 32.0), sylvian_angle=math.radians(rng.uniform(8.0, 25.0)),
        jitter=rng.uniform(0.9, 1.1, 8),
    )


def _outer_radius(head: dict, theta: np.ndarray) -> np.ndarray:
    """Outer skull radius (mm) at angle ``theta`` (level factor not applied)."""
    a, b = head["a"], head["b"]
    base = 1.0 / np.sqrt((np.cos(theta) / a) ** 2 + (np.sin(theta) / b) ** 2)
    mod = 1.0 + head["egg"] * np.sin(theta)
    for k, (amp, ph) in enumerate(zip(head["harm_amp"], head["harm_phase"]), start=2):
        mod = mod + amp * np.cos(k * theta + ph)
    return base * mod


def _level_scale(z: float) -> float:
    """Head cross-section scale at level z (mm above the basal ganglia / thalamus level)."""
    return math.sqrt(max(0.09, 1.0 - ((z + 15.0) / 100.0) ** 2))


def _skull_thickness(head: dict, theta: np.ndarray, pixel: float) -> np.ndarray:
    """Skull thickness (mm): thinner at the temples, at least one pixel."""
    return np.maximum(head["skull"] * (1.0 - 0.35 * np.cos(theta) ** 2), pixel)


def _sulci(rng: np.random.Generator, head: dict) -> list[dict]:
    mean_r = 0.5 * (head["a"] + head["b"])
    n = max(8, int(round(2 * math.pi * mean_r / head["sulcus_spacing"])))
    th = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * math.pi / n + rng.uniform(0, 2 * math.pi)
    return [dict(theta=float(t), depth=rng.uniform(8.0, 22.0), width=rng.uniform(0.8, 1.8),
                 bend=rng.uniform(-0.45, 0.45), wiggle=rng.uniform(-0.2, 0.2),
                 branch=rng.uniform(0.3, 0.7) if rng.uniform() < 0.4 else 0.0,
                 branch_angle=rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)) for t in th]


def _cleft(p0: np.ndarray, inward: np.ndarray, length: float, bend: float, wiggle: float = 0.0) -> np.ndarray:
    """Polyline from ``p0`` going ``inward`` for ``length`` mm, bending sideways by ``bend · length``."""
    nrm = np.array([-inward[1], inward[0]])
    return np.stack([p0, p0 + 0.35 * length * inward + (0.15 * bend + wiggle) * length * nrm,
                     p0 + 0.7 * length * inward + (0.5 * bend - wiggle) * length * nrm,
                     p0 + length * inward + bend * length * nrm])


def _slice_anatomy(rng: np.random.Generator, head: dict, sulci: list[dict], grid: _Grid, z: float,
                   pixel: float) -> dict:
    """Labels (before lesions and vessels) and geometry of one slice; ``pixel`` in anatomical mm."""
    x, y = grid.x, grid.y
    lvl = _level_scale(z)
    hf = head["a"] / 72.0 * lvl  # internal structures scale with head breadth and level
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    r_out = lvl * _outer_radius(head, theta)
    r_in = r_out - _skull_thickness(head, theta, pixel)
    labels = np.full(x.shape, AIR, np.int64)
    scalp = (r >= r_out) & (r < r_out + head["scalp"]) if head["scalp"] > 0 else np.zeros(x.shape, bool)
    labels[(r >= r_in) & (r < r_out)] = SKULL
    brain = r < r_in
    labels[brain] = WM

    def inner_point(t: float, inset: float = -1.0) -> np.ndarray:
        rr = float(lvl * _outer_radius(head, np.array(t)) - _skull_thickness(head, np.array(t), pixel))
        return np.array([math.cos(t), math.sin(t)]) * (rr - inset)

    # CSF clefts: sulci from the surface, the interhemispheric fissure, the Sylvian fissures
    clefts = np.zeros(x.shape, bool)
    min_half = 0.5 * pixel
    for sc in sulci:
        # a sulcus is ~1-2 mm wide: at coarse (anatomical) pixels only some of them show as a CSF pixel
        if rng.uniform() >= min(0.85, 1.5 * sc["width"] / pixel):
            continue
        t = sc["theta"] + rng.normal(0.0, 0.03)
        p0 = inner_point(t)
        inward = -np.array([math.cos(t), math.sin(t)])
        depth = sc["depth"] * rng.uniform(0.7, 1.2) * lvl + 1.0
        line = _cleft(p0, inward, depth, sc["bend"], sc["wiggle"])
        half = max(0.5 * sc["width"], min_half)
        clefts |= _stroke(grid, line, half)
        if sc["branch"] > 0:  # a side branch from the middle of the sulcus
            a = sc["branch_angle"]
            d = np.array([inward[0] * math.cos(a) - inward[1] * math.sin(a),
                          inward[0] * math.sin(a) + inward[1] * math.cos(a)])
            clefts |= _stroke(grid, _cleft(line[1], d, sc["branch"] * depth, -0.5 * sc["bend"]), half)
    r_ant = float(np.linalg.norm(inner_point(-math.pi / 2, 0)))
    r_post = float(np.linalg.norm(inner_point(math.pi / 2, 0)))
    fis_w = max(0.5 * rng.uniform(1.5, 3.0), min_half)
    clefts |= _stroke(grid, _cleft(inner_point(-math.pi / 2), np.array([0.0, 1.0]), head["fissure_a"] * r_ant + 1,
                                   rng.uniform(-0.05, 0.05)), fis_w)
    clefts |= _stroke(grid, _cleft(inner_point(math.pi / 2), np.array([0.0, -1.0]), head["fissure_p"] * r_post + 1,
                                   rng.uniform(-0.05, 0.05)), fis_w)
    sylvian_lines = []
    sylv = _profile(z, -22.0, 14.0)
    if sylv > 0:
        for side in (-1.0, 1.0):
            t = math.pi / 2 - side * (math.pi / 2 + head["sylvian_angle"])  # lateral, a little anterior
            d = np.array([-side * math.cos(head["sylvian_angle"]), math.sin(head["sylvian_angle"]) * 0.6])
            line = _cleft(inner_point(t), d / np.linalg.norm(d), head["sylvian_len"] * sylv * hf + 1.0,
                          rng.uniform(-0.2, 0.2))
            sylvian_lines.append((side, line))
            clefts |= _stroke(grid, line, max(0.5 * rng.uniform(2.0, 4.0), min_half))
    clefts &= brain

    # the cortical ribbon: brain within 2-4 mm of the surface (skull or CSF cleft); touches the skull
    thick = head["ribbon"] + head["ribbon_var"] * np.tanh(_field(rng, x.shape, (6.0 / pixel,) * 2))
    thick = np.maximum(np.clip(thick, 2.0, 4.0), pixel)
    dist = _distance_to_surface(~brain | clefts, pixel, float(thick.max()))
    labels[brain & (dist <= thick)] = GM
    # deep gray matter (caudate, putamen, thalamus) and the ventricles
    v, j = head["vent"], head["jitter"]
    for side in (-1.0, 1.0):
        pc = _profile(z, -6.0, 22.0)
        if pc:
            labels[brain & _ellipse(x, y, side * (11 + 3 * v) * hf * j[0], -12 * hf, 4.5 * hf * pc, 8 * hf * pc)] = GM
        pp = _profile(z, -12.0, 10.0)
        if pp:
            labels[brain & _ellipse(x, y, side * 24 * hf * j[1], -2 * hf, 4.5 * hf * pp, 13 * hf * pp,
                                    side * math.radians(15))] = GM
        pt = _profile(z, -10.0, 10.0)
        if pt:
            labels[brain & _ellipse(x, y, side * 9 * hf * j[2], 8 * hf, 7 * hf * pt, 11 * hf * pt)] = GM
    for side in (-1.0, 1.0):
        pv_ = _profile(z, -6.0, 30.0)
        if pv_:
            labels[brain & _ellipse(x, y, side * (3 + 3 * v) * hf, (-14 - 2 * v) * hf, max(0.8, 2.5 * v * pv_) * hf,
                                    9 * hf * pv_, side * math.radians(20))] = CSF
            labels[brain & _ellipse(x, y, side * (6 + 3 * v) * hf, 6 * hf, max(0.8, 3 * v * pv_) * hf, 14 * hf * pv_,
                                    -side * math.radians(15))] = CSF
        ph = _profile(z, -25.0, -10.0)
        if ph:
            labels[brain & _ellipse(x, y, side * 32 * hf, 5 * hf, (1 + v) * hf * ph, 6 * hf * ph)] = CSF
    p3 = _profile(z, -12.0, 0.0)
    if p3:
        labels[brain & _ellipse(x, y, 0.0, 2 * hf, max(0.5 * pixel, (0.8 + 1.2 * v) * hf * p3), 10 * hf * p3)] = CSF
    labels[clefts] = CSF
    return dict(labels=labels, brain=brain, scalp=scalp, r=r, theta=theta, r_out=r_out, r_in=r_in,
                lvl=lvl, hf=hf, sylvian=sylvian_lines, r_ant=r_ant, r_post=r_post, inner_point=inner_point)


def _vessels(rng: np.random.Generator, anat: dict, grid: _Grid, z: float, pixel: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Partial-volume images ``(artery, vein)`` of one slice (0..1)."""
    hf = anat["hf"]
    art, vein = np.zeros(grid.x.shape), np.zeros(grid.x.shape)
    disks_a: list[tuple[float, float, float, float]] = []  # (cx, cy, radius mm, through-plane factor)
    disks_v: list[tuple[float, float, float, float]] = []
    for _side, line in anat["sylvian"]:  # MCA branches (M2/M3) inside the Sylvian fissure
        for _ in range(int(rng.integers(2, 5))):
            u = rng.uniform(0.15, 0.95)
            seg = line[0] + u * (line[-1] - line[0])
            disks_a.append((float(seg[0]), float(seg[1]), 0.5 * rng.uniform(1.6, 3.2), rng.uniform(0.6, 1.0)))
    if -20.0 < z < -6.0:  # M1 segments
        for side in (-1.0, 1.0):
            disks_a.append((side * rng.uniform(14, 24) * hf, -5 * hf, 0.5 * rng.uniform(3.0, 4.0),
                            rng.uniform(0.5, 0.9)))
    if -10.0 < z < 55.0:  # ACA (A2 / pericallosal) pair beside the midline
        ya = -rng.uniform(15.0, 32.0) * hf
        for side in (-1.0, 1.0):
            disks_a.append((side * rng.uniform(1.5, 2.8), ya + rng.normal(0, 1.5), 0.5 * rng.uniform(1.6, 2.4),
                            rng.uniform(0.6, 1.0)))
    if -15.0 < z < 6.0:  # PCA
        for side in (-1.0, 1.0):
            disks_a.append((side * rng.uniform(12, 18) * hf, rng.uniform(20, 28) * hf, 0.5 * rng.uniform(1.6, 2.6),
                            rng.uniform(0.6, 1.0)))
    for _ in range(int(rng.integers(1, 5))):  # small cortical branches near the surface (low partial volume)
        t = rng.uniform(-math.pi, math.pi)
        p = anat["inner_point"](t, rng.uniform(2.0, 6.0))
        disks_a.append((float(p[0]), float(p[1]), 0.5 * rng.uniform(1.0, 1.6), rng.uniform(0.3, 0.8)))
    if z > -10.0:  # superior sagittal sinus against the posterior inner skull (anterior too, higher up)
        d = rng.uniform(6.0, 9.0) * min(1.0, hf)
        disks_v.append((0.0, anat["r_post"] - 0.45 * d, 0.5 * d, 1.0))
        if z > 25.0:
            d = rng.uniform(3.0, 5.0) * min(1.0, hf)
            disks_v.append((0.0, -anat["r_ant"] + 0.45 * d, 0.5 * d, 1.0))
    if -10.0 < z < 15.0:  # straight sinus
        disks_v.append((0.0, 0.55 * anat["r_post"], 0.5 * rng.uniform(4.0, 6.0) * min(1.0, hf), rng.uniform(0.8, 1.0)))
    if z < -12.0:  # transverse sinuses
        for side in (-1.0, 1.0):
            disks_v.append((side * 0.45 * anat["r_post"], 0.85 * anat["r_post"], 0.5 * rng.uniform(5, 8) * min(1.0, hf),
                            rng.uniform(0.8, 1.0)))
    # in a scaled-down head (tiny matrices) vessels keep ~1.5 pixels of diameter, so an AIF stays measurable
    min_rad = (0.75 if grid.scale < 1.0 else 0.3) * pixel
    for disks, img in ((disks_a, art), (disks_v, vein)):
        for cx, cy, rad, through in disks:
            np.maximum(img, through * _disk_coverage(grid, cx, cy, max(rad, min_rad), pixel), out=img)
    inside = anat["brain"]
    return np.where(inside, np.clip(art, 0, 1), 0.0), np.where(inside & (art <= 0), np.clip(vein, 0, 1), 0.0)


# ------------------------------------------------------------------------------------------ lesions
_TERRITORIES = ("MCA", "ACA", "PCA")


def _draw_lesion(rng: np.random.Generator, cfg: PhantomConfig) -> dict | None:
    if rng.uniform() >= cfg.lesion_probability:
        return None
    primary = str(rng.choice(_TERRITORIES, p=[0.65, 0.15, 0.2]))
    territories = [primary]
    if rng.uniform() < cfg.ribbon.two_territory_probability:
        territories.append("MCA" if primary != "MCA" else str(rng.choice(["ACA", "PCA"])))
    return dict(side=float(rng.choice([-1.0, 1.0])), territories=territories,
                centre_angle=float(rng.uniform(-0.6, 0.6)), centre_depth=float(rng.uniform(0.35, 0.8)),
                centre_z=float(rng.uniform(-15.0, 40.0)), extent_mm=float(rng.uniform(15.0, 40.0)),
                length_mm=float(rng.uniform(6.0, 14.0)), thr_pen=float(rng.uniform(0.4, 1.2)),
                core_gap=float(rng.uniform(0.6, 1.5)),
                rcbf_pen=float(rng.uniform(0.55, 0.75)), rcbv_pen=float(rng.uniform(0.95, 1.2)),
                delay_pen=float(rng.uniform(2.0, 4.0)), delay_pen_u=float(rng.uniform(0.5, 2.0)),
                disp_pen=float(rng.uniform(0.75, 1.5)), disp_pen_u=float(rng.uniform(0.25, 1.0)),
                rcbf_core=float(rng.uniform(0.15, 0.3)), rcbv_core=float(rng.uniform(0.4, 0.7)),
                delay_core=float(rng.uniform(3.5, 6.0)), delay_core_u=float(rng.uniform(0.0, 3.0)),
                disp_core=float(rng.uniform(1.5, 3.0)), olig_delay=float(rng.uniform(0.8, 2.0)))


def _territory_mask(lesion: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One hemisphere's vascular territories (ACA anterior-medial, PCA posterior, MCA between)."""
    side = lesion["side"]
    hemi = side * x > 1.0
    phi = np.degrees(np.arctan2(y, np.maximum(side * x, 1e-6)))  # -90 anterior .. +90 posterior
    wob = 6.0 * np.sin(np.hypot(x, y) / 9.0)
    sel = np.zeros(x.shape, bool)
    for t in lesion["territories"]:
        if t == "ACA":
            sel |= phi < -50.0 + wob
        elif t == "PCA":
            sel |= phi > 55.0 + wob
        else:
            sel |= (phi >= -50.0 + wob) & (phi <= 55.0 + wob)
    return hemi & sel


# --------------------------------------------------------------------------------------- the patient
def simulate_ribbon_patient(cfg: PhantomConfig, seed: int, patient_id: str | None = None) -> Study:
    """One ribbon-family patient (all slices), deterministic in ``seed``; see the module docstring.

    Returns the classic contract: ``frames`` (S, T, H, W) HU, ``maps`` (S, 3, H, W) CBV/CBF/TMAX truth,
    ``mask`` (S, H, W) brain (WM/GM/CSF/lesion, no vessels). ``meta`` has the classic keys (``aif_hu``,
    ``labels``, ``baseline_hu``, ``residue``, ``aif_params``, ``aif_pixels``, ``vof_pixels``, ``vof_hu``,
    ``config``, ``seed``, ``family``) plus ``mtt_s``, ``delay_s``, ``dispersion_s``, ``partial_volume``
    (S, H, W), ``residue_shape``, ``dispersion_kernel``, ``pixel_mm``, ``slice_mm``, ``anatomy_scale``,
    ``noise_hu``, ``frame_pattern``, ``lesion`` and ``head_pose`` (``rotation_rad``, ``offset_mm``,
    ``anatomy_scale``: the head frame is ``x = (c cos + r sin) / scale``, ``y = (−c sin + r cos) / scale``
    with ``c, r`` the pixel centre's mm from the matrix centre minus the offset; x > 0 is the patient's
    left, y > 0 posterior; the midline is x = 0).
    """
    opts = cfg.ribbon
    rng = np.random.default_rng([seed, _SALT])
    h, w, s_count = cfg.height, cfg.width, cfg.n_slices
    n_frames = int(rng.integers(cfg.frames_min, cfg.frames_max + 1))
    times, pattern = ribbon_frame_times(rng, n_frames, opts)
    aif_params = _draw_aif(rng, opts, cfg.recirculation)
    residue = opts.residue if opts.residue != "mixed" else str(rng.choice(RIBBON_RESIDUES))
    shape = {"exponential": None, "gamma": float(rng.uniform(1.5, 3.0)),
             "lognormal": float(rng.uniform(0.5, 1.0))}[residue]
    disp_kind = opts.dispersion if opts.dispersion != "mixed" else str(rng.choice(RIBBON_DISPERSIONS))

    # geometry: head size in mm, pixel drawn so that the head fits the matrix when the range allows
    head = _draw_head(rng)
    sulci = _sulci(rng, head)
    th = np.linspace(-math.pi, math.pi, 721)
    extent = float(_outer_radius(head, th).max()) + head["scalp"] + float(np.abs(head["off"]).max()) + 6.0
    pix_lo, pix_hi = cfg.pixel_mm or DEFAULT_PIXEL_MM
    need = 2.0 * extent / min(h, w)
    if need <= pix_hi:
        hi = max(need, min(pix_hi, MAX_FOV_MM / min(h, w)))
        pixel, scale = float(rng.uniform(max(pix_lo, need), hi)), 1.0
    else:
        pixel, scale = float(pix_hi), pix_hi / need
    if not opts.scalp:
        head["scalp"] = 0.0
    slice_mm = float(rng.uniform(*(cfg.slice_mm_range or DEFAULT_SLICE_MM)))
    z_centre = rng.uniform(-5.0, 30.0)
    zs = z_centre + (np.arange(s_count) - (s_count - 1) / 2) * slice_mm
    pa = pixel / scale  # one pixel in anatomical mm
    grid = _Grid(h, w, pixel, scale, head["rot"], head["off"])
    x, y = grid.x, grid.y

    # per-patient tissue values
    gm_cbf, gm_mtt = rng.uniform(50.0, 75.0), rng.uniform(3.3, 4.6)
    wm_cbf, wm_mtt = rng.uniform(18.0, 30.0), rng.uniform(4.2, 6.0)
    deep_factor = rng.uniform(0.85, 1.0)
    gm_delay, wm_extra = rng.uniform(0.0, 0.4), rng.uniform(0.1, 0.5)
    gm_hu = rng.uniform(34.0, 42.0)
    hu = dict(gm=gm_hu, wm=gm_hu - rng.uniform(6.0, 10.0), csf=rng.uniform(2.0, 12.0), blood=rng.uniform(38.0, 50.0),
              bone=rng.uniform(900.0, 1500.0), diploe=rng.uniform(200.0, 500.0), scalp=rng.uniform(-40.0, 40.0))

    lesion = _draw_lesion(rng, cfg)
    if lesion is not None:  # a 3-D field (slices × rows × cols) so that the lesion continues across slices
        ell = lesion["length_mm"] / pa
        fld = _field(rng, (s_count, h, w), (lesion["length_mm"] / slice_mm, ell, ell))
        side = lesion["side"]
        ang = lesion["centre_angle"]
        cx = side * lesion["centre_depth"] * head["a"] * math.cos(ang) * 0.8
        cy = lesion["centre_depth"] * head["b"] * math.sin(ang) * 0.8
        if lesion["territories"][0] == "ACA":
            cx, cy = side * 0.2 * head["a"], -0.6 * head["b"]
        elif lesion["territories"][0] == "PCA":
            cx, cy = side * 0.3 * head["a"], 0.65 * head["b"]

    S = (s_count, h, w)
    labels_all = np.zeros(S, np.int64)
    cbf = np.zeros(S)
    mtt = np.zeros(S)
    delay = np.zeros(S)
    beta = np.zeros(S)
    base = np.zeros(S)
    art_pv, vein_pv = np.zeros(S), np.zeros(S)
    heads = []
    lesion_g = np.full(S, -np.inf)
    for si, z in enumerate(zs):
        anat = _slice_anatomy(rng, head, sulci, grid, float(z), pa)
        lab = anat["labels"]
        deep = (lab == GM) & (anat["r"] < 0.6 * anat["r_in"])  # deep nuclei (the ribbon is near the surface)
        fl = [_field(rng, (h, w), (4.0 / pa,) * 2) for _ in range(4)]
        tissue = np.isin(lab, (GM, WM))
        is_gm = lab == GM
        cbf_s = np.where(is_gm, gm_cbf * np.where(deep, deep_factor, 1.0), wm_cbf) * (1 + 0.1 * fl[0])
        mtt_s = np.where(is_gm, gm_mtt, wm_mtt) * (1 + 0.08 * fl[1])
        d_s = gm_delay + 0.5 * (1 + np.tanh(fl[2])) * 0.5 + np.where(is_gm, 0.0, wm_extra)
        b_s = np.where(is_gm, 0.25, 0.375) + 0.5 * 0.5 * (1 + np.tanh(fl[3]))
        if lesion is not None:
            terr = _territory_mask(lesion, x, y)
            bump = 2.0 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - lesion["centre_z"]) ** 2)
                                / (2 * lesion["extent_mm"] ** 2))
            g = 0.8 * fld[si] + bump
            lesion_g[si] = np.where(terr & tissue, g, -np.inf)
            gl = lesion_g[si]
            tp, tc = lesion["thr_pen"], lesion["thr_pen"] + lesion["core_gap"]
            olig = (gl > tp - 0.35) & (gl <= tp)
            wo = np.clip((gl - (tp - 0.35)) / 0.35, 0, 1)
            d_s = np.where(olig, d_s + wo * lesion["olig_delay"], d_s)
            b_s = np.where(olig, b_s + 0.5 * wo, b_s)
            cbf_s = np.where(olig, cbf_s * (1 - 0.15 * wo), cbf_s)
            mtt_s = np.where(olig, mtt_s * (1 + 0.05 * wo) / (1 - 0.15 * wo), mtt_s)
            pen = gl > tp
            core = gl > tc
            u = np.clip((gl - tp) / (tc - tp), 0, 1)
            uc = np.clip((gl - tc) / 0.8, 0, 1)
            rcbf = np.where(core, lesion["rcbf_core"] * (1 - 0.3 * uc),
                            lesion["rcbf_pen"] - (lesion["rcbf_pen"] - 0.4) * u)
            rcbv = np.where(core, lesion["rcbv_core"] * (1 - 0.3 * uc), lesion["rcbv_pen"])
            sel = pen | core
            mtt_s = np.where(sel, np.minimum(mtt_s * rcbv / rcbf, 25.0), mtt_s)
            cbf_s = np.where(sel, cbf_s * rcbf, cbf_s)
            d_s = np.where(core, d_s + lesion["delay_core"] + lesion["delay_core_u"] * uc,
                           np.where(pen, d_s + lesion["delay_pen"] + lesion["delay_pen_u"] * u, d_s))
            b_s = np.where(core, b_s + lesion["disp_core"] + uc,
                           np.where(pen, b_s + lesion["disp_pen"] + lesion["disp_pen_u"] * u, b_s))
            lab = np.where(pen & tissue, PENUMBRA, lab)
            lab = np.where(core & tissue, CORE, lab)
        perf = np.isin(lab, (GM, WM, PENUMBRA, CORE))
        cbf[si] = np.where(perf, cbf_s, 0.0)
        mtt[si] = np.where(perf, mtt_s, 0.0)
        delay[si] = np.where(perf, d_s, 0.0)
        beta[si] = np.where(perf, np.maximum(np.round(b_s / DISPERSION_STEP_S), 1) * DISPERSION_STEP_S, 0.0)
        # unenhanced HU (before vessels): tissue + texture, skull with diploe, scalp
        tex = 1.5 * _field(rng, (h, w), (2.0 / pa,) * 2)
        b_img = np.full((h, w), -1000.0)
        b_img[anat["scalp"]] = hu["scalp"] + 8.0 * tex[anat["scalp"]]
        sk = lab == SKULL
        depth = np.clip((anat["r_out"] - anat["r"]) / np.maximum(anat["r_out"] - anat["r_in"], 1e-6), 0, 1)
        b_img[sk] = (hu["bone"] - hu["diploe"] * (1 - np.abs(2 * depth - 1)) + 40 * tex)[sk]
        b_img[lab == WM] = hu["wm"] + tex[lab == WM]
        b_img[lab == GM] = hu["gm"] + tex[lab == GM]
        b_img[lab == CSF] = hu["csf"] + tex[lab == CSF]
        b_img[lab == PENUMBRA] = (np.where(is_gm, hu["gm"], hu["wm"]) - 0.5 + tex)[lab == PENUMBRA]
        b_img[lab == CORE] = (np.where(is_gm, hu["gm"], hu["wm"]) - rng.uniform(1.0, 3.0) + tex)[lab == CORE]
        a_pv, v_pv = _vessels(rng, anat, grid, float(z), pa)
        vessel = np.maximum(a_pv, v_pv)
        b_img = vessel * hu["blood"] + (1 - vessel) * b_img
        lab = np.where(a_pv > 0, ARTERY, np.where(v_pv > 0, VEIN, lab))
        labels_all[si], base[si], art_pv[si], vein_pv[si] = lab, b_img, a_pv, v_pv
        heads.append(anat)

    # tissue curves from the tables
    dt = opts.fine_dt_s
    n_fine = int(math.ceil((times[-1] + 2.0) / dt)) + 2
    t_fine = np.arange(n_fine) * dt
    aif_fine = parker_aif(t_fine, **aif_params)
    perf_all = mtt > 0
    idx = np.flatnonzero(perf_all)
    enh = np.zeros((s_count * h * w, n_frames))
    tmax = np.zeros(S)
    if idx.size:
        m_px, b_px = mtt.reshape(-1)[idx], beta.reshape(-1)[idx]
        table = _ImpulseTable(aif_fine, dt, residue, shape, disp_kind, float(m_px.min()) * 0.999,
                              float(m_px.max()) * 1.001 + 1e-3, np.unique(b_px))
        bi, m0, wt = table.locate(m_px, b_px)
        t_off = table.tmax_offset(bi, m0, wt)
        d_px = delay.reshape(-1)[idx]
        lesion_px = np.isin(labels_all.reshape(-1)[idx], (PENUMBRA, CORE))
        # labelled hypoperfusion is TMAX > 6 s: raise the delay where the draw fell short
        d_px = np.where(lesion_px, np.maximum(d_px, 6.05 - t_off), d_px)
        delay.reshape(-1)[idx] = d_px
        tmax.reshape(-1)[idx] = d_px + t_off
        enh[idx] = table.curves(times, cbf.reshape(-1)[idx], d_px, bi, m0, wt)
    enh = enh.reshape(s_count, h, w, n_frames)
    aif_at = parker_aif(times, **aif_params)
    # venous output: the AIF through a gamma transit kernel (area 1)
    vk = dispersion_kernel(t_fine, rng.uniform(4.0, 8.0), "gamma")
    vk = vk / (vk.sum() * dt)
    vof_fine = np.convolve(aif_fine, vk)[:n_fine] * dt
    vof_at = np.interp(times, t_fine, vof_fine)
    vessel = (art_pv > 0) | (vein_pv > 0)  # partial volume: pv of the vessel's curve, 1 - pv of the tissue
    a, v = art_pv[vessel][:, None], vein_pv[vessel][:, None]
    enh[vessel] = (1 - a - v) * enh[vessel] + a * aif_at + v * vof_at

    # static artefacts on the unenhanced image: PSF blooming, streaks from the skull, cupping
    psf = rng.uniform(*opts.psf_px)
    base = _gaussian_filter(base, psf)
    streak_maps = np.zeros(S)
    for si in range(s_count):
        anat = heads[si]
        head_in = anat["r"] < anat["r_out"]
        if opts.streaks:
            for _ in range(int(rng.integers(2, 7))):
                t0 = rng.uniform(-math.pi, math.pi)
                o = np.array([math.cos(t0), math.sin(t0)]) * float(anat["lvl"] * _outer_radius(head, np.array(t0)))
                phi = t0 + math.pi + rng.uniform(-0.6, 0.6)
                dvec = np.array([math.cos(phi), math.sin(phi)])
                along = (x - o[0]) * dvec[0] + (y - o[1]) * dvec[1]
                across = -(x - o[0]) * dvec[1] + (y - o[1]) * dvec[0]
                width = rng.uniform(0.6, 1.5) * pa
                amp = rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 15.0)
                streak_maps[si] += np.where(along > 0, amp * np.exp(-0.5 * (across / width) ** 2)
                                            * np.exp(-along / rng.uniform(25.0, 60.0)), 0.0)
            rho = np.clip(anat["r"] / np.maximum(anat["r_in"], 1e-6), 0, 1)
            streak_maps[si] -= rng.uniform(0.0, 4.0) * (1 - rho**2) * anat["brain"]
            streak_maps[si] *= head_in
    base = base + streak_maps

    # noise: correlated Gaussian, level per patient, higher toward the centre (Poisson-like)
    level = float(rng.uniform(*opts.noise_hu))
    frames = (base[:, None] + np.moveaxis(enh, -1, 1)).astype(np.float32)
    if opts.streaks:  # streaks flicker a little from frame to frame (contrast and position change)
        frames += (rng.normal(0.0, 0.1, (s_count, n_frames, 1, 1)) * streak_maps[:, None]).astype(np.float32)
    if level > 0:  # float32 from here on: the noise is the largest array of a study
        corr = rng.uniform(*opts.noise_corr_px)
        white = rng.standard_normal(size=(s_count, n_frames, h, w), dtype=np.float32)
        noise = _gaussian_filter(white, corr)
        noise /= noise.std() + 1e-12
        gain = np.ones(S)
        if opts.poisson:
            kappa = rng.uniform(0.3, 0.8)
            for si, anat in enumerate(heads):
                rho = np.clip(anat["r"] / anat["r_out"], 0, 1)
                gain[si] = 1.0 + kappa * (1 - rho**2) * (anat["r"] < anat["r_out"])
            brain_all = np.stack([a["brain"] for a in heads])
            gain /= gain[brain_all].mean() if brain_all.any() else 1.0
        frames += (level * gain[:, None]).astype(np.float32) * noise

    maps = np.zeros((s_count, len(PARAMS), h, w), np.float32)
    maps[:, 0] = cbf * mtt / 60.0
    maps[:, 1] = cbf
    maps[:, 2] = tmax
    vessel_any = (art_pv > 0) | (vein_pv > 0)
    maps[np.broadcast_to(vessel_any[:, None], maps.shape)] = 0.0
    mask = np.isin(labels_all, (WM, GM, CSF, PENUMBRA, CORE))
    aif_pixels = [tuple(int(v) for v in p) for p in np.argwhere(labels_all == ARTERY)]
    vof_pixels = [tuple(int(v) for v in p) for p in np.argwhere(labels_all == VEIN)]
    keep = ~vessel_any
    lesion_meta = None
    if lesion is not None:
        lesion_meta = dict(side="left" if lesion["side"] > 0 else "right", territories=list(lesion["territories"]),
                           penumbra_px=int((labels_all == PENUMBRA).sum()), core_px=int((labels_all == CORE).sum()))
    pid = patient_id or f"ribbon-{seed:06d}"
    return Study(
        frames=frames,
        times_s=np.repeat(times[None].astype(np.float32), s_count, axis=0),
        affine=axial_affine(h, w, s_count, pixel, slice_mm),
        maps=maps,
        mask=mask,
        patient_id=pid,
        source=f"phantom(family=ribbon, seed={seed})",
        meta=dict(aif_hu=np.repeat(aif_at[None].astype(np.float32), s_count, axis=0), labels=labels_all,
                  baseline_hu=base.astype(np.float32), residue=residue, aif_params=aif_params,
                  aif_pixels=aif_pixels, vof_pixels=vof_pixels, vof_hu=vof_at.astype(np.float32),
                  config=asdict(cfg), seed=seed, family="ribbon",
                  mtt_s=(mtt * keep).astype(np.float32), delay_s=(delay * keep).astype(np.float32),
                  dispersion_s=(beta * keep).astype(np.float32),
                  partial_volume=np.maximum(art_pv, vein_pv).astype(np.float32),
                  residue_shape=shape, dispersion_kernel=disp_kind, pixel_mm=pixel, slice_mm=slice_mm,
                  anatomy_scale=float(scale), noise_hu=level, frame_pattern=pattern, lesion=lesion_meta,
                  head_pose=dict(rotation_rad=float(head["rot"]), offset_mm=[float(v) for v in head["off"]],
                                 anatomy_scale=float(scale))),
    ).validate()
