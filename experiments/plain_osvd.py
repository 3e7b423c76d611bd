"""A plain block-circulant oSVD in numpy: the reference the calculation approach is measured against.

What a textbook implementation does (Wu et al., MRM 2003;50:164; Østergaard 1996), with nothing of
ours in it:

* **grid**: every pixel's curve linearly interpolated onto a uniform grid at the acquisition's
  median frame interval;
* **baseline**: the mean of the frames before the arrival of the (automatic) AIF, the first frame
  where it exceeds 10 % of its peak, less one frame of margin;
* **AIF**: among the head's pixels (pre-contrast HU in (-50, 150)), the 1 % with the highest peak
  enhancement; of these, the ``n_aif`` (8) with the earliest time to peak; their mean; no
  partial-volume correction;
* **smoothing**: a 1.5 px Gaussian on every frame's enhancement, after the AIF is chosen;
* **deconvolution**: the AIF zero-padded to ``2N``, the ``2N x 2N`` block-circulant matrix, its SVD
  (``numpy.linalg.svd``); per pixel, the threshold is raised through the candidates until the
  oscillation index ``OI = 1/(N f_max) Σ|f(k) - 2f(k-1) + f(k-2)|`` is below 0.095 (CT);
* **maps**: CBF = max k (over the first ``N`` lags) / ``TISSUE_SCALE``, TMAX = its argmax (s), CBV =
  the area ratio ``∫C / ∫AIF / (60 TISSUE_SCALE)``, MTT = CBV / CBF * 60; maps everywhere in ``mask``.

:func:`plain_osvd` is the entry point (``experiments.calc_settings`` runs it on every benchmark study).
"""

from __future__ import annotations

import math

import numpy as np

from stm_dlp.perfusion.physics import TISSUE_SCALE
from stm_dlp.types import ALL_PARAMS, Study

THRESHOLDS: tuple[float, ...] = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25,
                                 0.3, 0.4, 0.6, 0.8)
OI_TARGET: float = 0.095


