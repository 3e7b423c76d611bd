"""4-D NIfTI CT perfusion with real frame times → :class:`~stm_dlp.types.Study`.

The frames: a ``(X, Y, Z, T)`` volume (or ISLES 2018's 5-D ``(X, Y, Z, 1, T)``) → frames
``(S=Z, T, H=Y, W=X)``; voxel ``[c, r, s, t]`` is row r, column c of slice s — the ``(W, H, S)``
convention of our NIfTI maps, so the file's affine is the study's affine unchanged.

The frame times, first source that gives them (recorded in ``meta["time_source"]``, and with it in
every ``summary.json``):

1. a **BIDS sidecar** next to the file (``<name>.json``, as dcm2niix writes it):
   ``FrameTimesStart`` (s, one per volume), else ``AcquisitionDuration`` (one per volume: frame
   durations, frames back to back; or one number: the whole acquisition, split evenly over the
   volumes). ``SliceTiming`` (s, one per slice, within each volume) is added per slice when
   present, so slice-interleaved and shuttle acquisitions keep per-slice times;
2. the header's time step: ``pixdim[4]`` of a 4-D file, ``pixdim[5]`` of a 5-D ``(X, Y, Z, 1, T)``
   one (ISLES 2018), in the ``xyzt_units`` time unit (s, ms or µs);
3. the **configured** interval (``frame_interval_s``; ``data.frame_interval_s`` / the CLIs'
   ``frame_interval_s=``), with a warning — it is never guessed: without any of these the file is
   refused. A configured interval that contradicts the file's own times is warned about and the
   file's times are used.

A sidecar that does not fit the file (a frame count other than the volumes', times not increasing,
not JSON) is an error naming the sidecar and the field.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from stm_dlp.types import Study, StudyError

_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
#: File-name endings of NIfTI files.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: str | Path) -> str:
    """``name`` of ``name.nii`` / ``name.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def sidecar_path(path: str | Path) -> Path | None:
    """The BIDS sidecar ``<name>.json`` beside ``path``, or None."""
    p = Path(path)
    side = p.with_name(nifti_stem(p) + ".json")
    return side if side.is_file() else None


