"""Digital CTP phantom: physics-based heads with exact ground-truth perfusion maps.

Every slice is an axial brain section with skull, cortical and deep gray matter (GM), white matter
(WM), ventricles (CSF), arteries (the AIF source, with partial volume), the superior sagittal sinus
(the VOF source) and, in most patients, an ischemic lesion — an infarct core inside a penumbra.
Each perfused pixel gets CBF, MTT and a bolus delay; its HU curve is

    HU(t) = baseline + (rho / kappa_H) * CBF * (AIF ⊛ R_MTT)(t - delay) + noise

(:mod:`stm_dlp.perfusion.physics`). Truth maps are exact: CBV = CBF * MTT / 60 and, as the paper
defines it, TMAX = argmax_t k(t) = delay (the residue functions used peak at t = 0).

Tissue values (means; each pixel varies by a smooth random field, each patient by a global factor):

============  ===============  ===========  =========  =====================================
tissue        CBF ml/100g/min  CBV ml/100g  MTT s      TMAX s
============  ===============  ===========  =========  =====================================
gray matter   60  (50-70)      4.0          4.0        0-1.5
white matter  25  (20-30)      2.0          4.8        0.5-2
penumbra      25  (15-35)      3.5 (kept)   ~8.5       6-10   (Tmax > 6 s: RAPID's threshold)
core          4.5 (3.5-6.5)    0.75         ~10        10-14  (CBF < 30% of normal)
CSF           0                0            0          0
============  ===============  ===========  =========  =====================================

Sources: Wintermark et al., Stroke 2006;37:979 (CT perfusion thresholds for core/penumbra);
Konstas et al., AJNR 2009;30:662 (normal GM/WM CBF, CBV, MTT by CT); Campbell et al., Stroke
2011;42:3435 (Tmax > 6 s hypoperfusion); Lansberg et al. 2012 / Albers 2018 (DEFUSE, RAPID
core as rCBF < 30%). Framing: 40-60 frames, ~1-1.8 s then 2-3 s intervals with jitter, total
60-120 s, as in clinical protocols (Konstas 2009; Wintermark 2015 consensus).

Families. This module is the ``"classic"`` family (the default, ``PhantomConfig.family``). A second,
independent generator, ``"ribbon"`` (:mod:`stm_dlp.data.phantom_ribbon`), differs in anatomy, lesions,
AIF model, residue shapes, dispersion, noise, spacing and framing, so that a model can be trained on
one family and tested on the other. :func:`simulate_patient` and :func:`simulate_cohort` dispatch on
``family``; both return the same :class:`~stm_dlp.types.Study` contract and ``meta`` keys.

Geometry of the classic family. By default the head fills a ``fov_mm`` field of view whatever the
matrix (pixel = ``fov_mm / matrix``) and slices are ``slice_mm`` apart, exactly as before. With
``pixel_mm=(lo, hi)`` the pixel size is drawn per patient in that range and the head keeps the physical
size it has in a ``fov_mm`` FOV (so a 512² matrix at 0.45 mm shows the same head as 128² at 1.8 mm);
where the matrix cannot hold the head at that pixel size it is scaled to fit, as with the default.
``slice_mm_range=(lo, hi)`` draws the slice thickness per patient (affine only: the classic anatomy
is defined on a normalised height). These draws use their own random stream, so switching them on does
not change anything else a seed produces.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from stm_dlp.geometry import affine_from_dicom_geometry, phantom_affine
from stm_dlp.perfusion.physics import (
    RESIDUE_KINDS,
    TissueCurveTable,
    arterial_input_function,
    convolve_causal,
    gamma_variate,
)
from stm_dlp.types import PARAMS, Study

# Tissue classes (label image values).
AIR, SKULL, WM, GM, CSF, ARTERY, VEIN, PENUMBRA, CORE = range(9)
#: Phantom generators (``PhantomConfig.family``).
FAMILIES: tuple[str, ...] = ("classic", "ribbon")
#: Bumped whenever a generator's output for a given config and seed changes: part of the cache key, so
#: cached patients of an older generator are never served (classic 2: core CBF 8 → 4.5 ml/100g/min; classic 3:
#: the AIF's systemic steady state, 0-15 % of its peak).
GENERATOR_VERSION: dict[str, int] = {"classic": 3, "ribbon": 1}
#: Residue shapes of the ribbon family.
RIBBON_RESIDUES: tuple[str, ...] = ("exponential", "gamma", "lognormal")
#: Dispersion kernels of the ribbon family.
RIBBON_DISPERSIONS: tuple[str, ...] = ("exponential", "gamma")

#: (CBF mean, MTT mean s, delay range s) per perfused class.
TISSUE_PARAMS: dict[int, tuple[float, float, tuple[float, float]]] = {
    GM: (60.0, 4.0, (0.0, 1.5)),
    WM: (25.0, 4.8, (0.5, 2.0)),
    PENUMBRA: (25.0, 8.5, (6.0, 10.0)),
    CORE: (4.5, 10.0, (10.0, 14.0)),  # rCBF < 30 % of the normal hemisphere even at the top of its spread
}
#: Unenhanced HU per class.
BASELINE_HU = {AIR: -1000.0, SKULL: 1000.0, WM: 28.0, GM: 38.0, CSF: 8.0, ARTERY: 45.0, VEIN: 45.0,
               PENUMBRA: 36.0, CORE: 32.0}


def _range(name: str, value, lo_min: float = 0.0) -> tuple[float, float] | None:
    """``value`` as a ``(lo, hi)`` float pair (Hydra gives lists), checked; ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {value!r}") from None
    if not lo_min <= lo <= hi:
        raise ValueError(f"{name} must satisfy {lo_min} <= lo <= hi, got {value!r}")
    return lo, hi


