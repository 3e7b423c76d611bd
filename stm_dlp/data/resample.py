"""In-plane resampling of a study to a target pixel spacing, and back (nnU-Net's "target spacing").

Training and prediction run at one configured pixel size (``data.target_spacing_mm``), whatever the
scanner's matrix and field of view: :func:`resample_study` puts a :class:`~stm_dlp.types.Study` on a
grid of square ``target_mm`` pixels centred on the scan's own field of view, and :func:`restore_maps`
brings maps predicted on that grid back to the scan's own grid, so outputs keep the scan's affine.

Only rows and columns change; slices, frames and times are untouched. Pixel spacing is read from the
affine (the norms of its first two columns: column step, row step), and the new affine describes the
new grid exactly (``A_new = A_old @ M`` with ``M`` the index map from the new grid to the old one).

Interpolation is separable and linear with a triangle kernel widened to the output step when
downsampling (the antialiased "bilinear" of PIL and ``torch.nn.functional.interpolate(antialias=True)``):
every output pixel is a weighted average of the input pixels its footprint covers, so noise and fine
detail are averaged rather than aliased by picking pixels. Upsampling is plain linear interpolation.
Weights are renormalised at the borders (nearest extrapolation), so a constant image stays constant
exactly. Frames and label maps (smooth physical quantities, TMAX included) are interpolated this way;
the mask is the interpolated mask > 0.5; integer arrays in ``meta`` (tissue classes) take the nearest
pixel.

Pure numpy/torch: no Lightning, Hydra or file I/O.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from stm_dlp.types import Study, StudyError, mtt_from_cbv_cbf, pixel_spacing_mm

#: Key in ``Study.meta`` of the scan's own grid: ``{"shape_hw": [H, W], "affine": 4x4 nested list}``.
ORIGINAL_GRID = "original_grid"
#: Two spacings closer than this (mm) are the same: no resampling.
SPACING_TOL_MM = 1e-6


def target_grid(shape_hw: tuple[int, int], affine: Any, target_mm: float) -> tuple[tuple[int, int], np.ndarray]:
    """The grid of square ``target_mm`` pixels that covers the field of view of ``shape_hw`` ``(H, W)``
    pixels with ``affine``: its shape ``(H', W')`` (``round(n * spacing / target_mm)``, at least 1) and
    its affine. The two grids share their centre; pixels are exactly ``target_mm`` apart (so the new
    field of view may differ from the old one by under one new pixel)."""
    if not (np.isfinite(target_mm) and target_mm > 0):
        raise ValueError(f"target spacing must be a positive number of mm, got {target_mm}")
    a = np.asarray(affine, np.float64)
    h, w = int(shape_hw[0]), int(shape_hw[1])
    dy, dx = pixel_spacing_mm(a)
    if dy <= 0 or dx <= 0:
        raise ValueError(f"affine has a zero pixel spacing ({dy}, {dx}) mm")
    new_h, new_w = max(1, round(h * dy / target_mm)), max(1, round(w * dx / target_mm))
    step_r, step_c = target_mm / dy, target_mm / dx  # one new pixel in old pixels
    index_map = np.eye(4)  # new (c, r, s, 1) -> old (c, r, s, 1), same centre
    index_map[0, 0], index_map[1, 1] = step_c, step_r
    index_map[0, 3] = (w - 1) / 2 - (new_w - 1) / 2 * step_c
    index_map[1, 3] = (h - 1) / 2 - (new_h - 1) / 2 * step_r
    return (new_h, new_w), a @ index_map


def axis_weights(n_in: int, n_out: int, step: float, offset: float) -> np.ndarray:
    """Float64 ``(n_out, n_in)`` interpolation matrix along one axis: output ``j`` sits at input index
    ``offset + j * step``. Triangle kernel of half-width ``max(1, step)`` (linear interpolation, widened
    to average when downsampling); positions are clamped into ``[0, n_in - 1]`` and each row sums to 1."""
    pos = np.clip(offset + np.arange(n_out, dtype=np.float64) * step, 0.0, n_in - 1.0)
    support = max(1.0, abs(step))
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in, dtype=np.float64)[None, :] - pos[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def resample_plane(arr: np.ndarray, rows: np.ndarray, cols: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """``rows @ arr @ cols.T`` over the last two axes: ``arr`` ``(..., H, W)`` → ``(..., H', W')`` for
    weights ``rows`` ``(H', H)`` and ``cols`` ``(W', W)``; computed in ``dtype`` (float32 for frames,
    float64 where exactness matters)."""
    x = torch.from_numpy(np.array(arr, dtype=dtype, copy=True))
    r = torch.from_numpy(rows.astype(dtype))
    c = torch.from_numpy(cols.astype(dtype))
    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, h, w)
    # the axis that shrinks most goes first: fewer multiply-adds for the second product
    if cols.shape[0] * h <= rows.shape[0] * w:
        y = torch.matmul(r, torch.matmul(x, c.T))
    else:
        y = torch.matmul(torch.matmul(r, x), c.T)
    return y.reshape(*lead, rows.shape[0], cols.shape[0]).numpy()


def _plane_weights(shape_hw: tuple[int, int], new_hw: tuple[int, int], index_map: np.ndarray,
                   where: str) -> tuple[np.ndarray, np.ndarray]:
    """Row and column weights for a new→old ``index_map`` (4x4, new voxel index → old voxel index)."""
    off_diag = index_map[:2, :3].copy()
    off_diag[0, 0] = off_diag[1, 1] = 0.0
    if np.abs(off_diag).max() > 1e-6 or abs(index_map[2, 2] - 1) > 1e-6 or abs(index_map[2, 3]) > 1e-6:
        raise StudyError(f"{where}: the two grids are not the same slices with scaled rows and columns; "
                         "cannot resample in-plane between them")
    rows = axis_weights(shape_hw[0], new_hw[0], index_map[1, 1], index_map[1, 3])
    cols = axis_weights(shape_hw[1], new_hw[1], index_map[0, 0], index_map[0, 3])
    return rows, cols


def _resample_array(arr: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """One array ``(..., H, W)`` by its kind: bool → interpolated > 0.5, integer → nearest pixel,
    float → linear (float64 arithmetic, returned in the input's float dtype)."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return resample_plane(arr, rows, cols, np.float64) > 0.5
    if np.issubdtype(arr.dtype, np.integer):
        r_idx, c_idx = rows.argmax(axis=1), cols.argmax(axis=1)  # the heaviest input pixel = the nearest
        return np.ascontiguousarray(arr[..., r_idx[:, None], c_idx[None, :]])
    return resample_plane(arr, rows, cols, np.float64).astype(arr.dtype)


def _map_pixels(pixels: Any, index_map: np.ndarray, new_hw: tuple[int, int]) -> Any:
    """A list of ``(slice, row, col)`` pixels (e.g. the phantom's ``aif_pixels``) moved to the nearest
    pixel of the new grid (``index_map``: new index → old index; duplicates kept once, order kept);
    anything else is returned unchanged."""
    try:
        arr = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError):
        return pixels
    if arr.ndim != 2 or arr.shape[1] != 3:
        return pixels
    r_new = np.clip(np.rint((arr[:, 1] - index_map[1, 3]) / index_map[1, 1]), 0, new_hw[0] - 1)
    c_new = np.clip(np.rint((arr[:, 2] - index_map[0, 3]) / index_map[0, 0]), 0, new_hw[1] - 1)
    out, seen = [], set()
    for key in zip(arr[:, 0].astype(int).tolist(), r_new.astype(int).tolist(), c_new.astype(int).tolist()):
        if key not in seen:
            seen.add(key)
            out.append(list(key))
    return out


