"""Perfusion maps out to PACS as DICOM (``output_dicom=true`` of ``stm_dlp.predict`` / ``stm_dlp.calc``).

``OUT/dicom/`` gets:

* one **derived CT series per map** (CBF, CBV, MTT, TMAX): CT Image Storage, ImageType
  ``DERIVED\\SECONDARY\\AXIAL\\<MAP>``, one image per slice with the scan's geometry
  (ImagePositionPatient / ImageOrientationPatient / PixelSpacing from the study's affine, the same
  FrameOfReferenceUID as the input DICOM so the maps overlay it), int16 pixels whose
  RescaleSlope / RescaleIntercept give the value in physical units (``RescaleType`` names the unit),
  repeated as a **Real World Value Mapping** with the UCUM unit, and a window from
  :data:`~stm_dlp.io.png.DEFAULT_WINDOWS`;
* one **RGB Secondary Capture series** of the colour maps (every map of a slice side by side with a
  colour bar and its unit), one image per slice.

Every series has new UIDs (study, series, instances), the pseudonymised patient (``PatientName`` =
``PatientID`` = the study's pseudonym; no other patient attribute), and ``SeriesDescription`` /
``ImageComments`` saying *research use, not for diagnosis*. The folder is written to a hidden
temporary sibling and renamed when complete, so a crash leaves no half series.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from stm_dlp.io.atomic import replace_dir
from stm_dlp.io.dicom_writer import CT_IMAGE_STORAGE, DEFAULT_UID_ROOT, _ds, _split, geometry_from_affine
from stm_dlp.io.png import DEFAULT_WINDOWS, DISPLAY_ORDER
from stm_dlp.types import UNITS

#: Secondary Capture Image Storage (the colour pictures).
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
#: What every series says about itself (SeriesDescription is at most 64 characters).
RESEARCH_NOTE = "research use, not for diagnosis"
#: UCUM code of each map's unit (Real World Value Mapping).
UCUM: dict[str, tuple[str, str]] = {
    "cbf": ("mL/(100.g.min)", "ml/100g/min"),
    "cbv": ("mL/(100.g)", "ml/100g"),
    "mtt": ("s", "second"),
    "tmax": ("s", "second"),
}
#: The folder (inside the output folder) the series go into.
DICOM_DIR = "dicom"


def choose_map_rescale(volume: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` for int16 storage of a map: intercept 0 and the smallest slope of the form
    ``{1, 2, 5} × 10^k`` that fits every value into ±32000 (round-trip error <= slope / 2)."""
    v = np.asarray(volume, np.float64)
    peak = float(np.max(np.abs(v[np.isfinite(v)]))) if np.isfinite(v).any() else 0.0
    if peak <= 0:
        return 1e-4, 0.0
    raw = peak / 32000.0
    k = math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        slope = m * 10.0**k
        if slope >= raw:
            return float(f"{slope:.6g}"), 0.0
    return float(f"{10.0 ** (k + 1):.6g}"), 0.0  # pragma: no cover - the loop always returns


def reference_uids(study_meta: Mapping[str, Any]) -> dict[str, str]:
    """``FrameOfReferenceUID`` of the input DICOM (read from its first file, never kept in the study), or
    ``{}`` for a non-DICOM input or when it cannot be read."""
    folder, files = study_meta.get("dicom_folder"), study_meta.get("files")
    if not folder or not isinstance(files, list) or not files or not files[0]:
        return {}
    try:
        ds = pydicom.dcmread(Path(folder) / files[0][0], stop_before_pixels=True,
                             specific_tags=["FrameOfReferenceUID"])
        uid = str(ds.get("FrameOfReferenceUID", "") or "")
    except Exception:  # noqa: BLE001 - any failure means: no reference, new UIDs
        return {}
    return {"FrameOfReferenceUID": uid} if uid and pydicom.uid.UID(uid).is_valid else {}


