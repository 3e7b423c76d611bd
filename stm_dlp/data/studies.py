"""Studies on disk: the labelled-dataset layouts of DESIGN.md, and the one dispatch between readers.

:func:`read_any_study` is the ONE reading path of training (the DataModule), ``predict`` and ``calc``;
:func:`list_patients` turns a dataset root in any layout into its patients. The layouts
(:func:`study_layout`):

``dicom_labelled``
    ``ROOT/<patient>/ctp/`` (DICOM: classic, enhanced multi-frame, one series per time point, shuttle
    mode — any names and nesting) and ``ROOT/<patient>/maps/{cbv,cbf,tmax}.nii.gz`` (+ optional
    ``mtt``, ``mask``); a patient without ``maps/`` is unlabelled.
``nifti_labelled``
    ``ROOT/<patient>/ctp.nii.gz`` (4-D, times from a ``ctp.json`` BIDS sidecar or the header:
    :mod:`stm_dlp.data.nifti4d`) and the same ``maps/``.
``isles2018``
    an ISLES 2018 ``case_N/`` folder (:mod:`stm_dlp.data.isles`).
``isles2024``
    an ISLES'24 subject ``raw_data/sub-strokeXXXX`` (:mod:`stm_dlp.data.isles2024`); the release
    folder itself is a root of subjects.
``unitobrain``
    a UniToBrain CTP folder with its ``<folder>_Maps`` sibling, or a patient folder with ``NLR_*`` map
    folders (:mod:`stm_dlp.data.unitobrain`; no TMAX).
``nifti4d``
    a bare 4-D ``.nii`` / ``.nii.gz`` file (unlabelled).
``dicom``
    a bare DICOM folder (unlabelled).

Label maps of the ``maps/`` layouts are NIfTI volumes in ``(W, H, S)`` order with the scan's affine
(as :func:`stm_dlp.io.nifti.write_maps_nifti` writes them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from stm_dlp.data.cache import source_fingerprint
from stm_dlp.data.dicom import read_dicom_study, validate_study
from stm_dlp.data.isles import is_isles_case, read_isles_case
from stm_dlp.data.isles2024 import (
    _subject_dirs,
    is_isles2024_root,
    is_isles2024_subject,
    list_isles2024_subjects,
    read_isles2024_case,
)
from stm_dlp.data.nifti4d import NIFTI_SUFFIXES, read_nifti4d, sidecar_path
from stm_dlp.data.unitobrain import find_unitobrain, is_unitobrain_case, read_unitobrain_case
from stm_dlp.io.nifti import read_nifti_maps
from stm_dlp.types import PARAMS, Study, StudyError

#: Every layout :func:`study_layout` can tell (see the module docstring).
LAYOUTS = ("dicom_labelled", "nifti_labelled", "isles2018", "isles2024", "unitobrain", "nifti4d", "dicom")

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


def _nifti_ctp(pdir: Path) -> Path | None:
    for suffix in NIFTI_SUFFIXES:
        if (pdir / f"ctp{suffix}").is_file():
            return pdir / f"ctp{suffix}"
    return None


def read_labelled_study(patient_dir: str | Path, *, pseudonym_key: bytes | None = None,
                        on_bad_frame: str = "raise", frame_interval_s: float | None = None) -> Study:
    """Read ``patient_dir/ctp/`` (DICOM) or ``patient_dir/ctp.nii.gz`` (4-D NIfTI) and, if present,
    ``patient_dir/maps/`` (labels).

    ``on_bad_frame`` is passed to :func:`~stm_dlp.data.dicom.read_dicom_study`; ``frame_interval_s``
    to :func:`~stm_dlp.data.nifti4d.read_nifti4d` (used only when the NIfTI has no times).

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
    nifti = _nifti_ctp(pdir)
    if ctp.is_dir():
        study = read_dicom_study(ctp, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame)
    elif nifti is not None:
        study = read_nifti4d(nifti, frame_interval_s=frame_interval_s, pseudonym_key=pseudonym_key,
                             patient_name=pdir.name)
    else:
        raise StudyError(f"{pdir}: no ctp/ folder (expected {pdir}/ctp/ holding the DICOM series, or "
                         f"{pdir}/ctp.nii.gz, and optionally {pdir}/maps/ holding cbv/cbf/tmax.nii.gz)")
    maps_dir = pdir / "maps"
    meta = dict(study.meta)
    maps = mask = None
    if maps_dir.is_dir():
        maps, mask = read_label_maps(maps_dir, (study.n_slices, *study.shape_hw), study.affine)
        meta["labels"] = str(maps_dir)
    return validate_study(dataclasses.replace(study, maps=maps, mask=mask, source=str(pdir), meta=meta))