def resample_study(study: Study, target_mm: float) -> Study:
    """``study`` on square ``target_mm`` pixels (in-plane only; slices and frames untouched).

    Frames ``(S, T, H, W)`` and label maps ``(S, P, H, W)`` are interpolated linearly (averaging when
    downsampling), the mask is the interpolated mask > 0.5, and ``meta`` arrays on the pixel grid
    (``(S, ..., H, W)``, e.g. the phantom's tissue ``labels``, ISLES ``lesion``) and ``*_pixels`` lists follow.
    The new ``affine`` describes the new grid exactly; ``meta["original_grid"]`` keeps the scan's own
    grid (``shape_hw``, ``affine``; the first one when resampled twice) for :func:`restore_maps`. A study
    already at ``target_mm`` is returned as a shallow copy with that entry added.
    """
    where = study.source or study.patient_id
    try:
        new_hw, new_affine = target_grid(study.shape_hw, study.affine, float(target_mm))
    except ValueError as exc:
        raise StudyError(f"{where}: cannot resample to {target_mm} mm pixels: {exc}") from None
    meta = dict(study.meta)
    meta.setdefault(ORIGINAL_GRID, {"shape_hw": list(study.shape_hw),
                                    "affine": np.asarray(study.affine, np.float64).tolist()})
    h, w = study.shape_hw
    if new_hw == (h, w) and np.allclose(new_affine, study.affine, rtol=0, atol=SPACING_TOL_MM):
        return replace(study, meta=meta)
    index_map = np.linalg.solve(np.asarray(study.affine, np.float64), new_affine)
    rows, cols = _plane_weights((h, w), new_hw, index_map, where)
    for key, value in study.meta.items():
        if isinstance(value, np.ndarray) and value.ndim >= 3 and value.shape[-2:] == (h, w):
            meta[key] = _resample_array(value, rows, cols)
        elif key.endswith("_pixels"):
            meta[key] = _map_pixels(value, index_map, new_hw)
    maps = None if study.maps is None else _resample_array(np.asarray(study.maps, np.float32), rows, cols)
    mask = None if study.mask is None else _resample_array(np.asarray(study.mask, bool), rows, cols)
    frames = resample_plane(study.frames, rows, cols, np.float32)
    return replace(study, frames=frames, affine=new_affine, maps=maps, mask=mask, meta=meta,
                   times_s=np.array(study.times_s, np.float32))


