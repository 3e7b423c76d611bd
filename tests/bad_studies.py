"""A corpus of broken studies, built by code from one good synthesized study (no binary blobs).

Each case is a function ``build(workdir) -> BadCase`` that copies the good patient folder
(``<patient>/ctp/`` DICOM + ``<patient>/maps/`` NIfTI truth) and breaks one thing. The reader must
refuse every case with a :class:`~stm_dlp.types.StudyError` whose message names the offending file
(or folder) and says what is wrong (``needles`` are substrings that must all appear, ``keywords``
are alternatives of which one must appear, case-insensitively).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from conftest import tiny_phantom
from pydicom.encaps import encapsulate

from stm_dlp.data.dicom import hash_uid, read_dicom_study
from stm_dlp.data.phantom import simulate_patient
from stm_dlp.io.nifti import nifti_bytes, read_nifti_maps
from stm_dlp.synth import fake_phi, write_patient

#: The good study: tiny, 2 slices, 6 frames, AcquisitionDate+AcquisitionTime style.
GOOD_CFG = tiny_phantom()
PHI = fake_phi(0, 7)  # (PatientName, PatientID) written into the good study


@dataclass
class BadCase:
    """Where to read, with which reader, and what the error message must contain."""

    path: Path
    needles: tuple[str, ...]
    keywords: tuple[str, ...]
    reader: str = "labelled"  # "labelled" (patient folder), "dicom" (ctp folder) or "any" (read_any_study)


def make_good(where: Path, seed: int = 7, style: str = "acquisition_time", index: int = 0) -> Path:
    """Write one good labelled patient to ``where`` (a new folder) and return it."""
    study = simulate_patient(GOOD_CFG, seed)
    name, pid = fake_phi(index, seed)
    return write_patient(where, study, time_style=style, patient_name=name, patient_id=pid, seed=seed)


class Corpus:
    """Builds bad cases from one cached good study (written once per corpus)."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.good = make_good(self.workdir / "good")
        self.files = [[self.good / "ctp" / rel for rel in row]
                      for row in read_dicom_study(self.good / "ctp").meta["files"]]

    @property
    def study(self):
        """The good study in memory (for cases written in another layout)."""
        return simulate_patient(GOOD_CFG, 7)

    def patient(self, name: str, write_ctp: Callable[[Path], object]) -> Path:
        """A labelled patient ``workdir/name`` whose ``ctp/`` is written by ``write_ctp(folder)`` and whose
        ``maps/`` are the good patient's."""
        dst = self.workdir / name
        write_ctp(dst / "ctp")
        shutil.copytree(self.good / "maps", dst / "maps")
        return dst

    def copy(self, name: str) -> tuple[Path, list[list[Path]]]:
        """A fresh copy of the good patient as ``workdir/name`` and its ``[slice][frame]`` files."""
        dst = self.workdir / name
        shutil.copytree(self.good, dst)
        return dst, [[dst / f.relative_to(self.good) for f in row] for row in self.files]


def _edit(path: Path, fn: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path, enforce_file_format=True)


# ------------------------------------------------------------------------------ the cases
def truncated_pixels(c: Corpus) -> BadCase:
    p, f = c.copy("truncated_pixels")
    data = f[0][2].read_bytes()
    f[0][2].write_bytes(data[:-100])  # cut inside the pixel data
    return BadCase(p, (f[0][2].name,), ("truncated",))


def truncated_header(c: Corpus) -> BadCase:
    p, f = c.copy("truncated_header")
    f[1][3].write_bytes(f[1][3].read_bytes()[:420])
    return BadCase(p, (f[1][3].name,), ("truncated",))


def empty_file(c: Corpus) -> BadCase:
    p, f = c.copy("empty_file")
    bad = f[0][0].parent / "IM_00000.dcm"
    bad.write_bytes(b"")
    return BadCase(p, (bad.name,), ("not a dicom", "truncated", "empty"))


def not_dicom(c: Corpus) -> BadCase:
    p, f = c.copy("not_dicom")
    bad = f[0][0].parent / "notes.txt"
    bad.write_text("exported by the PACS on Monday\n")
    return BadCase(p, (bad.name,), ("not a dicom",))


def missing_pixel_data(c: Corpus) -> BadCase:
    p, f = c.copy("missing_pixel_data")
    _edit(f[1][1], lambda ds: delattr(ds, "PixelData"))
    return BadCase(p, (f[1][1].name,), ("pixeldata",))


