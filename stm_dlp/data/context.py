"""Study-level context a model gets besides a slice's own pixels: the arterial reference curve; and the
CSF its maps leave out (:func:`exclude_csf`).

:func:`attach_arterial` computes it on the *whole* slice (after augmentation, before any crop) with
:func:`stm_dlp.perfusion.arterial.arterial_reference`, so a training crop that holds no artery still
carries its slice's arterial input, and training, evaluation and prediction see the same curve.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from stm_dlp.perfusion.arterial import arterial_reference
from stm_dlp.perfusion.mask import slice_csf
from stm_dlp.types import CTPBatch, SliceSample, Study


def attach_arterial(sample: SliceSample) -> SliceSample:
    """``sample`` with ``arterial_hu`` ``(T,)`` set from its own (whole-slice) frames; non-finite pixels
    (unreadable frames) are left out of the search."""
    frames = torch.from_numpy(np.ascontiguousarray(sample.frames, np.float32))
    ref = arterial_reference(frames, torch.from_numpy(np.ascontiguousarray(sample.times_s, np.float32)))
    return dataclasses.replace(sample, arterial_hu=ref.curve_hu.numpy())


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
