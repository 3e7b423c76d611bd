"""Write a :class:`~stm_dlp.types.Study` as CT DICOM the way scanners export perfusion.

Used by ``python -m stm_dlp.synth`` and the tests to put the phantom on disk exactly as a scanner
export looks, so the DICOM reader is tested against known truth. Geometry is derived from
``study.affine`` (the inverse of :func:`stm_dlp.geometry.affine_from_dicom_geometry`), so reading the
files back gives the same affine; HU are stored as int16 with a rescale chosen for <= 0.5 HU
round-trip error. The layouts:

* :func:`write_study_dicom` — classic CT Image Storage, one file per slice per frame, one series; or
  (``series_per_time_point=True``) one series per time point, as some scanners export each volume.
* :func:`write_study_enhanced` — Enhanced CT Image Storage (multi-frame): every frame in one file,
  or one file per time point (Canon/Toshiba volume CTP); frames in shuffled order, per-frame times in
  ``FrameContentSequence``, optionally ``TemporalPositionIndex`` = 1 in every file as Canon writes it.
* :func:`shuttle_study` — a shuttle (jog) mode acquisition from a phantom study: the table moves
  between slabs, so each slab has its own frame times (per-slice ``times_s``); both writers keep
  per-slice times as they are.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from stm_dlp.geometry import LPS_TO_RAS
from stm_dlp.types import Study

#: CT Image Storage.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The vendor styles of frame timing that :func:`write_study_dicom` can imitate.
TIME_STYLES: tuple[str, ...] = ("acquisition_time", "content_trigger", "acquisition_datetime", "midnight")
#: Enhanced CT Image Storage (multi-frame).
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
#: pydicom's UID root (valid, registered for pydicom-generated UIDs).
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."


def geometry_from_affine(affine: np.ndarray, n_slices: int) -> dict[str, Any]:
    """DICOM geometry of each slice for a NIfTI (RAS+) affine of a ``[c, r, s]`` volume.

    Inverse of :func:`stm_dlp.geometry.affine_from_dicom_geometry`.

    Returns:
        ``orientation`` (6,) ImageOrientationPatient, ``pixel_spacing`` (row, column) mm,
        ``positions`` (S, 3) ImagePositionPatient in LPS mm, ``normal`` (3,), ``slice_step`` (3,) mm
        and ``slice_thickness`` (mm, the step's length along the normal).
    """
    lps = LPS_TO_RAS @ np.asarray(affine, np.float64)  # LPS_TO_RAS is its own inverse
    col_vec, row_vec, step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dc, dr = float(np.linalg.norm(col_vec)), float(np.linalg.norm(row_vec))
    if dc <= 0 or dr <= 0:
        raise ValueError(f"affine has a zero in-plane axis: {affine.tolist()}")
    row_cos, col_cos = col_vec / dc, row_vec / dr
    normal = np.cross(row_cos, col_cos)
    positions = lps[:3, 3][None, :] + np.arange(n_slices)[:, None] * step[None, :]
    thickness = abs(float(step @ normal)) or 1.0
    return dict(orientation=np.concatenate([row_cos, col_cos]), pixel_spacing=(dr, dc), positions=positions,
                normal=normal, slice_step=step, slice_thickness=thickness)


def choose_rescale(frames_hu: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` so int16 storage holds every HU value with <= slope / 2 error.

    Slope 1, intercept -1024 (the CT convention) when the range fits; otherwise a slope just
    large enough to fit the range (then the error is slope / 2 HU).
    """
    lo, hi = float(np.min(frames_hu)), float(np.max(frames_hu))
    if lo + 1024 >= -32768 and hi + 1024 <= 32767:
        return 1.0, -1024.0
    slope = float(np.ceil((hi - lo) / 65000.0 * 1000.0) / 1000.0)
    return slope, float(np.round((hi + lo) / 2.0))


def _ds(x: float) -> str:
    return format_number_as_ds(float(x)) if x != 0 else "0"


def _tm(seconds_of_day: float) -> str:
    us = int(round(seconds_of_day * 1e6))
    h, rest = divmod(us, 3_600_000_000)
    m, rest = divmod(rest, 60_000_000)
    s, frac = divmod(rest, 1_000_000)
    return f"{h:02d}{m:02d}{s:02d}.{frac:06d}"


def _split(when: dt.datetime) -> tuple[str, str]:
    """``(DA, TM)`` strings of a datetime (microsecond precision)."""
    sod = when.hour * 3600 + when.minute * 60 + when.second + when.microsecond / 1e6
    return when.strftime("%Y%m%d"), _tm(sod)


def _uid_maker(uid_root: str, seed: int | None, patient_id: str, *salt: str) -> Any:
    """``uid(*parts)``: a fresh random UID, or with a ``seed`` one derived from the seed, the patient, the
    writer's ``salt`` and ``parts`` (reproducible files, distinct UIDs per writer)."""
    def uid(*parts: Any) -> str:
        if seed is None:
            return str(generate_uid(prefix=uid_root))
        return str(generate_uid(prefix=uid_root, entropy_srcs=[str(seed), patient_id, *salt, *map(str, parts)]))

    return uid


def _identity(ds: Any, series_description: str, patient_name: str, patient_id: str, birth_date: str,
              accession_number: str) -> None:
    """The patient, study-context and equipment tags every series the phantom writers produce carries."""
    ds.Modality = "CT"
    ds.Manufacturer = "STM-DLP"
    ds.ManufacturerModelName = "digital phantom"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = accession_number
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"


def write_study_dicom(
    study: Study,
    out_dir: str | Path,
    *,
    time_style: str = "acquisition_time",
    patient_name: str = "ANONYMOUS",
    patient_id: str = "ANONYMOUS",
    patient_birth_date: str = "",
    accession_number: str = "",
    seed: int | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
    series_description: str = "CT PERFUSION (STM-DLP phantom)",
    series_per_time_point: bool = False,
) -> list[list[Path]]:
    """Write ``study`` as one CT Image Storage series under ``out_dir``.

    Layout: ``out_dir/<series folder>/[partN/]IM_xxxxx.dcm`` with random-ish names and a shuffled
    write order, so a reader cannot rely on names or order. Explicit VR Little Endian, full file
    meta, int16 pixels with RescaleSlope/Intercept (see :func:`choose_rescale`), geometry from
    ``study.affine`` (see :func:`geometry_from_affine`). With ``series_per_time_point`` every time
    point (frame index) is its own series (own SeriesInstanceUID, SeriesNumber and folder), with the
    same StudyInstanceUID and FrameOfReferenceUID.

    Args:
        study: frames ``(S, T, H, W)`` HU, times_s ``(S, T)`` s, affine ``(4, 4)``.
        out_dir: folder to write into (created).
        time_style: how frame times are encoded, one of :data:`TIME_STYLES`:
            ``acquisition_time`` (AcquisitionDate + AcquisitionTime),
            ``content_trigger`` (ContentDate/ContentTime fixed at series start + TriggerTime in ms),
            ``acquisition_datetime`` (AcquisitionDateTime),
            ``midnight`` (AcquisitionTime only, series starting just before 00:00 so it crosses it).
        patient_name, patient_id, patient_birth_date, accession_number: the PHI written into every file
            (nothing else identifies anyone).
        seed: makes file names, start time and UIDs reproducible; ``None`` → fresh random.
        uid_root: UID prefix (must end with ``.``).
        series_description: SeriesDescription.

    Returns:
        The written paths as ``[slice][frame]`` lists.
    """
    if time_style not in TIME_STYLES:
        raise ValueError(f"time_style must be one of {TIME_STYLES}, got {time_style!r}")
    frames = np.asarray(study.frames)
    if frames.ndim != 4:
        raise ValueError(f"study.frames must be (S, T, H, W), got {frames.shape}")
    if not np.all(np.isfinite(frames)):
        raise ValueError(f"{study.source or study.patient_id}: frames contain NaN or inf; cannot write DICOM")
    n_s, n_t, h, w = frames.shape
    times = np.asarray(study.times_s, np.float64)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)

    uid = _uid_maker(uid_root, seed, patient_id)

    study_uid, series_uid, for_uid = uid("study"), uid("series"), uid("frame-of-reference")
    geo = geometry_from_affine(study.affine, n_s)
    slope, intercept = choose_rescale(frames)
    span = float(times.max() - times.min()) if times.size else 0.0
    day = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 1500)))
    if time_style == "midnight":
        before = min(30.0, 0.5 * span) if span > 0 else 30.0
        start = dt.datetime.combine(day, dt.time()) + dt.timedelta(days=1) - dt.timedelta(seconds=before)
    else:
        start = dt.datetime.combine(day, dt.time()) + dt.timedelta(
            seconds=float(rng.uniform(8 * 3600, 17 * 3600)))
        start = start.replace(microsecond=int(rng.integers(0, 1_000_000)))
    t0 = float(times.min())
    start_da, start_tm = _split(start)

    series_dir = out_dir / f"SE{rng.integers(0, 16**6):06x}"
    names = rng.permutation(np.arange(10000, 100000))[: n_s * n_t]
    subdirs = rng.integers(0, 3, size=n_s * n_t)
    if series_per_time_point:  # one folder per series, as PACS exports put them
        paths = [[series_dir.with_name(f"{series_dir.name}_T{t + 1:03d}") / f"IM_{names[s * n_t + t]:05d}.dcm"
                  for t in range(n_t)] for s in range(n_s)]
    else:
        paths = [[series_dir / (f"part{subdirs[s * n_t + t]}" if subdirs[s * n_t + t] else "")
                  / f"IM_{names[s * n_t + t]:05d}.dcm" for t in range(n_t)] for s in range(n_s)]
    for p in {q.parent for row in paths for q in row}:
        p.mkdir(parents=True, exist_ok=True)

    orientation = [_ds(v) for v in geo["orientation"]]
    spacing = [_ds(v) for v in geo["pixel_spacing"]]
    order = rng.permutation(n_s * n_t)
    for k in order:
        s, t = divmod(int(k), n_t)
        when = start + dt.timedelta(seconds=float(times[s, t] - t0))
        sop_uid = uid("image", s, t)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate, ds.StudyTime = start_da, start_tm
        ds.SeriesDate, ds.SeriesTime = start_da, start_tm
        if time_style == "acquisition_time":
            ds.AcquisitionDate, ds.AcquisitionTime = _split(when)
        elif time_style == "content_trigger":
            ds.ContentDate, ds.ContentTime = start_da, start_tm
            ds.TriggerTime = f"{(when - start).total_seconds() * 1000.0:.3f}"
        elif time_style == "acquisition_datetime":
            da, tm = _split(when)
            ds.AcquisitionDateTime = da + tm
        else:  # midnight: time of day only
            ds.AcquisitionTime = _split(when)[1]
        _identity(ds, series_description, patient_name, patient_id, patient_birth_date, accession_number)
        ds.KVP = "80"
        ds.SliceThickness = _ds(geo["slice_thickness"])
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = uid("series", t) if series_per_time_point else series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 100 + t if series_per_time_point else 4
        ds.AcquisitionNumber = t + 1
        ds.InstanceNumber = t * n_s + s + 1
        pos = geo["positions"][s]
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = orientation
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(pos @ geo["normal"]))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = h, w
        ds.PixelSpacing = spacing
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.WindowCenter, ds.WindowWidth = "40", "80"
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "HU"
        stored = np.round((frames[s, t].astype(np.float64) - intercept) / slope)
        ds.PixelData = np.clip(stored, -32768, 32767).astype("<i2").tobytes()
        pydicom.dcmwrite(paths[s][t], ds, enforce_file_format=True)
    return paths


