"""Study-level context a model gets besides a slice's own pixels: the arterial reference curve.

:func:`attach_arterial` computes it on the *whole* slice (after augmentation, before any crop) with
:func:`stm_dlp.perfusion.arterial.arterial_reference`, so a training crop that holds no artery still
carries its slice's arterial input, and training, evaluation and prediction see the same curve.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from stm_dlp.perfusion.arterial import arterial_reference
from stm_dlp.types import SliceSample


def attach_arterial(sample: SliceSample) -> SliceSample:
    """``sample`` with ``arterial_hu`` ``(T,)`` set from its own (whole-slice) frames; non-finite pixels
    (unreadable frames) are left out of the search."""
    frames = torch.from_numpy(np.ascontiguousarray(sample.frames, np.float32))
    ref = arterial_reference(frames, torch.from_numpy(np.ascontiguousarray(sample.times_s, np.float32)))
    return dataclasses.replace(sample, arterial_hu=ref.curve_hu.numpy())
