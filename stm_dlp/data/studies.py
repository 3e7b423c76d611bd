"""Studies on disk: the labelled-dataset layout of DESIGN.md, and dispatch between readers.

Layout::

    ROOT/<patient>/ctp/                         the DICOM series (any names and nesting)
    ROOT/<patient>/maps/{cbv,cbf,tmax}.nii.gz   label maps (+ optional mtt.nii.gz, mask.nii.gz)

Label maps are NIfTI volumes in ``(W, H, S)`` order with the scan's affine (as
:func:`stm_dlp.io.nifti.write_maps_nifti` writes them). A patient without ``maps/`` is unlabelled
(``Study.maps is None``). ISLES 2018 case folders are read by :mod:`stm_dlp.data.isles`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from stm_dlp.data.dicom import read_dicom_study, validate_study
from stm_dlp.data.isles import is_isles_case, read_isles_case
from stm_dlp.io.nifti import read_nifti_maps
from stm_dlp.types import PARAMS, Study, StudyError

#: Largest allowed difference (mm, element-wise) between a label map's affine and the scan's.
AFFINE_TOL_MM = 1e-3


def _find_map(maps_dir: Path, name: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        p = maps_dir / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _read_map(path: Path, shape_shw: tuple[int, int, int], scan_affine: np.ndarray | None) -> np.ndarray:
    try:
        vol, affine = read_nifti_maps(path)
    except StudyError:
        raise
    except Exception as exc:
        raise StudyError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
    if vol.shape != tuple(shape_shw):
        s, h, w = shape_shw
        raise StudyError(f"{path}: label map has shape (S, H, W) = {vol.shape} (NIfTI array "
                         f"{vol.shape[::-1]}) but the scan has {tuple(shape_shw)} (NIfTI array {(w, h, s)}); "
                         "maps must be on the scan's grid")
    bad = int(np.count_nonzero(~np.isfinite(vol)))
    if bad:
        raise StudyError(f"{path}: {bad} NaN or inf voxels in the label map; fix or mask them in the source")
    if scan_affine is not None:
        diff = float(np.max(np.abs(np.asarray(affine) - np.asarray(scan_affine))))
        if diff > AFFINE_TOL_MM:
            raise StudyError(f"{path}: affine differs from the scan's (DICOM geometry) by up to "
                             f"{diff:.4g} mm; the label maps do not overlay the scan "
                             f"(tolerance {AFFINE_TOL_MM} mm)")
    return vol


def read_label_maps(maps_dir: str | Path, shape_shw: tuple[int, int, int],
                    scan_affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``maps_dir/{cbv,cbf,tmax}.nii.gz`` (+ optional ``mtt``, ``mask``) and check them.

    Args:
        maps_dir: the ``maps/`` folder.
        shape_shw: the scan's ``(S, H, W)``; every map must match it.
        scan_affine: the scan's affine; every map's affine must be within :data:`AFFINE_TOL_MM`.

    Returns:
        ``(maps, mask)``: float32 ``(S, 3, H, W)`` in :data:`PARAMS` order (ml/100g, ml/100g/min, s),
        and bool ``(S, H, W)`` (``mask > 0.5``) or ``None`` without ``mask.nii.gz``.

    Raises:
        StudyError: a missing, unreadable, wrong-shape, NaN-holding or misaligned map (file named).
    """
    maps_dir = Path(maps_dir)
    vols = []
    for name in PARAMS:
        path = _find_map(maps_dir, name)
        if path is None:
            raise StudyError(f"{maps_dir / (name + '.nii.gz')}: label map missing (a maps/ folder needs "
                             f"{', '.join(p + '.nii.gz' for p in PARAMS)})")
        vols.append(_read_map(path, shape_shw, scan_affine))
    mtt = _find_map(maps_dir, "mtt")
    if mtt is not None:  # derived (CBV / CBF * 60), but a broken file is still worth reporting
        _read_map(mtt, shape_shw, scan_affine)
    mask_path = _find_map(maps_dir, "mask")
    mask = None if mask_path is None else _read_map(mask_path, shape_shw, scan_affine) > 0.5
    return np.stack(vols, axis=1).astype(np.float32), mask