def original_grid(study: Study) -> tuple[tuple[int, int], np.ndarray]:
    """The scan's own ``(H, W)`` and affine that :func:`resample_study` recorded (the study's own grid
    when it was never resampled)."""
    grid = study.meta.get(ORIGINAL_GRID)
    if not grid:
        return study.shape_hw, np.asarray(study.affine, np.float64)
    return (int(grid["shape_hw"][0]), int(grid["shape_hw"][1])), np.asarray(grid["affine"], np.float64)


def restore_maps(maps: Any, study: Study) -> Any:
    """Maps on the grid of the resampled ``study`` brought back to the scan's own grid (its
    ``meta["original_grid"]``), by the same interpolation (linear; averaging where the scan's pixels are
    the larger ones; bool arrays > 0.5).

    ``maps`` is an array ``(..., H', W')`` (e.g. ``(S, P, H', W')`` or a mask ``(S, H', W')``) or a dict
    of them (``{cbv, cbf, tmax, mtt}``); in a dict with ``cbv`` and ``cbf``, ``mtt`` is derived again
    from the restored CBV and CBF (MTT = CBV / CBF × 60) rather than interpolated. Returns the same kind.
    A study that was never resampled returns ``maps`` as they are.
    """
    (h, w), affine = original_grid(study)
    cur_hw = study.shape_hw
    if (h, w) == cur_hw and np.allclose(affine, study.affine, rtol=0, atol=SPACING_TOL_MM):
        return maps
    index_map = np.linalg.solve(np.asarray(study.affine, np.float64), affine)  # scan index -> resampled index
    rows, cols = _plane_weights(cur_hw, (h, w), index_map, study.source or study.patient_id)

    def one(arr: Any) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.shape[-2:] != cur_hw:
            raise ValueError(f"maps of shape {arr.shape} are not on the resampled grid {cur_hw}")
        return _resample_array(arr, rows, cols)

    if isinstance(maps, dict):
        out = {k: one(v) for k, v in maps.items()}
        if "mtt" in out and "cbv" in out and "cbf" in out:
            out["mtt"] = mtt_from_cbv_cbf(out["cbv"], out["cbf"]).astype(np.asarray(maps["mtt"]).dtype)
        return out
    return one(maps)
