"""``read_dicom_study``: a folder of DICOM files → a validated :class:`~stm_dlp.types.Study`.

A pipeline of named steps, each in its own module (the rules are in :mod:`stm_dlp.data.dicom`):
index the files into records (:mod:`.index`), keep one consistent series (:mod:`.slices`), arrange
it ``[slice][frame]`` with frame times (:mod:`.slices`, :mod:`.times`), read the pixels
(:mod:`.pixels`), and compute the affine (:mod:`.slices`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from stm_dlp.data.dicom.index import index_folder
from stm_dlp.data.dicom.pixels import ON_BAD_FRAME, read_frames, validate_study
from stm_dlp.data.dicom.pseudonym import hash_uid, pseudonymise
from stm_dlp.data.dicom.slices import arrange_frames, check_consistent, select_series, study_affine
from stm_dlp.types import Study


def read_dicom_study(path: str | Path, *, pseudonym_key: bytes | None = None,
                     on_bad_frame: str = "raise") -> Study:
    """Read the CT perfusion series in folder ``path`` (see :mod:`stm_dlp.data.dicom` for the rules).

    Args:
        path: a folder holding one CT perfusion series (any file names, any nesting).
        pseudonym_key: HMAC key for :func:`pseudonymise` (``None`` → project default key).
        on_bad_frame: a frame whose pixel data is missing, truncated, undecodable or NaN/inf after
            rescale is an error (``"raise"``, default), or (``"nan"``, for best-effort inference) is
            filled with NaN and listed in ``meta["bad_frames"]`` as ``{slice, frame, file, error}``
            while the rest of the study is read. Problems of headers, times or geometry are errors
            either way, and so is a study with no usable frame.

    Returns:
        A validated :class:`Study`: ``frames`` float32 ``(S, T, H, W)`` HU, ``times_s`` float32
        ``(S, T)`` seconds from the study's earliest frame, ``affine`` (4, 4) RAS+ mm for arrays in
        ``(W, H, S)`` order, ``maps``/``mask`` None, ``patient_id`` pseudonymised, ``source`` the
        folder, and ``meta`` with ``series_uid_hash``, ``time_tag``, ``crosses_midnight``,
        ``geometry_tag``, ``series_layout`` (one series, or one series per time point),
        ``series_uid_hashes`` (in time order), ``dicom_format`` (single-frame or enhanced multi-frame),
        ``dicom_folder``, ``time_source``, ``files`` (``[slice][frame]`` paths relative to the folder;
        with ``frames_in_file``, 1-based, for enhanced files),
        ``slice_positions_mm``, ``pixel_spacing_mm``, ``skipped`` (non-CT objects ignored) and
        ``bad_frames`` (empty unless ``on_bad_frame="nan"``).

    Raises:
        StudyError: with the offending file (or folder) and DICOM tag named (the rules: :mod:`stm_dlp.data.dicom`).
    """
    if on_bad_frame not in ON_BAD_FRAME:
        raise ValueError(f"on_bad_frame must be one of {', '.join(ON_BAD_FRAME)}, got {on_bad_frame!r}")
    root = Path(path)
    # The sources of frames: one record per single-frame file, one per frame of an enhanced file;
    # one series per time point is combined by select_series. Every later step only reads records.
    recs, skipped = index_folder(root)
    recs, layout = select_series(recs, root)
    check_consistent(recs)
    grid = arrange_frames(recs, root)
    frames, bad_frames = read_frames(grid.records, on_bad_frame, root)
    affine, spacing, notes = study_affine(grid)
    for note in notes:
        warnings.warn(f"{root}: {note}", stacklevel=2)  # points at the caller of read_dicom_study

    first = grid.records[0][0]
    # series of a one-series-per-time-point export, in time order (hashed: no UID leaves in clear)
    series_order: list[str] = []
    for t in range(len(grid.records[0])):
        for sl in grid.records:
            if (h := hash_uid(sl[t].series_uid)) not in series_order:
                series_order.append(h)
    enhanced = first.frame_index is not None
    study = Study(
        frames=frames,
        times_s=(grid.times_s - grid.times_s.min()).astype(np.float32),
        affine=affine,
        patient_id=pseudonymise(first.patient or first.series_uid, pseudonym_key),
        source=str(root),
        meta={
            "series_uid_hash": hash_uid(first.series_uid),
            "time_tag": grid.time_tag,
            "crosses_midnight": bool(grid.crosses_midnight),
            "geometry_tag": grid.geometry_tag,
            "series_layout": layout,
            "series_uid_hashes": series_order,
            "dicom_format": ("enhanced multi-frame" if enhanced else "single-frame")
                            + (f" ({len({r.path for sl in grid.records for r in sl})} files)" if enhanced else ""),
            "dicom_folder": str(root),
            "time_source": f"DICOM {grid.time_tag}",
            "files": [[r.rel for r in sl] for sl in grid.records],
            **({"frames_in_file": [[(r.frame_index or 0) + 1 for r in sl] for sl in grid.records]} if enhanced else {}),
            "slice_positions_mm": [float(p) for p in grid.slice_positions_mm],
            "pixel_spacing_mm": [float(spacing[0]), float(spacing[1])],
            "skipped": skipped,
            "notes": notes,
            "bad_frames": bad_frames,
        },
    )
    return validate_study(study)
