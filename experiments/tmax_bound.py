"""TMAX kept within a bound of the deconvolution prior's, applied after the fact to the cross-family
checkpoints of a benchmark (or ``experiments.cross_family``) run: what ``model.tmax_correction_s`` does at
inference, measured without retraining.

    python -m experiments.tmax_bound OUT [--bounds 0.25,0.5,1,2]

``OUT`` is the ``--out`` folder of ``python -m experiments.bench --profile cpu`` or of
``python -m experiments.cross_family`` (``OUT/runs/stm_dlp_lstm`` trained on classic,
``OUT/runs/stm_dlp_lstm_ribbon`` on ribbon). For each tested family (its held-out patients, regular data) it
prints TMAX R² / Dice(TMAX > 6 s) of the prior alone, and of each model unbounded, at each bound
(:func:`stm_dlp.models.stm_dlp.bounded_tmax`, in seconds) and levelled per slice to the prior's normal tissue
(:func:`stm_dlp.models.stm_dlp.prior_levelled_tmax`, ``model.tmax_level_from_prior``). docs/tmax.md §10 quotes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from experiments.bench.accuracy import CROSS_CONDITIONS, ModelMaps, PriorMaps, best_checkpoint, test_studies
from stm_dlp.models.stm_dlp import bounded_tmax, prior_levelled_tmax
from stm_dlp.perfusion.readout import ReadoutThresholds, dice

RUNS = {"classic": "stm_dlp_lstm", "ribbon": "stm_dlp_lstm_ribbon"}
LESION_TMAX_S = ReadoutThresholds().hypoperfusion_tmax_s


def r2_dice(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """TMAX R² and Dice(TMAX > 6 s) of pooled brain pixels."""
    r2 = 1.0 - float(((truth - pred) ** 2).sum() / max(((truth - truth.mean()) ** 2).sum(), 1e-12))
    return r2, dice(truth > LESION_TMAX_S, pred > LESION_TMAX_S)


def run(out: Path, bounds: list[float]) -> dict:
    """``{test family: {"prior": (r2, dice), "<train family>": {"unbounded": (r2, dice), bound: (r2, dice)}}}``."""
    models = {}
    for family, name in RUNS.items():
        d = out / "runs" / name
        models[family] = ModelMaps(best_checkpoint(d, json.loads((d / "metrics.json").read_text())), "cpu")
        # the network's own TMAX: whatever the run's config says, the columns add the bound / levelling
        models[family].model.tmax_correction_s = None
        models[family].model.tmax_level_from_prior = False
    prior_maps = PriorMaps()
    result: dict = {}
    for test, name in RUNS.items():
        truth, prior, pred, levelled = [], [], {f: [] for f in RUNS}, {f: [] for f in RUNS}
        for st in test_studies(out / "runs" / name, **CROSS_CONDITIONS["regular"]):
            m = np.asarray(st.mask, bool)
            truth.append(st.maps[:, 2][m])
            prior_s = torch.as_tensor(np.asarray(prior_maps.maps(st)[0]["tmax"]), dtype=torch.float32)
            prior.append(prior_s.numpy()[m])
            for f in RUNS:
                q = torch.as_tensor(np.asarray(models[f].maps(st)[0]["tmax"]), dtype=torch.float32)
                pred[f].append(q.numpy()[m])
                levelled[f].append(prior_levelled_tmax(q, prior_s).numpy()[m])
        t, p = np.concatenate(truth), np.concatenate(prior)
        result[test] = {"prior": r2_dice(t, p)}
        for f in RUNS:
            q = np.concatenate(pred[f])
            row = {"unbounded": r2_dice(t, q), "levelled": r2_dice(t, np.concatenate(levelled[f]))}
            for b in bounds:
                row[b] = r2_dice(t, bounded_tmax(torch.from_numpy(q), torch.from_numpy(p), b).numpy())
            result[test][f] = row
    return result


def table(result: dict, bounds: list[float]) -> str:
    head = ("| trained on | tested on | unbounded | " + " | ".join(f"bound {b:g} s" for b in bounds)
            + " | levelled to the prior | prior alone |")
    lines = [head, "|" + "---|" * (5 + len(bounds))]
    for test, rows in result.items():
        for f in RUNS:
            cells = [rows[f]["unbounded"]] + [rows[f][b] for b in bounds] + [rows[f]["levelled"]]
            lines.append(f"| {f} | {test} | " + " | ".join(f"{r:.2f} / {d:.2f}" for r, d in cells)
                         + f" | {rows['prior'][0]:.2f} / {rows['prior'][1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--bounds", default="0.25,0.5,1,2")
    args = ap.parse_args(argv)
    bounds = [float(b) for b in args.bounds.split(",") if b]
    print("TMAX R² / Dice(TMAX > 6 s), regular data, held-out patients")
    print(table(run(args.out, bounds), bounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