@dataclass
class RibbonOptions:
    """Options of the ``"ribbon"`` family (:mod:`stm_dlp.data.phantom_ribbon`); ranges are drawn per patient.

    Attributes:
        noise_hu: range of the per-frame noise standard deviation (HU), averaged over the brain.
        noise_corr_px: range of the Gaussian smoothing sigma (pixels) that correlates the noise in-plane.
        poisson: noise grows toward the head centre, where rays cross more tissue and bone.
        streaks: beam-hardening-like streaks starting at the skull (static, slightly varying per frame),
            plus cupping.
        psf_px: range of the scanner PSF sigma (pixels) blurring the unenhanced image (skull blooming).
        scalp: soft tissue (skin, fat) outside the skull; labelled ``AIR`` (not brain).
        residue: ``exponential``, ``gamma``, ``lognormal`` or ``mixed`` (one drawn per patient).
        dispersion: ``exponential``, ``gamma`` or ``mixed`` (one drawn per patient).
        arrival_s: range of the AIF arrival (s after the first frame).
        total_s: range of the acquisition length (s); the frame count comes from ``frames_min/max``.
        interval_s: allowed frame intervals (s).
        fine_dt_s: step (s) of the fine grid the curves and TMAX are computed on.
        two_territory_probability: chance that a lesion spans two adjacent vascular territories.
    """

    noise_hu: tuple[float, float] = (0.0, 8.0)
    noise_corr_px: tuple[float, float] = (0.4, 1.2)
    poisson: bool = True
    streaks: bool = True
    psf_px: tuple[float, float] = (0.0, 0.3)
    scalp: bool = True
    residue: str = "mixed"
    dispersion: str = "mixed"
    arrival_s: tuple[float, float] = (2.0, 15.0)
    total_s: tuple[float, float] = (50.0, 90.0)
    interval_s: tuple[float, float] = (1.0, 3.0)
    fine_dt_s: float = 0.05
    two_territory_probability: float = 0.2

    def __post_init__(self) -> None:
        for name in ("noise_hu", "noise_corr_px", "psf_px", "arrival_s", "total_s"):
            setattr(self, name, _range(f"ribbon.{name}", getattr(self, name)))
        self.interval_s = _range("ribbon.interval_s", self.interval_s, lo_min=0.05)
        if self.residue not in (*RIBBON_RESIDUES, "mixed"):
            raise ValueError(f"ribbon.residue must be one of {(*RIBBON_RESIDUES, 'mixed')}, got {self.residue!r}")
        if self.dispersion not in (*RIBBON_DISPERSIONS, "mixed"):
            raise ValueError(f"ribbon.dispersion must be one of {(*RIBBON_DISPERSIONS, 'mixed')}, "
                             f"got {self.dispersion!r}")
        if not 0.001 <= self.fine_dt_s <= 0.5:
            raise ValueError(f"ribbon.fine_dt_s must be in [0.001, 0.5] s, got {self.fine_dt_s}")
        if not 0.0 <= self.two_territory_probability <= 1.0:
            raise ValueError("ribbon.two_territory_probability must be in [0, 1]")