def study_layout(path: str | Path) -> str | None:
    """Which of :data:`LAYOUTS` ``path`` is in (the order of the checks decides), or None when it does
    not exist. A folder that is none of the others is taken as a bare DICOM folder."""
    p = Path(path)
    if p.is_file():
        return "nifti4d" if p.name.endswith(NIFTI_SUFFIXES) else "dicom"
    if not p.is_dir():
        return None
    if (p / "ctp").is_dir():
        return "dicom_labelled"
    if _nifti_ctp(p) is not None:
        return "nifti_labelled"
    if is_isles_case(p):
        return "isles2018"
    if is_isles2024_subject(p):
        return "isles2024"
    if is_unitobrain_case(p):
        return "unitobrain"
    return "dicom"


def _is_patient(path: Path) -> bool:
    if not path.is_dir() or path.name.startswith("."):
        return False
    return study_layout(path) not in (None, "dicom")


def list_patients(root: str | Path) -> list[Path]:
    """The patients under dataset ``root`` in any layout, sorted by name: sub-folders that are a patient
    (``ctp/``, ``ctp.nii.gz``, an ISLES 2018 case, a UniToBrain case), the subjects of an ISLES'24
    release, or sub-folders that each hold one patient's DICOM directly (one study each).

    Hidden folders (e.g. a half-written ``.sub-0001.xxx.tmp``) are skipped. ``root`` itself is
    returned when it is a single patient/case folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise StudyError(f"{root}: dataset root does not exist or is not a folder")
    if is_isles2024_root(root):
        return list_isles2024_subjects(root)
    found = sorted((p for p in root.iterdir() if _is_patient(p)), key=lambda p: p.name)
    if not found and _is_patient(root):
        return [root]
    if not found:
        found = _dicom_patient_folders(root)
    return found


def _first_dicom(folder: Path) -> Path | None:
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            with open(f, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                return f
    return None


def _dicom_patient_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that each hold one patient's DICOM directly (any names and nesting): a cohort
    only when they belong to different studies (StudyInstanceUID) — sub-folders of one study (a series per
    time point, a series per folder) are that one study, read from ``root``."""
    import pydicom

    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(subdirs) < 2 or any(f.is_file() and not f.name.startswith(".") for f in root.iterdir()):
        return []
    studies: dict[Path, str] = {}
    for d in subdirs:
        first = _first_dicom(d)
        if first is None:
            return []
        try:
            ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - not DICOM after all: not a DICOM cohort
            return []
        studies[d] = str(getattr(ds, "StudyInstanceUID", ""))
    return subdirs if len(set(studies.values())) == len(subdirs) else []


def study_sources(path: str | Path) -> list[Path]:
    """Every file or folder the study at ``path`` is read from (for cache fingerprints): ISLES'24 also
    reads the subject's ``derivatives``, a UniToBrain release case its ``_Maps`` sibling, a NIfTI its sidecar."""
    p = Path(path)
    layout = study_layout(p)
    if layout == "isles2024":
        return _subject_dirs(p)
    if layout == "unitobrain":
        found = find_unitobrain(p)
        if found is not None:
            ctp, maps = found
            outside = [d for d in (ctp, *maps.values()) if p.resolve() not in d.resolve().parents and d != p]
            return [p, *dict.fromkeys(outside)]
    if layout == "nifti4d" and (side := sidecar_path(p)) is not None:
        return [p, side]
    return [p]


