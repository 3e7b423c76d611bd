"""The second source of frames: enhanced multi-frame CT (one file, many frames) → one
:class:`~stm_dlp.data.dicom.record.FrameRecord` per frame.

Enhanced CT Image Storage (``1.2.840.10008.5.1.4.1.1.2.1``, and its Legacy Converted sibling
``…2.2``) puts the frames of all slices and time points in one file — or, as Canon/Toshiba volume
CTP exports, one file per time point. What a classic file says in its header, an enhanced file says
per frame in the *functional groups*: an item of ``PerFrameFunctionalGroupsSequence`` (5200,9230)
per frame, and ``SharedFunctionalGroupsSequence`` (5200,9229) for what all frames share (a macro in
the per-frame item wins over the shared one):

* position: ``PlanePositionSequence`` → ``ImagePositionPatient`` (required for every frame);
* orientation: ``PlaneOrientationSequence`` → ``ImageOrientationPatient``;
* spacing: ``PixelMeasuresSequence`` → ``PixelSpacing``, ``SliceThickness``, ``SpacingBetweenSlices``;
* rescale: ``PixelValueTransformationSequence`` → ``RescaleSlope`` / ``RescaleIntercept`` (else the
  file-level values, else 1 / 0);
* time: ``FrameContentSequence`` → ``FrameAcquisitionDateTime``, ``FrameReferenceDateTime`` and
  ``TemporalPositionIndex``; ``TemporalPositionSequence`` → ``TemporalPositionTimeOffset`` (s). Which
  of them orders the frames is decided with the other time tags in :mod:`.times`;
  ``TemporalPositionIndex`` is only a consistency check (Canon writes 1 in every file).

Frames may be stored in any order. The pixel bytes of frame ``i`` of a natively encoded file start
``i`` frames after the start of ``PixelData``; compressed files are decoded once per file
(:func:`~stm_dlp.data.dicom.pixels.read_frames`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pydicom
from pydicom.sequence import Sequence

from stm_dlp.data.dicom.record import FrameRecord, short_error
from stm_dlp.types import StudyError

#: SOP classes whose frames are described by functional groups.
ENHANCED_CT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
#: Per-frame time tags an enhanced frame can carry (kept in :attr:`FrameRecord.tags`).
PER_FRAME_TIME_TAGS = ("FrameAcquisitionDateTime", "FrameReferenceDateTime", "TemporalPositionTimeOffset")


def is_enhanced(ds: pydicom.Dataset, sop_class: str) -> bool:
    """True for a file whose frames are described by per-frame functional groups."""
    return sop_class in ENHANCED_CT_SOP_CLASSES or "PerFrameFunctionalGroupsSequence" in ds


def _items(ds: pydicom.Dataset, keyword: str, where: str) -> list[pydicom.Dataset]:
    """The items of sequence ``keyword`` of ``ds`` (empty when absent)."""
    try:
        seq = ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - a corrupt sequence raises many kinds
        raise StudyError(f"{where}: {keyword} cannot be parsed ({short_error(exc)})") from None
    if seq is None:
        return []
    if not isinstance(seq, Sequence):
        raise StudyError(f"{where}: {keyword} is not a sequence (file corrupt?)")
    return list(seq)


def _macro(frame: pydicom.Dataset, shared: pydicom.Dataset | None, keyword: str, where: str) -> Any:
    """The first item of functional-group macro ``keyword``: the frame's own, else the shared one."""
    for group in (frame, shared):
        if group is None:
            continue
        items = _items(group, keyword, where)
        if items:
            return items[0]
    return None


def _binary_float(item: pydicom.Dataset, keyword: str, where: str) -> float | None:
    """A binary FD/FL value (pydicom converts it), or None when absent."""
    try:
        value = item.get(keyword)
        if value is None or value == "":
            return None
        out = float(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)
    except Exception as exc:  # noqa: BLE001 - wrong length, wrong VR, ...
        raise StudyError(f"{where}: {keyword} cannot be read as a number ({short_error(exc)})") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise StudyError(f"{where}: {keyword} is not finite ({out})")
    return out


