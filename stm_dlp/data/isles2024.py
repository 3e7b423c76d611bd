"""ISLES'24 adapter: one subject of the ISLES'24 release (BIDS-like NIfTI) → :class:`~stm_dlp.types.Study`.

The release (Riedel et al. 2024; Zenodo 17652035) holds, for subject ``sub-strokeXXXX``::

    raw_data/sub-strokeXXXX/ses-01/sub-strokeXXXX_ses-01_ctp.nii.gz                 the 4-D CTP
    raw_data/sub-strokeXXXX/ses-01/perfusion-maps/sub-strokeXXXX_ses-01_{cbf,cbv,mtt,tmax}.nii.gz
    derivatives/sub-strokeXXXX/ses-01/sub-strokeXXXX_ses-01_space-ncct_ctp.nii.gz   (+ perfusion-maps/…space-ncct…)
    derivatives/sub-strokeXXXX/ses-02/sub-strokeXXXX_ses-02_space-ncct_lesion-msk.nii.gz

Other releases spell the subject ``sub-strokecase0001`` and the session ``ses-0001``, the top folder
``rawdata``; files are found by their BIDS name (``<subject>_<session>[_space-<space>]_<suffix>``) at
any depth below the subject's folders, not by folder names.

* **Space.** The CTP and its maps are taken from one space: the native one (``raw_data``, no
  ``space-`` entity) when it has a CTP, else ``space-ncct`` (``derivatives``); ``space=`` forces one.
* **Frames and times** as any 4-D NIfTI (:mod:`stm_dlp.data.nifti4d`: BIDS sidecar, pixdim, or the
  configured interval).
* **Labels.** ``cbv`` (ml/100g), ``cbf`` (ml/100g/min) and ``tmax`` (s) — the release's icobrain
  units, ours; ``mtt`` is checked but not used (MTT is derived). A dataset may lack a map: the
  study's ``labelled`` names those present (missing channels are zero-filled), none → unlabelled.
  A map whose grid differs from the CTP's is an error naming both files.
* **Mask, not labels, from the background.** Outside the brain the maps hold fill values (a negative
  TMAX, NaN). When any map has a negative or non-finite value, the brain is where every map is
  finite and >= 0; otherwise (a zero fill) where any map is non-zero. Labels are 0 outside the mask.
* The follow-up lesion mask (``lesion-msk``) is kept as ``meta["lesion"]`` when it is on the CTP's grid.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from stm_dlp.data.nifti4d import NIFTI_SUFFIXES, nifti_stem, read_nifti4d
from stm_dlp.types import PARAMS, Study, StudyError

#: Top-level folders of a release (the raw one first).
RAW_DIRS = ("raw_data", "rawdata")
DERIVATIVES = "derivatives"
MAP_SUFFIXES = ("cbv", "cbf", "tmax", "mtt")
SPACES = ("auto", "native", "ncct")


def _entities(path: Path) -> tuple[str, str | None, str | None, str] | None:
    """``(subject, session, space, suffix)`` of a BIDS-named NIfTI file, or None."""
    parts = nifti_stem(path).split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-"):
        return None
    session = next((p for p in parts[1:-1] if p.startswith("ses-")), None)
    space = next((p[len("space-"):] for p in parts[1:-1] if p.startswith("space-")), None)
    return parts[0], session, space, parts[-1].lower()


def _subject_dirs(subject_dir: Path) -> list[Path]:
    """Every folder of this subject in the release (raw and derivatives), the given one first."""
    out = [subject_dir]
    top = subject_dir.parent
    if top.name in (*RAW_DIRS, DERIVATIVES):
        for name in (*RAW_DIRS, DERIVATIVES):
            other = top.parent / name / subject_dir.name
            if other.is_dir() and other.resolve() != subject_dir.resolve():
                out.append(other)
    return out


def find_isles2024_files(subject_dir: str | Path) -> dict[tuple[str, str], Path]:
    """``{(space, suffix): file}`` of one subject (space ``native`` when the name has no ``space-``).

    Raises:
        StudyError: two files for one space and suffix.
    """
    sd = Path(subject_dir)
    found: dict[tuple[str, str], Path] = {}
    for folder in _subject_dirs(sd):
        for f in sorted(folder.rglob("*")):
            if not f.is_file() or f.name.startswith(".") or not f.name.endswith(NIFTI_SUFFIXES):
                continue
            ent = _entities(f)
            if ent is None or ent[0] != sd.name:
                continue
            key = (ent[2] or "native", ent[3])
            if key in found:
                raise StudyError(f"{sd}: two {key[1]} files in space {key[0]}: {found[key]} and {f}; keep one")
            found[key] = f
    return found


def is_isles2024_subject(path: str | Path) -> bool:
    """True for a ``sub-*`` folder holding (at any depth) a ``<subject>_…_ctp.nii[.gz]`` file."""
    p = Path(path)
    if not p.is_dir() or not p.name.startswith("sub-"):
        return False
    return any(suffix == "ctp" for (_space, suffix) in find_isles2024_files(p))


def is_isles2024_root(path: str | Path) -> bool:
    """True for a release folder: ``raw_data`` / ``rawdata`` / ``derivatives`` holding ``sub-*`` folders."""
    p = Path(path)
    return any((p / d).is_dir() and any(c.is_dir() and c.name.startswith("sub-") for c in (p / d).iterdir())
               for d in (*RAW_DIRS, DERIVATIVES))


def list_isles2024_subjects(root: str | Path) -> list[Path]:
    """The subjects of a release, one folder each (the raw one when both exist), sorted by name."""
    r = Path(root)
    chosen: dict[str, Path] = {}
    for d in (*RAW_DIRS, DERIVATIVES):
        top = r / d
        if not top.is_dir():
            continue
        for c in sorted(top.iterdir()):
            if c.name not in chosen and not c.name.startswith(".") and is_isles2024_subject(c):
                chosen[c.name] = c
    return [chosen[k] for k in sorted(chosen)]


def _load_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(str(path))
        vol = np.asanyarray(img.dataobj).astype(np.float32)
    except Exception as exc:  # noqa: BLE001
        raise StudyError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    return vol, np.asarray(img.affine, np.float64)


def brain_from_background(vols: dict[str, np.ndarray]) -> np.ndarray:
    """The brain mask implied by the maps' background fill (rule in the module docstring)."""
    stack = np.stack(list(vols.values()))
    if np.any(~np.isfinite(stack)) or np.any(stack < 0):
        return np.all(np.isfinite(stack) & (stack >= 0), axis=0)
    return np.any(stack != 0, axis=0)


