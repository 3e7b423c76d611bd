"""Pixels: stored values of one frame, rescale to HU, and what to do with a frame that cannot be used.

Uncompressed little-endian files are read straight from the byte offset the indexing pass found;
anything else goes through pydicom's decoders. A bad frame (pixel data missing, truncated,
undecodable, or NaN/inf after rescale) is an error, or with ``on_bad_frame="nan"`` a NaN frame
listed in ``meta["bad_frames"]``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from stm_dlp.data.dicom.record import FrameRecord, short_error
from stm_dlp.types import Study, StudyError

#: Transfer syntaxes whose pixel bytes are read directly: implicit / explicit VR little endian.
NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
#: What the reader does with a frame whose pixels cannot be used (see :func:`read_frames`).
ON_BAD_FRAME = ("raise", "nan")


def native_dtype(rec: FrameRecord) -> np.dtype:
    kinds = {8: "u1", 16: "u2", 32: "u4"}
    if rec.bits_allocated not in kinds:
        raise StudyError(f"{rec.where}: BitsAllocated {rec.bits_allocated} is not supported (8, 16 or 32)")
    code = kinds[rec.bits_allocated]
    return np.dtype("<" + (code.replace("u", "i") if rec.pixel_representation == 1 else code))


def read_pixels(rec: FrameRecord, decoded: dict[Path, np.ndarray] | None = None) -> np.ndarray:
    """Stored pixel values of one frame, ``(rows, cols)`` (before rescale).

    ``decoded`` caches the decoded frames of multi-frame files that pydicom has to decode (a
    compressed enhanced file is decoded once, not once per frame).
    """
    n = rec.rows * rec.cols
    if rec.pixel_offset is not None and rec.pixel_length is not None and rec.pixel_length != 0xFFFFFFFF:
        dtype = native_dtype(rec)
        need = n * dtype.itemsize
        if rec.pixel_length < need:
            raise StudyError(f"{rec.where}: PixelData (7FE0,0010) has {rec.pixel_length} bytes, but "
                             f"Rows×Columns = {rec.rows}×{rec.cols} at {rec.bits_allocated} bits need "
                             f"{need} (truncated?)")
        with open(rec.path, "rb") as fh:
            fh.seek(rec.pixel_offset)
            raw = fh.read(need)
        if len(raw) < need:
            raise StudyError(f"{rec.where}: truncated — PixelData (7FE0,0010) ends after {len(raw)} of "
                             f"{need} bytes")
        arr = np.frombuffer(raw, dtype=dtype, count=n)
        bits = rec.bits_allocated
        if rec.bits_stored < bits:
            shift = bits - rec.bits_stored
            if rec.pixel_representation == 1:  # sign-extend the stored bits
                arr = (arr << shift) >> shift
            else:
                arr = arr & ((1 << rec.bits_stored) - 1)
        return arr.reshape(rec.rows, rec.cols)
    # Compressed, big-endian or deflated transfer syntaxes: let pydicom decode.
    if rec.frame_index is not None and decoded is not None and rec.path in decoded:
        return _one_frame(rec, decoded[rec.path])
    try:
        ds = pydicom.dcmread(rec.path)
    except Exception as exc:
        raise StudyError(f"{rec.where}: cannot be read as DICOM, truncated or corrupt "
                         f"({short_error(exc)})") from None
    if "PixelData" not in ds:
        raise StudyError(f"{rec.where}: PixelData (7FE0,0010) is missing — the file holds no image or is "
                         "truncated")
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ""
    ts_name = getattr(ts, "name", "") or "missing"
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise StudyError(f"{rec.where}: cannot decode the pixel data of transfer syntax {ts_name} ({ts}); "
                         f"install a decoder (e.g. pylibjpeg) or export uncompressed "
                         f"({short_error(exc)})") from None
    if rec.frame_index is not None:
        if decoded is not None:
            decoded[rec.path] = arr
        return _one_frame(rec, arr)
    if arr.shape != (rec.rows, rec.cols):
        raise StudyError(f"{rec.where}: decoded pixel data has shape {arr.shape}, Rows×Columns say "
                         f"{(rec.rows, rec.cols)}")
    return arr


def _one_frame(rec: FrameRecord, arr: np.ndarray) -> np.ndarray:
    """Frame ``rec.frame_index`` of a decoded multi-frame array ``(frames, rows, cols)``."""
    if arr.ndim == 2 and rec.n_frames == 1:
        arr = arr[None]
    if arr.shape != (rec.n_frames, rec.rows, rec.cols):
        raise StudyError(f"{rec.where}: decoded pixel data has shape {arr.shape}, NumberOfFrames×Rows×Columns say "
                         f"{(rec.n_frames, rec.rows, rec.cols)}")
    return arr[rec.frame_index]


def frame_hu(rec: FrameRecord, decoded: dict[Path, np.ndarray] | None = None) -> np.ndarray:
    """One frame in HU, float32 ``(rows, cols)``: stored values × RescaleSlope + RescaleIntercept.

    Raises:
        StudyError: the pixel data is missing, truncated or undecodable, or the HU are not finite.
    """
    if rec.pixel_error:
        raise StudyError(rec.pixel_error)
    with np.errstate(over="ignore", invalid="ignore"):
        hu = read_pixels(rec, decoded).astype(np.float32) * np.float32(rec.slope) + np.float32(rec.intercept)
    if not np.all(np.isfinite(hu)):
        raise StudyError(f"{rec.where}: NaN or inf HU after rescale (RescaleSlope {rec.slope}, "
                         f"RescaleIntercept {rec.intercept})")
    return hu


def read_frames(grid: list[list[FrameRecord]], on_bad_frame: str, root: Path) -> tuple[np.ndarray, list[dict]]:
    """The pixels of every frame of ``grid`` (``[slice][frame]`` records of one series).

    Returns:
        ``frames`` float32 ``(S, T, H, W)`` HU, and the bad frames as ``{slice, frame, file, error}``
        (always empty with ``on_bad_frame="raise"``; their frames are NaN with ``"nan"``).

    Raises:
        StudyError: the first bad frame (``"raise"``), or when no frame of the series is usable.
    """
    records = [r for sl in grid for r in sl]
    # Pixel problems the indexing pass already found are raised before any memory is set aside.
    first_error = next((r.pixel_error for r in records if r.pixel_error), None)
    if first_error is not None and (on_bad_frame == "raise" or all(r.pixel_error for r in records)):
        raise StudyError(first_error)
    n_s, n_t = len(grid), len(grid[0])
    frames = np.empty((n_s, n_t, grid[0][0].rows, grid[0][0].cols), np.float32)
    bad_frames: list[dict[str, Any]] = []
    decoded: dict[Path, np.ndarray] = {}  # compressed multi-frame files, decoded once each
    for s, sl in enumerate(grid):
        for t, r in enumerate(sl):
            try:
                frames[s, t] = frame_hu(r, decoded)
            except StudyError as exc:
                if on_bad_frame == "raise":
                    raise
                frames[s, t] = np.nan
                bad = {"slice": s, "frame": t, "file": r.rel, "error": str(exc)}
                if r.frame_index is not None:
                    bad["frame_in_file"] = r.frame_index + 1
                bad_frames.append(bad)
    if len(bad_frames) == n_s * n_t:
        raise StudyError(f"{root}: no frame of the series is usable (e.g. {bad_frames[0]['error']})")
    return frames, bad_frames


def validate_study(study: Study) -> Study:
    """``study.validate()``, except that frames listed in ``meta["bad_frames"]`` may be NaN."""
    if study.meta.get("bad_frames"):
        frames = np.asarray(study.frames)
        dataclasses.replace(study, frames=np.where(np.isfinite(frames), frames, np.float32(0))).validate()
        return study
    return study.validate()