@dataclass
class PhantomConfig:
    """Size and randomness of a phantom cohort (all values documented in the module docstring).

    Shared by both families: ``height``, ``width`` (the matrix), ``n_slices``, ``frames_min``,
    ``frames_max``, ``lesion_probability``, ``recirculation``, ``pixel_mm`` and ``slice_mm_range``
    (``None`` = the family's default: classic ``fov_mm / matrix`` and ``slice_mm``, ribbon (0.5, 2.0) mm
    and (4, 10) mm). Classic only: ``noise_hu``, ``residue``, ``fov_mm``, ``slice_mm``, ``fine_dt_s``.
    Ribbon only: ``ribbon`` (:class:`RibbonOptions`, its own noise, residue, framing and artefacts).
    """

    height: int = 64
    width: int = 64
    n_slices: int = 4
    frames_min: int = 40
    frames_max: int = 60
    noise_hu: float = 3.0
    residue: str = "exponential"  # one of RESIDUE_KINDS, or "mixed" (random per patient)
    lesion_probability: float = 0.8
    recirculation: bool = True
    fov_mm: float = 220.0
    slice_mm: float = 5.0
    fine_dt_s: float = 0.02
    family: str = "classic"
    pixel_mm: tuple[float, float] | None = None
    slice_mm_range: tuple[float, float] | None = None
    ribbon: RibbonOptions = field(default_factory=RibbonOptions)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        self.pixel_mm = _range("pixel_mm", self.pixel_mm, lo_min=1e-3)
        self.slice_mm_range = _range("slice_mm_range", self.slice_mm_range, lo_min=1e-3)
        if not isinstance(self.ribbon, RibbonOptions):
            try:
                self.ribbon = RibbonOptions(**dict(self.ribbon or {}))
            except TypeError as exc:
                raise ValueError(f"ribbon: {exc}") from None
        if self.residue not in (*RESIDUE_KINDS, "mixed"):
            raise ValueError(f"residue must be one of {(*RESIDUE_KINDS, 'mixed')}, got {self.residue!r}")
        if not 2 <= self.frames_min <= self.frames_max:
            raise ValueError(f"need 2 <= frames_min <= frames_max, got {self.frames_min}, {self.frames_max}")
        if self.height < 16 or self.width < 16 or self.n_slices < 1:
            raise ValueError("phantom needs height, width >= 16 and n_slices >= 1")


