"""Colour pictures of perfusion maps a person can read (matplotlib, Agg backend).

Every picture uses fixed physical windows (:data:`DEFAULT_WINDOWS`), so colours mean the same
thing in every figure, run and method: CBV 0-8 ml/100g, CBF 0-80 ml/100g/min, MTT 0-16 s,
TMAX 0-16 s, with a jet colour map and black outside the brain mask.
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


def _grid(rows: list[tuple[str, dict[str, np.ndarray], np.ndarray | None]], params: list[str],
          windows: Mapping[str, tuple[float, float]], title: str | None, panel_in: float) -> plt.Figure:
    """Figure with one row per ``(label, maps2d, mask2d)`` and one column per parameter."""
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
            if i == 0:
                ax.set_title(p.upper(), fontsize=10)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
        if image is not None:
            bar = fig.colorbar(image, ax=axes[:, j], location="bottom", shrink=0.9, aspect=15)
            bar.set_label(_label(p), fontsize=8)
            bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def save_maps_png(path: str | Path, maps: Mapping[str, np.ndarray], mask: np.ndarray | None = None,
                  title: str | None = None, windows: Mapping[str, tuple[float, float]] = DEFAULT_WINDOWS,
                  slice_labels: Sequence[str] | None = None, dpi: int = 100, panel_in: float = 1.8) -> Path:
    """Picture of a study's maps: one row per slice, one column per parameter (CBF, CBV, MTT, TMAX).

    Args:
        path: output PNG (written atomically).
        maps: parameter → ``(S, H, W)`` in physical units (any of cbv, cbf, mtt, tmax).
        mask: bool ``(S, H, W)`` brain mask; black outside it. ``None`` shows every pixel.
        title: figure title (never put a patient name here).
        windows: parameter → display window; every parameter shown needs one.
        slice_labels: row labels (default ``slice 0``, ``slice 1``, ...).
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
    return _save(_grid(rows, params, windows, title, panel_in), path, dpi)


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