def _gauss_1d(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return g / g.sum()


def smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian (reflect padding) over the last two axes of ``(..., H, W)``."""
    if sigma <= 0:
        return img
    g = _gauss_1d(sigma)
    r = len(g) // 2
    out = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(r, r), (0, 0)], mode="reflect")
    out = sum(g[i] * out[..., i: i + img.shape[-2], :] for i in range(len(g)))
    out = np.pad(out, [(0, 0)] * (img.ndim - 2) + [(0, 0), (r, r)], mode="reflect")
    return sum(g[i] * out[..., :, i: i + img.shape[-1]] for i in range(len(g)))


def _to_grid(curves: np.ndarray, times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``(P, T)`` curves at ``times`` onto ``grid`` (held at the ends)."""
    idx = np.clip(np.searchsorted(times, grid) - 1, 0, len(times) - 2)
    w = np.clip((grid - times[idx]) / (times[idx + 1] - times[idx]), 0.0, 1.0)
    return curves[:, idx] * (1 - w) + curves[:, idx + 1] * w


def plain_osvd(frames: np.ndarray, times_s: np.ndarray, mask: np.ndarray, n_aif: int = 8,
               sigma_px: float = 1.5) -> dict[str, np.ndarray]:
    """CBV, CBF, TMAX, MTT maps ``(S, H, W)`` of a study ``(S, T, H, W)`` HU inside ``mask`` (see module doc)."""
    fr = np.asarray(frames, np.float64)
    s_count, n_t, h, w = fr.shape
    tt = np.asarray(times_s, np.float64).reshape(s_count, n_t)
    tt = tt - tt.min()
    dt = float(np.median(np.diff(tt, axis=1)))
    grid = np.arange(0.0, tt[:, -1].max() + 1e-9, dt)
    n = len(grid)
    # AIF candidates: head pixels, top 1 % by peak enhancement over the first frame, earliest peaks
    first = fr[:, 0]
    head = (first > -50) & (first < 150)
    curves = fr.transpose(0, 2, 3, 1)[head] - first[head][:, None]  # (P, T)
    slice_of = np.nonzero(head)[0]
    peak = curves.max(1)
    top = np.argsort(peak)[-max(n_aif, int(0.01 * len(peak))):]
    ttp = np.array([tt[slice_of[i], int(np.argmax(curves[i]))] for i in top])
    chosen = top[np.lexsort((-peak[top], ttp))[:n_aif]]
    aif_frames = np.mean([np.interp(grid, tt[slice_of[i]], curves[i]) for i in chosen], 0)
    a0 = int(np.argmax(aif_frames > 0.1 * aif_frames.max()))
    t_arr = grid[max(a0, 1)]
    # baseline and enhancement (per slice: frames before the AIF's arrival, less one frame)
    base = np.stack([fr[s, : max(1, int((tt[s] < t_arr).sum()) - 1)].mean(0) for s in range(s_count)])
    enh = smooth(fr - base[:, None], sigma_px)
    aif = aif_frames - aif_frames[: max(1, a0 - 1)].mean()
    # block-circulant matrix (2N) and its SVD
    a = np.concatenate([aif * dt, np.zeros(n)])
    idx = np.arange(2 * n)
    mat = a[(idx[:, None] - idx[None, :]) % (2 * n)]
    u, sv, vt = np.linalg.svd(mat)
    out = {k: np.zeros((s_count, h, w), np.float32) for k in ("cbf", "cbv", "tmax", "mtt")}
    aif_area = float(np.trapezoid(aif, dx=dt)) if hasattr(np, "trapezoid") else float(np.trapz(aif, dx=dt))
    for s in range(s_count):
        pix = np.argwhere(mask[s])
        if len(pix) == 0:
            continue
        c = _to_grid(enh[s][:, pix[:, 0], pix[:, 1]].T, tt[s], grid)  # (P, N)
        cp = np.concatenate([c, np.zeros_like(c)], 1)
        proj = cp @ u  # (P, 2N): U^T c
        chosen_k = np.zeros_like(cp)
        undecided = np.ones(len(c), bool)
        for j, thr in enumerate(THRESHOLDS):
            inv = np.where(sv > thr * sv[0], 1.0 / sv, 0.0)
            k = (proj[undecided] * inv) @ vt  # (P', 2N): V S^-1 U^T c
            fmax = k.max(1)
            oi = np.abs(k[:, 2:] - 2 * k[:, 1:-1] + k[:, :-2]).sum(1) / (k.shape[1] * np.maximum(fmax, 1e-12))
            ok = (oi < OI_TARGET) & (fmax > 0)
            if j == len(THRESHOLDS) - 1:
                ok = np.ones_like(ok)
            rows = np.nonzero(undecided)[0]
            chosen_k[rows[ok]] = k[ok]
            undecided[rows[ok]] = False
            if not undecided.any():
                break
        kk = chosen_k[:, :n]
        cbf = np.clip(kk.max(1) / TISSUE_SCALE, 0, None)
        tmax = kk.argmax(1) * dt
        area = np.trapezoid(c, dx=dt, axis=1) if hasattr(np, "trapezoid") else np.trapz(c, dx=dt, axis=1)
        cbv = np.clip(area / aif_area / (60.0 * TISSUE_SCALE), 0, None) if aif_area > 0 else np.zeros(len(c))
        mtt = np.where(cbf > 1e-3, cbv / np.maximum(cbf, 1e-3) * 60.0, 0.0)
        for name, v in (("cbf", cbf), ("cbv", cbv), ("tmax", tmax), ("mtt", mtt)):
            out[name][s, pix[:, 0], pix[:, 1]] = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    return out


class PlainOSVDMaps:
    """:func:`plain_osvd` as a maps provider for :func:`stm_dlp.calc_eval.evaluate_studies` (inside the study's
    brain mask, as every method the benchmark compares)."""

    label = "plain oSVD"

    def maps(self, study: Study) -> tuple[dict[str, np.ndarray], dict]:
        maps = plain_osvd(study.frames, study.times_s, np.asarray(study.mask, bool))
        return {p: np.asarray(maps[p], np.float32) for p in ALL_PARAMS}, {}
