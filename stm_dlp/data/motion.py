"""Motion correction as preprocessing for the model (``data.motion_correction``, ``predict motion=…``).

The same rigid in-plane registration the calculation approach runs first
(:func:`stm_dlp.perfusion.motion.correct_motion`): every frame registered to its slice's pre-contrast
reference, frames it cannot register reported and interpolated, still slices left alone. A network
trained on still heads sees a moving head as a different tissue curve in every pixel; registered first,
the study is again what it was trained on, at no training cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from stm_dlp.perfusion.motion import correct_motion
from stm_dlp.types import Study


def motion_corrected(study: Study) -> Study:
    """``study`` with its frames registered (see the module docstring); ``meta["motion_correction"]`` holds
    the report (``moved_frames``, ``max_shift_px``, ``max_rotation_deg``, ``failed_frames`` …). A study with
    non-finite frames (unreadable frames kept as NaN) is returned as it is, with the reason in the report."""
    frames = np.asarray(study.frames, np.float32)
    if not np.all(np.isfinite(frames)):
        report: dict[str, Any] = {"enabled": True, "skipped": "non-finite frames (unreadable frames)"}
        return dataclasses.replace(study, meta={**study.meta, "motion_correction": report})
    # a copy: cached studies are read-only memory maps, which torch will not wrap
    corrected, report = correct_motion(torch.from_numpy(np.array(frames, np.float32)), None,
                                       torch.from_numpy(np.asarray(study.times_s, np.float64)))
    summary = {"enabled": True, **{k: report[k] for k in ("moved_frames", "max_shift_px", "max_rotation_deg",
                                                          "failed_frames", "skipped_slices", "still_slices")
                                   if k in report}}
    return dataclasses.replace(study, frames=corrected.numpy().astype(study.frames.dtype, copy=False),
                               meta={**study.meta, "motion_correction": summary})