def no_time_tag(c: Corpus) -> BadCase:
    p, f = c.copy("no_time_tag")

    def strip(ds: pydicom.Dataset) -> None:
        for kw in ("AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime", "AcquisitionDateTime",
                   "TriggerTime"):
            if kw in ds:
                delattr(ds, kw)

    _edit(f[0][4], strip)
    return BadCase(p, (f[0][4].name,), ("time tag",))


def partly_missing_time_tag(c: Corpus) -> BadCase:
    p, f = c.copy("partly_missing_time_tag")
    _edit(f[1][2], lambda ds: delattr(ds, "AcquisitionTime"))  # AcquisitionDate alone is no time
    return BadCase(p, (f[1][2].name,), ("time tag",))


def duplicate_instance(c: Corpus) -> BadCase:
    p, f = c.copy("duplicate_instance")
    copy = f[0][1].parent / "IM_COPY.dcm"
    shutil.copy(f[0][1], copy)
    return BadCase(p, (copy.name, f[0][1].name), ("duplicate",))


def duplicate_frame(c: Corpus) -> BadCase:
    """Same slice and time as another frame, but a different SOP instance (a re-export)."""
    p, f = c.copy("duplicate_frame")
    copy = f[1][3].parent / "IM_REEXPORT.dcm"
    shutil.copy(f[1][3], copy)
    _edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", pydicom.uid.generate_uid()))
    return BadCase(p, (copy.name,), ("duplicate frame",))


def same_time(c: Corpus) -> BadCase:
    """Two frames of one slice carry the same acquisition time: times are not increasing."""
    p, f = c.copy("same_time")
    t0 = pydicom.dcmread(f[0][2]).AcquisitionTime
    _edit(f[0][3], lambda ds: setattr(ds, "AcquisitionTime", t0))
    return BadCase(p, (f[0][3].name, f[0][2].name), ("same time",))


def two_series(c: Corpus) -> BadCase:
    p, _ = c.copy("two_series")
    other = make_good(c.workdir / "other_for_two_series", seed=8, index=0)
    shutil.copytree(other / "ctp", p / "ctp" / "second_series")
    uids = {pydicom.dcmread(next(d.rglob("*.dcm"))).SeriesInstanceUID
            for d in (c.good / "ctp", other / "ctp")}
    return BadCase(p, tuple(hash_uid(u) for u in uids), ("more than one",))


def rows_columns(c: Corpus) -> BadCase:
    p, f = c.copy("rows_columns")

    def shrink(ds: pydicom.Dataset) -> None:
        ds.Rows, ds.Columns = 8, 8
        ds.PixelData = np.zeros((8, 8), "<i2").tobytes()

    _edit(f[1][4], shrink)
    return BadCase(p, (f[1][4].name,), ("rows/columns",))


