"""A corpus of broken studies, built by code from one good synthesized study (no binary blobs).

Each case is a function ``build(workdir) -> BadCase`` that copies the good patient folder
(``<patient>/ctp/`` DICOM + ``<patient>/maps/`` NIfTI truth) and breaks one thing. The reader must
refuse every case with a :class:`~stm_dlp.types.StudyError` whose message names the offending file
(or folder) and says what is wrong (``needles`` are substrings that must all appear, ``keywords``
are alternatives of which one must appear, case-insensitively).
"""

from __future__ import annotations

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
    reader: str = "labelled"  # "labelled" (patient folder) or "dicom" (ctp folder)


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


CASES: dict[str, Callable[[Corpus], BadCase]] = {fn.__name__: fn for fn in (
    truncated_pixels, truncated_header, empty_file, not_dicom, missing_pixel_data, no_time_tag,
    partly_missing_time_tag, duplicate_instance, duplicate_frame, same_time, two_series, rows_columns,
    compressed_no_decoder, rescale_overflow, nan_after_rescale, contradictory_time_tags, mixed_orientation,
    mixed_patients, fewer_frames, nan_labels,
    labels_wrong_shape, labels_misaligned, label_missing, empty_dir, missing_path, missing_ctp,
    single_frame_per_slice,
)}
