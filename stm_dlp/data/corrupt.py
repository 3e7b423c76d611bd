"""Corruptions of CTP frames: seeded, composable, usable on any study (real or simulated).

They are both training augmentations and the way the paper's failure cases (D_fail: noise, motion,
misalignment, missing frames, non-uniform framing) and frame reduction (Figure 7) are simulated.

Every transform is a callable ``t(frames, times_s, rng) -> (frames, times_s)`` on

* ``frames`` float32 ``(T, H, W)`` (one slice) or ``(S, T, H, W)`` (a whole study), HU;
* ``times_s`` float ``(T,)`` or ``(S, T)`` seconds.

Transforms that change T (dropping, truncation) drop the same frames in every slice of a study, so
a study stays rectangular. Labels are never touched: corruptions change the acquisition, not the
patient's perfusion.

Training augmentations that span what scanners produce (the default list is ``data.augment`` in
``conf/data/_common.yaml``): a noise level drawn per sample in a range that includes none
(``GaussianNoise(sigma_hu_range=…)``, ``StructuredNoise(sigma_hu_range=…)`` with streaks), impulse
HU spikes (:class:`ImpulseNoise`), frame intervals of 1-3 s (:class:`Reframe`), dropped frames
(``DropFrames(fraction_range=…)``) and rigid motion (:class:`RigidMotion`). The ``*_range`` fields are
off by default, so the named corruptions of the robustness study keep their fixed severities and draws.

A new corruption subclasses :class:`RandomTransform` (works on any leading shape) or
:class:`StudyTransform` (sees a whole study ``(S, T, H, W)`` even when given one slice) and writes
only ``apply`` / ``apply_study``; the probability check and the slice/study set-up live in the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from stm_dlp.types import Study

Array = np.ndarray
#: What every corruption (and :class:`Compose`) is: ``t(frames, times_s, rng) -> (frames, times_s)``.
Transform = Callable[[Array, Array, np.random.Generator], tuple[Array, Array]]


def _as_study(frames: Array, times: Array) -> tuple[Array, Array, bool]:
    """View one slice as a one-slice study; returns (frames (S,T,H,W), times (S,T), was_single)."""
    if frames.ndim == 3:
        return frames[None], np.asarray(times)[None], True
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T,H,W) or (S,T,H,W), got shape {frames.shape}")
    return frames, np.asarray(times), False


def _restore(frames: Array, times: Array, single: bool) -> tuple[Array, Array]:
    return (frames[0], times[0]) if single else (frames, times)


@dataclass
class RandomTransform:
    """Base of the corruptions: applied with probability ``p``, randomness only from the ``rng`` passed in.

    ``__call__`` draws one uniform number from ``rng`` on every call — also when ``p`` is 1, so the
    draws that follow (and the outputs for a given seed) do not depend on ``p`` — and calls
    :meth:`apply` when it is below ``p``; otherwise the input is returned unchanged. (Like MONAI's
    ``RandomizableTransform``, except that the generator comes with each call: one seeded generator
    per sample, shared by a :class:`Compose`.) ``p`` is keyword-only so that the subclasses' own
    fields keep their positions (``GaussianNoise(4.0, p=0.5)``).
    """

    p: float = field(default=1.0, kw_only=True)
    #: True for corruptions that only add noise to the HU values: frame times, pixel positions and the
    #: bolus are those acquired (what :class:`~stm_dlp.data.datamodule.SliceDataset` may keep a slice's
    #: deconvolution prior for).
    noise_only: ClassVar[bool] = False

    def __call__(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        if rng.uniform() >= self.p:
            return frames, times_s
        return self.apply(frames, times_s, rng)

    def apply(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """The corruption itself, on ``frames`` (..., T, H, W) HU and ``times_s`` (..., T) s."""
        raise NotImplementedError


@dataclass
class StudyTransform(RandomTransform):
    """A corruption that needs the whole study: :meth:`apply_study` sees ``(S, T, H, W)`` / ``(S, T)``.

    One slice ``(T, H, W)`` is viewed as a one-slice study and returned as one slice again, so
    frame-dependent choices (which frames move or are dropped) are the same in every slice.
    """

    def apply(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        f4, t2, single = _as_study(frames, times_s)
        out_f, out_t = self.apply_study(f4, t2, rng)
        return _restore(out_f, out_t, single)

    def apply_study(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """The corruption on a study: ``frames`` (S, T, H, W) HU, ``times_s`` (S, T) s."""
        raise NotImplementedError


def _check_range(name: str, value: Sequence[float] | None, lo_min: float = 0.0) -> tuple[float, float] | None:
    """``value`` as a ``(lo, hi)`` tuple (configs give lists), or ``None``; ``lo_min <= lo <= hi``."""
    if value is None:
        return None
    lo, hi = (float(v) for v in value)
    if not lo_min <= lo <= hi:
        raise ValueError(f"{name} must be (lo, hi) with {lo_min:g} <= lo <= hi, got {tuple(value)}")
    return lo, hi


@dataclass
class GaussianNoise(RandomTransform):
    """Independent Gaussian noise of ``sigma_hu`` HU on every pixel of every frame.

    With ``sigma_hu_range=(lo, hi)`` the level is drawn uniformly in that range for every call (per
    sample), e.g. ``(0, 30)``: from clean to a low-dose scan; ``sigma_hu`` is then unused.
    """

    noise_only: ClassVar[bool] = True

    sigma_hu: float = 10.0
    sigma_hu_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.sigma_hu_range = _check_range("GaussianNoise.sigma_hu_range", self.sigma_hu_range)

    def apply(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        if self.sigma_hu_range is not None:
            sigma = rng.uniform(*self.sigma_hu_range)
            # float32 draws: half the time of float64 for the per-sample training path
            noise = rng.standard_normal(frames.shape, dtype=np.float32)
            noise *= np.float32(sigma)
            return (np.asarray(frames, np.float32) + noise), times_s
        if self.sigma_hu <= 0:
            return frames, times_s
        return (frames + rng.normal(0.0, self.sigma_hu, frames.shape)).astype(np.float32), times_s


@dataclass
class ImpulseNoise(RandomTransform):
    """Salt-and-pepper HU spikes (detector or data-transfer errors): a ``fraction`` of the pixels of every
    frame, drawn per call in ``fraction_range``, get ± a spike of ``amplitude_hu_range`` HU (sign and size
    per pixel)."""

    noise_only: ClassVar[bool] = True

    fraction_range: tuple[float, float] = (0.0, 0.01)
    amplitude_hu_range: tuple[float, float] = (200.0, 1000.0)

    def __post_init__(self) -> None:
        self.fraction_range = _check_range("ImpulseNoise.fraction_range", self.fraction_range)
        self.amplitude_hu_range = _check_range("ImpulseNoise.amplitude_hu_range", self.amplitude_hu_range)
        if self.fraction_range[1] > 1:
            raise ValueError(f"ImpulseNoise.fraction_range must lie in [0, 1], got {self.fraction_range}")

    def apply(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        out = np.array(frames, np.float32)
        n = int(rng.binomial(out.size, rng.uniform(*self.fraction_range)))
        if n:
            # draws with replacement, repeats dropped: far cheaper than a permutation of every pixel
            idx = np.unique(rng.integers(0, out.size, n))
            spikes = rng.uniform(*self.amplitude_hu_range, idx.size) * rng.choice(np.array([-1.0, 1.0]), idx.size)
            out.reshape(-1)[idx] += spikes.astype(np.float32)
        return out, times_s


@dataclass
class StructuredNoise(RandomTransform):
    """Spatially correlated noise (CT noise texture and streak-like bands) of ``sigma_hu`` HU.

    Each frame gets a fresh Gaussian field low-passed to ``length_px`` plus, with probability
    ``streak_probability``, a random-direction sinusoidal band pattern (beam-hardening-like streaks).
    With ``sigma_hu_range=(lo, hi)`` the level is drawn per call in that range instead of ``sigma_hu``.
    """

    noise_only: ClassVar[bool] = True

    sigma_hu: float = 8.0
    length_px: float = 2.0
    streak_probability: float = 0.3
    sigma_hu_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.sigma_hu_range = _check_range("StructuredNoise.sigma_hu_range", self.sigma_hu_range)

    def apply(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        # a drawn level (training) takes a float32 path, ~3x faster; a fixed one keeps its float64 draws
        fast = self.sigma_hu_range is not None
        sigma = float(rng.uniform(*self.sigma_hu_range)) if fast else self.sigma_hu
        if sigma <= 0:
            return frames, times_s
        h, w = frames.shape[-2:]
        ky = np.fft.fftfreq(h)[:, None]
        kx = np.fft.rfftfreq(w)[None, :]
        spectrum = np.exp(-2 * (math.pi * self.length_px) ** 2 * (kx**2 + ky**2))
        # real FFT: the same field as ifft2(fft2(white) * spectrum).real (to 1e-15), ~6x faster
        if fast:
            white = torch.from_numpy(rng.standard_normal(frames.shape, dtype=np.float32))
            field_ = torch.fft.irfft2(torch.fft.rfft2(white) * torch.from_numpy(spectrum.astype(np.float32)),
                                      s=(h, w)).numpy()
        else:
            field_ = np.fft.irfft2(np.fft.rfft2(rng.normal(size=frames.shape)) * spectrum, s=(h, w))
        field_ /= field_.std(axis=(-2, -1), keepdims=True) + 1e-12
        out = frames + field_.dtype.type(sigma) * field_
        if rng.uniform() < self.streak_probability:
            yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            angle = rng.uniform(0, math.pi)
            band = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * math.pi / rng.uniform(4, 12))
            amp = rng.normal(0.0, sigma, frames.shape[:-2])[..., None, None]
            out = out + (amp * band).astype(out.dtype)
        return out.astype(np.float32), times_s


def rigid_warp(frames: Array, shift_px: Array, angle_rad: Array) -> Array:
    """Rigidly move each frame. ``frames`` (N, H, W); ``shift_px`` (N, 2) (dy, dx); ``angle_rad`` (N,).

    Bilinear resampling about the image centre; outside the field of view is filled with the
    frame's minimum (air).
    """
    n, h, w = frames.shape
    x = torch.from_numpy(np.ascontiguousarray(frames, np.float32))[:, None]
    cos, sin = torch.from_numpy(np.cos(angle_rad)).float(), torch.from_numpy(np.sin(angle_rad)).float()
    theta = torch.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    theta[:, 0, 2] = -torch.from_numpy(shift_px[:, 1]).float() * 2 / w
    theta[:, 1, 2] = -torch.from_numpy(shift_px[:, 0]).float() * 2 / h
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    fill = x.amin(dim=(2, 3), keepdim=True)
    warped = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return warped[:, 0].numpy()


def _warp_frames(f4: Array, idx: Array, shifts: Array, angles: Array) -> Array:
    """Copy of ``f4`` (S, T, H, W) with frames ``idx`` moved by per-frame ``shifts`` (n, 2) and
    ``angles`` (n,), the same motion in every slice (the head moves as a whole)."""
    out = f4.copy()
    if len(idx):
        s, hw = f4.shape[0], f4.shape[2:]
        sel = f4[:, idx].reshape(-1, *hw)
        warped = rigid_warp(sel, np.tile(shifts, (s, 1)), np.tile(angles, s))
        out[:, idx] = warped.reshape(s, len(idx), *hw)
    return out


@dataclass
class RigidMotion(StudyTransform):
    """Per-frame random rigid motion (patient jitter): a fraction of frames moved independently.

    Shifts are uniform in ±``max_shift_px`` pixels, rotations in ±``max_rotation_deg``. The same
    motion is applied to every slice of a study at a given frame (the head moves as a whole).
    """

    max_shift_px: float = 2.0
    max_rotation_deg: float = 3.0
    fraction: float = 0.3

    def apply_study(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        t = frames.shape[1]
        moved = rng.uniform(size=t) < self.fraction
        moved[0] = False  # keep the reference (pre-bolus) frame in place
        shifts = rng.uniform(-self.max_shift_px, self.max_shift_px, (t, 2)) * moved[:, None]
        angles = np.deg2rad(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg, t)) * moved
        idx = np.flatnonzero(moved)
        out = _warp_frames(frames, idx, shifts[idx], angles[idx])
        return out.astype(np.float32), times_s


@dataclass
class Misalignment(StudyTransform):
    """The patient moves once: from a random frame on, every frame is shifted/rotated the same way."""

    shift_px: float = 3.0
    rotation_deg: float = 4.0

    def apply_study(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        t = frames.shape[1]
        start = int(rng.integers(max(1, t // 5), max(2, t - 1)))
        direction = rng.normal(size=2)
        shift = self.shift_px * direction / (np.linalg.norm(direction) + 1e-12)
        angle = np.deg2rad(self.rotation_deg) * rng.choice([-1.0, 1.0])
        n = t - start
        out = _warp_frames(frames, np.arange(start, t), np.tile(shift, (n, 1)), np.full(n, angle))
        return out.astype(np.float32), times_s


@dataclass
class DropFrames(StudyTransform):
    """Drop a random ``fraction`` of frames (never the first); the kept frames keep their times.
    With ``fraction_range=(lo, hi)`` the fraction is drawn per call in that range instead."""

    fraction: float = 0.3
    min_frames: int = 8
    fraction_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.fraction_range = _check_range("DropFrames.fraction_range", self.fraction_range)
        if self.fraction_range is not None and self.fraction_range[1] >= 1:
            raise ValueError(f"DropFrames.fraction_range must lie in [0, 1), got {self.fraction_range}")

    def apply_study(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        t = frames.shape[1]
        fraction = self.fraction if self.fraction_range is None else rng.uniform(*self.fraction_range)
        n_drop = min(int(round(fraction * t)), max(0, t - self.min_frames))
        if n_drop <= 0:
            return frames, times_s
        drop = rng.choice(np.arange(1, t), size=n_drop, replace=False)
        keep = np.setdiff1d(np.arange(t), drop)
        return frames[:, keep], times_s[:, keep]


@dataclass
class JitterFraming(StudyTransform):
    """Non-uniform framing: frames re-acquired at jittered times.

    New times are the old ones plus Gaussian jitter of ``sigma_s`` × the local interval, kept
    strictly increasing and inside the original span; intensities are linearly interpolated in
    time from the original frames (exact for the phantom's smooth curves up to interpolation).
    """

    sigma_fraction: float = 0.35

    def apply_study(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        t = frames.shape[1]
        out_f = np.empty_like(frames, dtype=np.float32)
        out_t = np.empty_like(times_s, dtype=np.float64)
        jitter = rng.normal(0.0, self.sigma_fraction, t)
        jitter[0] = 0.0
        for si in range(frames.shape[0]):
            old = times_s[si].astype(np.float64)
            gaps = np.diff(old)
            local = np.concatenate([[gaps[0]], np.minimum(gaps[1:], gaps[:-1]), [gaps[-1]]])
            new = old + np.clip(jitter, -0.45, 0.45) * local
            new = np.clip(new, old[0], old[-1])
            new = np.maximum.accumulate(new + np.arange(t) * 1e-4)
            # Linear interpolation of every pixel between bracketing original frames.
            idx = np.clip(np.searchsorted(old, new) - 1, 0, t - 2)
            w = ((new - old[idx]) / (old[idx + 1] - old[idx]))[:, None, None]
            out_f[si] = (1 - w) * frames[si, idx] + w * frames[si, idx + 1]
            out_t[si] = new
        return out_f, out_t.astype(np.float32)


@dataclass
class Reframe(StudyTransform):
    """A different scanner's framing: the frames resampled onto a new irregular time grid.

    From each slice's first frame time, successive intervals are drawn uniformly in ``interval_s_range``
    (default 1-3 s, the span of clinical protocols) up to the slice's last time (the shortest span of the
    study, so every slice gets the same number of frames); each pixel is linearly interpolated along T
    between the bracketing original frames. Times change, labels do not. Fewer than ``min_frames`` new
    frames (a very short acquisition) leaves the study as it is.
    """

    interval_s_range: tuple[float, float] = (1.0, 3.0)
    min_frames: int = 4

    def __post_init__(self) -> None:
        self.interval_s_range = _check_range("Reframe.interval_s_range", self.interval_s_range)
        if self.interval_s_range[0] <= 0:
            raise ValueError(f"Reframe.interval_s_range must be positive, got {self.interval_s_range}")

    def apply_study(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        s, t = frames.shape[:2]
        old = np.asarray(times_s, np.float64)
        span = float(np.min(old[:, -1] - old[:, 0]))
        lo, hi = self.interval_s_range
        rel = np.concatenate([[0.0], np.cumsum(rng.uniform(lo, hi, int(span / lo) + 1))])
        rel = rel[rel <= span + 1e-6]
        if rel.size < max(2, self.min_frames):
            return frames, times_s
        out_f = np.empty((s, rel.size, *frames.shape[2:]), np.float32)
        out_t = np.empty((s, rel.size), np.float32)
        for si in range(s):
            new = np.minimum(old[si, 0] + rel, old[si, -1])
            idx = np.clip(np.searchsorted(old[si], new, side="right") - 1, 0, t - 2)
            w = ((new - old[si, idx]) / (old[si, idx + 1] - old[si, idx])).astype(np.float32)[:, None, None]
            a, b = frames[si, idx], frames[si, idx + 1]
            out_f[si] = a + w * (b - a)
            out_t[si] = new
        return out_f, out_t


@dataclass
class Truncate(RandomTransform):
    """Keep only the first frames (later frames lost, paper Figure 7).

    Either ``keep_fraction`` of the frames (rounded, at least ``min_frames``) or exactly ``keep_frames``.
    """

    keep_fraction: float = 1.0
    keep_frames: int | None = None
    min_frames: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.keep_frames is not None and self.keep_frames < 2:
            raise ValueError(f"keep_frames must be >= 2, got {self.keep_frames}")

    def n_keep(self, t: int) -> int:
        k = self.keep_frames if self.keep_frames is not None else int(round(self.keep_fraction * t))
        return int(min(t, max(k, self.min_frames)))

    def apply(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        k = self.n_keep(frames.shape[-3])
        return frames[..., :k, :, :], np.asarray(times_s)[..., :k]


@dataclass
class Compose:
    """Apply ``transforms`` in order, all drawing from the one generator passed in."""

    transforms: Sequence[Transform] = field(default_factory=list)

    @property
    def noise_only(self) -> bool:
        """Every transform only adds noise (:attr:`RandomTransform.noise_only`)."""
        return all(getattr(t, "noise_only", False) for t in self.transforms)

    def __call__(self, frames: Array, times_s: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        for tr in self.transforms:
            frames, times_s = tr(frames, times_s, rng)
        return frames, times_s


def corrupt_study(study: Study, transform: Transform, seed: int) -> Study:
    """A corrupted copy of a :class:`~stm_dlp.types.Study` (labels, mask, geometry unchanged)."""
    frames, times = transform(study.frames, study.times_s, np.random.default_rng(seed))
    return replace(study, frames=np.ascontiguousarray(frames, np.float32),
                   times_s=np.ascontiguousarray(times, np.float32)).validate()


#: Named corruptions of the robustness study (paper's D_fail), at the severities used by default.
NAMED_CORRUPTIONS: dict[str, Transform] = {
    "none": Compose([]),
    "noise": GaussianNoise(sigma_hu=15.0),
    # a low-dose scan with detector spikes: where a plain deconvolution stops finding lesions (issue 13's
    # independent phantom: Dice 0.04-0.09 at 15-30 HU with impulses)
    "heavy_noise": Compose([GaussianNoise(sigma_hu=30.0), ImpulseNoise(fraction_range=(0.002, 0.002),
                                                                      amplitude_hu_range=(300.0, 1000.0))]),
    "structured_noise": StructuredNoise(sigma_hu=12.0),
    "motion": RigidMotion(max_shift_px=2.0, max_rotation_deg=3.0, fraction=0.3),
    "misalignment": Misalignment(shift_px=3.0, rotation_deg=4.0),
    "dropped_frames": DropFrames(fraction=0.3),
    "jittered_framing": JitterFraming(sigma_fraction=0.35),
}


def named_corruption(name: str) -> Transform:
    """The transform of the robustness study called ``name``; error lists the valid names."""
    if name not in NAMED_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(NAMED_CORRUPTIONS)}")
    return NAMED_CORRUPTIONS[name]
