"""The one automatic CT brain mask, and the small binary-image tools it is made of (pure torch).

:func:`brain_mask` is what every part of the project uses where no mask is given (the calculation
approach, prediction, the model's losses and metrics on DICOM/NIfTI studies):

1. **pre-contrast image**: the per-pixel temporal *median* of the pre-bolus frames
   (:func:`baseline_image`; the bolus arrival is detected when not given,
   :func:`~stm_dlp.perfusion.concentration.study_arrival`). A median, not a mean: one frame's
   impulse noise or motion spike cannot move it.
2. **denoising**: a 3 x 3 spatial median (:func:`median_filter`). It removes noise and impulses
   but, unlike a Gaussian, does not pull the cortex next to a 1000 HU skull out of the soft-tissue
   window (a pixel on a straight skull edge has 3 bone neighbours out of 9: the median stays tissue).
3. **soft-tissue window** ``lo < HU < hi`` (:data:`BRAIN_HU_RANGE`: CSF ~0-15, parenchyma 20-45,
   acute blood 50-80 HU; air, fat and bone out) and, where the skull is closed, only what the skull
   encloses (:data:`BONE_HU`; keeps scalp and muscle out where they touch the brain through a gap).
4. **largest connected component** per slice (4-connected, :func:`largest_component`), so noise
   specks and the scalp go.
5. **holes filled** (:func:`fill_holes`): ventricles, vessels and calcifications are inside the
   brain.
6. **cortex restored**: one step of geodesic growth into pixels whose un-denoised pre-contrast HU is
   above the window's floor and below :data:`REGROW_MAX_HU` — the pixels the median took off at
   concave corners of the skull, and cortex that the scanner's blur mixes with the skull. There is **no
   erosion**: the partial-volume rim next to the skull is cortex (gray matter, CBF ~55) and its
   maps are wanted; eroding it loses 6-7 % of the brain on a 128² slice.

Every function takes and returns ``(..., H, W)`` tensors (numpy arrays are accepted by
:func:`brain_mask`, which then returns numpy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from stm_dlp.perfusion.concentration import frame_noise, gaussian_smooth_space, study_arrival

#: Soft-tissue window of the pre-contrast image (HU, exclusive): CSF (0-15 HU, down to ~-10 with
#: noise after the median) to acute blood (50-80 HU); air (-1000), fat (-100) and bone (> 200) out.
BRAIN_HU_RANGE: tuple[float, float] = (-20.0, 100.0)
#: Pre-contrast HU at and above which a (denoised) pixel is bone (skull 700-1500 HU, cancellous
#: bone ~300, partial-volume skull edges 150+).
BONE_HU: float = 150.0
#: The regrowth of step 6 accepts pixels up to this pre-contrast HU: cortex blurred with the skull
#: next to it (scanner PSF, "skull blooming") reads 100-250 HU; the skull itself 700+.
REGROW_MAX_HU: float = 300.0
#: A slice's brain must cover at least this fraction of the image (smaller: no brain on this slice,
#: e.g. the vertex or the skull base; the slice's mask is empty).
MIN_BRAIN_FRAC: float = 0.002
#: The skull encloses the brain when the area inside it is at least this fraction of the largest
#: soft-tissue component (otherwise the skull is open on this slice and is not used).
SKULL_ENCLOSED_FRAC: float = 0.5


def _as_3d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    return x.reshape(-1, *x.shape[-2:]), x.shape


def _run_max(lab: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace every label of ``lab`` ``(R, L)`` by the maximum over its run of True along the last axis."""
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    start = mask & ~prev
    run_id = torch.cumsum(start.reshape(-1).to(torch.int64), 0).reshape(mask.shape) * mask
    best = torch.zeros(int(run_id.max()) + 1, dtype=lab.dtype, device=lab.device)
    best = best.scatter_reduce(0, run_id.reshape(-1), lab.reshape(-1), reduce="amax", include_self=True)
    return torch.where(mask, best[run_id], lab)


