"""``python -m experiments.mtt_diagnostics RUN_DIR`` — where a trained model's MTT error comes from.

MTT is derived (CBV / CBF · 60), so a small disagreement between two maps, or a little flow predicted
where there is none, becomes a large MTT error. For the held-out test patients of a finished
``python -m stm_dlp.run`` (its own data config and best checkpoint) this splits the squared MTT error by
the truth's tissue class — CSF (true CBF 0), very low flow (true CBF < 5), lesion (true TMAX > 6 s),
normal tissue — and reports MAE and R² of every map twice: as the network outputs them, and with CSF left
out as ``stm_dlp.predict`` and the Lightning test step do (:func:`stm_dlp.data.context.exclude_csf`).

Writes a markdown table to stdout (and ``--out FILE``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stm_dlp.types import ALL_PARAMS, collate_slices, maps_by_name, physical_maps


def _r2(pred: np.ndarray, true: np.ndarray) -> float:
    return float(1.0 - ((pred - true) ** 2).sum() / max(((true - true.mean()) ** 2).sum(), 1e-12))


@torch.inference_mode()
def collect(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{"raw" | "csf_out" | "truth": {param: brain pixels of every test slice}}`` (plus ``tmax`` truth)."""
    from experiments.bench.accuracy import best_checkpoint, test_studies
    from stm_dlp.data.context import attach_arterial, batch_csf, exclude_csf, study_references
    from stm_dlp.predict import load_model

    model, scale, _ = load_model(best_checkpoint(run_dir, {}), "cpu")
    out: dict[str, dict[str, list[np.ndarray]]] = {k: {p: [] for p in ALL_PARAMS} for k in ("raw", "csf_out", "truth")}
    prior = bool(getattr(model, "deconv_prior", False))
    for study in test_studies(run_dir):
        references = study_references(study, getattr(model, "arterial_pooling", "slice"))
        for s in range(study.n_slices):
            batch = collate_slices([attach_arterial(study.slice_sample(s), prior, references[s])])
            raw = physical_maps(model(**batch.model_inputs()), scale)
            kept = exclude_csf(raw, batch_csf(batch))
            truth = maps_by_name(batch.maps)
            m = batch.mask
            for p in ALL_PARAMS:
                out["raw"][p].append(raw[p][m].numpy())
                out["csf_out"][p].append(kept[p][m].numpy())
                out["truth"][p].append(truth[p][m].numpy())
    return {k: {p: np.concatenate(v) for p, v in d.items()} for k, d in out.items()}


def report(data: dict[str, dict[str, np.ndarray]]) -> str:
    t = data["truth"]
    sst = float(((t["mtt"] - t["mtt"].mean()) ** 2).sum())
    classes = {"CSF (true CBF 0)": t["cbf"] == 0, "true CBF < 5": (t["cbf"] > 0) & (t["cbf"] < 5),
               "lesion (true TMAX > 6 s)": (t["cbf"] >= 5) & (t["tmax"] > 6),
               "normal tissue": (t["cbf"] >= 5) & (t["tmax"] <= 6)}
    lines = ["| pixels (truth) | share of the brain | SSE / SST raw | SSE / SST CSF out | predicted MTT raw / CSF "
             "out / true s |", "|:--|--:|--:|--:|--:|"]
    for name, sel in classes.items():
        if not sel.any():
            continue
        cells = [f"{100 * sel.mean():.1f} %"]
        for k in ("raw", "csf_out"):
            cells.append(f"{((data[k]['mtt'][sel] - t['mtt'][sel]) ** 2).sum() / sst:.2f}")
        cells.append(" / ".join(f"{data[k]['mtt'][sel].mean():.2f}" for k in ("raw", "csf_out", "truth")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| maps | " + " | ".join(f"{p.upper()} MAE / R²" for p in ALL_PARAMS) + " |",
              "|:--|" + "--:|" * len(ALL_PARAMS)]
    for k, label in (("raw", "as the network outputs them"), ("csf_out", "CSF left out (predict, test step)")):
        cells = [f"{np.abs(data[k][p] - t[p]).mean():.3f} / {_r2(data[k][p], t[p]):.3f}" for p in ALL_PARAMS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.mtt_diagnostics", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished python -m stm_dlp.run directory (config.yaml, checkpoints/)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    text = report(collect(args.run_dir))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
