"""Deconvolution of tissue enhancement curves by an arterial input function, vectorised over pixels.

Model (paper Eq. 1; Østergaard et al., MRM 1996;36:715): ``C(t) = (C_a ⊛ k)(t)`` with
``k = TISSUE_SCALE * CBF * R(t - delay)`` the flow-scaled residue. On a uniform grid of step ``dt``
this is ``c = A k`` with ``A`` the AIF convolution matrix (scaled by ``dt``). Engines:

``ssvd``
    Truncated SVD of the causal (lower-triangular Toeplitz) matrix; singular values below
    ``threshold * s_max`` are dropped. Default threshold 0.2 (Østergaard 1996, Part I: 20 % of the
    largest singular value was optimal in their simulations). Sensitive to tracer delay: a tissue
    curve arriving after the AIF reads CBF low (Wu et al., MRM 2003;50:164, Fig. 2).
``bcsvd``
    Block-circulant SVD (Wu 2003): AIF and tissue curves zero-padded to ``pad_factor * L``
    (``pad_factor = 2``, Wu's ``L >= 2N``) so the matrix is circulant and delays wrap instead of
    being lost; delay-insensitive. Default threshold 0.2 (Wu 2003 used 0.1-0.2 for "cSVD").
``osvd``
    Block-circulant SVD with a per-pixel threshold (Wu 2003): the threshold is raised through
    ``thresholds`` until the oscillation index of the residue, computed on second differences
    ``OI = 1/(N f_max) Σ |f(k) - 2 f(k-1) + f(k-2)|``, drops below ``oi_target``.
    ``oi_target``: 0.095 for CT (:data:`OI_TARGET_CT`), 0.035 for MR (:data:`OI_TARGET_MR`, Wu 2003).
``tikhonov``
    Block-circulant Tikhonov filter ``s / (s^2 + λ^2)`` with ``λ = tikhonov_lambda * s_max``
    (Calamante et al., MRM 2003;50:1237; default 0.1).

Implementation notes:

* A circulant matrix is diagonalised by the DFT: its singular values are ``|FFT(a)|`` and the
  truncated pseudo-inverse is a filter in the Fourier domain. So ``bcsvd``/``osvd``/``tikhonov``
  compute exactly what an explicit SVD of Wu's 2N × 2N block-circulant matrix gives (a test checks
  this against :func:`block_circulant_matrix` + ``torch.linalg.svd``), in ``O(N log N)`` per pixel.
  ``ssvd`` does one real SVD of the N × N causal matrix per AIF and one batched matmul.
* oSVD stays vectorised: every truncation's residue is a partial sum over the singular components
  (kept frequencies, largest singular value first), so the threshold search adds one band of
  components at a time to running residues — from the largest threshold down, one thin matrix
  product per candidate for the pixels still undecided — and tests all their OIs in one reduction
  (``osvd_search="cumulative"``, see :class:`DeconvParams`); each pixel keeps the first candidate
  whose OI is below the target (Wu's "increase until OI < target"); pixels that never pass keep the
  largest candidate.
* The OI is evaluated at the acquisition's sampling (``oi_stride`` grid steps, e.g. the median frame
  interval / ``dt``), the sampling Wu's targets were calibrated at; on a finer grid second
  differences shrink and the same target would regularise far less.
* ``aif_weights="simpson"`` uses Østergaard's (1996, Part I, Eq. 8) quadrature, assuming AIF and
  residue vary linearly over a step: ``a'_j = (a_{j-1} + 4 a_j + a_{j+1}) / 6``; ``"rect"`` is the
  plain ``dt * a_j`` rectangle rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

METHODS: tuple[str, ...] = ("ssvd", "bcsvd", "osvd", "tikhonov")
#: Oscillation-index target for CT (the project's CT default).
OI_TARGET_CT: float = 0.095
#: Oscillation-index target for DSC-MR (Wu et al. 2003).
OI_TARGET_MR: float = 0.035
#: Candidate relative thresholds for oSVD, ascending, 0.5 % to 80 % of s_max (16 = 4 bisection rounds;
#: the 0.2 of sSVD/bcSVD is among them).
OSVD_THRESHOLDS: tuple[float, ...] = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25,
                                      0.3, 0.4, 0.6, 0.8)
#: The residue's peak (CBF) and TMAX are searched up to this lag (s): a tissue whose bolus peaks a
#: minute after the AIF has no measurable flow (clinical TMAX maps end at 10-20 s).
MAX_POSITIVE_LAG_S: float = 60.0
#: TMAX estimators (:attr:`DeconvParams.tmax_method`).
TMAX_METHODS: tuple[str, ...] = ("half_rise", "argmax", "calibrated", "calibrated_dispersion")
#: The calibration residues (:meth:`Deconvolver.calibration`): exponential, these mean transit times (s) ...
CALIBRATION_MTT_S: tuple[float, ...] = (1.0, 2.0, 3.0, 4.5, 6.0, 9.0, 13.0, 20.0)
#: ... delayed by this much (s) after the AIF.
CALIBRATION_DELAY_S: float = 3.0
#: ``tmax_method="calibrated_dispersion"`` also calibrates on those residues dispersed by a normalised
#: exponential kernel (Calamante et al., MRM 2000;44:466) of these means (s): 0 (none) to the ~5 s of
#: an ischaemic core fed through collaterals. Their true TMAX is the argmax of the dispersed residue.
CALIBRATION_DISPERSION_S: tuple[float, ...] = (0.0, 0.75, 1.5, 2.5, 4.0, 6.0)
#: Circulant engines report lags down to this many seconds before the AIF (tissue "earlier" than the
#: AIF, e.g. when the AIF was picked a branch downstream: 1-3 s); the rest of the window holds positive
#: lags. Not more: the end of the circulant window holds the wrap of a curve cut off before its tail
#: returned (long-delay lesions, truncated scans), which with 15 s put the peak of 10-20 % of the
#: ribbon phantom's core pixels at a negative lag (TMAX 0; Dice(TMAX > 6 s) 0.78 -> 0.80 truncated).
MAX_NEGATIVE_LAG_S: float = 4.0


@dataclass
class DeconvParams:
    """Settings of the deconvolution engines (sources in the module docstring).

    Attributes:
        method: one of :data:`METHODS`.
        threshold: relative SVD truncation for ``ssvd`` / ``bcsvd`` (fraction of ``s_max``).
        oi_target: oSVD oscillation-index target (CT 0.095, MR 0.035).
        thresholds: oSVD candidate relative thresholds (sorted ascending internally).
        oi_stride: grid steps between the samples the OI is computed on (>= 1).
        tikhonov_lambda: Tikhonov ``λ`` relative to ``s_max``.
        aif_weights: ``"rect"`` (default, ``dt * a``) or ``"simpson"`` (Østergaard 1996, Eq. 8).
        pad_factor: block-circulant padding (Wu 2003: 2).
        max_freq_hz: circulant engines drop Fourier components above this frequency (``None``: keep
            all). Set to the acquisition's Nyquist frequency ``1 / (2 * median frame interval)``: the
            frames carry no information above it, and on a grid finer than the frames those
            components only echo the interpolation (an alternating pattern that inflates CBF).
        tmax_method: two estimators of the paper's ``TMAX = argmax k``. ``"half_rise"`` (default):
            the time the leading edge of ``k`` crosses half its maximum (linear interpolation). A
            residue function never rises (``R(0) = 1``, non-increasing), so the true ``argmax k`` is
            the bolus delay, where ``k`` jumps; the argmax of any band-limited estimate of a jump
            lags it by about ``1 / (2 f_max)``, i.e. one frame interval, while the half-way point of
            the estimated edge does not (clean Kudo grid, oSVD: bias -0.1 s vs +1.1..+1.5 s; 3 HU
            phantom noise: TMAX MAE 0.5 s vs 2.2 s; ``python -m experiments.calc_settings``).
            ``"argmax"``: the first local maximum of ``k`` (in time order) that reaches
            ``tmax_peak_frac`` of the global maximum, refined by a parabola through it and its
            neighbours (the literal definition; reports the lag above).
        osvd_search: ``"cumulative"`` (default): Wu's search ("raise the threshold until OI <
            target") over **all** candidates in one pass — every truncation's residue is a partial
            sum over the singular components (kept frequencies, largest singular value first), so
            the residues of all candidates come from one matrix product per band of components
            and a cumulative sum, and their OIs from one reduction; identical to ``"linear"`` (one
            residue evaluation per candidate, the reference implementation). ``"bisect"``: binary
            search, ``ceil(log2 M)`` evaluations; the same result whenever the OI falls
            monotonically with the threshold, as it does but for rare noise.
            ``"calibrated"``: the argmax minus the lag the same deconvolution (this AIF, grid, band
            limit, framing and the pixel's threshold) gives an exponential residue of the pixel's
            apparent MTT (:meth:`Deconvolver.calibration`). Half-rise is unbiased for residues that
            jump at the delay (classic phantom) but early for dispersed ones that rise over a second
            or two (ribbon phantom: -2.3 s); the calibrated argmax sits between (+0.3 s / -0.6..-1 s;
            ``python -m experiments.calc_settings`` compares them across both families).
            ``"calibrated_dispersion"``: the same, but the calibration also holds those residues
            dispersed (normalised exponential kernels of mean :data:`CALIBRATION_DISPERSION_S`, true
            TMAX = the dispersed residue's argmax), and the pixel's rise time (argmax minus
            half-rise of its estimate) picks the dispersion: the exponential-only calibration takes
            a jump's lag off a dispersed residue whose smooth peak the band limit hardly shifts
            (MTT 12 s, dispersion 3 s: -1.9 s; here -0.6 s; a jump stays exact).
        tmax_oi_target: oSVD only: TMAX from the truncation chosen for this OI target instead of
            ``oi_target`` (``None``: the same). A lower target raises the threshold (a smoother residue):
            on noisy low-flow tissue the ripples of the CBF pass's residue pass for its peak, while
            its peak height (CBF) would read low at the smoother truncation — so CBF, CBV and the
            threshold reported stay those of ``oi_target``.
        tmax_peak_frac: plateau tolerance of ``"argmax"``: with 0.9 a plateau-shaped residue (box,
            gamma) reports the start of the plateau, as the truth ``TMAX = delay`` defines it,
            instead of whichever Gibbs ripple happens to be highest; 1.0 is the plain argmax.
    """

    method: str = "osvd"
    threshold: float = 0.2
    oi_target: float = OI_TARGET_CT
    thresholds: tuple[float, ...] = field(default_factory=lambda: OSVD_THRESHOLDS)
    oi_stride: int = 1
    tikhonov_lambda: float = 0.1
    aif_weights: str = "rect"
    pad_factor: int = 2
    max_freq_hz: float | None = None
    tmax_method: str = "half_rise"
    tmax_peak_frac: float = 0.9
    osvd_search: str = "cumulative"
    tmax_oi_target: float | None = None

    def __post_init__(self) -> None:
        self.method = self.method.lower()
        if self.method not in METHODS:
            raise ValueError(f"unknown deconvolution method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.osvd_search not in ("cumulative", "bisect", "linear"):
            raise ValueError(f"osvd_search must be 'cumulative', 'bisect' or 'linear', got {self.osvd_search!r}")
        if self.tmax_method not in TMAX_METHODS:
            raise ValueError(f"tmax_method must be one of {', '.join(TMAX_METHODS)}, got {self.tmax_method!r}")
        if self.aif_weights not in ("simpson", "rect"):
            raise ValueError(f"aif_weights must be 'simpson' or 'rect', got {self.aif_weights!r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.pad_factor < 1 or self.oi_stride < 1:
            raise ValueError("pad_factor and oi_stride must be >= 1")
        self.thresholds = tuple(sorted(float(x) for x in self.thresholds))
        if not self.thresholds or not all(0 < x < 1 for x in self.thresholds):
            raise ValueError(f"oSVD thresholds must be in (0, 1), got {self.thresholds}")

    @property
    def circulant(self) -> bool:
        return self.method != "ssvd"


def weighted_aif(aif: torch.Tensor, dt_s: float, weights: str = "simpson") -> torch.Tensor:
    """AIF column of the convolution matrix, ``(L,)``: ``dt * a`` or Østergaard's Simpson-like weights."""
    a = aif * dt_s
    if weights == "rect":
        return a
    padded = torch.nn.functional.pad(a[None, None], (1, 1))[0, 0]
    return (padded[:-2] + 4 * padded[1:-1] + padded[2:]) / 6.0


def causal_matrix(aif_w: torch.Tensor) -> torch.Tensor:
    """Lower-triangular Toeplitz convolution matrix ``A[i, j] = a[i - j]`` (i >= j), ``(L, L)``."""
    n = aif_w.shape[0]
    i = torch.arange(n, device=aif_w.device)
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, aif_w[d.clamp(min=0)], torch.zeros((), dtype=aif_w.dtype, device=aif_w.device))


def block_circulant_matrix(aif_w: torch.Tensor, n: int) -> torch.Tensor:
    """Wu et al. (2003) block-circulant matrix ``(n, n)`` of the AIF zero-padded to ``n`` samples."""
    a = torch.nn.functional.pad(aif_w, (0, n - aif_w.shape[0]))
    i = torch.arange(n, device=aif_w.device)
    return a[(i[:, None] - i[None, :]) % n]


def oscillation_index(k: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Wu's (2003) oscillation index of residues ``k`` ``(P, N)`` sampled every ``stride`` steps, ``(P,)``.

    ``OI = 1/(N f_max) Σ_k |f(k) - 2 f(k-1) + f(k-2)|``; ``inf`` where ``f_max <= 0``.
    """
    f = k[:, ::stride] if stride > 1 else k
    n = f.shape[-1]
    fmax = f.amax(-1)  # amax: values only, several times faster than max() on CPU
    d2 = torch.add(f[:, 2:], f[:, :-2]).sub_(f[:, 1:-1], alpha=2.0).abs_().sum(-1)
    oi = d2 / (n * fmax.clamp_min(torch.finfo(f.dtype).tiny))
    return torch.where(fmax > 0, oi, torch.full_like(oi, float("inf")))


def _peak_stats(kt: torch.Tensor, n_neg: int, dt_s: float, method: str, peak_frac: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kmax, tmax_s)`` of residues ``kt`` ``(P, J)`` in time order (sample ``i`` is lag ``(i - n_neg) dt``)."""
    n = kt.shape[-1]
    if method in ("calibrated", "calibrated_dispersion"):  # the argmax; the caller subtracts the calibrated lag
        method = "argmax"
    if method == "half_rise":
        kmax, iglob = kt.max(-1)
        # last sample before the peak that is below half of it; float indices and one where/amax
        # are several times faster on CPU than integer or boolean reductions
        ar = torch.arange(n, device=kt.device, dtype=kt.dtype)
        level = 0.5 * kmax[:, None]
        j = torch.where((kt < level) & (ar[None] < iglob[:, None]), ar[None], -1.0).amax(-1).long()
        jj = j.clamp(min=0)
        y0 = kt.gather(-1, jj[:, None])[:, 0]
        y1 = kt.gather(-1, (jj + 1).clamp(max=n - 1)[:, None])[:, 0]
        step = torch.where(y1 > y0, y1 - y0, torch.ones_like(y0))
        frac = ((level[:, 0] - y0) / step).clamp(0.0, 1.0)
        pos = torch.where(j >= 0, jj.to(kt.dtype) + frac, iglob.to(kt.dtype))
    else:
        kmax = kt.amax(-1)
        cand = kt >= peak_frac * kmax[:, None]
        cand[:, 1:] &= kt[:, 1:] >= kt[:, :-1]
        cand[:, :-1] &= kt[:, :-1] >= kt[:, 1:]
        imax = cand.to(torch.uint8).argmax(-1)  # first True (the global max always qualifies)
        y0 = kt.gather(-1, imax[:, None])[:, 0]
        ym = kt.gather(-1, (imax - 1).clamp(min=0)[:, None])[:, 0]
        yp = kt.gather(-1, (imax + 1).clamp(max=n - 1)[:, None])[:, 0]
        valid = (imax > 0) & (imax < n - 1)
        denom = ym - 2 * y0 + yp
        off = torch.where(valid & (denom < 0), 0.5 * (ym - yp) / torch.where(denom < 0, denom, -1.0),
                          torch.zeros_like(y0)).clamp(-0.5, 0.5)
        pos = imax.to(kt.dtype) + off
    return kmax, (pos - n_neg) * dt_s


class Deconvolver:
    """One AIF's deconvolution operator, precomputed once and applied to any number of pixels.

    Circulant engines work in a reduced Fourier basis: only the frequencies that survive the band
    limit and the smallest candidate threshold are ever non-zero in a residue's spectrum, so the
    spectrum of a tissue curve is one small real matmul (``(P, L) @ (L, 2F)``, or straight from the
    frames with the resampling folded in), a threshold is a per-frequency filter, and residues are
    evaluated only where needed (every ``oi_stride``-th sample for the OI, the lag window for the
    maps) by another small matmul. This is exactly the truncated-SVD solution of Wu's
    block-circulant system (see the module docstring), computed with BLAS instead of per-pixel FFTs.

    Args:
        aif: ``(L,)`` AIF enhancement on the uniform grid (same units as the tissue curves).
        dt_s: grid step (s).
        params: :class:`DeconvParams`.
    """

    def __init__(self, aif: torch.Tensor, dt_s: float, params: DeconvParams | None = None):
        self.params = params or DeconvParams()
        self.dt_s = float(dt_s)
        self.dtype = aif.dtype if aif.dtype in (torch.float32, torch.float64) else torch.float32
        self.device = aif.device
        self.n_grid = int(aif.shape[-1])
        p = self.params
        self._aif64 = aif.to(torch.float64)
        a_w = weighted_aif(self._aif64, self.dt_s, p.aif_weights)
        if p.circulant:
            self.n_window = p.pad_factor * self.n_grid
            aif_f = torch.fft.rfft(a_w, n=self.n_window)  # complex128 (F,)
            sv = aif_f.abs()
            self.s_max = float(sv.max())
            if self.s_max <= 0:
                raise ValueError("the arterial input function is all zero; cannot deconvolve")
            freqs = torch.fft.rfftfreq(self.n_window, d=self.dt_s, dtype=torch.float64, device=self.device)
            f_cut = p.max_freq_hz if p.max_freq_hz else float("inf")
            band = freqs <= f_cut + 1e-9
            if p.method == "tikhonov":
                self.candidates: tuple[float, ...] = (p.tikhonov_lambda,)
                kept = torch.nonzero(band).flatten()
                lam = p.tikhonov_lambda * self.s_max
                g = aif_f[kept].conj() / (sv[kept] ** 2 + lam**2)
                self.n_keep = torch.tensor([kept.numel()], device=self.device)
            else:
                self.candidates = p.thresholds if p.method == "osvd" else (p.threshold,)
                kept = torch.nonzero(band & (sv > self.candidates[0] * self.s_max)).flatten()
                # Order the kept frequencies by singular value, largest first: raising the threshold
                # then drops a suffix, so candidate m keeps the first n_keep[m] of them.
                kept = kept[torch.argsort(sv[kept], descending=True, stable=True)]
                g = 1.0 / aif_f[kept]
                cand = torch.tensor(self.candidates, dtype=torch.float64, device=self.device)
                self.n_keep = (sv[kept][None, :] > cand[:, None] * self.s_max).sum(-1)  # (M,)
            self.freq_idx = kept  # (Fk,) rfft bins, in the order used everywhere below
            n = self.n_window
            fk = kept.to(torch.float64)
            # Forward basis on grid samples 0..L-1 (the rest of the window is zero padding).
            ang = 2 * math.pi * torch.arange(self.n_grid, dtype=torch.float64, device=self.device)[:, None] * fk / n
            # Forward DFT followed by the per-frequency division by the AIF spectrum, as one real
            # matrix: [Re K | Im K] = c @ fwd (the complex product by g folded into the columns).
            cos_a, msin_a = torch.cos(ang), -torch.sin(ang)
            self.fwd = torch.cat([cos_a * g.real - msin_a * g.imag, cos_a * g.imag + msin_a * g.real], dim=1)
            self._wf = torch.where((kept == 0) | (2 * kept == n), 1.0, 2.0).to(torch.float64) / n
            rank = torch.arange(kept.numel(), device=self.device)
            self._masks = (rank[None, :] < self.n_keep[:, None]).to(self.dtype).repeat(1, 2)  # (M, 2Fk)
            dc = torch.nonzero(kept == 0).flatten()
            self._dc_pos = int(dc[0]) if dc.numel() else -1
        else:
            self.n_window = self.n_grid
            self.candidates = (p.threshold,)
            u, s, vh = torch.linalg.svd(causal_matrix(a_w))
            if float(s[0]) <= 0:
                raise ValueError("the arterial input function is all zero; cannot deconvolve")
            self.s_max = float(s[0])
            s_inv = torch.where(s > p.threshold * s[0], 1.0 / s, torch.zeros_like(s))
            self.pinv_t = ((vh.T * s_inv) @ u.T).T.contiguous()  # (L, L) float64, k = c @ pinv_t
        self._cache: dict = {}

    # -- bases -----------------------------------------------------------------------------------
    def _inv_basis(self, n_idx: torch.Tensor) -> torch.Tensor:
        """``(2Fk, J)``: real inverse-DFT rows evaluating a kept spectrum at window samples ``n_idx``."""
        ang = 2 * math.pi * self.freq_idx.to(torch.float64)[:, None] * n_idx.to(torch.float64)[None]
        ang = ang / self.n_window
        wf = self._wf[:, None]
        return torch.cat([wf * torch.cos(ang), -wf * torch.sin(ang)], 0).to(self.dtype)

    @property
    def n_negative(self) -> int:
        """Negative-lag samples reported by circulant engines (0 for ``ssvd``)."""
        if not self.params.circulant:
            return 0
        return min(self.n_grid // 2, int(round(MAX_NEGATIVE_LAG_S / self.dt_s)))

    @property
    def n_lags(self) -> int:
        """Non-negative lags searched for the peak: ``[0, min(L, MAX_POSITIVE_LAG_S / dt))`` samples."""
        return min(self.n_grid, int(round(MAX_POSITIVE_LAG_S / self.dt_s)) + 1)

    @property
    def n_positive(self) -> int:
        """Window indices ``< n_positive`` are lags ``i * dt >= 0``; the rest (circulant) are negative."""
        return self.n_window - self.n_negative

    def _get(self, key: str, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _out_idx(self) -> torch.Tensor:
        """Window samples of the searched lag range ``[-n_negative, n_lags)`` in time order."""
        neg = torch.arange(self.n_window - self.n_negative, self.n_window, device=self.device)
        return torch.cat([neg, torch.arange(self.n_lags, device=self.device)])

    # -- core --------------------------------------------------------------------------------------
    def _spectrum(self, x: torch.Tensor, resample: torch.Tensor | None) -> torch.Tensor:
        """Unregularised residue spectrum ``K = C / A`` on the kept frequencies, ``(P, 2Fk)`` = [re | im].

        ``x`` is ``(P, L)`` on the grid, or ``(P, T)`` at the frame times with ``resample`` ``(L, T)``.
        """
        if resample is None:
            mat = self._get("fwd", lambda: self.fwd.to(self.dtype))
        else:  # (T, 2Fk): a few MFLOP, cheaper to redo per chunk than to cache safely
            mat = (resample.to(torch.float64).T @ self.fwd).to(self.dtype)
        return x.to(self.dtype) @ mat

    def _apply(self, kf: torch.Tensor, m: torch.Tensor | int, basis: torch.Tensor) -> torch.Tensor:
        """Residues at the samples of ``basis`` ``(2Fk, J)`` for candidate ``m`` (int, or ``(P,)``)."""
        fk = self.freq_idx.shape[0]
        if isinstance(m, int):
            n = int(self.n_keep[m])
            if n == fk:
                return kf @ basis
            return kf[:, :n] @ basis[:n] + kf[:, fk: fk + n] @ basis[fk: fk + n]
        return (kf * self._masks[m]) @ basis

    def _choose(self, kf: torch.Tensor, target: float | Sequence[float] | None = None) -> torch.Tensor:
        """Per-pixel candidate index ``(P,)`` (the oSVD search for OI ``target``, default
        ``params.oi_target``; 0 for single-filter engines); ``(K, P)`` for a sequence of K targets
        (one pass of the cumulative search for all)."""
        n_pix = kf.shape[0]
        m_count = len(self.candidates)
        if not isinstance(target, (int, float)) and target is not None:
            if self.params.osvd_search == "cumulative" and self.params.method == "osvd" and m_count > 1:
                basis = self._get("oi", lambda: self._inv_basis(
                    torch.arange(0, self.n_window, self.params.oi_stride, device=self.device)))
                return self._choose_cumulative(kf, basis, list(target))
            return torch.stack([self._choose(kf, float(t)) for t in target])
        if self.params.method != "osvd" or m_count == 1:
            return torch.zeros(n_pix, dtype=torch.long, device=kf.device)
        stride = self.params.oi_stride
        basis = self._get("oi", lambda: self._inv_basis(
            torch.arange(0, self.n_window, stride, device=self.device)))
        target = self.params.oi_target if target is None else float(target)
        if self.params.osvd_search == "cumulative":
            return self._choose_cumulative(kf, basis, target)
        if self.params.osvd_search == "linear":
            chosen = torch.full((n_pix,), m_count - 1, dtype=torch.long, device=kf.device)
            undecided = torch.ones(n_pix, dtype=torch.bool, device=kf.device)
            for m in range(m_count - 1):
                ok = undecided & (oscillation_index(self._apply(kf, m, basis)) < target)
                chosen = torch.where(ok, m, chosen)
                undecided &= ~ok
            return chosen
        # Binary search for the first candidate whose OI is below the target; all pixels are
        # evaluated each round (no data-dependent indexing: one code path for CPU and GPU).
        lo = torch.zeros(n_pix, dtype=torch.long, device=kf.device)
        hi = torch.full((n_pix,), m_count - 1, dtype=torch.long, device=kf.device)
        for r in range(int(math.ceil(math.log2(m_count)))):
            mid = (lo + hi) // 2
            # round 0: one candidate for all pixels -> a smaller prefix matmul, no per-pixel mask
            ok = oscillation_index(self._apply(kf, (m_count - 1) // 2 if r == 0 else mid, basis)) < target
            active = lo < hi
            hi = torch.where(active & ok, mid, hi)
            lo = torch.where(active & ~ok, mid + 1, lo)
        return lo

    def _band_basis(self, basis: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Components interleaved ``[re_0, im_0, re_1, im_1, ...]`` (largest singular value first): the
        permutation of ``kf``'s columns, the permuted ``basis`` transposed ``(samples, 2Fk)``, the same
        second-differenced along the samples (the OI's numerator is linear in the residue) and, per
        candidate ``m``, the component range it adds to candidate ``m + 1`` (the last keeps
        ``n_keep[-1]``)."""
        key = ("band", basis.data_ptr())
        if key not in self._cache:
            fk = self.freq_idx.shape[0]
            rank = torch.arange(fk, device=self.device)
            perm = torch.stack([rank, rank + fk], 1).reshape(-1)
            n_keep = [int(v) for v in self.n_keep.tolist()] + [0]
            bands = [(2 * n_keep[m + 1], 2 * n_keep[m]) for m in range(len(self.candidates))]
            bas = basis[perm]
            d2 = bas[:, 2:] + bas[:, :-2] - 2 * bas[:, 1:-1]
            self._cache[key] = (perm, bas.T.contiguous(), d2.T.contiguous(), bands)
        return self._cache[key]

    def _choose_cumulative(self, kf: torch.Tensor, basis: torch.Tensor, target: float | Sequence[float]
                           ) -> torch.Tensor:
        """Per-pixel candidate from partial sums over the singular components (see ``osvd_search``).

        The residue of candidate ``m`` is ``r_m = Σ_{b >= m} kf_b @ basis_b`` over bands of components
        (band ``b``: the components candidate ``b`` keeps and ``b + 1`` drops), and its OI numerator
        ``Σ|d2 r_m|`` the same sum over a second-differenced basis. Going from the largest threshold
        down, each step adds one band to the running residues of the pixels still undecided (a
        thin matrix product) and tests their OI; a pixel is decided at its first failure after a
        pass (the one before passed) — with the OI falling as the threshold rises, that is Wu's
        first threshold below the target; a pixel that never passes keeps the largest. Pixels are
        compacted as they are decided, so a pixel costs ``M - m`` band steps and the whole search
        about one residue evaluation's matrix work. Several ``target`` values are searched in the
        same pass (the residues and OIs are shared; a pixel leaves when every target has decided);
        the result is then ``(len(target), P)``.
        """
        perm, bas_t, bas_d2_t, bands = self._band_basis(basis)
        m_count = len(self.candidates)
        targets = [float(target)] if isinstance(target, (int, float)) else [float(t) for t in target]
        n_k = len(targets)
        n_pix, n_s = kf.shape[0], bas_t.shape[0]
        best = torch.full((n_k, n_pix), m_count - 1, dtype=torch.long, device=kf.device)
        lim = torch.tensor(targets, dtype=kf.dtype, device=kf.device)[:, None] * n_s
        # samples x pixels: the per-pixel reductions run over the leading axis, contiguous in pixels
        kt_all = kf[:, perm].T.contiguous()
        for start in range(0, n_pix, 16384):
            kt = kt_all[:, start: start + 16384]
            idx = torch.arange(start, start + kt.shape[1], device=kf.device)
            acc = torch.zeros((n_s, kt.shape[1]), dtype=kf.dtype, device=kf.device)
            acc2 = torch.zeros((n_s - 2, kt.shape[1]), dtype=kf.dtype, device=kf.device)
            passed = torch.zeros((n_k, kt.shape[1]), dtype=torch.bool, device=kf.device)
            ok = None
            for m in range(m_count - 1, -1, -1):
                lo, hi = bands[m]
                if hi > lo:
                    acc.addmm_(bas_t[:, lo:hi], kt[lo:hi])
                    acc2.addmm_(bas_d2_t[:, lo:hi], kt[lo:hi])
                if hi > lo or ok is None:
                    # OI = Σ|d2| / (N fmax) < target; a non-positive fmax fails
                    ok = acc2.abs().sum(0)[None] < lim * acc.amax(0)[None]
                # (no component added: the same residue as the candidate above, the same verdict)
                for k in range(n_k):
                    best[k, idx[ok[k]]] = m
                # decided: failed after having passed (the run of passing thresholds has ended); a
                # pixel leaves when every target has decided
                undecided = (ok | ~passed).any(0)
                passed |= ok
                n_left = int(undecided.sum())
                if n_left == 0:
                    break
                if n_left < 0.5 * undecided.numel():  # compact to the undecided pixels
                    kt, idx, acc, acc2 = kt[:, undecided], idx[undecided], acc[:, undecided], acc2[:, undecided]
                    passed, ok = passed[:, undecided], ok[:, undecided]
        return best[0] if isinstance(target, (int, float)) else best

    def residue(self, conc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-scaled residues over the whole window (for inspection and tests).

        Args:
            conc: ``(P, L)`` tissue enhancement on the grid.
        Returns:
            ``(k, threshold)``: ``k`` ``(P, n_window)`` (lag ``i * dt`` for ``i <`` :attr:`n_positive`,
            negative lags wrapped to the end for circulant engines) and the relative threshold
            (Tikhonov: λ) used per pixel ``(P,)``.
        """
        if not self.params.circulant:
            k = conc.to(torch.float64) @ self.pinv_t
            return k.to(self.dtype), torch.full((conc.shape[0],), self.params.threshold, dtype=self.dtype,
                                                device=conc.device)
        kf = self._spectrum(conc, None)
        m = self._choose(kf)
        basis = self._get("full", lambda: self._inv_basis(torch.arange(self.n_window, device=self.device)))
        cand = torch.tensor(self.candidates, dtype=self.dtype, device=conc.device)
        return self._apply(kf, m, basis), cand[m]

    def analyse(self, x: torch.Tensor, resample: torch.Tensor | None = None,
                frame_times: torch.Tensor | None = None, tmax_only: bool = False, cbf_only: bool = False
                ) -> dict[str, torch.Tensor]:
        """Peak height, peak time, integral and threshold of the residues of many curves.

        Args:
            x: ``(P, L)`` enhancement on the grid, or ``(P, T)`` enhancement at the frame times when
                ``resample`` ``(L, T)`` (see :func:`~stm_dlp.perfusion.concentration.interp_matrix`)
                is given — the resampling is then folded into the first matmul.
            frame_times: ``(T,)`` times (s, grid clock) of those frames, for the calibration
                (:meth:`calibration`) of ``tmax_method="calibrated"``.
            tmax_only: only ``tmax_s`` is wanted (a TMAX pass on differently smoothed curves): the
                search runs for ``tmax_oi_target`` alone and the other outputs are those of its
                truncation.
            cbf_only: ``tmax_s`` is not wanted (it comes from a TMAX pass): it is returned as 0.
        Returns:
            dict of ``(P,)``: ``kmax`` (sampled maximum of ``k`` over lags ``[-MAX_NEGATIVE_LAG_S, min(L dt, 60 s)]``),
            ``tmax_s`` (see :attr:`DeconvParams.tmax_method`), ``kint`` (``Σ k dt`` over the window)
            and ``threshold`` (relative threshold, or Tikhonov λ).
        """
        p = self.params
        if not p.circulant:
            if resample is None:
                mat = self._get("pinv", lambda: self.pinv_t.to(self.dtype))
            else:
                mat = (resample.to(torch.float64).T @ self.pinv_t).to(self.dtype)
            kt = x.to(self.dtype) @ mat[:, : self.n_lags]
            kmax, tmax = _peak_stats(kt, 0, self.dt_s, p.tmax_method, p.tmax_peak_frac)
            kint = x.to(self.dtype) @ mat.sum(-1, keepdim=True) * self.dt_s
            return {"kmax": kmax, "tmax_s": tmax, "kint": kint[:, 0], "threshold": torch.full_like(kmax, p.threshold)}
        kf = self._spectrum(x, resample)
        # TMAX from its own, smoother truncation (see DeconvParams.tmax_oi_target): both searches in one pass
        own = p.method == "osvd" and p.tmax_oi_target is not None and p.tmax_oi_target != p.oi_target
        if cbf_only:
            m = self._choose(kf)
            basis = self._get("out", lambda: self._inv_basis(self._out_idx()))
            kmax = self._apply(kf, m, basis).amax(-1)
            cand = torch.tensor(self.candidates, dtype=self.dtype, device=x.device)
            dc = kf[:, self._dc_pos] if self._dc_pos >= 0 else torch.zeros_like(kmax)
            dc = torch.where(self.n_keep[m] > self._dc_pos, dc, torch.zeros_like(kmax))
            return {"kmax": kmax, "tmax_s": torch.zeros_like(kmax), "kint": dc * self.dt_s, "threshold": cand[m]}
        if tmax_only:
            m = m_t = self._choose(kf, p.tmax_oi_target if own else None)
        elif own:
            m, m_t = self._choose(kf, (p.oi_target, p.tmax_oi_target)).unbind(0)
        else:
            m = m_t = self._choose(kf)
        basis = self._get("out", lambda: self._inv_basis(self._out_idx()))
        kt = self._apply(kf, m_t, basis)
        kmax_t, tmax = _peak_stats(kt, self.n_negative, self.dt_s, p.tmax_method, p.tmax_peak_frac)
        kmax = kmax_t if (tmax_only or not own) else self._apply(kf, m, basis).amax(-1)
        # Σ_n k[n] over the window is the DC coefficient K_0 (kept unless the AIF is odd enough that
        # |A(0)| falls below the pixel's threshold).
        if self._dc_pos >= 0:
            dc = torch.where(self.n_keep[m] > self._dc_pos, kf[:, self._dc_pos], torch.zeros_like(kmax))
        else:
            dc = torch.zeros_like(kmax)
        cand = torch.tensor(self.candidates, dtype=self.dtype, device=x.device)
        kint = dc * self.dt_s
        if p.tmax_method == "calibrated":
            tmax = tmax - self._calibrated_lag(m_t, kint, kmax_t, resample, frame_times)
        elif p.tmax_method == "calibrated_dispersion":
            _, t_half = _peak_stats(kt, self.n_negative, self.dt_s, "half_rise", p.tmax_peak_frac)
            rise = (tmax - t_half).clamp_min(0.0)
            tmax = tmax - self.dispersion_lag(m_t, kint, kmax_t, rise, resample, frame_times)
        return {"kmax": kmax, "tmax_s": tmax, "kint": kint, "threshold": cand[m]}

    def calibration(self, resample: torch.Tensor | None = None, frame_times: torch.Tensor | None = None,
                    dispersion_s: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        """What this deconvolution does to known residues, per candidate threshold (cached per framing).

        Exponential residues ``k = exp(-(t - d) / MTT)`` (``MTT`` in :data:`CALIBRATION_MTT_S`, ``d`` =
        :data:`CALIBRATION_DELAY_S`) — with ``dispersion_s``, each also dispersed by a normalised
        exponential kernel of every mean given (0 = none) — are convolved with the AIF on a grid four
        times finer (the forward model of :func:`causal_matrix`), sampled like the data — at
        ``frame_times`` and interpolated onto the grid by ``resample`` ``(L, T)`` when both are given,
        else on the grid — and deconvolved at every candidate threshold. Returns tensors of shape
        ``(M, n)`` (without ``dispersion_s``) or ``(B, M, n)`` (one block per dispersion): ``mtt_obs``
        (the apparent MTT ``∫k / max k`` of the estimate, increasing along n), ``lag`` (estimated
        argmax minus the true one — the delay plus the dispersed residue's own peak time — s) and
        ``rise`` (estimated argmax minus estimated half-rise time, s: ~the filter's rise for a jump,
        longer for a dispersed residue).
        """
        framed = resample is not None and frame_times is not None
        betas = (0.0,) if dispersion_s is None else tuple(float(b) for b in dispersion_s)
        key = ("calibration", tuple(round(float(v), 6) for v in frame_times.cpu()) if framed else None, betas)

        def build() -> dict[str, torch.Tensor]:
            fine = 4
            dt_f = self.dt_s / fine
            n_f = self.n_grid * fine
            t_f = torch.arange(n_f, dtype=torch.float64, device=self.device) * dt_f
            t = t_f[::fine]
            mtt = torch.tensor(CALIBRATION_MTT_S, dtype=torch.float64, device=self.device)
            d = CALIBRATION_DELAY_S
            n_d = int(round(d / dt_f))
            r_f = torch.exp(-t_f[None] / mtt[:, None])  # (n_mtt, n_f), jump at 0
            aif_f = torch.from_numpy(np.interp(t_f.cpu().numpy(), t.cpu().numpy(),
                                               self._aif64.cpu().numpy())).to(self.device)
            a_mat = causal_matrix(aif_f * dt_f)
            basis = self._get("out", lambda: self._inv_basis(self._out_idx()))
            rows: dict[str, list[torch.Tensor]] = {"mtt_obs": [], "lag": [], "rise": []}
            for beta in betas:
                if beta > 0:  # normalised on the grid: dispersion keeps the area (MTT)
                    h = torch.exp(-t_f / beta)
                    h = h / (h.sum() * dt_f)
                    g = (causal_matrix(h * dt_f) @ r_f.T).T
                else:
                    g = r_f
                peak_s = g.argmax(-1).to(torch.float64) * dt_f  # the dispersed residue's own TMAX
                k_f = torch.zeros_like(g)
                k_f[:, n_d:] = g[:, : n_f - n_d]
                conc_f = (a_mat @ k_f.T).T  # (n_mtt, n_f)
                if not framed:
                    kf = self._spectrum(conc_f[:, ::fine].to(self.dtype), None)
                else:
                    ft = frame_times.to(torch.float64).cpu().numpy()
                    conc = torch.from_numpy(np.stack([np.interp(ft, t_f.cpu().numpy(), c)
                                                      for c in conc_f.cpu().numpy()])).to(self.device, self.dtype)
                    kf = self._spectrum(conc, resample)
                area = (k_f.sum(-1) * dt_f).to(self.dtype)
                per_m: dict[str, list[torch.Tensor]] = {"mtt_obs": [], "lag": [], "rise": []}
                for m in range(len(self.candidates)):
                    kt = self._apply(kf, m, basis)
                    kmax, tmax = _peak_stats(kt, self.n_negative, self.dt_s, "argmax", self.params.tmax_peak_frac)
                    _, thalf = _peak_stats(kt, self.n_negative, self.dt_s, "half_rise", self.params.tmax_peak_frac)
                    per_m["mtt_obs"].append(area / kmax.clamp_min(1e-6))
                    per_m["lag"].append(tmax - d - peak_s.to(self.dtype))
                    per_m["rise"].append((tmax - thalf).clamp_min(0.0))
                for k, v in per_m.items():
                    rows[k].append(torch.stack(v))
            out = {k: torch.stack(v) for k, v in rows.items()}  # (B, M, n)
            return {k: v[0] for k, v in out.items()} if dispersion_s is None else out

        return self._get(key, build)

    def _calibrated_lag(self, m: torch.Tensor, kint: torch.Tensor, kmax: torch.Tensor,
                        resample: torch.Tensor | None = None, frame_times: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Per-pixel argmax lag of :meth:`calibration` at the pixel's threshold ``m`` and apparent MTT."""
        cal = self.calibration(resample, frame_times)
        xs = cal["mtt_obs"][m]  # (P, n) increasing
        obs = torch.where(kmax > 0, kint / kmax.clamp_min(1e-12), xs[:, :1].squeeze(-1)).clamp(xs[:, 0], xs[:, -1])
        j = torch.searchsorted(xs.contiguous(), obs[:, None].contiguous()).clamp(1, xs.shape[1] - 1)
        x0, x1 = xs.gather(1, j - 1)[:, 0], xs.gather(1, j)[:, 0]
        wgt = ((obs - x0) / (x1 - x0).clamp_min(1e-9)).clamp(0.0, 1.0)

        def interp(y: torch.Tensor) -> torch.Tensor:
            yy = y[m]
            return yy.gather(1, j - 1)[:, 0] * (1 - wgt) + yy.gather(1, j)[:, 0] * wgt

        return interp(cal["lag"])

    def dispersion_lag(self, m: torch.Tensor, kint: torch.Tensor, kmax: torch.Tensor, rise: torch.Tensor,
                        resample: torch.Tensor | None = None, frame_times: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Per-pixel argmax lag for ``tmax_method="calibrated_dispersion"``: in each dispersion block of
        :meth:`calibration` (:data:`CALIBRATION_DISPERSION_S`), the lag and rise time at the pixel's
        threshold ``m`` and apparent MTT (as :meth:`_calibrated_lag`); then the lag between the two
        blocks whose rise times bracket the pixel's ``rise`` ``(P,)`` (s). A residue that jumps at
        its delay rises like the filter and gets the undispersed lag; a dispersed one rises slower
        and its smooth peak is hardly shifted, so it gets less."""
        cal = self.calibration(resample, frame_times, CALIBRATION_DISPERSION_S)
        n_b, _, n = cal["lag"].shape
        # every dispersion block at once: (P, B, n) tables at the pixels' thresholds
        xs = cal["mtt_obs"].permute(1, 0, 2)[m]  # increasing along n
        ratio = kint / kmax.clamp_min(1e-12)
        obs = torch.where(kmax[:, None] > 0, ratio[:, None], xs[..., 0]).clamp(xs[..., 0], xs[..., -1])
        j = torch.searchsorted(xs.contiguous(), obs[..., None].contiguous()).clamp(1, n - 1)
        x0, x1 = xs.gather(-1, j - 1)[..., 0], xs.gather(-1, j)[..., 0]
        wgt = ((obs - x0) / (x1 - x0).clamp_min(1e-9)).clamp(0.0, 1.0)

        def at(name: str) -> torch.Tensor:
            yy = cal[name].permute(1, 0, 2)[m]
            return yy.gather(-1, j - 1)[..., 0] * (1 - wgt) + yy.gather(-1, j)[..., 0] * wgt

        lag = at("lag")  # (P, B)
        rs = at("rise").cummax(1).values  # rise grows with the dispersion; made monotonic
        obs = rise.to(rs.dtype).clamp(rs[:, 0], rs[:, -1])
        j = torch.searchsorted(rs.contiguous(), obs[:, None].contiguous()).clamp(1, n_b - 1)
        r0, r1 = rs.gather(1, j - 1)[:, 0], rs.gather(1, j)[:, 0]
        wgt = ((obs - r0) / (r1 - r0).clamp_min(1e-9)).clamp(0.0, 1.0)
        return lag.gather(1, j - 1)[:, 0] * (1 - wgt) + lag.gather(1, j)[:, 0] * wgt

    def summarise(self, k: torch.Tensor) -> dict[str, torch.Tensor]:
        """Peak, peak time and integral of full-window residues ``k`` ``(P, n_window)`` (:meth:`residue`)."""
        n_neg = self.n_negative
        kt = torch.roll(k, shifts=n_neg, dims=-1) if n_neg else k
        kt = kt[:, : n_neg + self.n_lags]
        kmax, tmax = _peak_stats(kt, n_neg, self.dt_s, self.params.tmax_method, self.params.tmax_peak_frac)
        return {"kmax": kmax, "tmax_s": tmax, "kint": k.sum(-1) * self.dt_s}


def deconvolve(
    conc: torch.Tensor,
    aif: torch.Tensor,
    dt_s: float,
    method: str = "osvd",
    **params: float | int | str | Sequence[float],
) -> tuple[torch.Tensor, Deconvolver]:
    """Convenience: residues ``k`` ``(..., n_window)`` of curves ``conc`` ``(..., L)`` on a uniform grid.

    ``params`` are :class:`DeconvParams` fields. Returns ``(k, deconvolver)``; use
    :meth:`Deconvolver.summarise` for peak / TMAX / integral.
    """
    dec = Deconvolver(aif, dt_s, DeconvParams(method=method, **params))  # type: ignore[arg-type]
    lead = conc.shape[:-1]
    k, _ = dec.residue(conc.reshape(-1, conc.shape[-1]))
    return k.reshape(*lead, k.shape[-1]), dec
