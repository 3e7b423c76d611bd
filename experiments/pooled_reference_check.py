"""A study-level arterial reference at test time: does it help the trained model and its prior?

    python -m experiments.pooled_reference_check --bench-out OUT [--checkpoint CKPT ...]

``OUT`` is the ``--out`` folder of ``python -m experiments.bench --profile cpu`` (its ``runs/stm_dlp_lstm`` and
``runs/stm_dlp_lstm_ribbon`` give the checkpoints and each family's held-out test studies). Every slice normally gets
either its *own* arterial reference (``arterial_pooling="slice"``) or the median over its study's slices'
(``"study"``, :func:`stm_dlp.perfusion.arterial.pool_references`; same frame times only), whichever the checkpoint
was trained with. Here both are tried on every checkpoint at test time, for the deconvolution prior and the
model's context alike, without retraining. Prints Dice(TMAX >
6 s) / TMAX R² / CBF R² per family × condition (regular, 15 HU noise) × reference (slice, pooled) for the prior
alone and each checkpoint (default: the bench's classic-trained model). docs/tmax.md §13 has the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.bench.accuracy import ModelMaps, PriorMaps, best_checkpoint, metrics_only, test_studies
from stm_dlp.calc_eval import evaluate_studies
from stm_dlp.types import ARTERIAL_POOLING


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, nargs="*", default=None)
    args = ap.parse_args()
    runs = {"classic": args.bench_out / "runs" / "stm_dlp_lstm",
            "ribbon": args.bench_out / "runs" / "stm_dlp_lstm_ribbon"}
    metrics = json.loads((runs["classic"] / "metrics.json").read_text())
    ckpts = args.checkpoint or [best_checkpoint(runs["classic"], metrics)]
    models = {f"model {c}": ModelMaps(c) for c in ckpts}
    print("| tested on | condition | reference | method | Dice TMAX>6 s | TMAX R² | CBF R² |")
    print("|---|---|---|---|---|---|---|")
    for family, run in runs.items():
        for cond, overrides in (("regular", {}), ("noise 15 HU", {"eval_corruption": "noise"})):
            studies = test_studies(run, **overrides)
            for pooling in ARTERIAL_POOLING:
                providers = {"prior alone": PriorMaps(pooling), **models}
                for provider in models.values():  # the reference prediction gives the model (predict_study)
                    provider.model.arterial_pooling = pooling
                for name, provider in providers.items():
                    m = metrics_only(evaluate_studies(provider, studies))
                    dice = ((m.get("readout") or {}).get("dice_tmax_gt_6") or {}).get("median")
                    print(f"| {family} | {cond} | {pooling} | {name} | {'—' if dice is None else f'{dice:.3f}'} | "
                          f"{m['tmax']['r2']:.2f} | {m['cbf']['r2']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