def expand_enhanced(base: FrameRecord, ds: pydicom.Dataset) -> list[FrameRecord]:
    """One record per frame of the enhanced file ``base`` describes (``ds`` read without pixels).

    Args:
        base: the record :func:`~stm_dlp.data.dicom.index.index_file` made from the file-level header
            (its ``pixel_offset`` / ``pixel_length`` span the whole ``PixelData``).
        ds: the file's dataset (``stop_before_pixels``).

    Raises:
        StudyError: naming the file, the frame and the tag — the functional groups do not match
            ``NumberOfFrames``, a frame has no position or orientation, or a value is malformed.
    """
    from stm_dlp.data.dicom.index import Header  # the raw-value reader (index imports this module)

    path = base.path
    n = base.n_frames
    if n < 1:
        raise StudyError(f"{path}: NumberOfFrames is {n}; an enhanced image needs at least one frame")
    per_frame = _items(ds, "PerFrameFunctionalGroupsSequence", str(path))
    if len(per_frame) != n:
        raise StudyError(f"{path}: PerFrameFunctionalGroupsSequence (5200,9230) has {len(per_frame)} items but "
                         f"NumberOfFrames is {n}; every frame needs its functional groups (file truncated?)")
    shared_items = _items(ds, "SharedFunctionalGroupsSequence", str(path))
    shared = shared_items[0] if shared_items else None

    frame_bytes = None
    if base.pixel_offset is not None and base.pixel_length is not None and base.pixel_length != 0xFFFFFFFF:
        from stm_dlp.data.dicom.pixels import native_dtype

        frame_bytes = base.rows * base.cols * native_dtype(base).itemsize
    out = []
    for i, item in enumerate(per_frame):
        where = f"{path} (frame {i + 1})"
        pos = _macro(item, shared, "PlanePositionSequence", where)
        ipp = Header(pos, where).floats("ImagePositionPatient", 3) if pos is not None else None  # type: ignore[arg-type]
        if ipp is None:
            raise StudyError(f"{where}: no ImagePositionPatient in PlanePositionSequence (0020,9113) of the "
                             "per-frame or shared functional groups; cannot tell which slice the frame is")
        ori = _macro(item, shared, "PlaneOrientationSequence", where)
        iop = Header(ori, where).floats("ImageOrientationPatient", 6) if ori is not None else None  # type: ignore[arg-type]
        if iop is None:
            raise StudyError(f"{where}: no ImageOrientationPatient in PlaneOrientationSequence (0020,9116) of "
                             "the per-frame or shared functional groups")
        meas = _macro(item, shared, "PixelMeasuresSequence", where)
        spacing, slice_spacing = base.pixel_spacing, base.slice_spacing
        if meas is not None:
            hm = Header(meas, where)  # type: ignore[arg-type]
            ps = hm.floats("PixelSpacing", 2)
            if ps is not None:
                spacing = (float(ps[0]), float(ps[1]))
            slice_spacing = hm.number("SpacingBetweenSlices") or hm.number("SliceThickness") or slice_spacing
        slope, intercept = base.slope, base.intercept
        pvt = _macro(item, shared, "PixelValueTransformationSequence", where)
        if pvt is not None:
            hp = Header(pvt, where)  # type: ignore[arg-type]
            slope = float(hp.number("RescaleSlope", slope))  # type: ignore[arg-type]
            intercept = float(hp.number("RescaleIntercept", intercept))  # type: ignore[arg-type]
        tags = dict(base.tags)  # file-level times (one value per file) come along
        temporal_index = None
        content = _items(item, "FrameContentSequence", where)
        if content:
            hc = Header(content[0], where)  # type: ignore[arg-type]
            for key in ("FrameAcquisitionDateTime", "FrameReferenceDateTime"):
                if (value := hc.text(key)) is not None:
                    tags[key] = value
            temporal_index = hc.integer("TemporalPositionIndex")
        tpos = _macro(item, shared, "TemporalPositionSequence", where)
        if tpos is not None:
            offset = _binary_float(tpos, "TemporalPositionTimeOffset", where)
            if offset is not None:
                tags["TemporalPositionTimeOffset"] = repr(offset)
        rec = dataclasses.replace(
            base, ipp=ipp, iop=iop, pixel_spacing=spacing, slice_spacing=slice_spacing, slope=slope,
            intercept=intercept, tags=tags, frame_index=i, temporal_index=temporal_index,
            extra=dict(base.extra))
        if frame_bytes is not None:
            start = i * frame_bytes
            if start + frame_bytes > base.pixel_length:  # type: ignore[operator]
                rec.pixel_offset = rec.pixel_length = None
                rec.has_pixels = False
                rec.pixel_error = (f"{where}: PixelData (7FE0,0010) has {base.pixel_length} bytes, but NumberOfFrames "
                                   f"× Rows × Columns = {n} × {base.rows} × {base.cols} at {base.bits_allocated} "
                                   f"bits need {n * frame_bytes} (truncated?)")
            else:
                rec.pixel_offset = base.pixel_offset + start  # type: ignore[operator]
                rec.pixel_length = frame_bytes
        out.append(rec)
    return out
