"""UniToBrain adapter: one patient's DICOM CTP and DICOM NLR maps → :class:`~stm_dlp.types.Study`.

UniToBrain (Gava et al. 2021, IEEE DataPort, doi:10.21227/x8ea-vh16) gives per patient a CTP series
and maps computed by non-linear regression, each a DICOM series with its own rescale: ``NLR_CBF``
(ml/100g/min), ``NLR_CBV`` (ml/100g), ``NLR_MTT`` (s) and ``NLR_TTP`` (s) — and **no TMAX**. Two
layouts are read::

    ROOT/MOL-001_Registered_Filtered_3mm_20HU/          the CTP (any names, any nesting)
    ROOT/MOL-001_Registered_Filtered_3mm_20HU_Maps/NLR_CBF/ …/NLR_CBV/ …/NLR_MTT/ …/NLR_TTP/

(the release: the maps in the sibling ``<CTP folder>_Maps``), or one folder per patient::

    ROOT/MOL-001/<CTP folder>/   ROOT/MOL-001/NLR_CBF/   ROOT/MOL-001/NLR_CBV/ …

* The CTP goes through the DICOM reader (:func:`~stm_dlp.data.dicom.read_dicom_study`).
* Each map through :func:`~stm_dlp.data.dicom.read_dicom_volume` (RescaleSlope / RescaleIntercept
  applied: the values are taken in the units above). Its slices are matched to the CTP's by position
  along the slice normal; a missing or extra slice, another matrix or an in-plane geometry that does
  not overlay the CTP is an error naming the map folder.
* **Labels.** CBV and CBF are the labels (``labelled = ("cbv", "cbf")``); the TMAX channel is
  zero-filled and skipped by the losses and metrics. ``NLR_MTT`` is not a label — this project derives
  MTT as CBV / CBF × 60 — and is kept as ``meta["nlr_mtt"]`` (S, H, W) for comparison; ``NLR_TTP``
  (time to peak, not a parameter here) is kept as ``meta["nlr_ttp"]`` for quality control. Both are
  optional.
* **Mask.** Where CBV or CBF is non-zero (the maps are 0 outside the brain); with a negative or NaN
  fill, where both are finite and >= 0 (the rule of :func:`stm_dlp.data.isles2024.brain_from_background`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from stm_dlp.data.dicom import read_dicom_study, read_dicom_volume, validate_study
from stm_dlp.data.isles2024 import brain_from_background
from stm_dlp.types import PARAMS, Study, StudyError

#: Map folder → what it becomes: a label parameter, or a meta key.
MAP_FOLDERS: dict[str, str] = {"NLR_CBV": "cbv", "NLR_CBF": "cbf", "NLR_MTT": "nlr_mtt", "NLR_TTP": "nlr_ttp"}
REQUIRED = ("NLR_CBV", "NLR_CBF")
MAPS_SUFFIX = "_Maps"
#: The parameters UniToBrain labels.
LABELLED: tuple[str, ...] = ("cbv", "cbf")
#: Largest allowed in-plane difference (mm) between a map's affine and the CTP's.
AFFINE_TOL_MM = 1e-2


def _map_dirs(folder: Path) -> dict[str, Path]:
    """``{NLR_xxx: folder}`` found under ``folder`` (any depth; names compared case-insensitively)."""
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for d in sorted(p for p in folder.rglob("*") if p.is_dir() and not p.name.startswith(".")):
        key = d.name.upper()
        if key in MAP_FOLDERS:
            if key in out:
                raise StudyError(f"{folder}: two {key} folders: {out[key]} and {d}; keep one")
            out[key] = d
    return out


def find_unitobrain(case: str | Path) -> tuple[Path, dict[str, Path]] | None:
    """``(CTP folder, {NLR_xxx: map folder})`` of a UniToBrain case, or None when ``case`` is not one."""
    p = Path(case)
    if not p.is_dir() or p.name.endswith(MAPS_SUFFIX):
        return None
    sibling = p.with_name(p.name + MAPS_SUFFIX)
    if sibling.is_dir():
        maps = _map_dirs(sibling)
        if any(k in maps for k in REQUIRED):
            return p, maps
    children = [c for c in sorted(p.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    maps = {c.name.upper(): c for c in children if c.name.upper() in MAP_FOLDERS}
    if not any(k in maps for k in REQUIRED):
        return None
    ctp = [c for c in children if c.name.upper() not in MAP_FOLDERS]
    if len(ctp) != 1:
        raise StudyError(f"{p}: a UniToBrain patient folder needs exactly one CTP folder beside the NLR_* map "
                         f"folders, found {len(ctp)} ({', '.join(c.name for c in ctp) or 'none'})")
    return ctp[0], maps


def is_unitobrain_case(path: str | Path) -> bool:
    """True for a UniToBrain CTP folder with a ``_Maps`` sibling, or a patient folder with NLR_* maps."""
    try:
        return find_unitobrain(path) is not None
    except StudyError:
        return True  # it is one, and reading it will say what is wrong


def read_unitobrain_case(case: str | Path, *, pseudonym_key: bytes | None = None,
                         on_bad_frame: str = "raise") -> Study:
    """Read one UniToBrain patient (see the module docstring).

    Args:
        case: the CTP folder of the release layout, or the patient folder.
        pseudonym_key: HMAC key for the patient pseudonym (from the CTP's PatientID, as for any DICOM).
        on_bad_frame: passed to :func:`~stm_dlp.data.dicom.read_dicom_study`.

    Returns:
        A validated :class:`Study` with maps ``(S, 3, H, W)`` (CBV, CBF, TMAX = 0), mask ``(S, H, W)``,
        ``labelled = ("cbv", "cbf")`` and ``meta["nlr_mtt"]`` / ``meta["nlr_ttp"]`` when present.

    Raises:
        StudyError: naming the folder or file — not a UniToBrain case, NLR_CBV or NLR_CBF missing, a
            map that does not overlay the CTP, or any DICOM problem.
    """
    p = Path(case)
    if not p.exists():
        raise StudyError(f"{p}: path does not exist")
    found = find_unitobrain(p)
    if found is None:
        raise StudyError(f"{p}: not a UniToBrain case (no NLR_CBV / NLR_CBF map folders in it or in "
                         f"{p.name}{MAPS_SUFFIX} beside it)")
    ctp_dir, map_dirs = found
    missing = [k for k in REQUIRED if k not in map_dirs]
    if missing:
        raise StudyError(f"{p}: {', '.join(missing)} map folder missing (UniToBrain labels need NLR_CBV and "
                         "NLR_CBF)")
    study = read_dicom_study(ctp_dir, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame)
    s_count, (h, w) = study.n_slices, study.shape_hw
    ctp_pos = np.asarray(study.meta["slice_positions_mm"], np.float64)
    vols: dict[str, np.ndarray] = {}
    for key, folder in map_dirs.items():
        vol = read_dicom_volume(folder)
        if vol.values.shape[1:] != (h, w):
            raise StudyError(f"{folder}: {key} images are {vol.values.shape[1]}×{vol.values.shape[2]} (Rows×Columns) "
                             f"but the CTP's are {h}×{w}; the map does not overlay the CTP")
        if len(vol.positions_mm) != s_count:
            raise StudyError(f"{folder}: {key} has {len(vol.positions_mm)} slices but the CTP has {s_count}; a map "
                             "needs one image per CTP slice")
        order = []
        for s, pos in enumerate(ctp_pos):
            k = int(np.argmin(np.abs(vol.positions_mm - pos)))
            if abs(float(vol.positions_mm[k]) - pos) > 0.05:
                raise StudyError(f"{folder}: no {key} image at the CTP's slice {s} (position {pos:.2f} mm along the "
                                 f"normal; the map has {np.round(vol.positions_mm, 2).tolist()[:8]} mm)")
            order.append(k)
        in_plane = float(np.max(np.abs(vol.affine[:3, :2] - study.affine[:3, :2])))
        shift = float(np.max(np.abs(vol.affine[:3, 3] - study.affine[:3, 3])))
        if in_plane > AFFINE_TOL_MM or shift > AFFINE_TOL_MM:
            raise StudyError(f"{folder}: {key} geometry (ImageOrientationPatient / PixelSpacing / "
                             f"ImagePositionPatient) differs from the CTP's by up to {max(in_plane, shift):.3g} mm; "
                             "the map does not overlay the CTP")
        values = vol.values[order]
        if not np.all(np.isfinite(values)):
            values = np.where(np.isfinite(values), values, np.float32(np.nan))
        vols[MAP_FOLDERS[key]] = values
    mask = brain_from_background({k: vols[k] for k in LABELLED})
    maps = np.stack([np.where(mask, vols[p], 0.0) if p in vols else np.zeros((s_count, h, w)) for p in PARAMS],
                    axis=1).astype(np.float32)
    meta = dict(study.meta)
    meta.update({"format": "unitobrain", "label_folders": {k: str(v) for k, v in map_dirs.items()},
                 "ctp_folder": str(ctp_dir)})
    for extra in ("nlr_mtt", "nlr_ttp"):
        if extra in vols:
            meta[extra] = np.where(mask, np.nan_to_num(vols[extra]), 0.0).astype(np.float32)
    return validate_study(dataclasses.replace(study, maps=maps, mask=mask, labelled=LABELLED, source=str(p),
                                              meta=meta))
