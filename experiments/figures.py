"""Figures of a sweep: Figure 7 (metrics vs fraction of frames), a robustness chart and the
qualitative comparison (input frame, truth, each model's maps and oSVD's; paper Figures 5-6 style).

Used by ``python -m experiments.tables``; every function takes plain numbers / arrays and writes a PNG
(matplotlib, Agg backend). Colours of maps come from :func:`stm_dlp.io.png.colorize`, whose fixed
physical window per parameter (:data:`stm_dlp.io.png.DEFAULT_WINDOWS`) gives every row the same
colour scale. No patient identifier is ever drawn.
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
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from stm_dlp.io.png import CMAP_NAME, DEFAULT_WINDOWS, DISPLAY_ORDER, colorize  # noqa: E402
from stm_dlp.types import PARAMS, UNITS  # noqa: E402

METRICS = ("mae", "rmse", "r2")
METRIC_LABELS = {"mae": "MAE", "rmse": "RMSE", "r2": "R²"}


def _save(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def plot_frames_curves(path: str | Path, curves: Mapping[str, Mapping[float, Mapping[str, Mapping[str, tuple]]]],
                       title: str | None = None) -> Path:
    """Paper Figure 7: MAE, RMSE and R² (rows) of CBV, CBF, TMAX (columns) vs the fraction of frames.

    Args:
        curves: method label → frame fraction → parameter → metric → ``(mean, std)`` (std may be nan).
    """
    fig, axes = plt.subplots(len(METRICS), len(PARAMS), figsize=(3.4 * len(PARAMS), 2.6 * len(METRICS)),
                             squeeze=False, layout="constrained")
    styles = ["-o", "--s", "-.^", ":d", "-v", "--x"]
    for j, p in enumerate(PARAMS):
        for i, m in enumerate(METRICS):
            ax = axes[i, j]
            for k, (label, by_fraction) in enumerate(curves.items()):
                xs = sorted(by_fraction, reverse=True)
                mean = np.array([by_fraction[x][p][m][0] for x in xs], float)
                std = np.array([by_fraction[x][p][m][1] for x in xs], float)
                xs_pct = [100.0 * x for x in xs]
                ax.plot(xs_pct, mean, styles[k % len(styles)], label=label, ms=4)
                if np.any(np.isfinite(std) & (std > 0)):
                    ax.fill_between(xs_pct, mean - np.nan_to_num(std), mean + np.nan_to_num(std), alpha=0.2)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{p.upper()} ({UNITS[p]})", fontsize=10)
            if j == 0:
                ax.set_ylabel(METRIC_LABELS[m])
    fig.supxlabel("frames kept (% of the acquisition, first frames, original timing)", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_condition_bars(path: str | Path, values: Mapping[str, Mapping[str, Mapping[str, tuple]]],
                        metric: str = "mae", title: str | None = None) -> Path:
    """Grouped bars of one metric per condition (e.g. corruption) and method, one panel per parameter.

    Args:
        values: condition label → method label → parameter → ``(mean, std)``.
    """
    conditions = list(values)
    methods = list(dict.fromkeys(m for c in conditions for m in values[c]))
    fig, axes = plt.subplots(1, len(PARAMS), figsize=(4.2 * len(PARAMS), 3.4), squeeze=False,
                             layout="constrained")
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(conditions))
    for j, p in enumerate(PARAMS):
        ax = axes[0, j]
        for k, method in enumerate(methods):
            mean = [values[c].get(method, {}).get(p, (np.nan, np.nan))[0] for c in conditions]
            std = [values[c].get(method, {}).get(p, (np.nan, np.nan))[1] for c in conditions]
            ax.bar(x + (k - (len(methods) - 1) / 2) * width, mean, width, yerr=np.nan_to_num(std),
                   label=method, capsize=2)
        ax.set_xticks(x, conditions, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{p.upper()} ({UNITS[p]})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if j == 0:
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=max(1, len(labels)), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _frame_window(frame: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    values = frame[mask] if mask is not None and mask.any() else frame.ravel()
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1.0))


def plot_qualitative(path: str | Path, frame: np.ndarray, rows: Mapping[str, Mapping[str, np.ndarray]],
                     mask: np.ndarray | None = None, title: str | None = None,
                     params: Sequence[str] = DISPLAY_ORDER, errors: Mapping[str, Mapping[str, float]] | None = None,
                     frame_caption: str = "input frame", panel_in: float = 1.9) -> Path:
    """Paper Figures 5-6: the input frame, then one row per method (truth first) × one column per
    parameter, coloured with the fixed physical window of each parameter (the same in every row).

    Args:
        frame: ``(H, W)`` HU, shown in grey next to the first row.
        rows: method label → parameter → ``(H, W)`` map in physical units.
        mask: bool ``(H, W)`` brain mask; black outside.
        errors: method label → parameter → MAE on this slice, printed under the panel.
    """
    params = [p for p in params if any(p in r for r in rows.values())]
    n_r, n_c = len(rows), len(params) + 1
    fig, axes = plt.subplots(n_r, n_c, figsize=(panel_in * n_c + 0.3, panel_in * n_r + 1.1), squeeze=False,
                             layout="constrained")
    lo, hi = _frame_window(np.asarray(frame, float), mask)
    for i, (label, maps) in enumerate(rows.items()):
        for j in range(n_c):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                if i == 0:
                    ax.imshow(frame, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                    ax.set_title(frame_caption, fontsize=9)
                else:
                    ax.axis("off")
                continue
            p = params[j - 1]
            ax.set_facecolor("black")
            if p in maps:
                ax.imshow(colorize(np.asarray(maps[p]), p, mask), interpolation="nearest")
                err = (errors or {}).get(label, {}).get(p)
                if err is not None:
                    ax.set_xlabel(f"MAE {err:.3g}", fontsize=7, labelpad=1)
            if i == 0:
                ax.set_title(p.upper(), fontsize=10)
            if j == 1:
                ax.set_ylabel(label, fontsize=9)
    cmap = colormaps[CMAP_NAME]
    for j, p in enumerate(params, start=1):
        w_lo, w_hi = DEFAULT_WINDOWS[p]
        bar = fig.colorbar(ScalarMappable(norm=Normalize(w_lo, w_hi), cmap=cmap), ax=axes[:, j],
                           location="bottom", shrink=0.9, aspect=15)
        bar.set_label(f"{p.upper()} ({UNITS.get(p, '')})", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
