"""ISLES 2018 adapter: a ``case_N/`` folder of NIfTI files → :class:`~stm_dlp.types.Study`.

A case holds sub-folders such as ``SMIR.Brain.XX.O.CT_4DPWI.345576/SMIR.Brain.XX.O.CT_4DPWI.345576.nii``,
and likewise ``CT_CBV``, ``CT_CBF``, ``CT_MTT``, ``CT_Tmax``, ``CT`` and ``OT`` (the lesion mask,
training cases only). Files are found by the marker as a dot-separated part of the file name
(``.nii`` or ``.nii.gz``, any depth), not by folder names.

* ``CT_4DPWI`` is ``(X, Y, Z, T)`` (a singleton 4th axis ``(X, Y, Z, 1, T)`` is accepted) →
  frames ``(S=Z, T, H=Y, W=X)``, i.e. voxel ``[c, r, s, t]`` = row r, column c of slice s, the same
  ``(W, H, S)`` convention as our NIfTI maps, so ``affine`` is the file's affine unchanged.
* Frame times come from :mod:`stm_dlp.data.nifti4d`: a BIDS sidecar beside the file if there is one,
  else the header's time step (``pixdim[4]``, or ``pixdim[5]`` of the 5-D form, with the
  ``xyzt_units`` time unit: s, ms or µs), else ``frame_interval_s`` (with a warning). Without any
  of these the case is an error asking for ``frame_interval_s`` — the interval is never guessed.
  ``meta["time_source"]`` says which was used.
* Label maps from ``CT_CBV``, ``CT_CBF``, ``CT_Tmax`` (ISLES 2018 stores them in ml/100g,
  ml/100g/min and s, our units) are transposed ``(X, Y, Z)`` → ``(S, H, W)``. ``CT_MTT`` is
  ignored (MTT is derived). The brain mask is where any label map is non-zero (the challenge's
  maps are zero outside the brain); ``OT`` is kept as ``meta["lesion"]`` ``(S, H, W)`` bool.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from stm_dlp.data.nifti4d import load_perfusion_nifti, nifti_frame_times
from stm_dlp.types import PARAMS, Study, StudyError

#: File-name marker of each ISLES 2018 modality.
MARKERS: dict[str, str] = {"4dpwi": "CT_4DPWI", "cbv": "CT_CBV", "cbf": "CT_CBF", "mtt": "CT_MTT",
                           "tmax": "CT_Tmax", "ct": "CT", "ot": "OT"}


def _nifti_files(case_dir: Path) -> list[Path]:
    return sorted(p for p in case_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and (p.name.endswith(".nii") or p.name.endswith(".nii.gz")))


def _parts(path: Path) -> set[str]:
    name = path.name[:-7] if path.name.endswith(".nii.gz") else path.name[:-4]
    return {part.lower() for part in name.split(".")}


def find_isles_files(case_dir: str | Path) -> dict[str, Path]:
    """Modality key (see :data:`MARKERS`) → file, for one case folder.

    Raises:
        StudyError: two files carry the same marker.
    """
    case_dir = Path(case_dir)
    found: dict[str, Path] = {}
    for f in _nifti_files(case_dir):
        parts = _parts(f)
        for key, marker in MARKERS.items():
            if marker.lower() in parts:
                if key in found:
                    raise StudyError(f"{case_dir}: two {marker} files: {found[key]} and {f}; "
                                     "keep one per case")
                found[key] = f
    return found


def is_isles_case(path: str | Path) -> bool:
    """True when ``path`` is a folder holding (at any depth) a ``CT_4DPWI`` NIfTI file."""
    p = Path(path)
    if not p.is_dir():
        return False
    return any("ct_4dpwi" in _parts(f) for f in _nifti_files(p))


def _load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj).astype(np.float32)
    except Exception as exc:
        raise StudyError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
    return img, data


def read_isles_case(case_dir: str | Path, *, frame_interval_s: float | None = None,
                    pseudonym_key: bytes | None = None) -> Study:
    """Read one ISLES 2018 case folder (see the module docstring).

    Args:
        case_dir: e.g. ``TRAINING/case_1``.
        frame_interval_s: seconds between frames; required when the header lacks a time step.
        pseudonym_key: HMAC key; the patient id is the pseudonymised case folder name.

    Returns:
        A validated :class:`Study`: frames float32 ``(S, T, H, W)``, times_s ``(S, T)`` uniform,
        maps ``(S, 3, H, W)`` (CBV, CBF, TMAX) or None when the case has no maps, mask ``(S, H, W)``.
    """
    from stm_dlp.data.dicom import pseudonymise

    case = Path(case_dir)
    if not case.exists():
        raise StudyError(f"{case}: path does not exist")
    files = find_isles_files(case)
    if "4dpwi" not in files:
        raise StudyError(f"{case}: no CT_4DPWI NIfTI file (expected e.g. SMIR.Brain.XX.O.CT_4DPWI.<id>.nii)")
    path4d = files["4dpwi"]
    img, data, time_axis = load_perfusion_nifti(path4d)
    n_x, n_y, n_z, n_t = data.shape
    times_s, time_source = nifti_frame_times(img, path4d, n_t, n_z, time_axis, frame_interval_s)
    frames = np.ascontiguousarray(np.transpose(data, (2, 3, 1, 0)))  # (Z, T, Y, X) = (S, T, H, W)
    times = times_s.astype(np.float32)
    dt_s = float(np.median(np.diff(times_s[0])))
    affine = np.asarray(img.affine, np.float64)

    def as_shw(key: str) -> np.ndarray:
        path = files[key]
        m_img, vol = _load(path)
        if vol.ndim == 4 and vol.shape[3] == 1:
            vol = vol[..., 0]
        if vol.shape != (n_x, n_y, n_z):
            raise StudyError(f"{path}: shape {vol.shape} does not match the CT_4DPWI grid {(n_x, n_y, n_z)}")
        if not np.all(np.isfinite(vol)):
            raise StudyError(f"{path}: NaN or inf voxels in the map")
        if float(np.max(np.abs(m_img.affine - affine))) > 1e-3:
            warnings.warn(f"{path}: affine differs from the CT_4DPWI's; using the CT_4DPWI geometry",
                          stacklevel=3)
        return np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))

    have = [p for p in PARAMS if p in files]
    maps = mask = None
    if have:
        missing = [MARKERS[p] for p in PARAMS if p not in files]
        if missing:
            raise StudyError(f"{case}: has {', '.join(MARKERS[p] for p in have)} but no "
                             f"{', '.join(missing)}; a labelled case needs CT_CBV, CT_CBF and CT_Tmax")
        maps = np.stack([as_shw(p) for p in PARAMS], axis=1).astype(np.float32)
        mask = np.any(maps != 0, axis=1)
    meta = {"format": "isles2018", "frame_interval_s": dt_s, "time_tag": time_source, "time_source": time_source,
            "files": {k: str(v.relative_to(case)) for k, v in files.items()}}
    if "ot" in files:
        meta["lesion"] = as_shw("ot") > 0.5
    return Study(frames=frames, times_s=times, affine=affine, maps=maps, mask=mask,
                 patient_id=pseudonymise(case.name, pseudonym_key), source=str(case), meta=meta).validate()
