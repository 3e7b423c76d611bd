"""``python -m experiments.tmax_diagnostics`` — why the default model does not learn TMAX: measurements on
the training data, no training (the training ablations are in docs/tmax.md, with their command).

For the default phantom cohort (``conf/data/phantom.yaml`` at ``scale=laptop``) it measures:

* the TMAX label distribution inside the brain mask and what a constant prediction scores: the median
  (what an L1 / Charbonnier loss converges to without information) against the mean (MSE's constant);
* how often a random training crop (16², the laptop scale) holds lesion (TMAX > 6 s) pixels, and an
  artery pixel (the only place the arterial input is visible to the network);
* the per-pixel signal: peak enhancement over baseline in normal tissue and in the lesion against the noise;
* how much of TMAX a pixel's absolute bolus arrival explains, against its arrival relative to the slice's
  arterial arrival (the arterial context): R² of a linear fit.

Writes a markdown table to stdout (and ``--out FILE``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stm_dlp.data.phantom import ARTERY, CORE, PENUMBRA, PhantomConfig, cohort_member, simulate_patient
from stm_dlp.perfusion.arterial import arterial_reference


def _r2(x: np.ndarray, y: np.ndarray) -> float:
    a = np.vstack([x, np.ones_like(x)]).T
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ coef
    return float(1.0 - resid.var() / y.var())


def _arrival(curves: np.ndarray, times: np.ndarray, frac: float = 0.3) -> np.ndarray:
    """First time each curve ``(N, T)`` (enhancement, HU) exceeds ``frac`` of its peak (linear interpolation)."""
    peak = curves.max(1, keepdims=True)
    above = curves >= frac * peak
    idx = above.argmax(1)
    idx0 = np.clip(idx - 1, 0, None)
    c0, c1 = curves[np.arange(len(idx)), idx0], curves[np.arange(len(idx)), idx]
    level = frac * peak[:, 0]
    w = np.where(c1 > c0, (level - c0) / np.maximum(c1 - c0, 1e-6), 0.0)
    return times[idx0] + np.clip(w, 0, 1) * (times[idx] - times[idx0])


def diagnose(n_patients: int = 16, seed: int = 0, crop: int = 16, n_crops: int = 2000,
             noise_hu: float = 3.0) -> list[tuple[str, str]]:
    cfg = PhantomConfig(noise_hu=noise_hu)
    clean = PhantomConfig(noise_hu=0.0)
    rng = np.random.default_rng(0)
    tmax_vals, crop_lesion, crop_artery = [], [], []
    peak_normal, peak_lesion, noise = [], [], []
    abs_arr, rel_arr, tmax_fit = [], [], []
    for i in range(n_patients):
        pseed, pid = cohort_member(i, seed)
        st = simulate_patient(cfg, pseed, pid)
        st0 = simulate_patient(clean, pseed, pid)  # same anatomy and truth, no noise: arrival measurement
        labels = st.meta["labels"]
        tmax = st.maps[:, 2]
        tmax_vals.append(tmax[st.mask])
        s_count, t_count, h, w = st.frames.shape
        for _ in range(n_crops // n_patients):
            s = rng.integers(s_count)
            y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            m = st.mask[s, y:y + crop, x:x + crop]
            crop_lesion.append(bool((m & (tmax[s, y:y + crop, x:x + crop] > 6)).any()))
            crop_artery.append(bool((labels[s, y:y + crop, x:x + crop] == ARTERY).any()))
        for s in range(s_count):
            enh = st0.frames[s] - st0.frames[s, :2].mean(0)  # (T, H, W)
            peak = enh.max(0)
            lesion = np.isin(labels[s], [PENUMBRA, CORE])
            normal = st.mask[s] & ~lesion & (tmax[s] > 0)
            peak_normal.append(peak[normal])
            peak_lesion.append(peak[lesion])
            noise.append(float(np.std(st.frames[s, :2] - st0.frames[s, :2])))
            sel = st.mask[s] & (peak > 0.5)
            if sel.sum() < 10:
                continue
            curves = enh[:, sel].T
            times = st.times_s[s] - st.times_s[s, 0]
            arr = _arrival(curves, times)
            ref = arterial_reference(torch.from_numpy(st0.frames[s]), torch.from_numpy(times.astype(np.float32)))
            a_arr = float(_arrival(ref.curve_hu.numpy()[None], times)[0])
            abs_arr.append(arr)
            rel_arr.append(arr - a_arr)
            tmax_fit.append(tmax[s][sel])
    tv = np.concatenate(tmax_vals)
    med, mean = float(np.median(tv)), float(tv.mean())
    r2_med = 1.0 - float(((tv - med) ** 2).mean() / tv.var())
    pn, pl = np.concatenate(peak_normal), np.concatenate(peak_lesion)
    a, r, t = np.concatenate(abs_arr), np.concatenate(rel_arr), np.concatenate(tmax_fit)
    return [
        ("patients / slices",
         f"{n_patients} / {n_patients * cfg.n_slices} ({cfg.height}², {noise_hu:g} HU noise)"),
        ("TMAX in the brain: median / mean / share > 6 s",
         f"{med:.2f} s / {mean:.2f} s / {100 * (tv > 6).mean():.1f} %"),
        ("R² of the constant median (L1/Charbonnier's optimum without information)", f"{r2_med:.3f}"),
        ("R² of the constant mean (MSE's)", "0.000"),
        (f"random {crop}² training crops holding lesion (TMAX > 6 s) pixels", f"{100 * np.mean(crop_lesion):.0f} %"),
        (f"random {crop}² training crops holding an artery pixel", f"{100 * np.mean(crop_artery):.0f} %"),
        ("peak enhancement, normal tissue (median)", f"{np.median(pn):.1f} HU"),
        ("peak enhancement, lesion (median)", f"{np.median(pl):.1f} HU"),
        ("noise per frame", f"{np.mean(noise):.1f} HU"),
        ("R² of TMAX on the pixel's absolute arrival", f"{_r2(a, t):.2f}"),
        ("R² of TMAX on its arrival relative to the slice's arterial reference", f"{_r2(r, t):.2f}"),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = diagnose(args.patients)
    text = "| measurement | value |\n|:--|--:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
