"""Perfusion maps ↔ NIfTI files with the scan's geometry.

On disk the data array is in ``(W, H, S)`` order — voxel ``[c, r, s]`` is row ``r``, column ``c``
of slice ``s`` — and the affine is the one from the DICOM geometry
(:func:`stm_dlp.geometry.affine_from_dicom_geometry`), so the maps overlay the scan in any
viewer. In memory maps are ``(S, H, W)``.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from stm_dlp.io.atomic import atomic_write_bytes


def to_nifti_order(volume: np.ndarray) -> np.ndarray:
    """``(S, H, W)`` → ``(W, H, S)`` (the on-disk order)."""
    return np.transpose(np.asarray(volume), (2, 1, 0))


def from_nifti_order(volume: np.ndarray) -> np.ndarray:
    """``(W, H, S)`` → ``(S, H, W)`` (the in-memory order)."""
    return np.transpose(np.asarray(volume), (2, 1, 0))


def nifti_bytes(volume_shw: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """Serialise one ``(S, H, W)`` map as NIfTI-1 (gzip-compressed unless ``compress=False``).

    Float data are stored as float32, bool masks as uint8; sform and qform are both set to
    ``affine`` (code 1, scanner), spatial units mm and time units s. Gzip output is byte-for-byte
    reproducible (no timestamp in the gzip header).
    """
    vol = np.asarray(volume_shw)
    if vol.ndim != 3:
        raise ValueError(f"a map must be (S, H, W), got shape {vol.shape}")
    data = to_nifti_order(vol.astype(np.uint8) if vol.dtype == bool else vol.astype(np.float32))
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got {affine!r}")
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def write_maps_nifti(out_dir: str | Path, maps: Mapping[str, np.ndarray], affine: np.ndarray) -> list[Path]:
    """Write each map as ``out_dir/{name}.nii.gz`` atomically.

    Args:
        out_dir: output folder (created).
        maps: name → ``(S, H, W)`` array (float maps in their physical units, or a bool mask).
        affine: ``(4, 4)`` RAS+ affine for the ``(W, H, S)`` data array.

    Returns:
        The written paths, in the order of ``maps``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, volume in maps.items():
        path = out / f"{name}.nii.gz"
        atomic_write_bytes(path, nifti_bytes(volume, affine))
        written.append(path)
    return written


def read_nifti_maps(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one map written by :func:`write_maps_nifti` (or any 3-D NIfTI).

    Returns:
        ``(volume, affine)``: float32 ``(S, H, W)`` (scaling applied) and the float64 (4, 4) affine.
    """
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return np.ascontiguousarray(from_nifti_order(data).astype(np.float32)), np.asarray(img.affine, np.float64)