def _seq(**fields: Any) -> pydicom.Sequence:
    """A one-item sequence with ``fields`` (a functional-group macro)."""
    item = pydicom.Dataset()
    for key, value in fields.items():
        setattr(item, key, value)
    return pydicom.Sequence([item])


def write_study_enhanced(
    study: Study,
    out_dir: str | Path,
    *,
    files: str = "single",
    series_per_file: bool = False,
    temporal_position_index: str = "per_time",
    time_tags: tuple[str, ...] = ("FrameAcquisitionDateTime", "FrameReferenceDateTime"),
    patient_name: str = "ANONYMOUS",
    patient_id: str = "ANONYMOUS",
    seed: int | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
    series_description: str = "CT PERFUSION (STM-DLP phantom, enhanced)",
) -> list[Path]:
    """Write ``study`` as Enhanced CT Image Storage (multi-frame) under ``out_dir``.

    Every frame is described by its per-frame functional groups — ``PlanePositionSequence``
    (ImagePositionPatient), ``FrameContentSequence`` (the ``time_tags`` of the frame, TemporalPositionIndex,
    StackID / InStackPositionNumber, DimensionIndexValues) and ``CTImageFrameTypeSequence`` — and the
    shared ones hold orientation, pixel spacing, rescale and window. Frames are stored in a shuffled
    order, so a reader cannot rely on it; pixels are int16 as in :func:`write_study_dicom`.

    Args:
        study: frames ``(S, T, H, W)`` HU, times_s ``(S, T)`` s (per slice: shuttle mode is kept), affine.
        out_dir: folder to write into (created).
        files: ``single`` (all S×T frames in one file) or ``per_time_point`` (T files of S frames each,
            as Canon/Toshiba volume CTP is exported).
        series_per_file: with ``per_time_point``, give every file its own SeriesInstanceUID.
        temporal_position_index: ``per_time`` (t + 1), ``constant`` (1 in every frame: the Canon quirk)
            or ``none`` (not written).
        time_tags: the per-frame time tags to write (any of FrameAcquisitionDateTime,
            FrameReferenceDateTime, TemporalPositionTimeOffset); ``()`` writes none (a broken file).
        patient_name, patient_id: the PHI written into every file.
        seed: makes names, start time and UIDs reproducible.
        uid_root, series_description: as in :func:`write_study_dicom`.

    Returns:
        The written files (one, or one per time point in time order).
    """
    if files not in ("single", "per_time_point"):
        raise ValueError(f"files must be single or per_time_point, got {files!r}")
    if temporal_position_index not in ("per_time", "constant", "none"):
        raise ValueError(f"temporal_position_index must be per_time, constant or none, got {temporal_position_index!r}")
    bad_tags = set(time_tags) - {"FrameAcquisitionDateTime", "FrameReferenceDateTime", "TemporalPositionTimeOffset"}
    if bad_tags:
        raise ValueError(f"unknown per-frame time tags {sorted(bad_tags)}")
    frames = np.asarray(study.frames)
    if frames.ndim != 4 or not np.all(np.isfinite(frames)):
        raise ValueError(f"{study.source or study.patient_id}: frames must be finite (S, T, H, W), got {frames.shape}")
    n_s, n_t, h, w = frames.shape
    times = np.asarray(study.times_s, np.float64)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)

    uid = _uid_maker(uid_root, seed, patient_id, "enhanced")

    study_uid, for_uid = uid("study"), uid("frame-of-reference")
    geo = geometry_from_affine(study.affine, n_s)
    slope, intercept = choose_rescale(frames)
    day = dt.date(2020, 1, 1) + dt.timedelta(days=int(rng.integers(0, 1500)))
    start = dt.datetime.combine(day, dt.time()) + dt.timedelta(seconds=float(rng.uniform(8 * 3600, 17 * 3600)))
    start = start.replace(microsecond=int(rng.integers(0, 1_000_000)))
    t0 = float(times.min())
    start_da, start_tm = _split(start)
    series_dir = out_dir / f"SE{rng.integers(0, 16**6):06x}"
    series_dir.mkdir(parents=True, exist_ok=True)
    groups = [[(s, t) for s in range(n_s) for t in range(n_t)]] if files == "single" else \
        [[(s, t) for s in range(n_s)] for t in range(n_t)]
    names = rng.permutation(np.arange(10000, 100000))[: len(groups)]
    paths = []
    for g, members in enumerate(groups):
        members = [members[i] for i in rng.permutation(len(members))]  # frames in any order
        sop_uid = uid("image", g)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ENHANCED_CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate, ds.StudyTime = start_da, start_tm
        ds.SeriesDate, ds.SeriesTime = start_da, start_tm
        ds.ContentDate, ds.ContentTime = start_da, start_tm
        first_when = start + dt.timedelta(seconds=float(min(times[s, t] for s, t in members) - t0))
        ds.AcquisitionDateTime = "".join(_split(first_when))
        _identity(ds, series_description, patient_name, patient_id, "", "")
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = uid("series", g) if series_per_file else uid("series")
        ds.StudyID = "1"
        ds.SeriesNumber = 200 + g if series_per_file else 5
        ds.InstanceNumber = g + 1
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ContentQualification = "RESEARCH"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.PresentationLUTShape = "IDENTITY"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = h, w
        ds.NumberOfFrames = len(members)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        dim_org = uid("dimension-organization")
        ds.DimensionOrganizationSequence = _seq(DimensionOrganizationUID=dim_org)
        dims = pydicom.Sequence()
        for pointer, group in (("TemporalPositionIndex", "FrameContentSequence"),
                               ("InStackPositionNumber", "FrameContentSequence")):
            item = pydicom.Dataset()
            item.DimensionOrganizationUID = dim_org
            item.DimensionIndexPointer = pydicom.datadict.tag_for_keyword(pointer)
            item.FunctionalGroupPointer = pydicom.datadict.tag_for_keyword(group)
            dims.append(item)
        ds.DimensionIndexSequence = dims
        shared = pydicom.Dataset()
        shared.PixelMeasuresSequence = _seq(PixelSpacing=[_ds(v) for v in geo["pixel_spacing"]],
                                            SliceThickness=_ds(geo["slice_thickness"]),
                                            SpacingBetweenSlices=_ds(geo["slice_thickness"]))
        shared.PlaneOrientationSequence = _seq(ImageOrientationPatient=[_ds(v) for v in geo["orientation"]])
        shared.PixelValueTransformationSequence = _seq(RescaleIntercept=_ds(intercept), RescaleSlope=_ds(slope),
                                                       RescaleType="HU")
        shared.FrameVOILUTSequence = _seq(WindowCenter="40", WindowWidth="80")
        ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
        per_frame = pydicom.Sequence()
        pixels = np.empty((len(members), h, w), "<i2")
        for k, (s, t) in enumerate(members):
            when = start + dt.timedelta(seconds=float(times[s, t] - t0))
            stamp = "".join(_split(when))
            item = pydicom.Dataset()
            content = pydicom.Dataset()
            if "FrameAcquisitionDateTime" in time_tags:
                content.FrameAcquisitionDateTime = stamp
            if "FrameReferenceDateTime" in time_tags:
                content.FrameReferenceDateTime = stamp
            content.FrameAcquisitionNumber = t + 1
            if temporal_position_index != "none":
                content.TemporalPositionIndex = t + 1 if temporal_position_index == "per_time" else 1
            content.StackID = "1"
            content.InStackPositionNumber = s + 1
            content.DimensionIndexValues = [t + 1 if temporal_position_index == "per_time" else 1, s + 1]
            item.FrameContentSequence = pydicom.Sequence([content])
            item.PlanePositionSequence = _seq(ImagePositionPatient=[_ds(v) for v in geo["positions"][s]])
            item.CTImageFrameTypeSequence = _seq(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])
            if "TemporalPositionTimeOffset" in time_tags:
                item.TemporalPositionSequence = _seq(TemporalPositionTimeOffset=float(times[s, t] - t0))
            per_frame.append(item)
            stored = np.round((frames[s, t].astype(np.float64) - intercept) / slope)
            pixels[k] = np.clip(stored, -32768, 32767)
        ds.PerFrameFunctionalGroupsSequence = per_frame
        ds.PixelData = pixels.tobytes()
        path = series_dir / f"EN_{names[g]:05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def shuttle_study(study: Study, positions: int = 2) -> Study:
    """A shuttle (jog) mode acquisition made from ``study``: the table moves between ``positions``
    slabs of adjacent slices, so slab ``k`` is imaged at frames ``k, k + positions, k + 2·positions, …``
    of ``study``. Each slice keeps exactly its frames and their times — per-slice ``times_s`` —
    and ``maps``/``mask`` stay the truth (the physiology did not change).

    Args:
        study: frames ``(S, T, H, W)`` with ``T >= 2 * positions`` and ``S >= positions``.
        positions: number of table positions (slabs).

    Returns:
        A study with ``T // positions`` frames per slice; ``meta["shuttle_positions"]`` and
        ``meta["shuttle_slab"]`` (slab of each slice) say how it was made.
    """
    s_count, t_count = study.n_slices, study.n_frames
    if positions < 2 or s_count < positions or t_count < 2 * positions:
        raise ValueError(f"shuttle mode needs 2 <= positions <= slices and >= 2 frames per position, got "
                         f"positions={positions} for {s_count} slices × {t_count} frames")
    n_t = t_count // positions
    slab = (np.arange(s_count) * positions) // s_count  # adjacent slices share a table position
    frames = np.stack([study.frames[s, slab[s]::positions][:n_t] for s in range(s_count)])
    times = np.stack([study.times_s[s, slab[s]::positions][:n_t] for s in range(s_count)])
    meta = dict(study.meta)
    for key, value in study.meta.items():  # per-slice curves (e.g. the phantom's true AIF) follow the frames
        if isinstance(value, np.ndarray) and value.shape[:2] == (s_count, t_count):
            meta[key] = np.stack([value[s, slab[s]::positions][:n_t] for s in range(s_count)])
    return Study(frames=np.ascontiguousarray(frames, np.float32), times_s=np.ascontiguousarray(times, np.float32),
                 affine=study.affine, maps=study.maps, mask=study.mask, patient_id=study.patient_id,
                 source=study.source, meta={**meta, "shuttle_positions": positions, "shuttle_slab": slab.tolist()})
