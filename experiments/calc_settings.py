"""Accuracy of the calculation approach's deconvolution settings against the digital phantom's exact truth.

    python -m experiments.calc_settings [--out FILE.json] [--md FILE.md] [--quick] [--threads N]
                                        [--residue exponential|box|gamma|mixed]

What it measures: how the settings of :func:`stm_dlp.perfusion.maps.calculate_maps` — ``method``
(``osvd`` / ``bcsvd``), the AIF (the phantom's true curve ``study.meta["aif_hu"][0]`` or ``"auto"``
selection), ``spatial_sigma_px``, ``temporal_sigma_s``, ``tmax_method`` and, for oSVD, ``oi_target`` —
change the error of the CBV, CBF, MTT and TMAX maps, so that defaults can be chosen with evidence.

* Studies: :func:`stm_dlp.data.phantom.simulate_patient` with ``PhantomConfig(height=128, width=128,
  n_slices=4, noise_hu=NOISE)`` for NOISE in 0, 1, 3, 6 HU and seeds 0, 1 (``--quick``: 64x64, 2 slices,
  seed 0, noise 0 and 3); ``--residue`` sets ``PhantomConfig.residue`` (default: the phantom's
  ``exponential``; TMAX estimators depend on the residue's shape). Every setting sees the same
  studies, so rows of one noise level are paired. Note that the phantom draws its noise from the
  same random stream as the anatomy, so one seed at two noise levels is not exactly the same patient
  (slices after the first differ).
* Truth: ``study.maps`` (CBV ml/100g, CBF ml/100g/min, TMAX s), MTT = ``mtt_from_cbv_cbf``; every
  metric is computed inside ``study.mask`` (brain incl. CSF, without the vessels), pixels pooled over
  the seeds.
* Grid (not the full cartesian product): oSVD with the automatic AIF over spatial x temporal x
  tmax_method x oi_target; oSVD with the true AIF and bcSVD (auto and true AIF) over spatial x
  temporal x tmax_method at the default oi_target (it does not apply to bcSVD).
* Metrics per setting and noise: MAE of CBV, CBF, MTT, TMAX over the mask; median signed relative
  error of CBV (pixels with true CBV > 0) and of CBF (true CBF >= 30); median signed TMAX error and
  TMAX MAE over perfused pixels (true CBF > 0, i.e. without CSF); 95th percentile of the absolute
  CBF and TMAX errors over the mask; per tissue class (``study.meta["labels"]``: WM, GM, CSF,
  penumbra, core) MAE and median signed error of every map (JSON).

Output: a Markdown table on stdout (one row per setting x noise) and a per-tissue table for the
default settings; ``--out`` writes everything (also per seed) as JSON, ``--md`` the Markdown. A full
run is ~1000 ``calculate_maps`` calls on 4 x 128² studies, about 10 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stm_dlp.data.phantom import CORE, CSF, GM, PENUMBRA, WM, PhantomConfig, simulate_patient
from stm_dlp.perfusion.maps import calculate_maps
from stm_dlp.perfusion.physics import RESIDUE_KINDS
from stm_dlp.types import Study, mtt_from_cbv_cbf

MAPS: tuple[str, ...] = ("cbv", "cbf", "mtt", "tmax")
TISSUES: dict[str, int] = {"wm": WM, "gm": GM, "csf": CSF, "penumbra": PENUMBRA, "core": CORE}
#: CBF relative errors are taken where the true CBF is at least this (ml/100g/min): GM and normal WM.
CBF_REL_MIN: float = 30.0
#: calculate_maps defaults the grid varies around.
_SIGNATURE = inspect.signature(calculate_maps).parameters
DEFAULTS: dict[str, Any] = {"aif": "auto", **{k: _SIGNATURE[k].default for k in (
    "method", "spatial_sigma_px", "temporal_sigma_s", "tmax_method", "oi_target")}}
SPATIAL: tuple[float, ...] = (0.0, 0.7, 1.0, 1.5)
TEMPORAL: tuple[float, ...] = (0.0, 1.0, 2.0)
TMAX_METHODS: tuple[str, ...] = ("argmax", "half_rise")
OI_TARGETS: tuple[float, ...] = (0.095, 0.15)


@dataclass(frozen=True)
class Setting:
    """One point of the grid: ``calculate_maps`` keyword arguments (``aif`` as ``"auto"`` or ``"true"``)."""

    method: str = DEFAULTS["method"]
    aif: str = DEFAULTS["aif"]
    spatial_sigma_px: float = DEFAULTS["spatial_sigma_px"]
    temporal_sigma_s: float = DEFAULTS["temporal_sigma_s"]
    tmax_method: str = DEFAULTS["tmax_method"]
    oi_target: float = DEFAULTS["oi_target"]

    @property
    def label(self) -> str:
        oi = f" oi{self.oi_target:g}" if self.method == "osvd" else ""
        tm = "hr" if self.tmax_method == "half_rise" else "am"
        return (f"{self.method} {self.aif} s{self.spatial_sigma_px:g} t{self.temporal_sigma_s:g} {tm}{oi}")

    @property
    def is_default(self) -> bool:
        return all(getattr(self, k) == v for k, v in DEFAULTS.items())

    def kwargs(self, study: Study) -> dict[str, Any]:
        aif: Any = study.meta["aif_hu"][0] if self.aif == "true" else "auto"
        kw: dict[str, Any] = dict(method=self.method, aif=aif, spatial_sigma_px=self.spatial_sigma_px,
                                  temporal_sigma_s=self.temporal_sigma_s, tmax_method=self.tmax_method)
        if self.method == "osvd":
            kw["oi_target"] = self.oi_target
        return kw

    def as_dict(self) -> dict[str, Any]:
        return dict(method=self.method, aif=self.aif, spatial_sigma_px=self.spatial_sigma_px,
                    temporal_sigma_s=self.temporal_sigma_s, tmax_method=self.tmax_method,
                    oi_target=self.oi_target if self.method == "osvd" else None)


def build_grid(quick: bool) -> list[Setting]:
    """The settings evaluated (see the module docstring); ``quick`` keeps the oSVD/auto block only."""
    grid: list[Setting] = []
    spatial = (0.0, 1.0) if quick else SPATIAL
    temporal = (0.0, 2.0) if quick else TEMPORAL
    for s in spatial:
        for t in temporal:
            for tm in TMAX_METHODS:
                for oi in OI_TARGETS:
                    grid.append(Setting("osvd", "auto", s, t, tm, oi))
    if quick:
        grid += [Setting("osvd", "true"), Setting("bcsvd", "auto"), Setting("bcsvd", "true")]
        return grid
    for method, aif in (("osvd", "true"), ("bcsvd", "auto"), ("bcsvd", "true")):
        for s in spatial:
            for t in temporal:
                for tm in TMAX_METHODS:
                    grid.append(Setting(method, aif, s, t, tm))
    return grid


@dataclass
class Truth:
    """Truth maps, mask and labels of one study, flattened to the mask pixels."""

    maps: dict[str, np.ndarray]
    labels: np.ndarray
    mask: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, study: Study) -> Truth:
        mask = np.asarray(study.mask, bool)
        tm = np.asarray(study.maps, np.float32)
        cbv, cbf, tmax = tm[:, 0], tm[:, 1], tm[:, 2]
        maps = {"cbv": cbv[mask], "cbf": cbf[mask], "tmax": tmax[mask],
                "mtt": np.asarray(mtt_from_cbv_cbf(cbv, cbf))[mask]}
        return cls(maps=maps, labels=np.asarray(study.meta["labels"])[mask], mask=mask)


def _f(x: float | np.floating) -> float:
    return round(float(x), 4)


def metrics(est: dict[str, np.ndarray], truth: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """Metrics of mask-flattened estimate vs truth (see the module docstring for the definitions)."""
    err = {k: est[k].astype(np.float64) - truth[k].astype(np.float64) for k in MAPS}
    perfused = truth["cbf"] > 0
    cbv_sel = truth["cbv"] > 0
    cbf_sel = truth["cbf"] >= CBF_REL_MIN

    def med(x: np.ndarray) -> float:
        return _f(np.median(x)) if x.size else float("nan")

    out: dict[str, Any] = {f"mae_{k}": _f(np.abs(err[k]).mean()) for k in MAPS}
    out["rel_cbv"] = med(err["cbv"][cbv_sel] / truth["cbv"][cbv_sel])
    out["rel_cbf"] = med(err["cbf"][cbf_sel] / truth["cbf"][cbf_sel])
    out["bias_tmax"] = med(err["tmax"][perfused])
    out["mae_tmax_perfused"] = _f(np.abs(err["tmax"][perfused]).mean()) if perfused.any() else float("nan")
    out["p95_cbf"] = _f(np.percentile(np.abs(err["cbf"]), 95))
    out["p95_tmax"] = _f(np.percentile(np.abs(err["tmax"]), 95))
    tissue: dict[str, Any] = {}
    for name, cls in TISSUES.items():
        sel = labels == cls
        if not sel.any():
            continue
        row: dict[str, Any] = {"n": int(sel.sum())}
        for k in MAPS:
            row[f"mae_{k}"] = _f(np.abs(err[k][sel]).mean())
            row[f"bias_{k}"] = med(err[k][sel])
        if name not in ("csf",):
            row["rel_cbf"] = med(err["cbf"][sel] / truth["cbf"][sel])
        tissue[name] = row
    out["tissue"] = tissue
    return out


def run_setting(setting: Setting, study: Study, truth: Truth) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Mask-flattened maps of one setting on one study, and run facts (time, AIF scale, threshold)."""
    t0 = time.perf_counter()
    maps, info = calculate_maps(study.frames, study.times_s, truth.mask, device="cpu", **setting.kwargs(study))
    facts = {"seconds": round(time.perf_counter() - t0, 3),
             "pv_scale": info["aif"].get("pv_scale"),
             "threshold_median": info["threshold_used"]["median"]}
    return {k: np.asarray(maps[k], np.float32)[truth.mask] for k in MAPS}, facts


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    return f"{x:.{nd}f}"


COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("mae_cbv", "CBV MAE", 2), ("mae_cbf", "CBF MAE", 1), ("mae_mtt", "MTT MAE", 2), ("mae_tmax", "TMAX MAE", 2),
    ("mae_tmax_perfused", "TMAX MAE perf", 2), ("rel_cbv", "CBV rel", 3), ("rel_cbf", "CBF rel≥30", 3),
    ("bias_tmax", "TMAX bias", 2), ("p95_cbf", "CBF p95", 1), ("p95_tmax", "TMAX p95", 1),
)


def markdown(results: list[dict[str, Any]], noises: Iterable[float]) -> str:
    """Main table (rows grouped by noise, then in grid order) and the per-tissue table of the defaults."""
    lines = ["| setting | noise HU | " + " | ".join(c[1] for c in COLUMNS) + " | s/run |",
             "|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for noise in noises:
        for r in results:
            m = r["by_noise"].get(str(noise))
            if m is None:
                continue
            star = " *" if r["is_default"] else ""
            cells = [_fmt(m["pooled"].get(k), nd) for k, _, nd in COLUMNS]
            lines.append(f"| {r['label']}{star} | {noise:g} | " + " | ".join(cells) + f" | {m['seconds_mean']:.2f} |")
    lines += ["", "`*` = calculate_maps defaults. am = argmax, hr = half_rise; s = spatial_sigma_px, "
              "t = temporal_sigma_s; rel = median signed relative error; TMAX bias = median signed error "
              "(s) over perfused pixels; p95 = 95th percentile of |error|; MAE/p95 over the brain mask "
              "(incl. CSF), pooled over seeds.", ""]
    default = next((r for r in results if r["is_default"]), None)
    if default is not None:
        lines += [f"Per tissue, defaults ({default['label']}): MAE (median signed error)", "",
                  "| noise HU | tissue | n | CBV | CBF | MTT | TMAX | CBF rel |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for noise in noises:
            m = default["by_noise"].get(str(noise))
            if m is None:
                continue
            for name, row in m["pooled"]["tissue"].items():
                cells = [f"{_fmt(row[f'mae_{k}'])} ({_fmt(row[f'bias_{k}'])})" for k in MAPS]
                lines.append(f"| {noise:g} | {name} | {row['n']} | " + " | ".join(cells)
                             + f" | {_fmt(row.get('rel_cbf'), 3)} |")
    return "\n".join(lines) + "\n"


def md_header() -> str:
    """Title, rerun command, date and machine for the ``--md`` file."""
    import os
    from datetime import datetime, timezone

    cmd = "python -m experiments.calc_settings " + " ".join(sys.argv[1:])
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"# Calculation-approach settings vs the phantom's exact truth\n\nGenerated by `{cmd.strip()}` on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}. `*` marks calculate_maps' defaults. Columns: see the module docstring "
            f"of `experiments/calc_settings.py`.\n\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    ap.add_argument("--md", type=Path, default=None, help="also write the Markdown tables here")
    ap.add_argument("--quick", action="store_true", help="64x64, 2 slices, 1 seed, noise 0 and 3, small grid")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--residue", default=PhantomConfig.residue, choices=(*RESIDUE_KINDS, "mixed"),
                    help="phantom residue function (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    if args.quick:
        size, n_slices, seeds, noises = 64, 2, (0,), (0.0, 3.0)
    else:
        size, n_slices, seeds, noises = 128, 4, (0, 1), (0.0, 1.0, 3.0, 6.0)
    grid = build_grid(args.quick)
    t_start = time.perf_counter()
    studies: dict[tuple[float, int], tuple[Study, Truth]] = {}
    for noise in noises:
        for seed in seeds:
            cfg = PhantomConfig(height=size, width=size, n_slices=n_slices, noise_hu=noise, residue=args.residue)
            st = simulate_patient(cfg, seed=seed)
            studies[(noise, seed)] = (st, Truth.of(st))

    from tqdm import tqdm

    results: list[dict[str, Any]] = []
    n_runs = len(grid) * len(studies)
    with tqdm(total=n_runs, desc="calc_settings", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for setting in grid:
            entry: dict[str, Any] = {"label": setting.label, "setting": setting.as_dict(),
                                     "is_default": setting.is_default, "by_noise": {}}
            for noise in noises:
                est_all: dict[str, list[np.ndarray]] = {k: [] for k in MAPS}
                tru_all: dict[str, list[np.ndarray]] = {k: [] for k in MAPS}
                lab_all: list[np.ndarray] = []
                per_seed: dict[str, Any] = {}
                secs: list[float] = []
                for seed in seeds:
                    study, truth = studies[(noise, seed)]
                    bar.set_postfix_str(f"{setting.label} noise={noise:g} seed={seed}")
                    try:
                        est, facts = run_setting(setting, study, truth)
                    except Exception as exc:  # a failed calculation is a result too
                        per_seed[str(seed)] = {"error": f"{type(exc).__name__}: {exc}"}
                        bar.update(1)
                        continue
                    m = metrics(est, truth.maps, truth.labels)
                    m.pop("tissue")
                    per_seed[str(seed)] = {**m, **facts}
                    secs.append(facts["seconds"])
                    for k in MAPS:
                        est_all[k].append(est[k])
                        tru_all[k].append(truth.maps[k])
                    lab_all.append(truth.labels)
                    bar.update(1)
                if not lab_all:
                    entry["by_noise"][str(noise)] = {"pooled": {}, "per_seed": per_seed, "seconds_mean": float("nan")}
                    continue
                pooled = metrics({k: np.concatenate(v) for k, v in est_all.items()},
                                 {k: np.concatenate(v) for k, v in tru_all.items()}, np.concatenate(lab_all))
                entry["by_noise"][str(noise)] = {"pooled": pooled, "per_seed": per_seed,
                                                 "seconds_mean": round(float(np.mean(secs)), 3)}
            results.append(entry)
    elapsed = time.perf_counter() - t_start

    md = markdown(results, noises)
    md += (f"\n{len(grid)} settings x {len(studies)} studies ({size}x{size}, {n_slices} slices, {args.residue} "
           f"residue) in {elapsed:.0f} s\n")
    print(md)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md_header() + md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "config": {"size": size, "n_slices": n_slices, "seeds": list(seeds), "noise_hu": list(noises),
                       "quick": args.quick, "residue": args.residue, "threads": args.threads,
                       "cbf_rel_min": CBF_REL_MIN, "defaults": DEFAULTS, "tissues": TISSUES},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "machine": platform.machine()},
            "elapsed_s": round(elapsed, 1),
            "results": results,
        }
        args.out.write_text(json.dumps(doc, indent=1, allow_nan=True))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
