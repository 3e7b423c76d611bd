"""From records to a ``[slice][frame]`` grid: one acquisition, one geometry, slices along the normal,
frames in time order, the same number of frames in every slice — and the grid's place in space.

A study is one series, or — :func:`select_series` — *one series per time point*: several
SeriesInstanceUIDs with the same StudyInstanceUID and FrameOfReferenceUID, each a single volume
(one image per slice position) of the same geometry (Rows×Columns, ImageOrientationPatient,
PixelSpacing, slice positions) and ImageType. Those are combined into one study and ordered by
acquisition time like the frames of one series. Anything else with more than one series (a CTA
beside the CTP, two perfusion series, per-volume series whose geometry differs) is an error naming
both series. :func:`arrange_frames` does not care which series or file a record came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stm_dlp.data.dicom.pseudonym import hash_uid
from stm_dlp.data.dicom.record import FrameRecord
from stm_dlp.data.dicom.times import DUP_TIME_S, frame_times
from stm_dlp.geometry import affine_from_dicom_geometry
from stm_dlp.types import StudyError

#: Slice positions (mm along the normal) closer than this are the same slice.
SLICE_TOL_MM = 0.05
#: What :func:`select_series` reports in ``meta["series_layout"]``.
SERIES_LAYOUTS = ("one series", "one series per time point")


def _describe(uid: str, rs: list[FrameRecord]) -> str:
    n = len({r.path for r in rs})
    return f"series {hash_uid(uid)} ({n} file{'' if n == 1 else 's'}, e.g. {rs[0].path})"


def _single_volume(rs: list[FrameRecord]) -> bool:
    """True when no two images of ``rs`` share a slice position (one volume at one time)."""
    try:
        positions, _, _ = slice_positions(rs)
    except StudyError:
        return False
    return all(len(g) == 1 for g in group_slices(positions))


def _per_volume_mismatch(by_series: dict[str, list[FrameRecord]]) -> str | None:
    """What differs between single-volume series that should be the time points of one acquisition
    (the tag and both values), or None when they match."""
    (uid0, ref), *others = list(by_series.items())
    p0 = np.sort(slice_positions(ref)[0])
    for uid, rs in others:
        a, b = ref[0], rs[0]
        checks = [
            ("Rows/Columns", f"{a.rows}×{a.cols}", f"{b.rows}×{b.cols}", (a.rows, a.cols) == (b.rows, b.cols)),
            ("ImageOrientationPatient", a.iop, b.iop, a.iop is None and b.iop is None or (
                a.iop is not None and b.iop is not None and float(np.max(np.abs(a.iop - b.iop))) <= 1e-4)),
            ("PixelSpacing", a.pixel_spacing, b.pixel_spacing, a.pixel_spacing == b.pixel_spacing or (
                a.pixel_spacing is not None and b.pixel_spacing is not None
                and float(np.max(np.abs(np.subtract(a.pixel_spacing, b.pixel_spacing)))) <= 1e-4)),
            ("ImageType", a.image_type, b.image_type, a.image_type == b.image_type),
        ]
        for tag, va, vb, same in checks:
            if not same:
                return (f"{_describe(uid0, ref)} and {_describe(uid, rs)} look like one series per time point (same "
                        f"StudyInstanceUID and FrameOfReferenceUID, one volume each) but their {tag} differs "
                        f"({va} vs {vb})")
        p1 = np.sort(slice_positions(rs)[0])
        if p1.shape != p0.shape or float(np.max(np.abs(p1 - p0))) > SLICE_TOL_MM:
            return (f"{_describe(uid0, ref)} and {_describe(uid, rs)} look like one series per time point (same "
                    "StudyInstanceUID and FrameOfReferenceUID, one volume each) but their slice positions "
                    f"(ImagePositionPatient) differ ({p0.size} slices at {np.round(p0, 2).tolist()[:6]} mm vs "
                    f"{p1.size} at {np.round(p1, 2).tolist()[:6]} mm)")
    return None


def select_series(recs: list[FrameRecord], root: Path) -> tuple[list[FrameRecord], str]:
    """The records of the one acquisition in ``root`` and its layout (one of :data:`SERIES_LAYOUTS`).

    Raises:
        StudyError: more than one series that are not the time points of one acquisition (both
            named), or per-volume series whose geometry differs (both named, and the tag).
    """
    by_series: dict[str, list[FrameRecord]] = {}
    for r in recs:
        by_series.setdefault(r.series_uid, []).append(r)
    if len(by_series) == 1:
        return recs, SERIES_LAYOUTS[0]
    groups = list(by_series.values())
    same_study = len({rs[0].study_uid for rs in groups}) == 1 and all(
        len({r.study_uid for r in rs}) == 1 for rs in groups)
    same_for = len({r.frame_of_reference_uid for rs in groups for r in rs}) == 1
    if same_study and same_for and all(_single_volume(rs) for rs in groups):
        problem = _per_volume_mismatch(by_series)
        if problem is not None:
            raise StudyError(f"{root}: {problem}; a folder must hold one perfusion acquisition — put each series "
                             "in its own folder")
        return [r for rs in groups for r in rs], SERIES_LAYOUTS[1]
    parts = [_describe(uid, rs) for uid, rs in by_series.items()]
    raise StudyError(f"{root}: more than one CT series with pixel data (SeriesInstanceUID): "
                     + "; ".join(parts) + ". Put each series in its own folder.")


def check_consistent(recs: list[FrameRecord]) -> None:
    """Refuse a series that mixes image sizes, orientations, pixel spacings or patients, repeats an
    image (SOPInstanceUID), or holds multi-frame or multi-sample images."""
    first = recs[0]
    sizes: dict[tuple[int, int], int] = {}
    for r in recs:
        sizes[(r.rows, r.cols)] = sizes.get((r.rows, r.cols), 0) + 1
    if len(sizes) > 1:
        common = max(sizes, key=lambda k: sizes[k])
        odd = next(r for r in recs if (r.rows, r.cols) != common)
        raise StudyError(f"{odd.path}: Rows/Columns {odd.rows}×{odd.cols} differ from the "
                         f"{common[0]}×{common[1]} of the other files in the series")
    seen: dict[tuple[str, int | None], FrameRecord] = {}
    patients: dict[str, FrameRecord] = {}
    for r in recs:
        key = (r.sop_uid, r.frame_index)  # the frames of one enhanced file share its SOPInstanceUID
        if key in seen:
            raise StudyError(f"{r.where}: duplicate SOPInstanceUID — the same image as "
                             f"{seen[key].where}; remove one copy")
        seen[key] = r
        patients.setdefault(r.patient, r)
        if r.n_frames != 1 and r.frame_index is None:  # enhanced files give one record per frame
            raise StudyError(f"{r.path}: NumberOfFrames is {r.n_frames} but the file has no per-frame functional "
                             "groups (PerFrameFunctionalGroupsSequence); a multi-frame CT must be Enhanced CT — or "
                             "export one file per image")
        if r.samples != 1:
            raise StudyError(f"{r.path}: SamplesPerPixel is {r.samples}; a CT image has 1 "
                             "(is it a screenshot?)")
        if r.iop is not None and first.iop is not None and np.max(np.abs(r.iop - first.iop)) > 1e-4:
            raise StudyError(f"{r.where}: ImageOrientationPatient differs from {first.where}; the series mixes "
                             "orientations")
        if (r.pixel_spacing is not None and first.pixel_spacing is not None
                and np.max(np.abs(np.subtract(r.pixel_spacing, first.pixel_spacing))) > 1e-4):
            raise StudyError(f"{r.where}: PixelSpacing {r.pixel_spacing} differs from {first.pixel_spacing} "
                             f"of {first.where}")
    if len(patients) > 1:
        a, b = list(patients.values())[:2]
        raise StudyError(f"{a.path} and {b.path}: PatientID differs — the series mixes patients (IDs not "
                         "shown); a study folder must hold one patient's series")


def slice_positions(recs: list[FrameRecord]) -> tuple[np.ndarray, np.ndarray, str]:
    """Position (mm) of every record along the slice normal, the normal, and the tag used."""
    iop = next((r.iop for r in recs if r.iop is not None), None)
    if iop is None:
        normal = np.array([0.0, 0.0, 1.0])
    else:
        normal = np.cross(iop[:3], iop[3:])
        norm = float(np.linalg.norm(normal))
        if norm < 1e-6:
            raise StudyError(f"{recs[0].path}: ImageOrientationPatient rows and columns are parallel")
        normal = normal / norm
    if all(r.ipp is not None for r in recs) and iop is not None:
        if any(r.iop is None for r in recs):
            r = next(r for r in recs if r.iop is None)
            raise StudyError(f"{r.path}: ImageOrientationPatient is missing (other files have it)")
        return np.array([float(r.ipp @ normal) for r in recs]), normal, "ImagePositionPatient"  # type: ignore[operator]
    if all(r.slice_location is not None for r in recs):
        return np.array([float(r.slice_location) for r in recs]), normal, "SliceLocation"  # type: ignore[arg-type]
    r = next(r for r in recs if r.ipp is None or r.iop is None)
    raise StudyError(f"{r.path}: neither ImagePositionPatient/ImageOrientationPatient nor SliceLocation is "
                     "present in every file; cannot tell which slice it is")


def group_slices(positions: np.ndarray) -> list[list[int]]:
    """Indices of ``positions`` (mm) grouped into slices (within :data:`SLICE_TOL_MM`), ascending."""
    order = np.argsort(positions, kind="stable")
    groups: list[list[int]] = []
    last = None
    for i in order:
        if last is None or positions[i] - last > SLICE_TOL_MM:
            groups.append([])
        groups[-1].append(int(i))
        last = positions[i]
    return groups


def _frame_count_error(recs: list[FrameRecord], ordered: list[list[int]], counts: list[int], times: np.ndarray,
                       positions: np.ndarray) -> None:
    """Raise for slices with differing frame counts, naming the odd slice and, if possible, the gap."""
    # the most common count is the reference (ties: the larger, as a lost file is likelier than an extra)
    common = max(set(counts), key=lambda c: (counts.count(c), c))
    k = next(i for i, c in enumerate(counts) if c != common)
    ref = next(i for i, c in enumerate(counts) if c == common)
    odd_t = times[ordered[k]] - times[ordered[k][0]]
    ref_t = times[ordered[ref]] - times[ordered[ref][0]]
    hint = ""
    if counts[k] < common:
        tol = 0.5 * float(np.min(np.diff(ref_t))) if len(ref_t) > 1 else 0.5
        j = next((j for j, t in enumerate(ref_t) if np.min(np.abs(odd_t - t)) > tol), None)
        if j is not None and j > 0:
            before = recs[ordered[k][min(j, len(ordered[k])) - 1]]
            hint = f"; its frame {j} (~{ref_t[j]:.2f} s) is missing, after {before.path.name}"
    example = recs[ordered[k][0]]
    raise StudyError(
        f"{example.path.parent}: slice {k} (position {positions[ordered[k][0]]:.2f} mm, e.g. "
        f"{example.path.name}) has {counts[k]} frames but slice {ref} has {common} (frames per slice: "
        f"{counts}){hint}; every slice must have the same number of frames (a missing or extra file?)")



@dataclass
class FrameGrid:
    """The records of one series arranged ``[slice][frame]``: slices ascending along the normal,
    frames in time order within a slice, every slice with the same number of frames."""

    records: list[list[FrameRecord]]
    times_s: np.ndarray  # (S, T) float64, absolute seconds (from the chosen time tag)
    time_tag: str
    crosses_midnight: bool
    slice_positions_mm: np.ndarray  # (S,) position along the normal of each slice's first frame
    normal: np.ndarray  # (3,) unit slice normal, LPS
    geometry_tag: str  # "ImagePositionPatient" or "SliceLocation"


def arrange_frames(recs: list[FrameRecord], root: Path) -> FrameGrid:
    """Group ``recs`` (one consistent series) into slices, order each slice in time, check the counts.

    Raises:
        StudyError: no slice has two frames (a plain CT), no usable time tag, a duplicate frame
            (same slice and time), or slices with differing numbers of frames.
    """
    positions, normal, geometry_tag = slice_positions(recs)
    slices = group_slices(positions)
    if max(len(sl) for sl in slices) < 2:
        raise StudyError(f"{root}: every slice position has a single image ({len(recs)} files); a perfusion "
                         "series needs several frames per slice (is this a plain CT?)")
    times, time_tag, crossed = frame_times(recs, slices)

    ordered: list[list[int]] = []
    for sl in slices:
        sl = sorted(sl, key=lambda i: (times[i], recs[i].rel))
        for a, b in zip(sl[:-1], sl[1:]):
            if times[b] - times[a] <= DUP_TIME_S:
                raise StudyError(f"{recs[b].where}: duplicate frame — same slice position and same time "
                                 f"({time_tag}) as {recs[a].where}; frame times must increase within a slice")
        ordered.append(sl)
    counts = [len(sl) for sl in ordered]
    if len(set(counts)) > 1:
        _frame_count_error(recs, ordered, counts, times, positions)
    return FrameGrid(
        records=[[recs[i] for i in sl] for sl in ordered],
        times_s=np.array([[times[i] for i in sl] for sl in ordered], np.float64),
        time_tag=time_tag,
        crosses_midnight=crossed,
        slice_positions_mm=np.array([positions[sl[0]] for sl in ordered]),
        normal=normal,
        geometry_tag=geometry_tag,
    )


def study_affine(grid: FrameGrid) -> tuple[np.ndarray, tuple[float, float], list[str]]:
    """NIfTI (RAS+) affine of ``grid`` for arrays in ``(W, H, S)`` order, the pixel spacing used
    (mm, between rows then columns) and notes on what had to be assumed (for warnings and meta)."""
    first = grid.records[0][0]
    n_s = len(grid.records)
    spacing = first.pixel_spacing
    notes = []
    if spacing is None:
        spacing = (1.0, 1.0)
        notes.append("PixelSpacing missing: 1 mm assumed")
    iop = first.iop if first.iop is not None else np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    if first.iop is None:
        notes.append("ImageOrientationPatient missing: axial assumed")
    slice_pos, normal = grid.slice_positions_mm, grid.normal
    if grid.geometry_tag == "ImagePositionPatient":
        origin = first.ipp
        last = grid.records[-1][0].ipp
        step = (last - origin) / (n_s - 1) if n_s > 1 else normal * (first.slice_spacing or 1.0)  # type: ignore[operator]
    else:
        origin = normal * slice_pos[0]
        gap = (slice_pos[-1] - slice_pos[0]) / (n_s - 1) if n_s > 1 else (first.slice_spacing or 1.0)
        step = normal * gap
        notes.append("ImagePositionPatient missing: affine origin from SliceLocation (approximate)")
    if n_s > 2:
        gaps = np.diff(slice_pos)
        if np.max(np.abs(gaps - gaps.mean())) > 0.01 * abs(gaps.mean()) + 0.01:
            notes.append(f"irregular slice spacing {np.round(gaps, 3).tolist()} mm: affine uses the mean")
    affine = affine_from_dicom_geometry(origin, iop, spacing, step)  # type: ignore[arg-type]
    return affine, spacing, notes