def _base_dataset(sop_class: str, sop_uid: str, patient: str, study_uid: str, series_uid: str,
                  series_number: int, description: str, when: dt.datetime) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    da, tm = _split(when)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = da
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = tm
    ds.PatientName = patient
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"STM-DLP perfusion maps ({RESEARCH_NOTE})"[:64]
    ds.SeriesDescription = description[:64]
    ds.SeriesNumber = series_number
    ds.Manufacturer = "STM-DLP"
    ds.ManufacturerModelName = "STM-DLP research software"
    ds.ImageComments = f"STM-DLP perfusion maps: {RESEARCH_NOTE}"
    ds.BurnedInAnnotation = "NO"
    return ds


def _colour_slice(maps: Mapping[str, np.ndarray], mask: np.ndarray | None, s: int, title: str) -> np.ndarray:
    """uint8 RGB ``(h, w, 3)``: the maps of slice ``s`` side by side, each with a colour bar and unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    params = [p for p in DISPLAY_ORDER if p in maps]
    fig, axes = plt.subplots(1, len(params), figsize=(2.6 * len(params), 2.6), dpi=80)
    fig.patch.set_facecolor("black")
    axes = np.atleast_1d(axes)
    cmap = colormaps["jet"].with_extremes(bad="black")
    for ax, p in zip(axes, params):
        arr = np.asarray(maps[p][s], np.float64)
        hide = ~np.isfinite(arr) | (~np.asarray(mask[s], bool) if mask is not None else False)
        lo, hi = DEFAULT_WINDOWS[p]
        im = ax.imshow(np.ma.masked_array(np.where(hide, 0.0, arr), mask=hide), cmap=cmap, vmin=lo, vmax=hi,
                       interpolation="nearest")
        ax.set_title(f"{p.upper()} ({UNITS[p]})", color="white", fontsize=8)
        ax.axis("off")
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.ax.tick_params(colors="white", labelsize=6)
    fig.suptitle(f"{title} · slice {s + 1} · {RESEARCH_NOTE}", color="white", fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def write_maps_dicom(out_dir: str | Path, maps: Mapping[str, np.ndarray], affine: np.ndarray, *,
                     patient_id: str, reference: Mapping[str, str] | None = None, mask: np.ndarray | None = None,
                     method: str = "stm_dlp", colour: bool = True,
                     uid_root: str = DEFAULT_UID_ROOT) -> dict[str, list[Path]]:
    """Write the maps as DICOM series into ``out_dir/dicom/`` (see the module docstring).

    Args:
        out_dir: the output folder; ``out_dir/dicom`` is replaced as a whole.
        maps: ``cbf``, ``cbv``, ``mtt``, ``tmax`` (any present), each float ``(S, H, W)`` in ml/100g/min,
            ml/100g, s, s.
        affine: the scan's RAS+ affine for ``(W, H, S)`` arrays (``study.affine``).
        patient_id: the study's pseudonym (written as PatientName and PatientID).
        reference: ``{"FrameOfReferenceUID": ...}`` of the input (:func:`reference_uids`); a new one otherwise.
        mask: bool ``(S, H, W)``: outside it the colour pictures are black (the map values are kept).
        method: what made the maps (in SeriesDescription and DerivationDescription).
        colour: also write the RGB Secondary Capture series.
        uid_root: prefix of the new UIDs.

    Returns:
        ``{series name: [file per slice]}`` for ``cbf``, ``cbv``, ``mtt``, ``tmax`` (those given) and ``colour``.
    """
    params = [p for p in DISPLAY_ORDER if p in maps]
    if not params:
        raise ValueError("write_maps_dicom needs at least one of cbf, cbv, mtt, tmax")
    shape = np.asarray(maps[params[0]]).shape
    if len(shape) != 3 or any(np.asarray(maps[p]).shape != shape for p in params):
        raise ValueError(f"every map must be (S, H, W) of one shape, got {[np.asarray(maps[p]).shape for p in params]}")
    n_s, h, w = shape
    geo = geometry_from_affine(affine, n_s)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / DICOM_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{DICOM_DIR}.", suffix=".tmp", dir=out))
    now = dt.datetime.now().replace(microsecond=0)
    study_uid = str(generate_uid(prefix=uid_root))
    for_uid = (reference or {}).get("FrameOfReferenceUID") or str(generate_uid(prefix=uid_root))
    written: dict[str, list[Path]] = {}
    try:
        for k, p in enumerate(params):
            vol = np.asarray(maps[p], np.float64)
            vol = np.where(np.isfinite(vol), vol, 0.0)
            slope, intercept = choose_map_rescale(vol)
            series_uid = str(generate_uid(prefix=uid_root))
            folder = tmp / p.upper()
            folder.mkdir()
            ucum, meaning = UCUM[p]
            lo, hi = DEFAULT_WINDOWS[p]
            files = []
            for s in range(n_s):
                sop = str(generate_uid(prefix=uid_root))
                ds = _base_dataset(CT_IMAGE_STORAGE, sop, patient_id, study_uid, series_uid, 900 + k,
                                   f"STM-DLP {p.upper()} {UNITS[p]} {RESEARCH_NOTE}", now)
                ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL", p.upper()]
                ds.Modality = "CT"
                ds.DerivationDescription = f"CT perfusion {p.upper()} ({UNITS[p]}) by STM-DLP, {method}"[:1024]
                ds.InstanceNumber = s + 1
                ds.FrameOfReferenceUID = for_uid
                ds.PositionReferenceIndicator = ""
                ds.ImagePositionPatient = [_ds(v) for v in geo["positions"][s]]
                ds.ImageOrientationPatient = [_ds(v) for v in geo["orientation"]]
                ds.PixelSpacing = [_ds(v) for v in geo["pixel_spacing"]]
                ds.SliceThickness = _ds(geo["slice_thickness"])
                ds.SliceLocation = _ds(float(geo["positions"][s] @ geo["normal"]))
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.Rows, ds.Columns = h, w
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
                ds.PixelRepresentation = 1
                ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
                ds.RescaleType = UNITS[p].upper()
                ds.WindowCenter, ds.WindowWidth = _ds((lo + hi) / 2), _ds(hi - lo)
                rwvm = pydicom.Dataset()
                rwvm.add_new("RealWorldValueFirstValueMapped", "SS", -32768)
                rwvm.add_new("RealWorldValueLastValueMapped", "SS", 32767)
                rwvm.RealWorldValueSlope = float(slope)
                rwvm.RealWorldValueIntercept = float(intercept)
                rwvm.LUTExplanation = f"{p.upper()} ({UNITS[p]})"
                rwvm.LUTLabel = p.upper()
                unit = pydicom.Dataset()
                unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = ucum, "UCUM", meaning
                rwvm.MeasurementUnitsCodeSequence = pydicom.Sequence([unit])
                ds.RealWorldValueMappingSequence = pydicom.Sequence([rwvm])
                stored = np.clip(np.round((vol[s] - intercept) / slope), -32768, 32767)
                ds.PixelData = stored.astype("<i2").tobytes()
                path = folder / f"{p.upper()}_{s + 1:04d}.dcm"
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
                files.append(path)
            written[p] = files
        if colour:
            series_uid = str(generate_uid(prefix=uid_root))
            folder = tmp / "COLOUR"
            folder.mkdir()
            files = []
            for s in range(n_s):
                rgb = _colour_slice(maps, mask, s, f"STM-DLP {method}")
                sop = str(generate_uid(prefix=uid_root))
                ds = _base_dataset(SECONDARY_CAPTURE_STORAGE, sop, patient_id, study_uid, series_uid, 990,
                                   f"STM-DLP colour maps {RESEARCH_NOTE}", now)
                ds.Modality = "OT"
                ds.ConversionType = "WSD"
                ds.ImageType = ["DERIVED", "SECONDARY"]
                ds.BurnedInAnnotation = "YES"  # titles, units and colour bars are in the pixels
                ds.InstanceNumber = s + 1
                ds.SamplesPerPixel = 3
                ds.PhotometricInterpretation = "RGB"
                ds.PlanarConfiguration = 0
                ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
                ds.PixelRepresentation = 0
                ds.PixelData = np.ascontiguousarray(rgb, np.uint8).tobytes()
                path = folder / f"COLOUR_{s + 1:04d}.dcm"
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
                files.append(path)
            written["colour"] = files
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: [final / f.relative_to(tmp) for f in files] for name, files in written.items()}
