"""The output bundle of ``predict`` and ``calc``: NIfTI maps, a colour picture and a JSON summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stm_dlp.io.atomic import atomic_write_text
from stm_dlp.io.nifti import write_maps_nifti
from stm_dlp.io.png import DEFAULT_WINDOWS, save_maps_png
from stm_dlp.types import ALL_PARAMS, LONG_NAMES, UNITS, mtt_from_cbv_cbf


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def map_stats(maps: Mapping[str, np.ndarray], mask: np.ndarray | None) -> dict[str, dict[str, float]]:
    """Mean, median, 5th and 95th percentile of each map inside ``mask`` (finite values only)."""
    out = {}
    for name, m in maps.items():
        arr = np.asarray(m, np.float64)
        sel = np.isfinite(arr) & (np.asarray(mask, bool) if mask is not None else True)
        vals = arr[sel]
        if vals.size == 0:
            out[name] = {"n": 0}
            continue
        p5, p50, p95 = np.percentile(vals, [5, 50, 95])
        out[name] = {"n": int(vals.size), "mean": float(vals.mean()), "median": float(p50),
                     "p5": float(p5), "p95": float(p95)}
    return out


def write_outputs(out_dir: str | Path, maps: Mapping[str, np.ndarray], affine: np.ndarray,
                  summary: Mapping[str, Any] | None = None, mask: np.ndarray | None = None,
                  title: str | None = None) -> dict[str, Path]:
    """Write ``OUT/{cbf,cbv,mtt,tmax}.nii.gz``, ``OUT/maps.png`` and ``OUT/summary.json`` atomically.

    Args:
        out_dir: output folder (created).
        maps: ``cbv``, ``cbf``, ``tmax`` (and optionally ``mtt``, else derived as CBV / CBF × 60),
            each float ``(S, H, W)`` in ml/100g, ml/100g/min, s.
        affine: ``(4, 4)`` RAS+ affine of the scan (``study.affine``) for ``(W, H, S)`` arrays.
        summary: extra JSON-able facts (method, model, timing_s, source, ...), merged into the file.
        mask: bool ``(S, H, W)`` brain mask; written as ``mask.nii.gz``, used for the picture and stats.
        title: picture title (never a patient name).

    Returns:
        ``{name: path}`` of every written file (``cbv``, ``cbf``, ``tmax``, ``mtt``, [``mask``],
        ``png``, ``summary``).
    """
    missing = [p for p in ("cbv", "cbf", "tmax") if p not in maps]
    if missing:
        raise ValueError(f"write_outputs needs maps {missing} (got {sorted(maps)})")
    full = {p: np.asarray(maps[p], np.float32) for p in ("cbv", "cbf", "tmax")}
    full["mtt"] = (np.asarray(maps["mtt"], np.float32) if "mtt" in maps
                   else np.asarray(mtt_from_cbv_cbf(full["cbv"], full["cbf"]), np.float32))
    shape = full["cbv"].shape
    for name, m in full.items():
        if m.shape != shape or m.ndim != 3:
            raise ValueError(f"map {name} has shape {m.shape}; all maps must be (S, H, W) = {shape}")
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != shape:
            raise ValueError(f"mask has shape {mask.shape}, maps have {shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = {p: full[p] for p in ALL_PARAMS}
    volumes: dict[str, np.ndarray] = dict(ordered)
    if mask is not None:
        volumes["mask"] = mask
    paths = dict(zip(volumes, write_maps_nifti(out, volumes, affine)))
    paths["png"] = save_maps_png(out / "maps.png", ordered, mask=mask, title=title)
    affine = np.asarray(affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    info: dict[str, Any] = {
        "units": {p: UNITS[p] for p in ALL_PARAMS},
        "long_names": {p: LONG_NAMES[p] for p in ALL_PARAMS},
        "shape_shw": list(shape),
        "nifti_shape_whs": [shape[2], shape[1], shape[0]],
        "spacing_mm": {"column": float(spacing[0]), "row": float(spacing[1]), "slice": float(spacing[2])},
        "affine": affine.tolist(),
        "display_windows": {p: list(DEFAULT_WINDOWS[p]) for p in ALL_PARAMS},
        "stats_in_mask": map_stats(ordered, mask),
        "files": {k: p.name for k, p in paths.items()},
    }
    info.update(_jsonable(dict(summary or {})))
    paths["summary"] = out / "summary.json"
    info["files"]["summary"] = "summary.json"
    atomic_write_text(paths["summary"], json.dumps(_jsonable(info), indent=2, sort_keys=False) + "\n")
    return paths
