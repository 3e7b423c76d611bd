"""Colour pictures of perfusion maps a person can read (matplotlib, Agg backend).

Every picture uses fixed physical windows (:data:`DEFAULT_WINDOWS`), so colours mean the same
thing in every figure, run and method: CBV 0-8 ml/100g, CBF 0-80 ml/100g/min, MTT 0-16 s,
TMAX 0-16 s, with a jet colour map and black outside the brain mask.

:func:`save_maps_png` can outline regions (the readout's core and TMAX > 6 s) on every map, and
:func:`save_readout_png` draws the clinical readout a stroke team reads at a glance: core red,
penumbra green, on the pre-contrast CT.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import Colormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from stm_dlp.io.atomic import atomic_write_bytes  # noqa: E402
from stm_dlp.types import UNITS  # noqa: E402

#: Display window ``(low, high)`` per parameter, in its physical unit.
DEFAULT_WINDOWS: dict[str, tuple[float, float]] = {
    "cbv": (0.0, 8.0),
    "cbf": (0.0, 80.0),
    "mtt": (0.0, 16.0),
    "tmax": (0.0, 16.0),
}
#: Column order of the pictures.
DISPLAY_ORDER: tuple[str, ...] = ("cbf", "cbv", "mtt", "tmax")
CMAP_NAME = "jet"
#: Outline colours on the jet maps: neither colour occurs in jet, so both stay visible on any value.
OUTLINE_COLORS: dict[str, str] = {"core": "magenta", "hypoperfusion": "white"}
#: Readout picture: RGBA of the core and penumbra overlays and the CT window (HU) of the background.
CORE_RGBA = (1.0, 0.0, 0.0, 0.6)
PENUMBRA_RGBA = (0.0, 0.85, 0.0, 0.45)
BRAIN_WINDOW_HU = (0.0, 80.0)  # the standard brain window, level 40 / width 80

#: ``label -> ((S, H, W) bool region, matplotlib colour)``, e.g. ``{"core": (core, "magenta")}``.
Outlines = Mapping[str, tuple[np.ndarray, str]]


def _cmap() -> Colormap:
    return colormaps[CMAP_NAME].with_extremes(bad="black")


def _window(param: str, windows: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    if param in windows:
        return windows[param]
    raise ValueError(f"no display window for parameter {param!r} (known: {sorted(windows)})")


def _masked(map2d: np.ndarray, mask: np.ndarray | None) -> np.ma.MaskedArray:
    arr = np.asarray(map2d, np.float64)
    hide = ~np.isfinite(arr)
    if mask is not None:
        hide |= ~np.asarray(mask, bool)
    return np.ma.masked_array(np.where(hide, 0.0, arr), mask=hide)


def _ordered(params: Sequence[str]) -> list[str]:
    return [p for p in DISPLAY_ORDER if p in params] + [p for p in params if p not in DISPLAY_ORDER]


def colorize(map2d: np.ndarray, param: str, mask: np.ndarray | None = None,
             windows: Mapping[str, tuple[float, float]] = DEFAULT_WINDOWS) -> np.ndarray:
    """One map ``(H, W)`` → uint8 RGB ``(H, W, 3)`` with the parameter's fixed window and jet colours.

    Values outside the window are clipped to its ends; NaN/inf and pixels outside ``mask`` are black.
    """
    lo, hi = _window(param, windows)
    arr = _masked(map2d, mask)
    if arr.ndim != 2:
        raise ValueError(f"colorize needs a 2-D map (H, W), got shape {arr.shape}")
    norm = np.clip((arr.filled(lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    rgb = (_cmap()(norm)[..., :3] * 255.0 + 0.5).astype(np.uint8)
    rgb[np.ma.getmaskarray(arr)] = 0
    return rgb


def _label(param: str) -> str:
    return f"{param.upper()} ({UNITS.get(param, '')})" if param in UNITS else param.upper()


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _outline(ax: plt.Axes, region2d: np.ndarray, color: str) -> None:
    """Draw the boundary of a bool ``(H, W)`` region (nothing when it is empty or fills the image)."""
    r = np.asarray(region2d, bool)
    if r.any() and not r.all():
        # pad so that a region touching the image edge is closed; contour coordinates shift by 1
        padded = np.pad(r.astype(np.float32), 1)
        n_r, n_c = padded.shape
        ax.contour(np.arange(n_c) - 1, np.arange(n_r) - 1, padded, levels=[0.5], colors=[color],
                   linewidths=0.9)


def _grid(rows: list[tuple[str, dict[str, np.ndarray], np.ndarray | None]], params: list[str],
          windows: Mapping[str, tuple[float, float]], title: str | None, panel_in: float,
          outlines: list[dict[str, tuple[np.ndarray, str]]] | None = None) -> plt.Figure:
    """Figure with one row per ``(label, maps2d, mask2d)`` and one column per parameter; ``outlines``
    (one ``{label: (region2d, colour)}`` per row) are drawn on every panel of their row."""
    n_r, n_c = len(rows), len(params)
    fig, axes = plt.subplots(n_r, n_c, figsize=(panel_in * n_c + 0.4, panel_in * n_r + 1.0),
                             squeeze=False, layout="constrained")
    fig.set_facecolor("white")
    cmap = _cmap()
    for j, p in enumerate(params):
        lo, hi = _window(p, windows)
        image = None
        for i, (label, maps2d, mask2d) in enumerate(rows):
            ax = axes[i, j]
            ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            if p in maps2d:
                image = ax.imshow(_masked(maps2d[p], mask2d), cmap=cmap, vmin=lo, vmax=hi,
                                  interpolation="nearest")
                for region2d, color in (outlines[i] if outlines else {}).values():
                    _outline(ax, region2d, color)
            if i == 0:
                ax.set_title(p.upper(), fontsize=10)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
        if image is not None:
            bar = fig.colorbar(image, ax=axes[:, j], location="bottom", shrink=0.9, aspect=15)
            bar.set_label(_label(p), fontsize=8)
            bar.ax.tick_params(labelsize=7)
    if outlines:
        handles = [Line2D([0], [0], color=color, lw=1.5, label=label)
                   for label, (_region, color) in outlines[0].items()]
        # dark legend box: the outline colours are chosen for the jet maps and the white one vanishes on white
        fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=len(handles), frameon=True,
                   facecolor="0.2", edgecolor="0.2", labelcolor="white")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_maps_png(path: str | Path, maps: Mapping[str, np.ndarray], mask: np.ndarray | None = None,
                  title: str | None = None, windows: Mapping[str, tuple[float, float]] = DEFAULT_WINDOWS,
                  slice_labels: Sequence[str] | None = None, dpi: int = 100, panel_in: float = 1.8,
                  outlines: Outlines | None = None) -> Path:
    """Picture of a study's maps: one row per slice, one column per parameter (CBF, CBV, MTT, TMAX).

    Args:
        path: output PNG (written atomically).
        maps: parameter → ``(S, H, W)`` in physical units (any of cbv, cbf, mtt, tmax).
        mask: bool ``(S, H, W)`` brain mask; black outside it. ``None`` shows every pixel.
        title: figure title (never put a patient name here).
        windows: parameter → display window; every parameter shown needs one.
        slice_labels: row labels (default ``slice 0``, ``slice 1``, ...).
        outlines: ``label -> (bool (S, H, W) region, colour)`` drawn as contours on every map of
            each slice, with a legend (e.g. the readout's core and TMAX > 6 s,
            :data:`OUTLINE_COLORS`).
    """
    params = _ordered(list(maps))
    if not params:
        raise ValueError("save_maps_png needs at least one map")
    shapes = {np.asarray(maps[p]).shape for p in params}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"maps must all be (S, H, W) of one shape, got {sorted(shapes)}")
    n_s = next(iter(shapes))[0]
    if mask is not None and np.asarray(mask).shape != next(iter(shapes)):
        raise ValueError(f"mask shape {np.asarray(mask).shape} does not match the maps {next(iter(shapes))}")
    labels = list(slice_labels) if slice_labels is not None else [f"slice {s}" for s in range(n_s)]
    rows = [(labels[s], {p: np.asarray(maps[p])[s] for p in params},
             None if mask is None else np.asarray(mask)[s]) for s in range(n_s)]
    per_row = None
    if outlines:
        for label, (region, _color) in outlines.items():
            if np.asarray(region).shape != next(iter(shapes)):
                raise ValueError(f"outline {label!r} has shape {np.asarray(region).shape}, the maps "
                                 f"{next(iter(shapes))}")
        per_row = [{label: (np.asarray(region, bool)[s], color) for label, (region, color) in outlines.items()}
                   for s in range(n_s)]
    return _save(_grid(rows, params, windows, title, panel_in, per_row), path, dpi)


def save_readout_png(path: str | Path, background_hu: np.ndarray, core: np.ndarray, penumbra: np.ndarray,
                     title: str | None = None, core_label: str = "core", penumbra_label: str = "penumbra",
                     window_hu: tuple[float, float] = BRAIN_WINDOW_HU, background_label: str = "pre-contrast CT",
                     slice_labels: Sequence[str] | None = None, dpi: int = 100, panel_in: float = 2.2) -> Path:
    """The clinical readout at a glance: core red and penumbra green over a grey image, one panel per slice.

    Args:
        path: output PNG (written atomically).
        background_hu: ``(S, H, W)`` grey background, e.g. the pre-contrast CT in HU (shown in
            ``window_hu``, the brain window 0-80 HU by default).
        core, penumbra: bool ``(S, H, W)`` regions (:func:`stm_dlp.perfusion.readout.readout_regions`).
        title: figure title, e.g. the volumes (never a patient name).
        core_label, penumbra_label: legend texts (e.g. with the thresholds and volumes).
        background_label: what the grey image is (in the legend).
        slice_labels: panel titles (default ``slice 0``, ``slice 1``, ...).
    """
    bg = np.asarray(background_hu, np.float64)
    c, pen = np.asarray(core, bool), np.asarray(penumbra, bool)
    if bg.ndim != 3 or c.shape != bg.shape or pen.shape != bg.shape:
        raise ValueError(f"readout picture needs (S, H, W) background, core and penumbra of one shape, got "
                         f"{bg.shape}, {c.shape}, {pen.shape}")
    n_s = bg.shape[0]
    labels = list(slice_labels) if slice_labels is not None else [f"slice {s}" for s in range(n_s)]
    n_c = min(n_s, max(4, int(np.ceil(np.sqrt(n_s)))))
    n_r = int(np.ceil(n_s / n_c))
    fig, axes = plt.subplots(n_r, n_c, figsize=(panel_in * n_c + 0.4, panel_in * n_r + 1.1), squeeze=False,
                             layout="constrained")
    fig.set_facecolor("white")
    lo, hi = window_hu
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("black")
        if k >= n_s:
            ax.axis("off")
            continue
        ax.imshow(np.nan_to_num(bg[k], nan=lo), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        overlay = np.zeros((*bg.shape[1:], 4))
        overlay[pen[k] & ~c[k]] = PENUMBRA_RGBA
        overlay[c[k]] = CORE_RGBA
        ax.imshow(overlay, interpolation="nearest")
        ax.set_title(labels[k], fontsize=9)
    unit = " HU" if window_hu == BRAIN_WINDOW_HU or "CT" in background_label else ""
    handles = [Patch(color=CORE_RGBA[:3], label=core_label), Patch(color=PENUMBRA_RGBA[:3], label=penumbra_label),
               Patch(facecolor="0.5", edgecolor="0.2", label=f"{background_label} (grey {lo:g}-{hi:g}{unit})")]
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, ncols=3, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def save_comparison_png(path: str | Path, rows: Mapping[str, Mapping[str, np.ndarray]],
                        mask: np.ndarray | None = None, title: str | None = None,
                        windows: Mapping[str, tuple[float, float]] = DEFAULT_WINDOWS, dpi: int = 100,
                        panel_in: float = 1.8) -> Path:
    """Side-by-side maps of one slice: one row per method (e.g. truth / model / oSVD), one column per
    parameter, the same colour scale per parameter in every row.

    Args:
        rows: method name → parameter → ``(H, W)`` map.
        mask: bool ``(H, W)``; black outside it.
    """
    if not rows:
        raise ValueError("save_comparison_png needs at least one row")
    params = _ordered(list(dict.fromkeys(p for r in rows.values() for p in r)))
    grid = [(name, {p: np.asarray(m) for p, m in maps2d.items()}, None if mask is None else np.asarray(mask))
            for name, maps2d in rows.items()]
    return _save(_grid(grid, params, windows, title, panel_in), path, dpi)
