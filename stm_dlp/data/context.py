"""Study-level context a model gets besides a slice's own pixels: the arterial reference curve, optionally
the deconvolution of the slice with it (the *deconvolution prior*); and the CSF its maps leave out
(:func:`exclude_csf`).

:func:`study_references` computes the reference of every slice on the *whole* slice (before any crop) with
:func:`stm_dlp.perfusion.arterial.arterial_reference` and, by default, pools them over the study (their median:
one bolus feeds every slice); :func:`attach_arterial` sets it on a slice and adds :func:`deconvolution_prior`.
So a training crop that holds no artery still carries its study's arterial input, and training, evaluation and
prediction see the same curve.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch

from stm_dlp.perfusion.arterial import arterial_reference, pool_references, scan_window
from stm_dlp.perfusion.maps import calculate_maps
from stm_dlp.perfusion.mask import slice_csf
from stm_dlp.types import PARAMS, CTPBatch, SliceSample, Study

log = logging.getLogger(__name__)

#: The calculation approach's options for the deconvolution prior: its defaults (oSVD, 5.5 mm smoothing,
#: the TMAX pass with its median) except motion correction (done before, on the study, when configured)
#: and the TMAX calibration: ``calibrated`` (exponential residues) costs ~25 ms a slice where the default
#: dispersion-aware one costs ~90 ms (its lookup is built per AIF), and a network corrects a calibration's
#: bias; on 3 mm phantom slices TMAX R² 0.70 / 0.90 (ribbon / classic), as with the default (0.71 / 0.79).
#: Under noise the TMAX pass widens its smoothing in proportion to the noise (σ ∝ noise: the smoothed curves keep the
#: noise of a study at ``noise_ref_hu``), where the calc's default widens it as the CBF pass (√noise, 1.5 mm -> 3 mm at
#: 30 HU: ~1 px on the model's 3 mm grid, whose noise ripples pass for residue peaks). Model Dice(TMAX > 6 s) over
#: 28 studies per family, 15 HU / 30 HU + impulses, before -> after: classic 0.59 -> 0.67 / 0.31 -> 0.45, ribbon
#: 0.61 -> 0.58 / 0.33 -> 0.33 (same family), held out 0.57 -> 0.62 / 0.31 -> 0.43 and 0.65 -> 0.65 / 0.25 -> 0.30;
#: regular data unchanged. Widening the TMAX median too gains more on classic and loses on ribbon (docs/tmax.md §16).
PRIOR_OPTIONS: dict = {"motion": False, "tmax_method": "calibrated", "tmax_noise_widening": 1.0}


def deconvolution_prior(sample: SliceSample) -> np.ndarray:
    """The calculation approach's CBV, CBF, TMAX of ``sample`` with its arterial reference
    (``sample.arterial_hu``, set by :func:`attach_arterial`) as the AIF: float32 ``(P, H, W)`` in
    :data:`~stm_dlp.types.PARAMS` order, physical units, 0 outside ``sample.mask`` and on CSF.

    Physics the network need not learn, and which holds on any generator: the reference curve tells *when*
    and *how much* contrast reached the slice, the deconvolution divides each pixel's curve by it. A slice
    whose reference cannot be deconvolved (no enhancement: a failed injection, a broken series) gets
    zeros, with a warning — the model then reads its frames alone."""
    if sample.arterial_hu is None:
        raise ValueError(f"patient {sample.patient_id}, slice {sample.slice_index}: the deconvolution prior "
                         "needs the arterial reference (attach_arterial)")
    frames = np.nan_to_num(np.asarray(sample.frames, np.float32))[None]
    try:
        maps, _ = calculate_maps(frames, sample.times_s, mask=np.asarray(sample.mask, bool)[None],
                                 aif=sample.arterial_hu, pixel_mm=sample.pixel_mm, **PRIOR_OPTIONS)
    except ValueError as exc:
        log.warning("patient %s, slice %d: no deconvolution prior (%s); the model reads the frames alone",
                    sample.patient_id, sample.slice_index, exc)
        return np.zeros((len(PARAMS), *sample.frames.shape[1:]), np.float32)
    return np.stack([maps[p][0] for p in PARAMS]).astype(np.float32)


def slice_reference(sample: SliceSample) -> np.ndarray:
    """The arterial reference ``(T,)`` float32 (HU over baseline) of ``sample``'s own whole-slice frames
    (:func:`~stm_dlp.perfusion.arterial.arterial_reference`; non-finite pixels — unreadable frames — are left out
    of the search)."""
    frames = torch.from_numpy(np.ascontiguousarray(sample.frames, np.float32))
    ref = arterial_reference(frames, torch.from_numpy(np.ascontiguousarray(sample.times_s, np.float32)))
    return ref.curve_hu.numpy()


def study_references(study: Study, pooling: str = "study", slices: Sequence[int] | None = None) -> np.ndarray:
    """The arterial reference ``(len(slices), T)`` float32 of each of ``slices`` (default: all) of ``study`` as
    given (acquired or corrupted): :func:`~stm_dlp.perfusion.arterial.pool_references` of those slices' own
    (:func:`slice_reference`) — with ``pooling="study"`` their median, one curve for all of them."""
    slices = list(range(study.n_slices)) if slices is None else list(slices)
    own = np.stack([slice_reference(study.slice_sample(s)) for s in slices])
    times = torch.from_numpy(np.ascontiguousarray(np.asarray(study.times_s)[slices], np.float32))
    return pool_references(torch.from_numpy(own), times, pooling).numpy()


def attach_arterial(sample: SliceSample, prior: bool = False, reference: np.ndarray | None = None) -> SliceSample:
    """``sample`` with ``arterial_hu`` ``(T,)`` set — ``reference`` (HU at ``sample.times_s``, e.g. a row of
    :func:`study_references`) when given, else the slice's own (:func:`slice_reference`) — and, with ``prior``,
    ``prior_maps`` (:func:`deconvolution_prior`)."""
    if reference is None:
        reference = slice_reference(sample)
    reference = np.ascontiguousarray(reference, np.float32)
    if reference.shape != sample.times_s.shape:
        raise ValueError(f"patient {sample.patient_id}, slice {sample.slice_index}: arterial reference of shape "
                         f"{reference.shape} for {sample.times_s.shape[0]} frames")
    sample = dataclasses.replace(sample, arterial_hu=reference)
    if prior:
        sample = dataclasses.replace(sample, prior_maps=deconvolution_prior(sample))
    return sample


def reference_on(reference: np.ndarray, times_s: np.ndarray, new_times_s: np.ndarray) -> np.ndarray:
    """``reference`` ``(T,)`` (HU at ``times_s``) linearly interpolated at ``new_times_s`` ``(T',)`` — both clocks
    from the same origin —, the last value held past the end: the study's reference on a slice's augmented
    framing (:class:`~stm_dlp.data.corrupt.Reframe`, ``DropFrames``, ``JitterFraming`` keep the first frame and
    interpolate the frames the same way)."""
    return np.interp(np.asarray(new_times_s, np.float64), np.asarray(times_s, np.float64),
                     np.asarray(reference, np.float64)).astype(np.float32)


def delay_tissue(sample: SliceSample, delay_s: float) -> SliceSample:
    """``sample`` as if every pixel's bolus came ``delay_s`` seconds later (earlier when negative) relative to
    its arterial input: the arterial reference is read ``delay_s`` earlier on the same frame times
    (``ref'(t) = ref(t + delay_s)``, linear interpolation, the last value held past the scan's end), and TMAX
    — of the labels and of the deconvolution prior, where either is above 0 — moves by ``delay_s`` (floored at
    0). CBV, CBF and MTT stay as they are.

    Exact physics, whatever the generator: a tissue curve is ``AIF ⊛ k``, and ``AIF(t + δ) ⊛ k(t − δ)`` is the
    same curve, whose ``k`` peaks δ later. A training augmentation (:class:`SliceDataset`'s
    ``tissue_delay_s``): a phantom's normal tissue has nearly one TMAX level (its generator's residue shape
    sets it), which a network can memorise instead of reading the timing; shifting breaks that shortcut
    (docs/tmax.md §9). The slice's own arteries in the frames are not moved, which is why it is for
    training only."""
    if sample.arterial_hu is None:
        raise ValueError(f"patient {sample.patient_id}, slice {sample.slice_index}: delay_tissue needs the "
                         "arterial reference (attach_arterial)")
    times = np.asarray(sample.times_s, np.float64)
    ref = reference_on(sample.arterial_hu, times, times + delay_s)
    k = PARAMS.index("tmax")

    def shifted(stack: np.ndarray) -> np.ndarray:
        out = np.array(stack, np.float32, copy=True)
        out[k] = np.where(out[k] > 0, np.maximum(out[k] + delay_s, 0.0), out[k])
        return out

    labels = shifted(sample.maps) if "tmax" in sample.labelled else sample.maps
    prior = None if sample.prior_maps is None else shifted(sample.prior_maps)
    return dataclasses.replace(sample, arterial_hu=ref, maps=labels, prior_maps=prior)


def study_scan_window(study: Study) -> dict:
    """:func:`~stm_dlp.perfusion.arterial.scan_window` of ``study`` from the arterial reference
    (:func:`arterial_reference`) of its most enhancing slice — the model's own context, so prediction
    reports what its input allowed — with ``"slice"`` added; logs the warning when the scan was short."""
    times = np.asarray(study.times_s, np.float32)
    frames = np.asarray(study.frames, np.float32)
    refs = [arterial_reference(torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(frames[s]))),
                               torch.from_numpy(np.ascontiguousarray(times[s]))) for s in range(study.n_slices)]
    best = int(np.argmax([r.peak_hu for r in refs]))
    window = {**scan_window(refs[best].time_to_peak_s, float(times[best, -1] - times[best, 0])), "slice": best}
    if window["warning"]:
        log.warning("%s: %s", study.patient_id, window["warning"])
    return window


def batch_csf(batch: CTPBatch) -> torch.Tensor:
    """CSF ``(B, H, W)`` bool of each slice of ``batch``, inside ``batch.mask``
    (:func:`stm_dlp.perfusion.mask.slice_csf`: pre-bolus HU < 15, the calculation approach's own test)."""
    return slice_csf(batch.frames, batch.times_s, batch.lengths, batch.mask)


def study_csf(study: Study) -> np.ndarray:
    """CSF ``(S, H, W)`` bool of every slice of ``study``, inside its mask (everywhere when it has none)."""
    frames = torch.from_numpy(np.ascontiguousarray(study.frames, np.float32))
    times = torch.from_numpy(np.ascontiguousarray(study.times_s, np.float32))
    mask = (torch.ones(frames.shape[0], *frames.shape[2:], dtype=torch.bool) if study.mask is None
            else torch.from_numpy(np.asarray(study.mask, bool)))
    lengths = torch.full((frames.shape[0],), frames.shape[1])
    return slice_csf(torch.nan_to_num(frames), times, lengths, mask).numpy()


def exclude_csf(maps: dict[str, torch.Tensor], csf: torch.Tensor) -> dict[str, torch.Tensor]:
    """``maps`` (``{param: (B, H, W)}``, physical units) with every parameter 0 on ``csf`` (:func:`batch_csf`),
    as the calculation approach does. A network's output is smooth across the ventricle's edge, so without
    this CSF reads as a little flow with a large CBV/CBF ratio: an MTT of tens of seconds and, below 30 % of
    the reference CBF, ischaemic core. The clinical readout is then taken on the brain without CSF
    (prediction and labels alike), as perfusion software does."""
    if not bool(csf.any()):
        return maps
    return {p: torch.where(csf, torch.zeros_like(v), v) for p, v in maps.items()}
