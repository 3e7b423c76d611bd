"""Scanner geometry → NIfTI affine (pure numpy; used by the DICOM reader, the phantom and the writers,
so it sits below both ``data/`` and ``io/``)."""

from __future__ import annotations

import numpy as np

#: DICOM patient coordinates are LPS; NIfTI is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine_from_dicom_geometry(
    first_position_lps: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing_mm: tuple[float, float],
    slice_step_lps: np.ndarray,
) -> np.ndarray:
    """NIfTI (RAS+) affine for a volume stored as ``[c, r, s]`` (column, row, slice).

    Args:
        first_position_lps: ImagePositionPatient (mm, LPS) of the first slice's first pixel.
        orientation: ImageOrientationPatient, six numbers: row direction cosine (the direction of
            increasing column index) then column direction cosine (increasing row index).
        pixel_spacing_mm: PixelSpacing ``(between rows, between columns)`` in mm, as DICOM orders it.
        slice_step_lps: vector (mm, LPS) from one slice's position to the next.
    """
    orientation = np.asarray(orientation, dtype=np.float64)
    row_cos, col_cos = orientation[:3], orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * float(pixel_spacing_mm[1])
    lps[:3, 1] = col_cos * float(pixel_spacing_mm[0])
    lps[:3, 2] = np.asarray(slice_step_lps, dtype=np.float64)
    lps[:3, 3] = np.asarray(first_position_lps, dtype=np.float64)
    return LPS_TO_RAS @ lps


def phantom_affine(height: int, width: int, n_slices: int, fov_mm: float = 220.0,
                   slice_mm: float = 5.0) -> np.ndarray:
    """Affine of an axial phantom: FOV ``fov_mm`` square, slices ``slice_mm`` apart, feet→head."""
    spacing = (fov_mm / height, fov_mm / width)
    first = np.array([-fov_mm / 2, -fov_mm / 2, -slice_mm * (n_slices - 1) / 2])
    return affine_from_dicom_geometry(first, np.array([1, 0, 0, 0, 1, 0]), spacing,
                                      np.array([0.0, 0.0, slice_mm]))
