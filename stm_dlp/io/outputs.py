"""The output bundle of ``predict`` and ``calc``: NIfTI maps, colour pictures and a JSON summary.

Every bundle carries the clinical readout (:mod:`stm_dlp.perfusion.readout`): a ``readout`` block in
``summary.json``, the core and TMAX > 6 s outlines and volumes on ``maps.png``, and ``readout.png``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stm_dlp.io.atomic import atomic_write_text
from stm_dlp.io.nifti import write_maps_nifti
from stm_dlp.io.png import BRAIN_WINDOW_HU, DEFAULT_WINDOWS, OUTLINE_COLORS, save_maps_png, save_readout_png
from stm_dlp.perfusion.readout import ReadoutThresholds, compute_readout, readout_line, voxel_volume_ml
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
                  title: str | None = None, baseline_hu: np.ndarray | None = None,
                  readout_thresholds: ReadoutThresholds | None = None) -> dict[str, Path]:
    """Write ``OUT/{cbf,cbv,mtt,tmax}.nii.gz``, ``OUT/maps.png``, ``OUT/readout.png`` and
    ``OUT/summary.json`` atomically.

    Args:
        out_dir: output folder (created).
        maps: ``cbv``, ``cbf``, ``tmax`` (and optionally ``mtt``, else derived as CBV / CBF × 60),
            each float ``(S, H, W)`` in ml/100g, ml/100g/min, s.
        affine: ``(4, 4)`` RAS+ affine of the scan (``study.affine``) for ``(W, H, S)`` arrays.
        summary: extra JSON-able facts (method, model, timing_s, source, ...), merged into the file.
        mask: bool ``(S, H, W)`` brain mask; written as ``mask.nii.gz``, used for the picture and stats.
        title: picture title (never a patient name).
        baseline_hu: ``(S, H, W)`` pre-contrast image (HU), the background of ``readout.png``
            (:func:`stm_dlp.perfusion.readout.precontrast_image`); without it the CBV map is shown.
        readout_thresholds: thresholds of the clinical readout (defaults when ``None``).

    The readout (voxel volume from ``affine``) goes into ``summary.json`` as ``readout``, its core and
    hypoperfusion outlines and volumes onto ``maps.png``, and core (red) / penumbra (green) onto
    ``readout.png``.

    Returns:
        ``{name: path}`` of every written file (``cbv``, ``cbf``, ``tmax``, ``mtt``, [``mask``],
        ``png``, ``readout_png``, ``summary``).
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
    if baseline_hu is not None:
        baseline_hu = np.asarray(baseline_hu, np.float32)
        if baseline_hu.shape != shape:
            raise ValueError(f"pre-contrast image has shape {baseline_hu.shape}, maps have {shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = {p: full[p] for p in ALL_PARAMS}
    volumes: dict[str, np.ndarray] = dict(ordered)
    if mask is not None:
        volumes["mask"] = mask
    paths = dict(zip(volumes, write_maps_nifti(out, volumes, affine)))
    affine = np.asarray(affine, np.float64)
    readout = compute_readout(ordered, mask, voxel_volume_ml(affine), readout_thresholds, affine=affine)
    paths["png"], paths["readout_png"] = _readout_pictures(out, ordered, mask, baseline_hu, readout.summary,
                                                           readout.regions, title)
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
    info["readout"] = _jsonable(readout.summary)
    paths["summary"] = out / "summary.json"
    info["files"]["summary"] = "summary.json"
    atomic_write_text(paths["summary"], json.dumps(_jsonable(info), indent=2, sort_keys=False, allow_nan=False)
                      + "\n")
    return paths


def _readout_pictures(out: Path, maps: Mapping[str, np.ndarray], mask: np.ndarray | None,
                      baseline_hu: np.ndarray | None, ro: Mapping[str, Any], regions: Mapping[str, np.ndarray],
                      title: str | None) -> tuple[Path, Path]:
    """``maps.png`` with the core / hypoperfusion outlines and ``readout.png``; volumes in both titles."""
    thr = ro["thresholds"]
    core_txt = f"rCBF < {100 * thr['core_rcbf']:g} %"
    hypo_txt = f"TMAX > {thr['hypoperfusion_tmax_s']:g} s"
    line = readout_line(ro)
    outlines = {f"core ({core_txt}): {ro['core_ml']:.1f} ml": (regions["core"], OUTLINE_COLORS["core"]),
                f"{hypo_txt}: {ro['hypoperfusion_ml']:.1f} ml": (regions["hypoperfusion"],
                                                                  OUTLINE_COLORS["hypoperfusion"])}
    maps_png = save_maps_png(out / "maps.png", maps, mask=mask, title=f"{title}\n{line}" if title else line,
                             outlines=outlines)
    ref = ro["reference"]
    side = (f"{ref['side_anatomical']} hemisphere" if ref.get("side_anatomical")
            else f"image {ref['side'].replace('_', ' ')}" if ref.get("side") else "")
    ref_txt = (f"reference CBF {ref['cbf_ml_100g_min']:.1f} ml/100g/min ({ref['method_used']}"
               f"{', ' + side if ref['method_used'] == 'contralateral' and side else ''})"
               if ref.get("cbf_ml_100g_min") is not None else "no reference CBF (no tissue in the mask)")
    hir = ro.get("hypoperfusion_intensity_ratio")
    extra = f"HIR {hir:.2f} · " if hir is not None else ""
    lines = [title] if title else []
    lines += [line, f"{extra}{ref_txt}"]
    if baseline_hu is not None:
        background, window, bg_label = baseline_hu, BRAIN_WINDOW_HU, "pre-contrast CT"
    else:  # no frames at hand: the CBV map shows the anatomy well enough to place the regions
        background = np.where(mask, maps["cbv"], 0.0) if mask is not None else maps["cbv"]
        window, bg_label = DEFAULT_WINDOWS["cbv"], "CBV map"
    readout_png = save_readout_png(
        out / "readout.png", background, regions["core"], regions["penumbra"], title="\n".join(lines),
        core_label=f"core ({core_txt}): {ro['core_ml']:.1f} ml",
        penumbra_label=f"penumbra ({hypo_txt}, not core): {ro['penumbra_ml']:.1f} ml",
        window_hu=window, background_label=bg_label)
    return maps_png, readout_png