def study_fingerprint(path: str | Path) -> dict[str, Any]:
    """:func:`~stm_dlp.data.cache.source_fingerprint` of every source of the study (one source: the
    same dict as ``source_fingerprint(path)``)."""
    sources = study_sources(path)
    if len(sources) == 1:
        return source_fingerprint(sources[0])
    return {"sources": [source_fingerprint(s) for s in sources]}


def read_any_study(path: str | Path, *, pseudonym_key: bytes | None = None,
                   frame_interval_s: float | None = None, on_bad_frame: str = "raise") -> Study:
    """Read whatever ``path`` holds, in any of :data:`LAYOUTS` (see the module docstring).

    Args:
        path: the patient folder, case, subject, CTP folder or 4-D NIfTI file.
        pseudonym_key: HMAC key for patient pseudonyms.
        frame_interval_s: seconds between frames, for NIfTI inputs whose files give no times.
        on_bad_frame: ``"raise"`` or ``"nan"`` for DICOM series (see
            :func:`~stm_dlp.data.dicom.read_dicom_study`); NIfTI cases are always strict.

    Returns:
        A validated :class:`Study`; ``meta["layout"]`` says which layout was read. A study whose layout
        carries no brain mask gets the automatic one (:func:`with_brain_mask`).
    """
    p = Path(path)
    layout = study_layout(p)
    if layout is None:
        raise StudyError(f"{p}: path does not exist")
    if layout in ("dicom_labelled", "nifti_labelled"):
        study = read_labelled_study(p, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame,
                                    frame_interval_s=frame_interval_s)
    elif layout == "isles2018":
        study = read_isles_case(p, frame_interval_s=frame_interval_s, pseudonym_key=pseudonym_key)
    elif layout == "isles2024":
        study = read_isles2024_case(p, frame_interval_s=frame_interval_s, pseudonym_key=pseudonym_key)
    elif layout == "unitobrain":
        study = read_unitobrain_case(p, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame)
    elif layout == "nifti4d":
        study = read_nifti4d(p, frame_interval_s=frame_interval_s, pseudonym_key=pseudonym_key)
    else:
        if p.is_dir() and is_isles2024_root(p):
            raise StudyError(f"{p}: an ISLES'24 release (raw_data/, derivatives/), not one study; give one "
                             f"subject ({p}/raw_data/sub-…) or use the folder as a dataset root")
        study = read_dicom_study(p, pseudonym_key=pseudonym_key, on_bad_frame=on_bad_frame)
    study.meta["layout"] = layout
    return with_brain_mask(study)


def with_brain_mask(study: Study) -> Study:
    """``study`` with the automatic CT brain mask (:func:`stm_dlp.perfusion.mask.brain_mask`) where it has
    none (``meta["mask_source"]`` says which): the one mask predict, calc, training losses and metrics use."""
    if study.mask is not None:
        return dataclasses.replace(study, meta={**study.meta, "mask_source": study.meta.get("mask_source", "given")})
    from stm_dlp.perfusion.mask import brain_mask

    frames = np.nan_to_num(np.asarray(study.frames, np.float32), nan=-1000.0)  # unreadable frames: air, not brain
    mask = np.asarray(brain_mask(frames, np.asarray(study.times_s, np.float32)), bool)
    return dataclasses.replace(study, mask=mask, meta={**study.meta, "mask_source": "automatic"})


__all__ = ["LAYOUTS", "list_patients", "read_any_study", "read_label_maps", "read_labelled_study",
           "study_fingerprint", "study_layout", "study_sources", "with_brain_mask"]