def label_components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of a binary image ``(..., H, W)``, each 2-D image on its own.

    Returns int64 labels of the same shape: 0 for background, and for each component one positive id
    (unique over the whole batch, not consecutive). Implementation: every pixel starts with its own
    id and takes the maximum over its horizontal, then vertical run of foreground, until nothing
    changes — a few passes for compact shapes (each pass is two vectorised scans).
    """
    m3, shape = _as_3d(mask.to(torch.bool))
    n, h, w = m3.shape
    lab = torch.where(m3, torch.arange(1, n * h * w + 1, device=m3.device).reshape(n, h, w), 0)
    m_rows, m_cols = m3.reshape(n * h, w), m3.transpose(1, 2).reshape(n * w, h)
    for _ in range(h * w + 1):
        new = _run_max(lab.reshape(n * h, w), m_rows).reshape(n, h, w)
        new = _run_max(new.transpose(1, 2).reshape(n * w, h), m_cols).reshape(n, w, h).transpose(1, 2)
        if torch.equal(new, lab):
            break
        lab = new.contiguous()
    return lab.reshape(shape)


def largest_component(mask: torch.Tensor, min_pixels: int = 1) -> torch.Tensor:
    """The largest 4-connected component of each 2-D image of ``mask`` ``(..., H, W)`` (bool).

    An image whose largest component has fewer than ``min_pixels`` pixels comes back empty.
    """
    m3, shape = _as_3d(mask.to(torch.bool))
    n, h, w = m3.shape
    lab = label_components(m3)
    counts = torch.bincount(lab.reshape(-1), minlength=n * h * w + 1)[1:].reshape(n, h * w)
    size, best = counts.max(-1)
    best_id = best + 1 + torch.arange(n, device=m3.device) * h * w
    keep = (lab == best_id[:, None, None]) & (size >= max(1, min_pixels))[:, None, None]
    return keep.reshape(shape)


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` ``(..., H, W)`` with every background region that does not touch the image border filled."""
    m3, shape = _as_3d(mask.to(torch.bool))
    lab = label_components(~m3)
    border = torch.cat([lab[:, 0, :], lab[:, -1, :], lab[:, :, 0], lab[:, :, -1]], dim=1).reshape(-1)
    outside = torch.isin(lab, torch.unique(border[border > 0]))
    return (m3 | ~outside).reshape(shape)