def read_labelled_study(patient_dir: str | Path, *, pseudonym_key: bytes | None = None,
                        on_bad_frame: str = "raise") -> Study:
    """Read ``patient_dir/ctp/`` (DICOM) and, if present, ``patient_dir/maps/`` (labels).

    ``on_bad_frame`` is passed to :func:`~stm_dlp.data.dicom.read_dicom_study`.

    Returns:
        A validated :class:`Study` (frames ``(S, T, H, W)`` HU, times_s ``(S, T)`` s, maps
        ``(S, 3, H, W)`` or None, mask ``(S, H, W)`` or None) with ``source`` = ``patient_dir``.

    Raises:
        StudyError: see :func:`stm_dlp.data.dicom.read_dicom_study` and :func:`read_label_maps`.
    """
    pdir = Path(patient_dir)
    if not pdir.exists():
        raise StudyError(f"{pdir}: path does not exist")
    ctp = pdir / "ctp"
    if not ctp.is_dir():
        raise StudyError(f"{pdir}: no ctp/ folder (expected {pdir}/ctp/ holding the DICOM series and "
                         f"optionally {pdir}/maps/ holding cbv/cbf/tmax.nii.gz)")
    study = read_dicom_study(ctp, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame)
    maps_dir = pdir / "maps"
    meta = dict(study.meta)
    maps = mask = None
    if maps_dir.is_dir():
        maps, mask = read_label_maps(maps_dir, (study.n_slices, *study.shape_hw), study.affine)
        meta["labels"] = str(maps_dir)
    return validate_study(dataclasses.replace(study, maps=maps, mask=mask, source=str(pdir), meta=meta))


def _is_patient(path: Path) -> bool:
    if not path.is_dir() or path.name.startswith("."):
        return False
    return (path / "ctp").is_dir() or is_isles_case(path)


def list_patients(root: str | Path) -> list[Path]:
    """Patient folders under ``root``: sub-folders with ``ctp/`` or an ISLES 2018 case, sorted by name.

    Hidden folders (e.g. a half-written ``.sub-0001.xxx.tmp``) are skipped. ``root`` itself is
    returned when it is a single patient/case folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise StudyError(f"{root}: dataset root does not exist or is not a folder")
    found = sorted((p for p in root.iterdir() if _is_patient(p)), key=lambda p: p.name)
    if not found and _is_patient(root):
        return [root]
    return found


def with_brain_mask(study: Study) -> Study:
    """``study`` with the automatic CT brain mask (:func:`stm_dlp.perfusion.mask.brain_mask`) where it has
    none (``meta["mask_source"]`` says which): the one mask predict, calc, training losses and metrics use."""
    if study.mask is not None:
        return dataclasses.replace(study, meta={**study.meta, "mask_source": study.meta.get("mask_source", "given")})
    from stm_dlp.perfusion.mask import brain_mask

    frames = np.nan_to_num(np.asarray(study.frames, np.float32), nan=-1000.0)  # unreadable frames: air, not brain
    mask = np.asarray(brain_mask(frames, np.asarray(study.times_s, np.float32)), bool)
    return dataclasses.replace(study, mask=mask, meta={**study.meta, "mask_source": "automatic"})


def read_any_study(path: str | Path, *, pseudonym_key: bytes | None = None,
                   frame_interval_s: float | None = None, on_bad_frame: str = "raise") -> Study:
    """Read whatever ``path`` holds (see :func:`_read_study`) and give it a brain mask
    (:func:`with_brain_mask`) when its layout carries none."""
    return with_brain_mask(_read_study(path, pseudonym_key=pseudonym_key, frame_interval_s=frame_interval_s,
                                       on_bad_frame=on_bad_frame))


def _read_study(path: str | Path, *, pseudonym_key: bytes | None = None,
                frame_interval_s: float | None = None, on_bad_frame: str = "raise") -> Study:
    """Read whatever ``path`` holds: a patient folder (``ctp/`` + ``maps/``), an ISLES 2018 case, or a
    bare DICOM series folder (unlabelled).

    Args:
        path: the folder.
        pseudonym_key: HMAC key for patient pseudonyms.
        frame_interval_s: seconds between frames, for ISLES cases whose header lacks it.
        on_bad_frame: ``"raise"`` or ``"nan"`` for DICOM series (see
            :func:`~stm_dlp.data.dicom.read_dicom_study`); NIfTI cases are always strict.
    """
    p = Path(path)
    if not p.exists():
        raise StudyError(f"{p}: path does not exist")
    if (p / "ctp").is_dir():
        return read_labelled_study(p, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame)
    if is_isles_case(p):
        return read_isles_case(p, frame_interval_s=frame_interval_s, pseudonym_key=pseudonym_key)
    return read_dicom_study(p, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame)