def read_isles2024_case(subject_dir: str | Path, *, space: str = "auto", frame_interval_s: float | None = None,
                        pseudonym_key: bytes | None = None) -> Study:
    """Read one ISLES'24 subject (see the module docstring).

    Args:
        subject_dir: ``…/raw_data/sub-strokeXXXX`` (or its ``derivatives`` twin, or a lone subject folder).
        space: ``auto`` (native if it has a CTP, else ncct), ``native`` or ``ncct``.
        frame_interval_s: seconds between frames when the CTP gives no times itself.
        pseudonym_key: HMAC key; the patient id is the pseudonymised subject name.

    Returns:
        A validated :class:`Study`: frames ``(S, T, H, W)``, times_s ``(S, T)``, maps ``(S, 3, H, W)`` (0
        outside the mask) or None, mask ``(S, H, W)`` or None, ``labelled`` the maps present.
    """
    from stm_dlp.data.dicom import pseudonymise

    sd = Path(subject_dir)
    if not sd.is_dir():
        raise StudyError(f"{sd}: path does not exist or is not a folder")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    files = find_isles2024_files(sd)
    spaces = [s for s in ("native", "ncct") if (s, "ctp") in files] + sorted(
        {s for s, x in files if x == "ctp"} - {"native", "ncct"})
    if not spaces:
        raise StudyError(f"{sd}: no CTP file ({sd.name}_<session>_ctp.nii.gz) for this subject")
    chosen = spaces[0] if space == "auto" else space
    if (chosen, "ctp") not in files:
        raise StudyError(f"{sd}: no CTP file in space {chosen} (spaces with a CTP: {', '.join(spaces)})")
    ctp_path = files[(chosen, "ctp")]
    study = read_nifti4d(ctp_path, frame_interval_s=frame_interval_s, pseudonym_key=pseudonym_key,
                         patient_name=sd.name)
    s_count, (h, w) = study.n_slices, study.shape_hw
    grid = (w, h, s_count)
    vols: dict[str, np.ndarray] = {}
    for suffix in MAP_SUFFIXES:
        path = files.get((chosen, suffix))
        if path is None:
            continue
        vol, affine = _load_map(path)
        if vol.shape != grid:
            raise StudyError(f"{path}: map shape {vol.shape} does not match the CTP grid {grid} of {ctp_path} "
                             "(NIfTI (X, Y, Z)); maps must be on the CTP's grid")
        if float(np.max(np.abs(affine - study.affine))) > 1e-3:
            warnings.warn(f"{path}: affine differs from the CTP's ({ctp_path.name}); using the CTP geometry",
                          stacklevel=2)
        vols[suffix] = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))  # (S, H, W)
    labelled = tuple(p for p in PARAMS if p in vols)
    maps = mask = None
    if labelled:
        mask = brain_from_background(vols)
        maps = np.stack([np.where(mask, vols[p], 0.0) if p in vols else np.zeros((s_count, h, w))
                         for p in PARAMS], axis=1).astype(np.float32)
    meta = {**study.meta, "format": "isles2024", "space": chosen,
            "files": {k: str(v) for (sp, k), v in files.items() if sp == chosen}}
    lesion_path = next((v for (sp, k), v in files.items() if k == "lesion-msk"), None)
    if lesion_path is not None:
        lesion, affine = _load_map(lesion_path)
        if lesion.shape == grid and float(np.max(np.abs(affine - study.affine))) <= 1e-3:
            meta["lesion"] = np.ascontiguousarray(np.transpose(lesion, (2, 1, 0))) > 0.5
            meta["files"]["lesion-msk"] = str(lesion_path)
    return Study(frames=study.frames, times_s=study.times_s, affine=study.affine, maps=maps, mask=mask,
                 labelled=labelled or PARAMS, patient_id=pseudonymise(sd.name, pseudonym_key), source=str(sd),
                 meta=meta).validate()