def frame_times(rng: np.random.Generator, n_frames: int) -> np.ndarray:
    """Irregular clinical framing: a fast first phase (1-1.8 s) then a slow phase (2-3 s), jittered.

    Returns float64 ``(n_frames,)`` seconds from the first frame, strictly increasing.
    """
    n_fast = int(round(n_frames * rng.uniform(0.55, 0.7)))
    dt_fast, dt_slow = rng.uniform(1.0, 1.8), rng.uniform(2.0, 3.0)
    steps = np.concatenate([np.full(n_fast - 1, dt_fast), np.full(n_frames - n_fast, dt_slow)])
    steps = steps + rng.normal(0.0, 0.08, steps.shape)
    steps = np.maximum(steps, 0.3)
    return np.concatenate([[0.0], np.cumsum(steps)])


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], length_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ``length_px`` pixels."""
    h, w = shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.fftfreq(w)[None, :]
    spectrum = np.exp(-2 * (math.pi * length_px) ** 2 * (kx**2 + ky**2))
    field = np.fft.ifft2(np.fft.fft2(rng.normal(size=shape)) * spectrum).real
    return (field - field.mean()) / (field.std() + 1e-12)


def head_labels(rng: np.random.Generator, height: int, width: int, z: float,
                lesion: dict | None, step: float | None = None) -> np.ndarray:
    """Label image ``(H, W)`` of tissue classes for an axial slice at height ``z`` ∈ [0, 1].

    The head is drawn in normalised coordinates (±1 = the edges of the default framing). ``step`` is
    the normalised size of one pixel (same along rows and columns, centred grid); ``None`` keeps the
    default framing, where ±1 are the first and last row / column.
    """
    if step is None:
        y, x = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    else:
        y, x = np.meshgrid((np.arange(height) - (height - 1) / 2) * step,
                           (np.arange(width) - (width - 1) / 2) * step, indexing="ij")
    size = 0.75 + 0.25 * math.cos((z - 0.45) * 2.2)
    ax, ay = 0.72 * size, 0.86 * size
    r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2)
    theta = np.arctan2(y, x)
    labels = np.full((height, width), AIR, np.int64)
    labels[r < 1.1] = SKULL
    brain = r < 1.0
    labels[brain] = WM
    cortex = brain & (r > 0.78 + 0.05 * np.sin(7 * theta + 10 * z))
    labels[cortex] = GM
    for sx in (-1, 1):  # basal ganglia / thalami
        labels[brain & (((x - sx * 0.22 * ax) / (0.14 * ax)) ** 2 + ((y + 0.05) / (0.2 * ay)) ** 2 < 1)] = GM
    vent = 0.1 * (1.2 - abs(z - 0.5))
    for sx in (-1, 1):
        labels[brain & (((x - sx * 0.09 * ax) / (vent * ax)) ** 2 + ((y + 0.1) / (2.6 * vent * ay)) ** 2 < 1)] = CSF
    if lesion is not None and lesion["z0"] <= z <= lesion["z1"]:
        d = np.sqrt(((x - lesion["cx"] * ax) / (lesion["rx"] * ax)) ** 2
                    + ((y - lesion["cy"] * ay) / (lesion["ry"] * ay)) ** 2)
        tissue = brain & (labels != CSF)
        labels[tissue & (d < 1.0)] = PENUMBRA
        labels[tissue & (d < lesion["core_frac"])] = CORE
    if step is None:
        rad = max(1.0, height / 40)
        px = np.stack([y * (height - 1) / 2, x * (width - 1) / 2])
        sy, sx_ = (height - 1) / 2, (width - 1) / 2
    else:  # vessels keep their physical size: radius 1/40 of the design FOV (normalised 1/20)
        rad = max(1.0, 1.0 / (20.0 * step))
        px = np.stack([y / step, x / step])
        sy = sx_ = 1.0 / step
    for cx, cy in ((-0.3 * ax, -0.05 * ay), (0.3 * ax, -0.05 * ay), (0.0, -0.55 * ay)):  # MCAs, ACA
        dist = np.hypot(px[0] - cy * sy, px[1] - cx * sx_)
        labels[brain & (dist <= rad)] = ARTERY
    dist = np.hypot(px[0] - 0.92 * ay * sy, px[1])
    labels[(r < 1.0) & (dist <= rad * 1.3)] = VEIN  # superior sagittal sinus, posterior midline
    return labels


def axial_affine(height: int, width: int, n_slices: int, pixel_mm: float, slice_mm: float) -> np.ndarray:
    """Affine of a centred axial volume with square ``pixel_mm`` pixels and slices ``slice_mm`` apart."""
    first = np.array([-pixel_mm * width / 2, -pixel_mm * height / 2, -slice_mm * (n_slices - 1) / 2])
    return affine_from_dicom_geometry(first, np.array([1, 0, 0, 0, 1, 0]), (pixel_mm, pixel_mm),
                                      np.array([0.0, 0.0, slice_mm]))


def _classic_geometry(cfg: PhantomConfig, seed: int) -> tuple[float | None, np.ndarray]:
    """Normalised pixel step for :func:`head_labels` (``None`` = default framing) and the affine.

    Drawn from a stream of its own (``[seed, 1]``) so the other draws of a seed do not move.
    """
    h, w, s_count = cfg.height, cfg.width, cfg.n_slices
    if cfg.pixel_mm is None and cfg.slice_mm_range is None:
        return None, phantom_affine(h, w, s_count, cfg.fov_mm, cfg.slice_mm)
    rng = np.random.default_rng([seed, 1])
    slice_mm = cfg.slice_mm if cfg.slice_mm_range is None else float(rng.uniform(*cfg.slice_mm_range))
    if cfg.pixel_mm is None:  # only the thickness is drawn: default framing (pixel = fov / matrix)
        return None, phantom_affine(h, w, s_count, cfg.fov_mm, slice_mm)
    pixel = float(rng.uniform(*cfg.pixel_mm))
    # the head keeps its size in a fov_mm FOV, unless the matrix is too small to hold it at this pixel
    step = max(pixel / (cfg.fov_mm / 2), 2.0 / (min(h, w) - 1))
    return step, axial_affine(h, w, s_count, pixel, slice_mm)


def simulate_patient(cfg: PhantomConfig, seed: int, patient_id: str | None = None) -> Study:
    """One phantom patient (all slices) of the family ``cfg.family``, deterministic in ``seed``.

    ``meta`` carries the exact inputs: ``aif_hu`` (S, T) (true AIF at each slice's times),
    ``labels`` (S, H, W) tissue classes, ``baseline_hu`` (S, H, W), ``residue``, ``aif_params``,
    ``aif_pixels`` / ``vof_pixels`` (lists of ``(slice, row, col)``), ``vof_hu``, ``family``, ``config``
    and ``seed``. The ribbon family adds more (see :mod:`stm_dlp.data.phantom_ribbon`).
    """
    if cfg.family == "ribbon":
        from stm_dlp.data.phantom_ribbon import simulate_ribbon_patient

        return simulate_ribbon_patient(cfg, seed, patient_id)
    step, affine = _classic_geometry(cfg, seed)
    rng = np.random.default_rng(seed)
    h, w, s_count = cfg.height, cfg.width, cfg.n_slices
    n_frames = int(rng.integers(cfg.frames_min, cfg.frames_max + 1))
    times = frame_times(rng, n_frames)
    residue = cfg.residue if cfg.residue != "mixed" else str(rng.choice(RESIDUE_KINDS))
    aif_params = dict(
        t0_s=float(rng.uniform(3.0, 10.0)),
        peak_hu=float(rng.uniform(250.0, 450.0)),
        alpha=float(rng.uniform(2.5, 4.0)),
        beta_s=float(rng.uniform(1.0, 1.8)),
        recirculation=float(rng.uniform(0.08, 0.15)) if cfg.recirculation else 0.0,
    )
    if cfg.recirculation:  # the systemic steady state (generator 3), from its own stream: the rest of the patient
        tail = np.random.default_rng([seed, 3])  # (anatomy, lesion, noise) is what generator 2 drew
        aif_params.update(steady_state=float(tail.uniform(0.0, 0.15)),
                          steady_state_decay_s=float(tail.uniform(20.0, 80.0)))
    lesion = None
    if rng.uniform() < cfg.lesion_probability:
        side = rng.choice([-1.0, 1.0])
        lesion = dict(cx=side * rng.uniform(0.3, 0.5), cy=rng.uniform(-0.4, 0.3), rx=rng.uniform(0.22, 0.4),
                      ry=rng.uniform(0.25, 0.45), core_frac=rng.uniform(0.35, 0.65),
                      z0=rng.uniform(0.0, 0.4), z1=rng.uniform(0.6, 1.0))
    patient_scale = rng.uniform(0.9, 1.1)

    t_end = float(times[-1]) + 20.0
    t_fine = torch.arange(0.0, t_end, cfg.fine_dt_s, dtype=torch.float64)
    aif_fine = arterial_input_function(t_fine, **aif_params)
    table = TissueCurveTable(aif_fine, cfg.fine_dt_s, residue)
    times_t = torch.from_numpy(times)
    aif_at = arterial_input_function(times_t, **aif_params).numpy()
    # Venous output: the AIF dispersed by a gamma transit kernel (mean ~6 s, area 1), full volume.
    kernel = gamma_variate(t_fine, 1.0, 1.0, 3.0, 1.7)
    kernel = kernel / (kernel.sum() * cfg.fine_dt_s)
    vof_fine = convolve_causal(aif_fine, kernel, cfg.fine_dt_s)
    vof_at = np.interp(times, t_fine.numpy(), vof_fine.numpy())

    frames = np.empty((s_count, n_frames, h, w), np.float32)
    maps = np.zeros((s_count, len(PARAMS), h, w), np.float32)
    mask = np.zeros((s_count, h, w), bool)
    labels_all = np.zeros((s_count, h, w), np.int64)
    baseline_all = np.zeros((s_count, h, w), np.float32)
    aif_pixels, vof_pixels = [], []
    for si in range(s_count):
        z = (si + 0.5) / s_count
        labels = head_labels(rng, h, w, z, lesion, step)
        labels_all[si] = labels
        baseline = np.vectorize(BASELINE_HU.get)(labels).astype(np.float64)
        baseline += np.where(labels >= WM, 2.0 * smooth_field(rng, (h, w), 2.0), 0.0)
        baseline_all[si] = baseline
        cbf = np.zeros((h, w))
        mtt = np.zeros((h, w))
        delay = np.zeros((h, w))
        tex_f, tex_m, tex_d = (smooth_field(rng, (h, w), max(1.5, h / 24)) for _ in range(3))
        for cls, (cbf_mean, mtt_mean, (d0, d1)) in TISSUE_PARAMS.items():
            sel = labels == cls
            cbf[sel] = cbf_mean * patient_scale * (1 + 0.1 * tex_f[sel])
            mtt[sel] = mtt_mean * (1 + 0.08 * tex_m[sel])
            delay[sel] = d0 + (d1 - d0) * (0.5 + 0.5 * np.tanh(tex_d[sel]))
        perfused = np.isin(labels, list(TISSUE_PARAMS))
        enh = np.zeros((h * w, n_frames))
        idx = np.flatnonzero(perfused)
        if idx.size:
            enh[idx] = table.curves(
                times_t, torch.from_numpy(cbf.reshape(-1)[idx]), torch.from_numpy(mtt.reshape(-1)[idx]),
                torch.from_numpy(delay.reshape(-1)[idx])
            ).numpy()
        enh = enh.reshape(h, w, n_frames)
        rows, cols = np.nonzero(labels == ARTERY)
        for r_, c_ in zip(rows, cols):
            enh[r_, c_] = rng.uniform(0.7, 1.0) * aif_at  # partial volume
            aif_pixels.append((si, int(r_), int(c_)))
        rows, cols = np.nonzero(labels == VEIN)
        for r_, c_ in zip(rows, cols):
            enh[r_, c_] = vof_at
            vof_pixels.append((si, int(r_), int(c_)))
        hu = baseline[None] + np.moveaxis(enh, -1, 0)
        if cfg.noise_hu > 0:
            hu = hu + rng.normal(0.0, cfg.noise_hu, hu.shape)
        frames[si] = hu
        maps[si, 0] = cbf * mtt / 60.0
        maps[si, 1] = cbf
        maps[si, 2] = delay * perfused
        mask[si] = (labels >= WM) & (labels != ARTERY) & (labels != VEIN)

    pid = patient_id or f"phantom-{seed:06d}"
    return Study(
        frames=frames,
        times_s=np.repeat(times[None].astype(np.float32), s_count, axis=0),
        affine=affine,
        maps=maps,
        mask=mask,
        patient_id=pid,
        source=f"phantom(seed={seed})",
        meta=dict(aif_hu=np.repeat(aif_at[None].astype(np.float32), s_count, axis=0), labels=labels_all,
                  baseline_hu=baseline_all, residue=residue, aif_params=aif_params, aif_pixels=aif_pixels,
                  vof_pixels=vof_pixels, vof_hu=vof_at.astype(np.float32), family="classic",
                  config=asdict(cfg), seed=seed),
    ).validate()


def cohort_member(index: int, seed: int = 0) -> tuple[int, str]:
    """``(patient seed, patient id)`` of patient ``index`` of the cohort ``seed`` — the one definition the
    DataModule, ``stm_dlp.synth`` and :func:`simulate_cohort` share (so a cohort grows without changing
    its first patients)."""
    return seed * 100003 + index, f"phantom-{seed:03d}-{index:04d}"


def simulate_cohort(n_patients: int, cfg: PhantomConfig | None = None, seed: int = 0) -> list[Study]:
    """``n_patients`` independent patients of ``cfg.family``; patient i is :func:`cohort_member` ``(i, seed)``."""
    cfg = cfg or PhantomConfig()
    return [simulate_patient(cfg, *cohort_member(i, seed)) for i in range(n_patients)]


def validation_grid(
    cbv_values: tuple[float, ...] = (2.0, 4.0, 6.0),
    mtt_values: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0),
    delay_values: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0),
    residue: str = "exponential",
    tile: int = 6,
    noise_hu: float = 0.0,
    times_s: np.ndarray | None = None,
    aif_params: dict | None = None,
    seed: int = 0,
) -> Study:
    """Kudo-style validation phantom (Kudo et al., Radiology 2010;254:200).

    Slice ``s`` holds CBV ``cbv_values[s]``; tile (i, j) of each slice has MTT ``mtt_values[i]`` and
    delay ``delay_values[j]`` (CBF = CBV / MTT * 60). Rows of tiles = MTT, columns = delay. Frames
    default to a regular 1 s grid over 90 s. ``meta['aif_hu']`` is the true AIF.
    """
    rng = np.random.default_rng(seed)
    times = np.arange(0.0, 90.0, 1.0) if times_s is None else np.asarray(times_s, np.float64)
    aif_params = aif_params or dict(t0_s=6.0, peak_hu=350.0, alpha=3.0, beta_s=1.5, recirculation=0.0)
    dt = 0.01
    t_fine = torch.arange(0.0, float(times[-1]) + 20.0, dt, dtype=torch.float64)
    table = TissueCurveTable(arterial_input_function(t_fine, **aif_params), dt, residue, n_mtt=1024)
    h, w = len(mtt_values) * tile, len(delay_values) * tile
    n_s, n_t = len(cbv_values), len(times)
    frames = np.empty((n_s, n_t, h, w), np.float32)
    maps = np.zeros((n_s, len(PARAMS), h, w), np.float32)
    mtt_img = np.repeat(np.repeat(np.asarray(mtt_values, float)[:, None], len(delay_values), 1), tile, 0)
    mtt_img = np.repeat(mtt_img, tile, 1)
    delay_img = np.repeat(np.repeat(np.asarray(delay_values, float)[None, :], len(mtt_values), 0), tile, 1)
    delay_img = np.repeat(delay_img, tile, 0)
    for si, cbv in enumerate(cbv_values):
        cbf_img = cbv / mtt_img * 60.0
        curves = table.curves(torch.from_numpy(times), torch.from_numpy(cbf_img.reshape(-1)),
                              torch.from_numpy(mtt_img.reshape(-1)), torch.from_numpy(delay_img.reshape(-1)))
        hu = 30.0 + curves.numpy().reshape(h, w, n_t)
        if noise_hu > 0:
            hu = hu + rng.normal(0, noise_hu, hu.shape)
        frames[si] = np.moveaxis(hu, -1, 0)
        maps[si] = np.stack([np.full((h, w), cbv), cbf_img, delay_img])
    aif = arterial_input_function(torch.from_numpy(times), **aif_params).numpy().astype(np.float32)
    return Study(
        frames=frames,
        times_s=np.repeat(times[None].astype(np.float32), n_s, axis=0),
        affine=phantom_affine(h, w, n_s),
        maps=maps,
        mask=np.ones((n_s, h, w), bool),
        patient_id="validation-grid",
        source=f"validation_grid({residue})",
        meta=dict(aif_hu=np.repeat(aif[None], n_s, axis=0), residue=residue, aif_params=aif_params,
                  mtt_values=tuple(mtt_values), delay_values=tuple(delay_values), tile=tile),
    ).validate()
