"""The unit the reader works on: one image frame and what its header says (:class:`FrameRecord`).

Every later step — series selection, slice grouping, frame times, pixels, geometry — reads only
records, never files or pydicom datasets, so a new *source of frames* (enhanced multi-frame files,
one series per time point) plugs in by producing records (see :mod:`stm_dlp.data.dicom.index`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class FrameRecord:
    """What the indexing pass learns about one image: a single-frame file, or one frame of an
    enhanced multi-frame file (``frame_index`` set, geometry, rescale and times from its per-frame
    and shared functional groups).

    Geometry is in the DICOM patient frame (LPS, mm); ``tags`` holds the raw text of the time tags
    (:data:`~stm_dlp.data.dicom.times.TIME_TAGS`) the file (or the frame) carries.
    """

    path: Path
    rel: str  # path relative to the study folder, for messages and ``meta["files"]``
    series_uid: str
    sop_uid: str
    modality: str
    patient: str
    rows: int
    cols: int
    ipp: np.ndarray | None
    iop: np.ndarray | None
    slice_location: float | None
    pixel_spacing: tuple[float, float] | None
    slice_spacing: float | None
    tags: dict[str, str]
    transfer_syntax: str
    slope: float
    intercept: float
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples: int
    n_frames: int
    pixel_offset: int | None = None  # where the pixel bytes start (native little endian only)
    pixel_length: int | None = None
    has_pixels: bool | None = None  # None: unknown until the pixels are read
    pixel_error: str | None = None  # pixel data missing or truncated (raised when the frame is read)
    frame_index: int | None = None  # 0-based frame of a multi-frame file; None for a single-frame file
    study_uid: str | None = None
    frame_of_reference_uid: str | None = None
    image_type: str | None = None
    temporal_index: int | None = None  # TemporalPositionIndex of an enhanced frame (checked, never trusted alone)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """The file, and for a frame of a multi-frame file which frame, for messages."""
        return str(self.path) if self.frame_index is None else f"{self.path} (frame {self.frame_index + 1})"


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters (pydicom's messages can be long)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
