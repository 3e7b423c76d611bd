"""Fixture writers: a :class:`~stm_dlp.types.Study` on disk in each public layout the readers take.

Used by ``python -m stm_dlp.synth layout=…`` and the tests, so every reader is checked against the
phantom's exact truth (frames, per-slice times, geometry, labels):

* :func:`write_nifti4d` — a 4-D NIfTI ``(X, Y, Z, T)`` with its times as a BIDS sidecar
  (``FrameTimesStart``, + ``SliceTiming`` for per-slice offsets), in ``pixdim[4]``, as ISLES 2018's 5-D
  ``(X, Y, Z, 1, T)`` with ``pixdim[5]``, or not at all;
* :func:`write_nifti_patient` — ``ROOT/<patient>/ctp.nii.gz`` (+ ``ctp.json``) and ``maps/``;
* :func:`write_isles2018_case` — ``case_N/SMIR.Brain.XX.O.CT_4DPWI.<id>/…nii`` and the map folders;
* :func:`write_isles2024_case` — ``raw_data/sub-strokeXXXX/ses-01/…_ctp.nii.gz`` with
  ``perfusion-maps/…_{cbf,cbv,mtt,tmax}.nii.gz`` (or the ``derivatives/…_space-ncct_…`` spelling), a
  negative TMAX fill outside the brain, and the follow-up lesion mask;
* :func:`write_unitobrain_case` — a DICOM CTP folder and DICOM ``NLR_CBF``, ``NLR_CBV``,
  ``NLR_MTT``, ``NLR_TTP`` map series, each with its own rescale (no TMAX).

Arrays on disk follow the NIfTI ``(W, H, S)`` convention of :mod:`stm_dlp.io.nifti`; every writer puts
a patient folder into place only when it is complete (hidden temporary sibling, then rename).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from stm_dlp.io.dicom_writer import CT_IMAGE_STORAGE, DEFAULT_UID_ROOT, _ds, geometry_from_affine, write_study_dicom
from stm_dlp.io.nifti import nifti_bytes
from stm_dlp.types import PARAMS, Study, maps_by_name

#: How :func:`write_nifti4d` stores the frame times.
NIFTI_TIMES = ("sidecar", "pixdim", "five_d", "none")
#: UniToBrain map folders and the rescale each is written with: (slope, intercept) for uint16.
UNITOBRAIN_MAPS: dict[str, tuple[float, float]] = {
    "NLR_CBF": (0.01, 0.0), "NLR_CBV": (0.001, 0.0), "NLR_MTT": (0.005, 0.0), "NLR_TTP": (0.01, 0.0),
}


def _atomic_dir(final: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Build ``final`` in a hidden temporary sibling with ``fill(tmp)`` and rename it into place."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        fill(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _uniform_step(times: np.ndarray) -> float:
    """The one step of times shared by every slice, else ValueError."""
    step = np.diff(times, axis=1)
    if not np.allclose(times, times[:1], atol=1e-5) or not np.allclose(step, step.flat[0], atol=1e-5):
        raise ValueError("pixdim can only hold uniform frame times shared by every slice; use times='sidecar'")
    return float(step.flat[0])


def sidecar_timing(times_s: np.ndarray) -> dict[str, list[float]]:
    """BIDS ``FrameTimesStart`` (s) and, for per-slice offsets, ``SliceTiming`` (s) of ``times_s (S, T)``.

    Raises:
        ValueError: per-slice times that are not one frame clock plus a constant offset per slice.
    """
    times = np.asarray(times_s, np.float64)
    offsets = times[:, 0] - times[:, 0].min()
    start = times[int(np.argmin(times[:, 0]))]
    if not np.allclose(times - offsets[:, None], start[None, :], atol=1e-5):
        raise ValueError("these per-slice times are not a frame clock plus a constant offset per slice; a 4-D "
                         "NIfTI with a BIDS sidecar cannot hold them (write DICOM)")
    out = {"FrameTimesStart": [round(float(t), 6) for t in start - start[0]]}
    if np.any(offsets > 1e-6):
        out["SliceTiming"] = [round(float(o), 6) for o in offsets]
    return out


def write_nifti4d(study: Study, path: str | Path, *, times: str = "sidecar") -> Path:
    """Write ``study``'s frames as a 4-D NIfTI at ``path`` (``.nii`` or ``.nii.gz``) with ``study.affine``.

    Args:
        study: frames ``(S, T, H, W)``, times_s ``(S, T)``.
        path: the file; a sidecar goes beside it as ``<name>.json``.
        times: one of :data:`NIFTI_TIMES` — ``sidecar`` (BIDS FrameTimesStart [+ SliceTiming]),
            ``pixdim`` (pixdim[4] in s; uniform times only), ``five_d`` (ISLES 2018's (X, Y, Z, 1, T) with
            pixdim[5] in s; uniform times only) or ``none`` (no times: a reader must be told the interval).

    Returns:
        ``path``.
    """
    if times not in NIFTI_TIMES:
        raise ValueError(f"times must be one of {NIFTI_TIMES}, got {times!r}")
    p = Path(path)
    data = np.ascontiguousarray(np.transpose(np.asarray(study.frames, np.float32), (3, 2, 0, 1)))  # (X, Y, Z, T)
    step = 0.0
    if times in ("pixdim", "five_d"):
        step = _uniform_step(np.asarray(study.times_s, np.float64))
    if times == "five_d":
        data = data[:, :, :, None, :]
    img = nib.Nifti1Image(data, np.asarray(study.affine, np.float64))
    img.header.set_xyzt_units("mm", "sec" if times in ("pixdim", "five_d") else "unknown")
    zooms = list(img.header.get_zooms())
    zooms[-1] = step if times in ("pixdim", "five_d") else 0.0
    if times == "five_d":
        zooms[3] = 1.0
    img.header.set_zooms(zooms)
    img.set_sform(np.asarray(study.affine, np.float64), code=1)
    img.set_qform(np.asarray(study.affine, np.float64), code=1)
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(p))
    if times == "sidecar":
        side = p.with_name(p.name[:-7] + ".json" if p.name.endswith(".nii.gz") else p.stem + ".json")
        side.write_text(json.dumps({"Modality": "CT", **sidecar_timing(study.times_s)}, indent=2) + "\n",
                        encoding="utf-8")
    return p


def _map_volumes(study: Study) -> dict[str, np.ndarray]:
    if study.maps is None:
        raise ValueError(f"{study.source or study.patient_id}: a labelled study is needed for its maps")
    return {k: np.asarray(v, np.float32) for k, v in maps_by_name(study.maps).items()}


def write_nifti_patient(patient_dir: str | Path, study: Study, *, times: str = "sidecar",
                        overwrite: bool = False) -> Path:
    """``patient_dir/ctp.nii.gz`` (+ ``ctp.json``) and ``maps/{cbv,cbf,tmax,mtt,mask}.nii.gz``."""

    def fill(tmp: Path) -> None:
        write_nifti4d(study, tmp / "ctp.nii.gz", times=times)
        if study.maps is not None:
            (tmp / "maps").mkdir()
            vols: dict[str, np.ndarray] = dict(_map_volumes(study))
            if study.mask is not None:
                vols["mask"] = np.asarray(study.mask, bool)
            for name, vol in vols.items():
                (tmp / "maps" / f"{name}.nii.gz").write_bytes(nifti_bytes(vol, study.affine))

    return _atomic_dir(Path(patient_dir), fill, overwrite)


def write_isles2018_case(case_dir: str | Path, study: Study, *, times: str = "five_d", overwrite: bool = False) -> Path:
    """An ISLES 2018 case folder: ``SMIR.Brain.XX.O.CT_4DPWI.<id>/….nii`` and ``CT_CBV``, ``CT_CBF``,
    ``CT_MTT``, ``CT_Tmax`` (0 outside the brain). ``times`` as in :func:`write_nifti4d`: ``five_d`` (the
    challenge's 5-D file with pixdim[5]; uniform times only), ``pixdim``, or ``sidecar`` (a BIDS
    ``….json`` beside the 4-D file, for irregular framing)."""

    def fill(tmp: Path) -> None:
        stem = "SMIR.Brain.XX.O.CT_4DPWI.100001"
        write_nifti4d(study, tmp / stem / f"{stem}.nii", times=times)
        if study.maps is not None:
            mask = np.asarray(study.mask, bool) if study.mask is not None else np.ones(study.maps[:, 0].shape, bool)
            for i, (name, marker) in enumerate((("cbv", "CT_CBV"), ("cbf", "CT_CBF"), ("mtt", "CT_MTT"),
                                                ("tmax", "CT_Tmax"))):
                s = f"SMIR.Brain.XX.O.{marker}.{100002 + i}"
                (tmp / s).mkdir()
                (tmp / s / f"{s}.nii").write_bytes(nifti_bytes(_map_volumes(study)[name] * mask, study.affine,
                                                               compress=False))

    return _atomic_dir(Path(case_dir), fill, overwrite)


def write_isles2024_case(root: str | Path, study: Study, *, subject: str = "sub-stroke0001", session: str = "ses-01",
                         space: str = "native", tmax_fill: float = -1.0, sidecar: bool = True,
                         lesion: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """One ISLES'24 subject under dataset ``root``; returns the subject folder holding the CTP.

    ``space="native"``: ``root/raw_data/<subject>/<session>/<subject>_<session>_ctp.nii.gz`` and
    ``…/perfusion-maps/<subject>_<session>_{cbf,cbv,mtt,tmax}.nii.gz``; ``space="ncct"``: the same under
    ``root/derivatives/`` with ``_space-ncct`` in every name. Maps are 0 outside the brain except TMAX,
    which holds ``tmax_fill`` there (as icobrain exports do); ``lesion`` (bool ``(S, H, W)``), with
    ``space="ncct"``, goes to ``derivatives/<subject>/ses-02/…_space-ncct_lesion-msk.nii.gz``.
    With ``sidecar`` the CTP's times are a BIDS ``…_ctp.json``; without, ``pixdim[4]``
    (uniform times only).
    """
    if space not in ("native", "ncct"):
        raise ValueError(f"space must be native or ncct, got {space!r}")
    root = Path(root)
    top = root / ("raw_data" if space == "native" else "derivatives")
    tag = "" if space == "native" else "_space-ncct"
    final = top / subject
    follow_up = "ses-02" if session == "ses-01" else "ses-0002"

    def fill(tmp: Path) -> None:
        ses = tmp / session
        write_nifti4d(study, ses / f"{subject}_{session}{tag}_ctp.nii.gz", times="sidecar" if sidecar else "pixdim")
        if study.maps is not None:
            mask = np.asarray(study.mask, bool) if study.mask is not None else np.ones(study.maps[:, 0].shape, bool)
            (ses / "perfusion-maps").mkdir()
            for name, vol in _map_volumes(study).items():
                out = np.where(mask, vol, np.float32(tmax_fill if name == "tmax" else 0.0))
                (ses / "perfusion-maps" / f"{subject}_{session}{tag}_{name}.nii.gz").write_bytes(
                    nifti_bytes(out, study.affine))
        if space == "ncct" and lesion is not None:
            (tmp / follow_up).mkdir()
            (tmp / follow_up / f"{subject}_{follow_up}_space-ncct_lesion-msk.nii.gz").write_bytes(
                nifti_bytes(np.asarray(lesion, bool), study.affine))

    return _atomic_dir(final, fill, overwrite)


def write_unitobrain_case(root: str | Path, study: Study, *, name: str = "MOL-001", layout: str = "release",
                          seed: int = 0, patient_name: str = "UNITO^PATIENT", patient_id: str = "UNITO-0001",
                          overwrite: bool = False) -> Path:
    """One UniToBrain patient under ``root``; returns the folder a reader is pointed at.

    ``layout="release"`` (as the IEEE DataPort release): ``root/<name>_Registered_Filtered_3mm_20HU/`` is the
    CTP (classic DICOM) and ``root/<name>_Registered_Filtered_3mm_20HU_Maps/NLR_{CBF,CBV,MTT,TTP}/`` the maps;
    ``layout="patient"``: ``root/<name>/CT4D/`` and ``root/<name>/NLR_*/``. The maps are DICOM series, one
    image per slice with the CTP's geometry, uint16 with each map's own rescale (:data:`UNITOBRAIN_MAPS`),
    0 outside the brain. NLR_TTP is the time (s from the first frame) of each pixel's peak enhancement.
    """
    if layout not in ("release", "patient"):
        raise ValueError(f"layout must be release or patient, got {layout!r}")
    if study.maps is None:
        raise ValueError("write_unitobrain_case needs a labelled study")
    root = Path(root)
    vols = _map_volumes(study)
    mask = np.asarray(study.mask, bool) if study.mask is not None else np.ones(vols["cbv"].shape, bool)
    frames = np.asarray(study.frames, np.float32)
    peak = np.argmax(frames - frames[:, :1], axis=1)
    ttp = np.take_along_axis(np.asarray(study.times_s, np.float32)[:, :, None, None], peak[:, None], axis=1)[:, 0]
    maps = {"NLR_CBF": vols["cbf"], "NLR_CBV": vols["cbv"], "NLR_MTT": vols["mtt"], "NLR_TTP": ttp}

    def write_maps(folder: Path) -> None:
        for key, vol in maps.items():
            slope, intercept = UNITOBRAIN_MAPS[key]
            write_volume_dicom(np.where(mask, vol, 0.0), study.affine, folder / key, description=key,
                               slope=slope, intercept=intercept, patient_name=patient_name, patient_id=patient_id,
                               seed=seed)

    if layout == "release":
        ctp = root / f"{name}_Registered_Filtered_3mm_20HU"
        _atomic_dir(root / f"{ctp.name}_Maps", write_maps, overwrite)
        return _atomic_dir(ctp, lambda tmp: write_study_dicom(study, tmp, patient_name=patient_name,
                                                              patient_id=patient_id, seed=seed), overwrite)

    def fill(tmp: Path) -> None:
        write_study_dicom(study, tmp / "CT4D", patient_name=patient_name, patient_id=patient_id, seed=seed)
        write_maps(tmp)

    return _atomic_dir(root / name, fill, overwrite)


def write_volume_dicom(volume_shw: np.ndarray, affine: np.ndarray, folder: str | Path, *, description: str,
                       slope: float, intercept: float, patient_name: str = "ANONYMOUS",
                       patient_id: str = "ANONYMOUS", seed: int = 0,
                       modality: str = "CT", uid_root: str = DEFAULT_UID_ROOT) -> list[Path]:
    """A derived single-volume series (one image per slice) with the given rescale, stored as uint16
    (values below ``intercept`` are clipped). Geometry from ``affine``."""
    vol = np.asarray(volume_shw, np.float64)
    n_s, h, w = vol.shape
    geo = geometry_from_affine(affine, n_s)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def uid(*parts: Any) -> str:
        return str(generate_uid(prefix=uid_root, entropy_srcs=[str(seed), patient_id, description, *map(str, parts)]))

    series_uid, study_uid = uid("series"), uid("study")
    day = (dt.date(2021, 1, 1) + dt.timedelta(days=seed % 365)).strftime("%Y%m%d")
    paths = []
    for s in range(n_s):
        sop = uid("image", s)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", description]
        ds.Modality = modality
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = day
        ds.PatientName, ds.PatientID = patient_name, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesDescription = description
        ds.SeriesNumber, ds.InstanceNumber = 50, s + 1
        ds.ImagePositionPatient = [_ds(v) for v in geo["positions"][s]]
        ds.ImageOrientationPatient = [_ds(v) for v in geo["orientation"]]
        ds.PixelSpacing = [_ds(v) for v in geo["pixel_spacing"]]
        ds.SliceThickness = _ds(geo["slice_thickness"])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = h, w
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        stored = np.clip(np.round((vol[s] - intercept) / slope), 0, 65535)
        ds.PixelData = stored.astype("<u2").tobytes()
        path = folder / f"{description}{s + 1:05d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


__all__ = ["NIFTI_TIMES", "PARAMS", "UNITOBRAIN_MAPS", "sidecar_timing", "write_isles2018_case",
           "write_isles2024_case", "write_nifti4d", "write_nifti_patient", "write_unitobrain_case",
           "write_volume_dicom"]
