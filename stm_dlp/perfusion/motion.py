"""Rigid in-plane motion correction of CTP frames (pure torch, vectorised over frames).

:func:`correct_motion` registers every frame of every slice to that slice's mean pre-contrast frame
(more precisely the median of its pre-bolus frames, which one moved baseline frame cannot blur):

1. **features**: each frame's HU after a 3 x 3 median (impulse noise), clipped to ``[-200, 1200]``
   HU — the skull and the head outline carry the alignment; the bolus changes the brain by tens of
   HU and the vessels by hundreds, which the robust weights of step 4 discount;
2. **rotation**: the magnitude spectrum does not move with a translation and turns with the image,
   so the rotation is the shift of the log-magnitude spectrum in polar coordinates (one circular
   cross-correlation along the angle per frame; Reddy & Chatterji, IEEE TIP 1996) — any angle in
   ±90°, resolved to 0.5° and refined by a parabola;
3. **translation**: phase correlation (Kuglin & Hines 1975) of the derotated frame with the
   reference, low-pass weighted against noise, sub-pixel by a parabola — any shift;
4. **refinement**: Gauss–Newton on (angle, shift) of the bilinear warp (``affine_grid`` /
   ``grid_sample``) with Huber weights (frames whose vessels light up are not pulled toward the
   bolus), on lightly smoothed features, all frames at once;
5. **check**: a frame is *not registered* — reported, and left as acquired — when its normalised
   cross-correlation with the reference after registration is far below the other frames' (more
   than ``max(FAIL_NCC_DROP, 8 MAD)`` under their median) or its motion exceeds the search limits.
   A correction never fails silently: ``report["failed_frames"]`` lists ``[slice, frame]``, and such
   a frame is replaced by the linear interpolation in time of its slice's registered neighbours
   (what the deconvolution does for a missing frame; ``failed="keep"`` leaves it as acquired).

Motion is reported in the convention of :func:`stm_dlp.data.corrupt.rigid_warp`: a frame equals the
reference rotated by ``rotation_deg`` about the image centre and shifted by ``shift_px`` = ``(dy,
dx)`` pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: Feature window (HU): air clipped to -200 (the head outline stays an edge), bone to 1200.
FEATURE_HU: tuple[float, float] = (-200.0, 1200.0)
#: Frames moved less than this are left untouched (no resampling of noise for nothing).
MIN_SHIFT_PX: float = 0.05
MIN_ROTATION_DEG: float = 0.05
#: A slice is registered only when at least this fraction of its reference is bone (>= MIN_BONE_HU):
#: the skull is what the registration locks onto; without it (synthetic grids, a brain-only crop)
#: the slice is left alone and reported in ``skipped_slices``.
MIN_BONE_HU: float = 300.0
MIN_BONE_FRAC: float = 0.005
#: ... and when it is at least this large (px): smaller images are not registered.
MIN_SIZE_PX: int = 24
#: Resampling of the corrected frames (``grid_sample`` mode).
FRAME_INTERPOLATION: str = "bilinear"
#: Largest motion searched, as a fraction of the image size and in degrees.
MAX_SHIFT_FRAC: float = 0.25
MAX_ROTATION_DEG: float = 20.0
#: A frame is not registered when its NCC with the reference after registration is more than
#: ``max(8 MAD, FAIL_NCC_DROP)`` below the slice's median NCC (bone-dominated features: registered
#: frames agree to ~0.003, a frame a few degrees off loses ~0.015).
FAIL_NCC_DROP: float = 0.005
#: A first, coarse look that finds every frame within this of the first frame leaves the slice alone.
STILL_SHIFT_PX: float = 0.3
STILL_ROTATION_DEG: float = 0.2
#: Gauss–Newton iterations of the refinement.
GN_ITERATIONS: int = 12
#: Registration is estimated on images at most this large (average-pooled), then refined at full size.
WORK_SIZE: int = 128


def _grid(angle_rad: torch.Tensor, shift: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """``grid_sample`` grid ``(N, H, W, 2)`` of ``q = R(angle) p + shift`` (pixel coordinates about the centre)."""
    dev = angle_rad.device
    y = (torch.arange(h, dtype=dtype, device=dev) - (h - 1) / 2)[None, :, None]
    x = (torch.arange(w, dtype=dtype, device=dev) - (w - 1) / 2)[None, None, :]
    cos, sin = torch.cos(angle_rad)[:, None, None], torch.sin(angle_rad)[:, None, None]
    # align_corners=False: pixel centre c (0-based) is at (2c + 1) / size - 1, i.e. 2 x / size about the centre
    grid = torch.empty((angle_rad.shape[0], h, w, 2), dtype=dtype, device=dev)
    grid[..., 0] = (cos * (2.0 / w)) * x - (sin * (2.0 / w)) * y + shift[:, 1, None, None] * (2.0 / w)
    grid[..., 1] = (sin * (2.0 / h)) * x + (cos * (2.0 / h)) * y + shift[:, 0, None, None] * (2.0 / h)
    return grid


def warp(img: torch.Tensor, angle_rad: torch.Tensor, shift: torch.Tensor, fill: torch.Tensor | None = None,
         grid: torch.Tensor | None = None, mode: str = "bilinear") -> torch.Tensor:
    """Sample images ``(N, H, W)`` at ``q = R(angle) p + shift`` (pixel coordinates about the centre).

    ``shift`` is ``(N, 2)`` = ``(dy, dx)`` px; ``angle_rad`` ``(N,)``. Bilinear; outside the image the
    value is ``fill`` ``(N,)`` (default: each image's minimum, i.e. air).
    """
    n, h, w = img.shape
    if grid is None:
        grid = _grid(angle_rad.to(img.dtype), shift.to(img.dtype), h, w, img.dtype)
    base = img.amin(dim=(1, 2)) if fill is None else fill
    out = F.grid_sample((img - base[:, None, None])[:, None], grid, mode=mode, padding_mode="zeros",
                        align_corners=False)[:, 0]
    return out + base[:, None, None]


def _med3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))


def _features(frames: torch.Tensor) -> torch.Tensor:
    """Registration features: a separable 3 x 3 median (rows, then columns; removes impulses at a
    fraction of a true median's cost), clipped to :data:`FEATURE_HU`."""
    x = F.pad(frames[:, None], (1, 1, 0, 0), mode="replicate")[:, 0]
    x = _med3(x[..., :-2], x[..., 1:-1], x[..., 2:])
    x = F.pad(x[:, None], (0, 0, 1, 1), mode="replicate")[:, 0]
    x = _med3(x[:, :-2], x[:, 1:-1], x[:, 2:])
    return x.clamp(*FEATURE_HU)


def _polar_log_magnitude(img: torch.Tensor, n_angles: int = 360, n_radii: int = 48) -> torch.Tensor:
    """``(N, n_radii, n_angles)`` log-magnitude spectrum on a polar grid over [0°, 180°)."""
    n, h, w = img.shape
    x = img - img.mean(dim=(1, 2), keepdim=True)
    win = torch.outer(torch.hann_window(h, periodic=False, dtype=img.dtype, device=img.device),
                      torch.hann_window(w, periodic=False, dtype=img.dtype, device=img.device))
    mag = torch.fft.fftshift(torch.fft.fft2(x * win).abs(), dim=(-2, -1))
    mag = torch.log1p(mag)
    theta = torch.arange(n_angles, dtype=img.dtype, device=img.device) * (math.pi / n_angles)
    r = torch.linspace(0.06, 0.6, n_radii, dtype=img.dtype, device=img.device)  # of the Nyquist radius
    # normalised sampling coordinates of the shifted spectrum (frequency (u, v) ~ (x, y))
    gx = r[:, None] * torch.cos(theta)[None]
    gy = r[:, None] * torch.sin(theta)[None]
    grid = torch.stack([gx, gy], -1)[None].expand(n, -1, -1, -1)
    return F.grid_sample(mag[:, None], grid, mode="bilinear", align_corners=False)[:, 0]


def _parabola(c_m: torch.Tensor, c_0: torch.Tensor, c_p: torch.Tensor) -> torch.Tensor:
    den = c_m - 2 * c_0 + c_p
    off = torch.where(den < 0, 0.5 * (c_m - c_p) / torch.where(den < 0, den, -torch.ones_like(den)),
                      torch.zeros_like(den))
    return off.clamp(-0.5, 0.5)


def _rotation(feat: torch.Tensor, ref: torch.Tensor, n_angles: int = 360) -> torch.Tensor:
    """Angle ``(N,)`` (rad) ``a`` such that ``warp(feat, a, ·)`` is ``ref`` up to a translation."""
    pf = _polar_log_magnitude(feat, n_angles)
    pr = _polar_log_magnitude(ref[None], n_angles)
    pf = pf - pf.mean(-1, keepdim=True)
    pr = pr - pr.mean(-1, keepdim=True)
    corr = torch.fft.irfft(torch.fft.rfft(pf, dim=-1) * torch.fft.rfft(pr, dim=-1).conj(), n=n_angles, dim=-1)
    corr = corr.sum(1)  # (N, n_angles): circular lag k of the frame's spectrum against the reference's
    k = corr.argmax(-1)
    ar = torch.arange(corr.shape[0], device=corr.device)
    off = _parabola(corr[ar, (k - 1) % n_angles], corr[ar, k], corr[ar, (k + 1) % n_angles])
    lag = k.to(feat.dtype) + off
    lag = torch.where(lag > n_angles / 2, lag - n_angles, lag)
    # the frame's spectrum is the reference's turned by the frame's rotation; sampling at R(a) p undoes it
    return lag * (math.pi / n_angles)


def _translation(feat: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Shift ``(N, 2)`` ``(dy, dx)`` px such that ``warp(feat, 0, shift)`` is ``ref`` (phase correlation)."""
    n, h, w = feat.shape
    fa = torch.fft.fft2(feat - feat.mean(dim=(1, 2), keepdim=True))
    fb = torch.fft.fft2(ref - ref.mean())
    cross = fa * fb.conj()
    ky = torch.fft.fftfreq(h, dtype=feat.dtype, device=feat.device)[:, None]
    kx = torch.fft.fftfreq(w, dtype=feat.dtype, device=feat.device)[None]
    lowpass = torch.exp(-((kx**2 + ky**2) / (2 * 0.15**2)))  # noise lives at high frequencies
    corr = torch.fft.ifft2(cross / cross.abs().clamp_min(1e-12) * lowpass).real
    flat = corr.reshape(n, -1).argmax(-1)
    iy, ix = flat // w, flat % w
    ar = torch.arange(n, device=feat.device)
    oy = _parabola(corr[ar, (iy - 1) % h, ix], corr[ar, iy, ix], corr[ar, (iy + 1) % h, ix])
    ox = _parabola(corr[ar, iy, (ix - 1) % w], corr[ar, iy, ix], corr[ar, iy, (ix + 1) % w])
    dy = torch.where(iy > h // 2, iy - h, iy).to(feat.dtype) + oy
    dx = torch.where(ix > w // 2, ix - w, ix).to(feat.dtype) + ox
    return torch.stack([dy, dx], -1)


def _smooth(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(N, H, W)`` as two banded matrix products (zero padding, renormalised)."""
    from stm_dlp.perfusion.concentration import _gaussian_band

    n, h, w = img.shape
    g_h = _gaussian_band(h, sigma, img.dtype, img.device)
    g_w = _gaussian_band(w, sigma, img.dtype, img.device)
    norm = (g_h.sum(1)[:, None] * g_w.sum(0)[None, :])
    return g_h @ img @ g_w / norm


def _gauss_newton(feat: torch.Tensor, ref: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor,
                  iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine ``(angle, shift)`` so that ``warp(feat, angle, shift) ≈ ref`` (Huber-weighted least squares).

    The Jacobian uses the gradient of the warped image rotated back (``∇F(q) = R ∇C(p)``), so each
    iteration costs one warp of the frames.
    """
    n, h, w = feat.shape
    dtype, dev = feat.dtype, feat.device
    y = (torch.arange(h, dtype=dtype, device=dev) - (h - 1) / 2)[:, None].expand(h, w)
    x = (torch.arange(w, dtype=dtype, device=dev) - (w - 1) / 2)[None].expand(h, w)
    fill = feat.amin(dim=(1, 2))
    eye = torch.eye(3, dtype=dtype, device=dev)
    for _ in range(iterations):
        q = _grid(angle, shift, h, w, dtype)
        c = warp(feat, angle, shift, fill, grid=q)
        cy, cx = torch.gradient(c, dim=(1, 2))
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        fx, fy = cos * cx - sin * cy, sin * cx + cos * cy  # ∇F at the sample points
        valid = (q[..., 0].abs() < 1 - 2.0 / w) & (q[..., 1].abs() < 1 - 2.0 / h)
        r = c - ref[None]
        vf = valid.to(dtype)
        scale = 1.25 * (r.abs() * vf).sum(dim=(1, 2)) / vf.sum(dim=(1, 2)).clamp_min(1)  # ~sigma for Gaussian r
        wgt = vf / torch.clamp(r.abs() / (1.5 * scale.clamp_min(1e-3)[:, None, None]), min=1.0)
        j_a = fx * (-sin * x - cos * y) + fy * (cos * x - sin * y)
        jac = torch.stack([j_a, fy, fx], -1).reshape(n, -1, 3)  # d/d(angle, dy, dx)
        wj = jac * wgt.reshape(n, -1, 1)
        hess = wj.transpose(1, 2) @ jac
        grad = wj.transpose(1, 2) @ r.reshape(n, -1, 1)
        # Levenberg-style damping: a frame without structure (flat, all air) gives a zero step, not an error
        damp = 1e-6 * torch.diagonal(hess, dim1=1, dim2=2).mean(-1) + 1e-9
        step = -torch.linalg.solve(hess + damp[:, None, None] * eye, grad)[..., 0]
        # a Gauss-Newton step far from the optimum can overshoot: at most 2 px and 2 degrees at a time
        step = torch.cat([step[:, :1].clamp(-0.035, 0.035), step[:, 1:].clamp(-2.0, 2.0)], 1)
        angle = angle + step[:, 0]
        shift = shift + step[:, 1:]
        if float(step[:, 1:].abs().max()) < 5e-3 and float(step[:, 0].abs().max()) < 1e-4:
            break
    return angle, shift


def _ncc(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    v = valid.to(a.dtype)
    n = v.sum(dim=(1, 2)).clamp_min(1)
    ma = (a * v).sum(dim=(1, 2)) / n
    mb = (b * v).sum(dim=(1, 2)) / n
    da, db = (a - ma[:, None, None]) * v, (b - mb[:, None, None]) * v
    return (da * db).sum(dim=(1, 2)) / ((da**2).sum(dim=(1, 2)) * (db**2).sum(dim=(1, 2))).sqrt().clamp_min(1e-12)


def register_slice(frames: torch.Tensor, reference: torch.Tensor, feat: torch.Tensor | None = None,
                   fine: bool = True) -> dict[str, torch.Tensor]:
    """Rigid registration of one slice's frames ``(T, H, W)`` HU to a reference feature image ``(H, W)``
    (:func:`_features` of a pre-contrast frame).

    Estimated on images of at most :data:`WORK_SIZE` (average-pooled; ~0.1 px there), coarse to fine;
    ``fine=False`` stops after the coarse level (a quick look for motion). ``feat`` are the frames'
    features when already computed. Returns ``angle`` ``(T,)`` rad and ``shift`` ``(T, 2)`` px
    (full resolution) of the *correction* (sample at ``R(angle) p + shift``), ``ncc`` ``(T,)`` after
    registration and ``failed`` ``(T,)`` bool.
    """
    n_t, h, w = frames.shape
    feat = _features(frames.to(torch.float32)) if feat is None else feat
    scale = max(1, int(math.ceil(max(h, w) / WORK_SIZE)))
    small = F.avg_pool2d(feat[:, None], scale)[:, 0] if scale > 1 else feat
    ref_full = reference.to(torch.float32)
    ref_s = F.avg_pool2d(ref_full[None, None], scale)[0, 0] if scale > 1 else ref_full
    angle = _rotation(small, ref_s)
    zero = torch.zeros(n_t, 2, dtype=small.dtype, device=small.device)
    derot = warp(small, angle, zero)
    shift = _translation(derot, ref_s)
    # the translation was measured after the rotation: sampling at R p + R t = R (p + t)
    cos, sin = torch.cos(angle), torch.sin(angle)
    shift = torch.stack([sin * shift[:, 1] + cos * shift[:, 0], cos * shift[:, 1] - sin * shift[:, 0]], -1)
    # coarse to fine: a wide smoothing first widens the basin (a 4-8 degree jump whose first
    # estimate is a degree off is several pixels off at the skull), then the detail
    coarse, ref_c = F.avg_pool2d(small[:, None], 2)[:, 0], F.avg_pool2d(ref_s[None, None], 2)[0, 0]
    angle, shift = _gauss_newton(_smooth(coarse, 1.0), _smooth(ref_c[None], 1.0)[0], angle, shift / 2,
                                 GN_ITERATIONS)
    shift = shift * 2
    ref_sm = _smooth(ref_s[None], 1.0)[0]
    small_sm = _smooth(small, 1.0)
    if fine:
        angle, shift = _gauss_newton(small_sm, ref_sm, angle, shift, GN_ITERATIONS)
    reg = warp(small_sm, angle, shift)
    valid = warp(torch.ones_like(small), angle, shift, torch.zeros(n_t, dtype=small.dtype)) > 0.999
    ncc = _ncc(reg, ref_sm.expand_as(reg), valid)
    shift = shift * scale
    med = ncc.median()
    mad = (ncc - med).abs().median()
    limit_px = MAX_SHIFT_FRAC * min(h, w)
    failed = (ncc < med - torch.clamp(8 * mad, min=FAIL_NCC_DROP)) | (shift.abs().amax(-1) > limit_px) \
        | (angle.abs() > math.radians(MAX_ROTATION_DEG)) | ~torch.isfinite(ncc)
    return {"angle": angle, "shift": shift, "ncc": ncc, "failed": failed}


def correct_motion(frames: torch.Tensor, n_baseline: int | Sequence[int] | None = None,
                   times_s: torch.Tensor | None = None, failed: str = "interpolate"
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Every frame registered in-plane to its slice's pre-contrast reference (see the module docstring).

    Args:
        frames: ``(S, T, H, W)`` HU.
        n_baseline: pre-bolus frames (one count or one per slice); the reference is their median.
            ``None`` (default): found after a first registration to the first frame (then
            ``report["n_baseline"]``), since a moving head fools the arrival detection.
        times_s: ``(S, T)`` frame times for interpolating frames that could not be registered
            (default: frame indices).
        failed: ``"interpolate"`` (default) or ``"keep"`` for frames that could not be registered.

    Returns:
        ``(corrected, report)``: ``corrected`` like ``frames`` (frames that moved less than
        :data:`MIN_SHIFT_PX` / :data:`MIN_ROTATION_DEG`, and frames not registered, as they were);
        ``report`` (JSON-able): ``shift_px`` ``[S][T][dy, dx]`` and ``rotation_deg`` ``[S][T]`` of
        the motion found (convention of :func:`stm_dlp.data.corrupt.rigid_warp`), ``ncc``
        ``[S][T]``, ``failed_frames`` ``[[slice, frame], ...]``, ``moved_frames`` (count corrected),
        ``resampled_frames`` ``[[slice, frame], ...]`` (the frames corrected, i.e. resampled),
        ``max_shift_px``, ``max_rotation_deg``, ``skipped_slices`` (no bone to register on),
        ``still_slices`` (a first coarse look found no motion: left alone).
    """
    s_count, n_t, h, w = frames.shape
    if n_baseline is None:
        nb = None
    else:
        nb = list(n_baseline) if isinstance(n_baseline, Sequence) else [int(n_baseline)] * s_count
    out = frames.clone()
    shifts, rots, nccs, failed_list = [], [], [], []
    moved = 0
    resampled: list[list[int]] = []
    passes = []
    skipped: list[int] = []
    still: list[int] = []
    for s in range(s_count):
        feat0 = _features(frames[s].to(torch.float32))
        if min(h, w) < MIN_SIZE_PX or float((feat0[0] >= MIN_BONE_HU).to(torch.float32).mean()) < MIN_BONE_FRAC:
            # nothing rigid to register on (no skull: a synthetic grid, a brain-only crop; or a tiny
            # image): the slice is left alone and reported
            skipped.append(s)
            shifts.append([[0.0, 0.0] for _ in range(n_t)])
            rots.append([0.0] * n_t)
            nccs.append([1.0] * n_t)
            continue
        if nb is None:
            # the pre-bolus frames are not known yet (a moving head fools the arrival detection): register
            # to the first frame, find the arrival on the registered frames, and register again to the
            # median of the registered pre-bolus frames
            r0 = register_slice(frames[s], feat0[0], feat0, fine=False)
            if float(r0["shift"].abs().max()) < STILL_SHIFT_PX and float(r0["angle"].abs().max()) < math.radians(
                    STILL_ROTATION_DEG):
                # a quick look finds no motion: the slice is left as it is (most studies: no cost but this)
                still.append(s)
                shifts.append([[0.0, 0.0] for _ in range(n_t)])
                rots.append([0.0] * n_t)
                nccs.append([round(float(v), 4) for v in r0["ncc"].cpu()])
                continue
            reg0 = warp(frames[s].to(torch.float32), r0["angle"], r0["shift"])
            from stm_dlp.perfusion.concentration import study_arrival

            tt = (torch.arange(n_t, dtype=torch.float64) if times_s is None
                  else torch.as_tensor(times_s[s], dtype=torch.float64))
            k = study_arrival(reg0[None], tt[None].to(reg0.device)).n_baseline[0]
            regf = _features(reg0[:k])
            ref = regf.median(0).values if k > 2 else regf.mean(0)
            passes.append(int(k))
        else:
            k = int(min(max(nb[s], 1), n_t))
            ref = feat0[:k].median(0).values if k > 2 else feat0[:k].mean(0)
        r = register_slice(frames[s], ref, feat0)
        angle, shift = r["angle"], r["shift"]
        # report the motion (frame = reference turned by alpha and shifted by s): alpha = -angle,
        # s = R(alpha) shift
        alpha = -angle
        ca, sa = torch.cos(alpha), torch.sin(alpha)
        mot = torch.stack([sa * shift[:, 1] + ca * shift[:, 0], ca * shift[:, 1] - sa * shift[:, 0]], -1)
        apply = ~r["failed"] & ((shift.abs().amax(-1) > MIN_SHIFT_PX) | (angle.abs() > math.radians(MIN_ROTATION_DEG)))
        idx = torch.nonzero(apply).flatten()
        resampled += [[s, int(t)] for t in idx.tolist()]
        if idx.numel():
            moved_frames = warp(frames[s, idx].to(torch.float32), angle[idx].float(), shift[idx].float(),
                                mode=FRAME_INTERPOLATION)
            out[s, idx] = moved_frames.to(frames.dtype)
            moved += int(idx.numel())
        bad = torch.nonzero(r["failed"]).flatten()
        if failed == "interpolate" and bad.numel() and bad.numel() < n_t:
            t = (torch.arange(n_t, dtype=torch.float64) if times_s is None
                 else torch.as_tensor(times_s[s], dtype=torch.float64).cpu())
            good = torch.nonzero(~r["failed"].cpu()).flatten()
            for b in bad.cpu().tolist():
                hi = int(torch.searchsorted(good, torch.tensor(b)))
                lo_i, hi_i = good[max(hi - 1, 0)], good[min(hi, good.numel() - 1)]
                if lo_i == hi_i:
                    out[s, b] = out[s, lo_i]
                else:
                    wgt = float((t[b] - t[lo_i]) / (t[hi_i] - t[lo_i]))
                    out[s, b] = (1 - wgt) * out[s, lo_i] + wgt * out[s, hi_i]
        shifts.append([[round(float(v), 3) for v in row] for row in mot.cpu()])
        rots.append([round(math.degrees(float(v)), 3) for v in alpha.cpu()])
        nccs.append([round(float(v), 4) for v in r["ncc"].cpu()])
        failed_list += [[s, int(t)] for t in bad.tolist()]
    all_shift = [abs(v) for sl in shifts for row in sl for v in row]
    all_rot = [abs(v) for sl in rots for v in sl]
    report = {"shift_px": shifts, "rotation_deg": rots, "ncc": nccs, "failed_frames": failed_list,
              "moved_frames": moved, "resampled_frames": resampled,
              "max_shift_px": round(max(all_shift, default=0.0), 3),
              "max_rotation_deg": round(max(all_rot, default=0.0), 3),
              "reference": "median of each slice's pre-bolus frames",
              "failed_handling": failed, "skipped_slices": skipped, "still_slices": still}
    if passes:
        report["n_baseline"] = passes
    return out, report