def load_perfusion_nifti(path: str | Path) -> tuple[nib.Nifti1Image, np.ndarray, int]:
    """``(image, data (X, Y, Z, T) float32, time axis of the file: 3, or 4 for (X, Y, Z, 1, T))``.

    Raises:
        StudyError: not readable as NIfTI, not 4-D / 5-D with a singleton 4th axis, NaN or inf values.
    """
    p = Path(path)
    try:
        img = nib.load(str(p))
        data = np.asanyarray(img.dataobj).astype(np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on a corrupt file
        raise StudyError(f"{p}: cannot be read as NIfTI ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") \
            from None
    if data.ndim == 5 and data.shape[3] == 1:
        data, time_axis = data[:, :, :, 0, :], 4
    elif data.ndim == 4:
        time_axis = 3
    else:
        raise StudyError(f"{p}: a perfusion NIfTI must be 4-D (X, Y, Z, T) or 5-D (X, Y, Z, 1, T), got shape "
                         f"{data.shape}")
    if data.shape[3] < 2:
        raise StudyError(f"{p}: {data.shape[3]} volume(s) along time; a CTP series needs at least 2")
    if not np.all(np.isfinite(data)):
        raise StudyError(f"{p}: NaN or inf values in the perfusion series")
    return img, data, time_axis


def _number_list(side: Path, key: str, value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise StudyError(f"{side}: {key} must be a list of numbers (seconds), got {str(value)[:80]}") from None
    if arr.size != n:
        raise StudyError(f"{side}: {key} has {arr.size} values but the NIfTI has {n} {what}; the sidecar does not "
                         "belong to this file (or the file was cut)")
    if not np.all(np.isfinite(arr)):
        raise StudyError(f"{side}: {key} holds non-finite values")
    return arr


def _read_sidecar(side: Path) -> dict[str, Any]:
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudyError(f"{side}: the BIDS sidecar is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise StudyError(f"{side}: the BIDS sidecar must be a JSON object")
    return data


def _sidecar_times(side: Path, n_t: int, n_z: int) -> tuple[np.ndarray, str] | None:
    """``(times (Z, T) s, source)`` from a BIDS sidecar, or None when it has no frame timing."""
    data = _read_sidecar(side)
    if "FrameTimesStart" in data:
        start = _number_list(side, "FrameTimesStart", data["FrameTimesStart"], n_t, "volumes")
        source = f"BIDS sidecar {side.name}: FrameTimesStart"
    elif "AcquisitionDuration" in data:
        value = data["AcquisitionDuration"]
        if isinstance(value, (list, tuple)):
            durations = _number_list(side, "AcquisitionDuration", value, n_t, "volumes")
            start = np.concatenate([[0.0], np.cumsum(durations)[:-1]])
            source = f"BIDS sidecar {side.name}: AcquisitionDuration per volume"
        else:
            total = float(_number_list(side, "AcquisitionDuration", value, 1, "(one number)")[0])
            if not total > 0:
                raise StudyError(f"{side}: AcquisitionDuration must be a positive number of seconds, got {value}")
            start = np.arange(n_t) * (total / n_t)
            source = f"BIDS sidecar {side.name}: AcquisitionDuration / volumes"
    else:
        return None
    times = np.repeat(start[None, :], n_z, axis=0)
    if "SliceTiming" in data:
        times = times + _number_list(side, "SliceTiming", data["SliceTiming"], n_z, "slices")[:, None]
        source += " + SliceTiming"
    bad = np.nonzero(np.diff(times, axis=1) <= 0)
    if bad[0].size:
        raise StudyError(f"{side}: frame times from {source.split(': ', 1)[1]} are not strictly increasing "
                         f"(slice {int(bad[0][0])}, volume {int(bad[1][0]) + 1})")
    return times - times.min(), source


def _header_step(img: nib.Nifti1Image, time_axis: int) -> tuple[float | None, str]:
    """The header's time step in seconds (or None) and a description of where it came from."""
    index = time_axis + 1  # pixdim[0] is qfac
    pixdim = float(img.header["pixdim"][index])
    unit = img.header.get_xyzt_units()[1]
    where = f"NIfTI pixdim[{index}] = {pixdim:g} ({unit})"
    if unit in _TIME_UNITS and pixdim > 0 and np.isfinite(pixdim):
        return pixdim * _TIME_UNITS[unit], where
    return None, where


def nifti_frame_times(img: nib.Nifti1Image, path: str | Path, n_t: int, n_z: int, time_axis: int,
                      frame_interval_s: float | None = None) -> tuple[np.ndarray, str]:
    """Frame times of a 4-D perfusion NIfTI by the rules of the module docstring.

    Returns:
        ``(times_s (Z, T) float64 from the first frame, source)``; ``source`` is a readable description
        (e.g. ``"BIDS sidecar ctp.json: FrameTimesStart"``, ``"NIfTI pixdim[4] (msec)"``).

    Raises:
        StudyError: a sidecar that does not fit, a bad ``frame_interval_s``, or no source of times.
    """
    p = Path(path)
    if frame_interval_s is not None and not (frame_interval_s > 0 and np.isfinite(frame_interval_s)):
        raise StudyError(f"{p}: frame_interval_s must be a positive number of seconds, got {frame_interval_s}")
    found: tuple[np.ndarray, str] | None = None
    side = sidecar_path(p)
    if side is not None:
        found = _sidecar_times(side, n_t, n_z)
    if found is None:
        step, where = _header_step(img, time_axis)
        if step is not None:
            found = (np.repeat((np.arange(n_t) * step)[None], n_z, axis=0),
                     f"NIfTI pixdim[{time_axis + 1}] ({img.header.get_xyzt_units()[1]})")
    if found is not None:
        times, source = found
        if frame_interval_s is not None:
            step = float(np.median(np.diff(times[0])))
            if abs(step - frame_interval_s) > 0.01 * frame_interval_s:
                warnings.warn(f"{p}: the configured frame_interval_s={frame_interval_s:g} s contradicts the file's "
                              f"own frame times ({source}, median step {step:.4g} s); using the file's",
                              stacklevel=3)
        return times, source
    if frame_interval_s is not None:
        warnings.warn(f"{p}: no frame times in the file (no BIDS sidecar timing, {_header_step(img, time_axis)[1]}); "
                      f"using the configured frame_interval_s={frame_interval_s:g} s", stacklevel=3)
        return (np.repeat((np.arange(n_t) * frame_interval_s)[None], n_z, axis=0),
                f"configured frame_interval_s = {frame_interval_s:g} s")
    raise StudyError(f"{p}: the file gives no frame times (no BIDS sidecar {nifti_stem(p)}.json with FrameTimesStart, "
                     f"{_header_step(img, time_axis)[1]}); pass frame_interval_s=<seconds between frames> "
                     "(data.frame_interval_s=...) — it is never guessed")


def read_nifti4d(path: str | Path, *, frame_interval_s: float | None = None, pseudonym_key: bytes | None = None,
                 patient_name: str | None = None) -> Study:
    """Read a 4-D perfusion NIfTI (see the module docstring) as an unlabelled study.

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        frame_interval_s: seconds between frames, used only when the file has no times of its own.
        pseudonym_key: HMAC key for the patient pseudonym.
        patient_name: what is pseudonymised into ``patient_id`` (default: the file's stem).

    Returns:
        A validated :class:`Study`: frames float32 ``(S, T, H, W)`` HU, times_s ``(S, T)`` s, the file's
        affine, ``meta`` with ``format``, ``time_source``, ``frame_interval_s`` (median step) and ``file``.
    """
    from stm_dlp.data.dicom import pseudonymise

    p = Path(path)
    if not p.is_file():
        raise StudyError(f"{p}: path does not exist or is not a file")
    img, data, time_axis = load_perfusion_nifti(p)
    n_x, n_y, n_z, n_t = data.shape
    times, source = nifti_frame_times(img, p, n_t, n_z, time_axis, frame_interval_s)
    frames = np.ascontiguousarray(np.transpose(data, (2, 3, 1, 0)))  # (Z, T, Y, X) = (S, T, H, W)
    meta = {"format": "nifti4d", "time_source": source, "time_tag": source,
            "frame_interval_s": float(np.median(np.diff(times[0]))), "file": p.name}
    return Study(frames=frames, times_s=times.astype(np.float32), affine=np.asarray(img.affine, np.float64),
                 patient_id=pseudonymise(patient_name or nifti_stem(p), pseudonym_key), source=str(p),
                 meta=meta).validate()