def compressed_no_decoder(c: Corpus) -> BadCase:
    """TransferSyntaxUID says JPEG 2000 but the fragments are garbage: no decoder can read it."""
    p, f = c.copy("compressed_no_decoder")

    def compress(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
        ds.PixelData = encapsulate([b"\x00\x01garbage-not-a-codestream" * 4])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True

    _edit(f[0][5], compress)
    return BadCase(p, (f[0][5].name,), ("jpeg 2000",))


def rescale_overflow(c: Corpus) -> BadCase:
    p, f = c.copy("rescale_overflow")
    _edit(f[1][0], lambda ds: setattr(ds, "RescaleSlope", "1e+38"))
    return BadCase(p, (f[1][0].name, "RescaleSlope"), ("nan or inf",))


def nan_after_rescale(c: Corpus) -> BadCase:
    """RescaleIntercept NaN: every pixel of the frame is NaN in HU."""
    p, f = c.copy("nan_after_rescale")
    _edit(f[0][4], lambda ds: setattr(ds, "RescaleIntercept", "NaN"))
    return BadCase(p, (f[0][4].name, "RescaleIntercept"), ("nan or inf",))


def contradictory_time_tags(c: Corpus) -> BadCase:
    """AcquisitionDateTime (preferred) and AcquisitionDate+AcquisitionTime disagree for one frame by 5 s."""
    p, f = c.copy("contradictory_time_tags")
    odd = f[1][2]

    def add_datetime(path: Path) -> None:
        def fn(ds: pydicom.Dataset) -> None:
            when = np.datetime64(f"{ds.AcquisitionDate[:4]}-{ds.AcquisitionDate[4:6]}-{ds.AcquisitionDate[6:]}T"
                                 f"{ds.AcquisitionTime[:2]}:{ds.AcquisitionTime[2:4]}:{ds.AcquisitionTime[4:]}")
            if path == odd:
                when = when + np.timedelta64(5, "s")
            ds.AcquisitionDateTime = str(when).replace("-", "").replace(":", "").replace("T", "")

        _edit(path, fn)

    for row in f:
        for path in row:
            add_datetime(path)
    return BadCase(p, (odd.name, "AcquisitionDateTime", "AcquisitionDate+AcquisitionTime"), ("contradictory",))


def mixed_orientation(c: Corpus) -> BadCase:
    p, f = c.copy("mixed_orientation")
    _edit(f[0][3], lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    return BadCase(p, (f[0][3].name, "ImageOrientationPatient"), ("differs",))


def mixed_patients(c: Corpus) -> BadCase:
    p, f = c.copy("mixed_patients")
    _edit(f[1][2], lambda ds: setattr(ds, "PatientID", "SOMEONE-ELSE-42"))
    return BadCase(p, (f[1][2].name, "PatientID"), ("mixes patients",))


def fewer_frames(c: Corpus) -> BadCase:
    """One slice lost a frame: every slice must have the same number of frames."""
    p, f = c.copy("fewer_frames")
    f[1][3].unlink()
    return BadCase(p, ("slice 1", f[1][0].name), ("same number of frames",))


def nan_labels(c: Corpus) -> BadCase:
    p, _ = c.copy("nan_labels")
    vol, affine = read_nifti_maps(p / "maps" / "cbf.nii.gz")
    vol[0, 3, 4] = np.nan
    (p / "maps" / "cbf.nii.gz").write_bytes(nifti_bytes(vol, affine))
    return BadCase(p, ("cbf.nii.gz",), ("nan",))


def labels_wrong_shape(c: Corpus) -> BadCase:
    p, _ = c.copy("labels_wrong_shape")
    vol, affine = read_nifti_maps(p / "maps" / "cbv.nii.gz")
    (p / "maps" / "cbv.nii.gz").write_bytes(nifti_bytes(vol[:, :-1, :], affine))
    return BadCase(p, ("cbv.nii.gz",), ("shape",))


def labels_misaligned(c: Corpus) -> BadCase:
    p, _ = c.copy("labels_misaligned")
    vol, affine = read_nifti_maps(p / "maps" / "tmax.nii.gz")
    shifted = affine.copy()
    shifted[0, 3] += 2.0  # 2 mm off
    (p / "maps" / "tmax.nii.gz").write_bytes(nifti_bytes(vol, shifted))
    return BadCase(p, ("tmax.nii.gz",), ("affine",))


def label_missing(c: Corpus) -> BadCase:
    p, _ = c.copy("label_missing")
    (p / "maps" / "tmax.nii.gz").unlink()
    return BadCase(p, ("tmax.nii.gz",), ("missing",))


def empty_dir(c: Corpus) -> BadCase:
    p = c.workdir / "empty_dir"
    (p / "ctp").mkdir(parents=True)
    (p / "ctp" / ".DS_Store").write_bytes(b"\x00")  # hidden files do not count
    return BadCase(p, ("empty_dir",), ("empty",))


def missing_path(c: Corpus) -> BadCase:
    return BadCase(c.workdir / "no_such_patient", ("no_such_patient",), ("does not exist",))


def missing_ctp(c: Corpus) -> BadCase:
    p = c.workdir / "missing_ctp"
    (p / "maps").mkdir(parents=True)
    return BadCase(p, ("missing_ctp",), ("no ctp/",))


def single_frame_per_slice(c: Corpus) -> BadCase:
    p, f = c.copy("single_frame_per_slice")
    for row in f:
        for x in row[1:]:
            x.unlink()
    return BadCase(p / "ctp", ("ctp",), ("single image",), reader="dicom")


# ------------------------------------------------------------------------------ other layouts (issue 15)
def _enhanced(c: Corpus, name: str, **kw) -> tuple[Path, Path]:
    from stm_dlp.io.dicom_writer import write_study_enhanced

    paths: list[Path] = []
    p = c.patient(name, lambda d: paths.extend(write_study_enhanced(c.study, d, seed=7, patient_name=PHI[0],
                                                                     patient_id=PHI[1], **kw)))
    return p, paths[0]


def enhanced_without_frame_times(c: Corpus) -> BadCase:
    p, f = _enhanced(c, "enhanced_without_frame_times", time_tags=(), temporal_position_index="none")
    return BadCase(p, (f.name, "FrameContentSequence"), ("without per-frame times",))


def enhanced_scrambled_times(c: Corpus) -> BadCase:
    """De-identification shuffled FrameAcquisitionDateTime within each slice; nothing else orders the frames."""
    p, f = _enhanced(c, "enhanced_scrambled_times", time_tags=("FrameAcquisitionDateTime",))

    def scramble(ds: pydicom.Dataset) -> None:
        by_slice: dict[int, list] = {}
        for item in ds.PerFrameFunctionalGroupsSequence:
            content = item.FrameContentSequence[0]
            by_slice.setdefault(int(content.InStackPositionNumber), []).append(content)
        for items in by_slice.values():
            values = [i.FrameAcquisitionDateTime for i in items]
            for i, v in zip(items, values[::-1]):
                i.FrameAcquisitionDateTime = v

    _edit(f, scramble)
    return BadCase(p, (f.name, "FrameAcquisitionDateTime", "TemporalPositionIndex"), ("scrambled",))


def enhanced_functional_groups_cut(c: Corpus) -> BadCase:
    p, f = _enhanced(c, "enhanced_functional_groups_cut")
    _edit(f, lambda ds: ds.PerFrameFunctionalGroupsSequence.pop())
    return BadCase(p, (f.name, "PerFrameFunctionalGroupsSequence", "NumberOfFrames"), ("items",))


def enhanced_frame_without_position(c: Corpus) -> BadCase:
    p, f = _enhanced(c, "enhanced_frame_without_position")
    _edit(f, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[3], "PlanePositionSequence"))
    return BadCase(p, (f.name, "frame 4", "PlanePositionSequence"), ("cannot tell which slice",))


def enhanced_truncated_pixels(c: Corpus) -> BadCase:
    p, f = _enhanced(c, "enhanced_truncated_pixels")
    f.write_bytes(f.read_bytes()[:-300])
    return BadCase(p, (f.name,), ("truncated",))


def _per_volume(c: Corpus, name: str) -> tuple[Path, list[list[Path]]]:
    from stm_dlp.io.dicom_writer import write_study_dicom

    paths: list[list[Path]] = []
    p = c.patient(name, lambda d: paths.extend(write_study_dicom(c.study, d, seed=7, patient_name=PHI[0],
                                                                  patient_id=PHI[1], series_per_time_point=True)))
    return p, paths


def per_volume_geometry_mismatch(c: Corpus) -> BadCase:
    """One series per time point, but one volume has another PixelSpacing: not the same acquisition."""
    p, f = _per_volume(c, "per_volume_geometry_mismatch")
    for row in f:
        _edit(row[2], lambda ds: setattr(ds, "PixelSpacing", ["0.5", "0.5"]))
    uids = [hash_uid(pydicom.dcmread(f[0][t]).SeriesInstanceUID) for t in (0, 2)]
    return BadCase(p, (*uids, "PixelSpacing"), ("look like one series per time point",))


def per_volume_missing_slice(c: Corpus) -> BadCase:
    p, f = _per_volume(c, "per_volume_missing_slice")
    f[1][3].unlink()
    return BadCase(p, (hash_uid(pydicom.dcmread(f[0][3]).SeriesInstanceUID), "slice positions"),
                   ("look like one series per time point",))


def _nifti_patient(c: Corpus, name: str) -> Path:
    from stm_dlp.io.layouts import write_nifti_patient

    return write_nifti_patient(c.workdir / name, c.study)


def sidecar_wrong_frame_count(c: Corpus) -> BadCase:
    p = _nifti_patient(c, "sidecar_wrong_frame_count")
    side = p / "ctp.json"
    data = json.loads(side.read_text())
    data["FrameTimesStart"] = data["FrameTimesStart"][:-1]
    side.write_text(json.dumps(data))
    return BadCase(p, ("ctp.json", "FrameTimesStart"), ("volumes",), reader="any")


def sidecar_not_json(c: Corpus) -> BadCase:
    p = _nifti_patient(c, "sidecar_not_json")
    (p / "ctp.json").write_text("{FrameTimesStart: [0, 1,")
    return BadCase(p, ("ctp.json",), ("not valid json",), reader="any")


def sidecar_times_not_increasing(c: Corpus) -> BadCase:
    p = _nifti_patient(c, "sidecar_times_not_increasing")
    data = json.loads((p / "ctp.json").read_text())
    data["FrameTimesStart"][3] = data["FrameTimesStart"][2]
    (p / "ctp.json").write_text(json.dumps(data))
    return BadCase(p, ("ctp.json", "FrameTimesStart"), ("not strictly increasing",), reader="any")


def nifti_without_times(c: Corpus) -> BadCase:
    p = _nifti_patient(c, "nifti_without_times")
    (p / "ctp.json").unlink()
    return BadCase(p, ("ctp.nii.gz", "frame_interval_s"), ("never guessed",), reader="any")


def isles2024_map_wrong_shape(c: Corpus) -> BadCase:
    from stm_dlp.io.layouts import write_isles2024_case

    subject = write_isles2024_case(c.workdir / "isles2024_map_wrong_shape", c.study)
    path = next(subject.rglob("*_cbf.nii.gz"))
    vol, affine = read_nifti_maps(path)
    path.write_bytes(nifti_bytes(vol[:, :-2, :], affine))
    return BadCase(subject, (path.name, "CTP grid"), ("does not match",), reader="any")


def _unitobrain(c: Corpus, name: str) -> Path:
    from stm_dlp.io.layouts import write_unitobrain_case

    return write_unitobrain_case(c.workdir / name, c.study, layout="patient", patient_name=PHI[0],
                                 patient_id=PHI[1])


def unitobrain_without_cbf(c: Corpus) -> BadCase:
    p = _unitobrain(c, "unitobrain_without_cbf")
    shutil.rmtree(p / "NLR_CBF")
    return BadCase(p, ("NLR_CBF",), ("missing",), reader="any")


def unitobrain_map_slice_missing(c: Corpus) -> BadCase:
    p = _unitobrain(c, "unitobrain_map_slice_missing")
    sorted((p / "NLR_CBV").iterdir())[0].unlink()
    return BadCase(p, ("NLR_CBV",), ("slices",), reader="any")


def unitobrain_map_misaligned(c: Corpus) -> BadCase:
    p = _unitobrain(c, "unitobrain_map_misaligned")

    def shift(ds: pydicom.Dataset) -> None:
        ds.ImagePositionPatient = [str(float(ds.ImagePositionPatient[0]) + 3.0), *map(str, ds.ImagePositionPatient[1:])]

    for f in (p / "NLR_CBF").iterdir():
        _edit(f, shift)
    return BadCase(p, ("NLR_CBF", "ImagePositionPatient"), ("does not overlay",), reader="any")


#: The failure classes of the layouts of issue 15 (enhanced DICOM, one series per time point, NIfTI
#: sidecars, ISLES'24, UniToBrain), each refused with a one-line StudyError naming the file and the tag.
FORMAT_CASES = (
    enhanced_without_frame_times, enhanced_scrambled_times, enhanced_functional_groups_cut,
    enhanced_frame_without_position, enhanced_truncated_pixels, per_volume_geometry_mismatch,
    per_volume_missing_slice, sidecar_wrong_frame_count, sidecar_not_json, sidecar_times_not_increasing,
    nifti_without_times, isles2024_map_wrong_shape, unitobrain_without_cbf, unitobrain_map_slice_missing,
    unitobrain_map_misaligned,
)


CASES: dict[str, Callable[[Corpus], BadCase]] = {fn.__name__: fn for fn in (
    truncated_pixels, truncated_header, empty_file, not_dicom, missing_pixel_data, no_time_tag,
    partly_missing_time_tag, duplicate_instance, duplicate_frame, same_time, two_series, rows_columns,
    compressed_no_decoder, rescale_overflow, nan_after_rescale, contradictory_time_tags, mixed_orientation,
    mixed_patients, fewer_frames, nan_labels,
    labels_wrong_shape, labels_misaligned, label_missing, empty_dir, missing_path, missing_ctp,
    single_frame_per_slice, *FORMAT_CASES,
)}
