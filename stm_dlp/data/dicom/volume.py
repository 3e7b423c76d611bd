"""A DICOM *volume*: one image per slice position, no time axis — derived maps (UniToBrain's
``NLR_CBF`` …, our own ``output_dicom`` series) rather than a perfusion series.

The same steps as the perfusion reader, without the time ones: index the files (any modality — maps
are often ``OT`` or ``CT`` derived images), one series, consistent geometry, slices along the normal,
pixels with RescaleSlope / RescaleIntercept applied (the map's physical values), and the affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stm_dlp.data.dicom.index import index_folder
from stm_dlp.data.dicom.pixels import frame_hu
from stm_dlp.data.dicom.pseudonym import hash_uid
from stm_dlp.data.dicom.slices import FrameGrid, check_consistent, group_slices, slice_positions, study_affine
from stm_dlp.types import StudyError


@dataclass
class DicomVolume:
    """``values`` float32 ``(S, H, W)`` (stored values × slope + intercept) with slices ascending along
    the normal, their ``positions_mm`` along it, the ``normal`` (LPS), the RAS+ ``affine`` for
    ``(W, H, S)`` arrays, and the files ``[slice]`` relative to the folder."""

    values: np.ndarray
    positions_mm: np.ndarray
    normal: np.ndarray
    affine: np.ndarray
    files: list[str]
    series_uid_hash: str


def read_dicom_volume(folder: str | Path) -> DicomVolume:
    """Read the single-volume DICOM series in ``folder`` (one image per slice position).

    Raises:
        StudyError: naming the file and the tag — the folder is missing or empty, a file is not DICOM,
            more than one series, inconsistent geometry, two images at one slice position, or bad pixels.
    """
    root = Path(folder)
    recs, _skipped = index_folder(root, any_modality=True)
    series = {r.series_uid for r in recs}
    if len(series) > 1:
        raise StudyError(f"{root}: more than one series ({', '.join(sorted(hash_uid(u) for u in series))}); a map "
                         "folder holds one series, one image per slice")
    check_consistent(recs)
    positions, normal, geometry_tag = slice_positions(recs)
    groups = group_slices(positions)
    for g in groups:
        if len(g) > 1:
            a, b = recs[g[0]], recs[g[1]]
            raise StudyError(f"{b.where}: the same slice position ({positions[g[0]]:.2f} mm along the normal, "
                             f"{geometry_tag}) as {a.where}; a map holds one image per slice")
    ordered = [recs[g[0]] for g in groups]
    values = np.stack([frame_hu(r) for r in ordered])
    grid = FrameGrid(records=[[r] for r in ordered], times_s=np.zeros((len(ordered), 1)), time_tag="none",
                     crosses_midnight=False, slice_positions_mm=np.array([positions[g[0]] for g in groups]),
                     normal=normal, geometry_tag=geometry_tag)
    affine, _spacing, _notes = study_affine(grid)
    return DicomVolume(values=values.astype(np.float32), positions_mm=grid.slice_positions_mm, normal=normal,
                       affine=affine, files=[r.rel for r in ordered], series_uid_hash=hash_uid(ordered[0].series_uid))
