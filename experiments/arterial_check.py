"""How well the model's arterial context follows the true arterial input, on both phantom families.

    python -m experiments.arterial_check [--patients 8] [--md FILE]

For each phantom family at its own matrix (classic 64², ribbon 128² at 1.6-2 mm), on the scan's own grid
and resampled to 3 mm (the laptop scale's ``data.target_spacing_mm``), under the regular, noise (σ 15 HU)
and motion conditions (motion corrected first by :func:`stm_dlp.data.motion.motion_corrected`, as the
DataModule and ``stm_dlp.predict`` do), every slice's
:func:`~stm_dlp.perfusion.arterial.arterial_reference` is compared with the phantom's full-volume AIF
(``meta["aif_hu"]``) on the same frame times:

* **arrival error** (s): the reference's arrival minus the true AIF's, both by
  :func:`~stm_dlp.curves.rise_time` (30 % of the peak, searched backwards from the peak) —
  what the model's "time since the arterial arrival" channel is built from, so TMAX inherits it;
* **peak ratio**: the reference's peak over the true AIF's (1 = the amplitude CBF and CBV scale with;
  partial volume pulls it below 1).

Prints a Markdown table; ``--md`` also writes it with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import numpy as np
import torch

from stm_dlp.curves import rise_time
from stm_dlp.data.corrupt import corrupt_study, named_corruption
from stm_dlp.data.motion import motion_corrected
from stm_dlp.data.phantom import PhantomConfig, simulate_cohort
from stm_dlp.data.resample import resample_study
from stm_dlp.perfusion.arterial import arterial_reference
from stm_dlp.types import Study

#: (family, matrix): each family at its own size (the benchmark's cohorts).
FAMILIES: tuple[tuple[str, int], ...] = (("classic", 64), ("ribbon", 128))
CONDITIONS: tuple[str, ...] = ("none", "noise", "motion")
GRIDS: tuple[str, ...] = ("native", "3 mm")


def _arrival(curve: np.ndarray, times: np.ndarray) -> float:
    return float(rise_time(torch.as_tensor(curve, dtype=torch.float32), torch.as_tensor(times, dtype=torch.float32)))


def slice_errors(study: Study, truth: Study) -> list[tuple[float, float]]:
    """``(arrival error s, peak ratio)`` of every slice of ``study`` against ``truth.meta["aif_hu"]``."""
    out = []
    frames = torch.from_numpy(np.asarray(study.frames, np.float32))
    for s in range(study.n_slices):
        times = np.asarray(study.times_s[s], np.float32)
        ref = arterial_reference(frames[s], torch.from_numpy(times))
        aif = np.asarray(truth.meta["aif_hu"][s], np.float64)
        out.append((_arrival(ref.curve_hu.numpy(), times) - _arrival(aif, times), ref.peak_hu / float(aif.max())))
    return out


def measure(n_patients: int) -> list[dict[str, object]]:
    rows = []
    for family, size in FAMILIES:
        cohort = simulate_cohort(n_patients, PhantomConfig(family=family, height=size, width=size, n_slices=4,
                                                           frames_min=40, frames_max=50), seed=0)
        for grid in GRIDS:
            for cond in CONDITIONS:
                errs = []
                for i, st in enumerate(cohort):
                    x = st if grid == "native" else resample_study(st, 3.0)
                    x = corrupt_study(x, named_corruption(cond), 100 + i)
                    if cond == "motion":
                        x = motion_corrected(x)
                    errs += slice_errors(x, st)
                e = np.array([a for a, _ in errs])
                q = np.array([b for _, b in errs])
                rows.append({"family": family, "grid": grid, "condition": cond, "slices": len(errs),
                             "mean": float(e.mean()), "abs": float(np.abs(e).mean()),
                             "p90": float(np.quantile(np.abs(e), 0.9)), "ratio": float(np.median(q)),
                             "ratio_lo": float(q.min()), "ratio_hi": float(q.max())})
                print(f"  {family} {grid} {cond}: |error| {rows[-1]['abs']:.2f} s", flush=True)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| family | grid | condition | slices | arrival error mean s | mean abs s | 90th pct abs s "
             "| peak ratio median [min, max] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['grid']} | {r['condition']} | {r['slices']} | {r['mean']:+.2f} | "
                     f"{r['abs']:.2f} | {r['p90']:.2f} | {r['ratio']:.2f} [{r['ratio_lo']:.2f}, {r['ratio_hi']:.2f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=8, help="patients per family (4 slices each)")
    ap.add_argument("--md", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    text = table(measure(args.patients))
    print(text)
    if args.md:
        Path(args.md).write_text(
            f"`python -m experiments.arterial_check --patients {args.patients}` — "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{datetime.date.today().isoformat()}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
