"""Where the calculation approach's TMAX goes wrong: lesion vs normal tissue, per option set.

    python -m experiments.calc_tmax_diag [--conditions regular,truncated] [--families classic,ribbon]
        [--options "tmax_method='argmax';spatial_sigma_mm=0"] [--profile full|quick]

For each family x condition (the studies of :mod:`experiments.calc_settings`, same seeds) and each
option set (``;``-separated :func:`~stm_dlp.perfusion.maps.calculate_maps` keyword options, Python
literals; the first set is always the defaults, motion correction off), prints pooled over the
patients: Dice(TMAX > 6 s), TMAX MAE, the median TMAX error inside the true lesion (penumbra + core)
and in the rest of the brain, the fraction of perfused pixels whose TMAX is 0, and CBF / CBV MAE.
``docs/calc/issue14_targets.md`` quotes its tables.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time

import numpy as np
import torch

from experiments.calc_settings import PROFILES, make_studies
from stm_dlp.data.phantom import CORE, PENUMBRA
from stm_dlp.perfusion.maps import calculate_maps


def parse_options(text: str) -> list[dict]:
    """``"a=1,b='x';c=2"`` -> ``[{}, {"a": 1, "b": "x"}, {"c": 2}]`` (the defaults first)."""
    out: list[dict] = [{}]
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        call = ast.parse(f"f({spec})", mode="eval").body
        out.append({kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
    return out


def run(families: list[str], conditions: list[str], option_sets: list[dict], profile: str = "full",
        log=print) -> list[dict]:
    prof = PROFILES[profile]
    rows = []
    for fam in families:
        for cond in conditions:
            acc: list[dict[str, list]] = [{k: [] for k in ("t", "e", "les", "perf", "cbf", "cbv")}
                                          for _ in option_sets]
            secs = [0.0] * len(option_sets)
            for patient in range(prof["patients"]):
                st = make_studies(fam, patient, prof)[cond]
                m = np.asarray(st.mask, bool)
                les = np.isin(st.meta["labels"], (PENUMBRA, CORE))[m]
                for i, kw in enumerate(option_sets):
                    t0 = time.perf_counter()
                    maps, _ = calculate_maps(st.frames, st.times_s, None, affine=st.affine,
                                             **{"motion": False, **kw})
                    secs[i] += time.perf_counter() - t0
                    a = acc[i]
                    a["t"].append(st.maps[:, 2][m])
                    a["e"].append(maps["tmax"][m])
                    a["les"].append(les)
                    a["perf"].append(st.maps[:, 1][m] > 0)
                    a["cbf"].append(np.abs(maps["cbf"][m] - st.maps[:, 1][m]))
                    a["cbv"].append(np.abs(maps["cbv"][m] - st.maps[:, 0][m]))
            for i, kw in enumerate(option_sets):
                t, e, les, perf, cbf, cbv = (np.concatenate(acc[i][k]) for k in ("t", "e", "les", "perf", "cbf",
                                                                                 "cbv"))
                a, b = t > 6, e > 6
                row = {"family": fam, "condition": cond, "options": kw or "defaults",
                       "dice": float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1)),
                       "tmax_mae": float(np.abs(e - t).mean()),
                       "bias_lesion": float(np.median(e[les] - t[les])) if les.any() else float("nan"),
                       "bias_normal": float(np.median(e[~les & perf] - t[~les & perf])),
                       "zero_frac": float(np.mean(e[perf] == 0)), "cbf_mae": float(cbf.mean()),
                       "cbv_mae": float(cbv.mean()), "seconds": secs[i]}
                rows.append(row)
                log(f"| {fam} | {cond} | {row['options']} | {row['dice']:.3f} | {row['tmax_mae']:.2f} | "
                    f"{row['bias_lesion']:+.2f} | {row['bias_normal']:+.2f} | {row['zero_frac']:.3f} | "
                    f"{row['cbf_mae']:.1f} | {row['cbv_mae']:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="classic,ribbon")
    ap.add_argument("--conditions", default="regular")
    ap.add_argument("--options", default="", help="';'-separated option sets (the defaults always come first)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    print("| family | condition | options | Dice TMAX>6 | TMAX MAE | lesion bias | normal bias | TMAX 0 | CBF MAE "
          "| CBV MAE |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    run(args.families.split(","), args.conditions.split(","), parse_options(args.options), args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