def dilate(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Binary dilation of ``(..., H, W)`` by a ``(2r+1)²`` square (two separable max-pools)."""
    if radius <= 0:
        return mask.to(torch.bool)
    m3, shape = _as_3d(mask.to(torch.float32))
    k = 2 * radius + 1
    x = torch.nn.functional.max_pool2d(m3[:, None], (1, k), stride=1, padding=(0, radius))
    x = torch.nn.functional.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))
    return (x[:, 0] > 0.5).reshape(shape)


def erode(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Binary erosion by a ``(2r+1)²`` square (outside the image counts as foreground)."""
    return ~dilate(~mask.to(torch.bool), radius)


def median_filter(image: torch.Tensor, radius: int = 1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spatial median over a ``(2r+1)²`` window of each 2-D image of ``(..., H, W)`` (edges replicated).

    With ``mask`` (bool, same shape) only masked pixels enter the medians, and unmasked pixels keep
    their value: an edge-preserving denoiser inside an organ.
    """
    if radius <= 0:
        return image
    x3, shape = _as_3d(image)
    k = 2 * radius + 1
    if mask is not None:
        m3 = mask.reshape(x3.shape).to(torch.bool)
        x3 = torch.where(m3, x3, torch.full_like(x3, float("nan")))
    padded = torch.nn.functional.pad(x3[:, None], (radius,) * 4, mode="replicate")[:, 0]
    out = torch.empty_like(x3)
    for i in range(x3.shape[0]):  # one image at a time: (H, W, k²) patches
        patches = padded[i].unfold(0, k, 1).unfold(1, k, 1).reshape(*x3.shape[1:], k * k)
        out[i] = patches.nanmedian(-1).values if mask is not None else patches.median(-1).values
    if mask is not None:
        out = torch.where(m3, out, image.reshape(x3.shape))
    return out.reshape(shape)


def baseline_image(frames_hu: torch.Tensor, n_baseline: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Pre-contrast image ``(S, H, W)``: per-pixel temporal median of the first ``n_baseline`` frames.

    Args:
        frames_hu: ``(S, T, H, W)`` HU.
        n_baseline: pre-bolus frame count, one for all slices or one per slice (>= 1).
    """
    s_count, n_t = frames_hu.shape[:2]
    nb = torch.as_tensor(n_baseline).reshape(-1).tolist()
    nb = nb * s_count if len(nb) == 1 else nb
    if len(nb) != s_count:
        raise ValueError(f"n_baseline needs one value or one per slice ({s_count}), got {len(nb)}")
    out = torch.empty((s_count, *frames_hu.shape[2:]), dtype=frames_hu.dtype, device=frames_hu.device)
    for s, k in enumerate(nb):
        k = int(min(max(int(k), 1), n_t))
        out[s] = frames_hu[s, :k].median(0).values if k > 2 else frames_hu[s, :k].mean(0)
    return out


def brain_mask(
    image: torch.Tensor | np.ndarray,
    times_s: torch.Tensor | np.ndarray | None = None,
    *,
    n_baseline: int | Sequence[int] | None = None,
    hu_range: tuple[float, float] = BRAIN_HU_RANGE,
    bone_hu: float = BONE_HU,
    median_px: int = 1,
    regrow_px: int = 1,
    min_brain_frac: float = MIN_BRAIN_FRAC,
) -> torch.Tensor | np.ndarray:
    """Automatic brain mask of a head CT(P) study (the steps are in the module docstring).

    Args:
        image: ``(S, T, H, W)`` CTP frames in HU, or an ``(S, H, W)`` pre-contrast image in HU
            (e.g. a baseline already computed, or a plain head CT).
        times_s: ``(S, T)`` or ``(T,)`` frame times (s); only used to find the bolus arrival when
            ``image`` has frames and ``n_baseline`` is not given (default: frame spacing 1).
        n_baseline: pre-bolus frames (one count, or one per slice); ``None``: detected.
        hu_range: soft-tissue window (HU, exclusive) of the denoised pre-contrast image.
        bone_hu: bone threshold (HU) for the skull-enclosure test.
        median_px: radius of the denoising median (px; 1 = 3 x 3, 0 = off).
        regrow_px: steps of geodesic growth restoring cortex next to the skull (px).
        min_brain_frac: slices whose brain is smaller than this fraction of the image are empty.

    Returns:
        bool ``(S, H, W)`` (numpy when ``image`` was numpy, else a tensor on ``image``'s device).
    """
    is_numpy = not isinstance(image, torch.Tensor)
    x = torch.as_tensor(np.array(image, np.float32) if is_numpy else image)
    x = x.to(torch.float32) if not x.is_floating_point() else x
    if x.dim() == 4:
        if n_baseline is None:
            n_t = x.shape[1]
            tt = (torch.arange(n_t, dtype=torch.float64) if times_s is None
                  else torch.as_tensor(np.asarray(times_s, np.float64)))
            n_baseline = study_arrival(x, tt.expand(x.shape[0], n_t)).n_baseline
        base = baseline_image(x, n_baseline)
    elif x.dim() == 3:
        base = x
    else:
        raise ValueError(f"brain_mask needs (S, T, H, W) frames or an (S, H, W) image, got shape {tuple(x.shape)}")
    mask = mask_from_baseline(base, hu_range=hu_range, bone_hu=bone_hu, median_px=median_px, regrow_px=regrow_px,
                              min_brain_frac=min_brain_frac)
    return mask.cpu().numpy() if is_numpy else mask


def mask_from_baseline(
    base: torch.Tensor,
    hu_range: tuple[float, float] = BRAIN_HU_RANGE,
    bone_hu: float = BONE_HU,
    median_px: int = 1,
    regrow_px: int = 1,
    min_brain_frac: float = MIN_BRAIN_FRAC,
) -> torch.Tensor:
    """:func:`brain_mask` of a pre-contrast image ``base`` ``(S, H, W)`` HU (tensor), bool ``(S, H, W)``."""
    lo, hi = hu_range
    base = torch.nan_to_num(base.to(torch.float32), nan=-1000.0, posinf=3000.0, neginf=-1000.0)
    s_count, h, w = base.shape
    den = median_filter(base, median_px)
    soft = (den > lo) & (den < hi)
    bone = den >= bone_hu
    inside = fill_holes(bone) & ~bone
    # where the skull is closed, the brain is what it encloses (scalp and muscle touching the brain
    # through a gap stay out); where it is open (skull base, a cropped field of view) it is not used
    soft_big = largest_component(soft)
    enclosed = inside.sum((1, 2)) >= SKULL_ENCLOSED_FRAC * soft_big.sum((1, 2))
    cand = torch.where(enclosed[:, None, None], soft & inside, soft)
    min_px = max(4, int(round(min_brain_frac * h * w)))
    brain = fill_holes(largest_component(cand, min_pixels=min_px))
    # the cortex next to the skull may be brighter than soft tissue: the median filter and the
    # scanner's blur (skull blooming) mix bone into it; up to REGROW_MAX_HU it is still cortex
    raw_soft = (base > lo) & (base < REGROW_MAX_HU)
    for _ in range(max(0, regrow_px)):
        brain = brain | (dilate(brain, 1) & raw_soft)
    return fill_holes(brain)


# ---------------------------------------------------------------------------------------------- CSF
#: Pre-contrast HU below which a brain pixel is CSF (ventricles, sulci: 0-15 HU; white matter 25-30).
CSF_MAX_HU: float = 15.0
#: The CSF test smooths the baseline until its noise is at most this (HU): CSF (0-15 HU) and white
#: matter (25-30 HU) are then > 3 noise levels from the 15 HU threshold.
CSF_NOISE_TARGET_HU: float = 2.0
#: ... but never more than this (px): beyond it, the ventricles blur into the parenchyma.
CSF_MAX_SMOOTH_PX: float = 3.0
#: More than this fraction of the brain below the threshold: the frames are not head-CT HU (ventricles
#: and sulci are ~5-15 % of a slice); :func:`slice_csf` then excludes nothing.
CSF_MAX_FRAC: float = 0.5


def csf_mask(base: torch.Tensor, brain: torch.Tensor, baseline_noise_hu: float, min_sigma_px: float,
             max_hu: float = CSF_MAX_HU) -> tuple[torch.Tensor, dict]:
    """CSF inside the brain: the pre-contrast image, denoised, below ``max_hu``.

    The baseline is smoothed inside the brain (normalised convolution, so the skull does not leak in)
    with σ = ``min_sigma_px`` — more when it is noisy, until its noise is :data:`CSF_NOISE_TARGET_HU`
    (at most :data:`CSF_MAX_SMOOTH_PX`). With a noisy baseline the smoothing also blurs the ventricles
    into the tissue around them, so an edge-preserving median inside the brain (3/5/7 px window, cutting
    the noise ~2.4/4/5.6 times) must agree.

    Args:
        base: ``(S, H, W)`` pre-contrast image (HU).
        brain: ``(S, H, W)`` bool brain mask.
        baseline_noise_hu: noise of ``base`` (HU): per-frame noise / √(pre-bolus frames).
        min_sigma_px: least smoothing (px), e.g. 1.2 mm in pixels.
        max_hu: the CSF threshold (HU).

    Returns:
        ``(csf, report)``: bool ``(S, H, W)`` and ``{pixels, reason, threshold_hu, smooth_px, median_px}``.
    """
    # white noise after a 2-D Gaussian of σ px has std σ_n / (2 √π σ)
    sigma_noise = baseline_noise_hu / (2.0 * math.sqrt(math.pi) * CSF_NOISE_TARGET_HU)
    sigma = float(min(max(min_sigma_px, sigma_noise), CSF_MAX_SMOOTH_PX))
    base_ref = gaussian_smooth_space(base, sigma, brain.to(base.dtype))
    csf = brain & (base_ref < max_hu)
    radius = 0
    if baseline_noise_hu > 2.0 * CSF_NOISE_TARGET_HU:
        radius = 1 if baseline_noise_hu <= 5.0 else (2 if baseline_noise_hu <= 10.0 else 3)
        csf &= median_filter(base, radius, brain) < max_hu
    how = f"baseline smoothed σ {sigma:.2f} px" + (f" and {2 * radius + 1}² median" if radius else "")
    report = {"pixels": int(csf.sum()), "reason": f"pre-bolus HU < {max_hu:g} ({how})", "threshold_hu": max_hu,
              "smooth_px": round(sigma, 3), "median_px": 2 * radius + 1 if radius else 0}
    return csf, report


def slice_csf(frames: torch.Tensor, times_s: torch.Tensor, lengths: torch.Tensor, brain: torch.Tensor,
              max_hu: float = CSF_MAX_HU, min_sigma_px: float = 0.5) -> torch.Tensor:
    """CSF of every slice of a batch (:func:`csf_mask` on each slice's own pre-bolus frames) — the
    exclusion the calculation approach makes, for a model's maps.

    Args:
        frames: ``(B, T, H, W)`` HU, frames past ``lengths[b]`` padding.
        times_s: ``(B, T)`` s.
        lengths: ``(B,)`` valid frames.
        brain: ``(B, H, W)`` bool.
        max_hu, min_sigma_px: see :func:`csf_mask`.

    Returns:
        bool ``(B, H, W)``; all False on a slice whose brain is mostly below ``max_hu`` (not head-CT HU)
        or has fewer than 4 frames.
    """
    out = torch.zeros_like(brain, dtype=torch.bool)
    for b in range(frames.shape[0]):
        n_t = int(lengths[b])
        region = brain[b]
        if n_t < 4 or not bool(region.any()):
            continue
        fr = frames[b, :n_t].float()[None]
        n_base = study_arrival(fr, times_s[b, :n_t][None]).n_baseline
        base = baseline_image(fr, n_base)
        noise = frame_noise(fr, region[None]) / math.sqrt(max(1, int(n_base[0])))
        csf, _ = csf_mask(base, region[None], noise, min_sigma_px, max_hu)
        if int(csf.sum()) <= CSF_MAX_FRAC * int(region.sum()):
            out[b] = csf[0]
    return out
