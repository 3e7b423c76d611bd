"""Can a truncated scan be read at all? The calculation approach per patient on the truncated studies of
:mod:`experiments.calc_settings`, beside the same truncation of the noise-free study (an upper bound for
any method: no noise, only the lost frames) and the full studies, with how long each scan ran after its
arterial peak (:func:`stm_dlp.perfusion.arterial.scan_window`, ``info["scan_window"]``).

    python -m experiments.calc_truncation [--families ribbon,classic] [--profile full|quick|micro]

Prints one Markdown table: family, patient, scan length (s), seconds after the arterial peak, whether the
calc flagged the scan as short, and Dice(TMAX > 6 s) on clean / clean truncated / regular / truncated.
``docs/calc/issue14_targets.md`` §6 quotes it.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from experiments.calc_settings import FAMILIES, PROFILES, make_studies
from stm_dlp.data.corrupt import Truncate, corrupt_study
from stm_dlp.perfusion.maps import calculate_maps
from stm_dlp.perfusion.readout import ReadoutThresholds, dice

#: The clinical TMAX threshold (s) the Dice is taken at.
LESION_TMAX_S = ReadoutThresholds().hypoperfusion_tmax_s
#: The studies compared, in table order.
COLUMNS: tuple[str, ...] = ("clean", "clean truncated", "regular", "truncated")


def run(families: list[str], profile: str = "full") -> list[dict]:
    """One row per family x patient: ``{"family", "patient", "scan_s", "after_peak_s", "short",
    "dice": {column: value}}`` (scan length, seconds after the arterial peak and the flag of the *truncated* study)."""
    prof = PROFILES[profile]
    rows = []
    for fam in families:
        for patient in range(prof["patients"]):
            studies = make_studies(fam, patient, prof)
            # the truncation of calc_settings (keep 70 % of the frames) applied to the noise-free study
            studies["clean truncated"] = corrupt_study(studies["clean"], Truncate(keep_fraction=0.7), seed=0)
            row: dict = {"family": fam, "patient": patient, "dice": {}}
            for name in COLUMNS:
                st = studies[name]
                m = np.asarray(st.mask, bool)
                maps, info = calculate_maps(st.frames, st.times_s, None, affine=st.affine, motion=False)
                row["dice"][name] = dice(st.maps[:, 2][m] > LESION_TMAX_S, np.asarray(maps["tmax"])[m] > LESION_TMAX_S)
                if name == "truncated":
                    w = info["scan_window"]
                    row.update(scan_s=float(np.asarray(st.times_s).max()), after_peak_s=w["after_peak_s"],
                               short=w["short"])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| family | patient | truncated scan s | after arterial peak s | flagged short | "
            + " | ".join(f"Dice {c}" for c in COLUMNS) + " |")
    lines = [head, "|" + "---|" * (5 + len(COLUMNS))]
    for r in rows:
        lines.append(f"| {r['family']} | {r['patient']} | {r['scan_s']:.0f} | {r['after_peak_s']:.1f} | "
                     f"{'yes' if r['short'] else 'no'} | " + " | ".join(f"{r['dice'][c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    args = ap.parse_args(argv)
    print(table(run([f for f in args.families.split(",") if f], args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
