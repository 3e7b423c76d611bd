"""A study-level arterial reference at test time: does it help the trained model and its prior?

    python -m experiments.pooled_reference_check --bench-out OUT [--checkpoint CKPT ...]
        [--conditions regular,noise,heavy_noise,motion] [--pooling study,slice] [--deconvolution]
        [--seeds 0,13,14] [--prior-variants '{"before": {"tmax_noise_widening": 0.5}, "now": {}}']

``OUT`` is the ``--out`` folder of ``python -m experiments.bench --profile cpu`` (its ``runs/stm_dlp_lstm`` and
``runs/stm_dlp_lstm_ribbon`` give the checkpoints and each family's held-out test studies). Every slice normally gets
either its *own* arterial reference (``arterial_pooling="slice"``) or the median over its study's slices'
(``"study"``, :func:`stm_dlp.perfusion.arterial.pool_references`; same frame times only), whichever the checkpoint
was trained with. Here both are tried on every checkpoint at test time, for the deconvolution prior and the
model's context alike, without retraining. Prints Dice(TMAX >
6 s) / TMAX R² / CBF R² per family × condition (default: regular, 15 HU noise) × reference (slice, pooled) for the prior
alone and each checkpoint (default: the bench's classic-trained model); ``--conditions`` and ``--pooling`` choose
other cells (any of the benchmark's cross-family conditions). docs/tmax.md §13-14 have the numbers.

``--seeds`` pools more patients than the benchmark's 4 test patients: seed 0 is the runs' own test split, any other
seed ``S`` the test and validation patients of the cohort ``data.seed=S`` of the same configuration (its patients are
not those of cohort 0, which the models were trained on: ``stm_dlp.data.phantom.cohort_member``). Dice is then the
median over every pooled patient with a lesion. ``--prior-variants`` (JSON: label -> options) evaluates the prior and
the models with :data:`stm_dlp.data.context.PRIOR_OPTIONS` updated by each variant's options at test time (docs/tmax.md
§16: the TMAX pass's noise widening).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.bench.accuracy import (
    CALC,
    CROSS_CONDITIONS,
    ModelMaps,
    PriorMaps,
    best_checkpoint,
    cohort_studies,
    metrics_only,
    readout_value,
)
from experiments.plain_osvd import PlainOSVDMaps
from stm_dlp.calc_eval import CalcBaseline, evaluate_studies
from stm_dlp.data import context
from stm_dlp.perfusion.maps import PARAM_NAMES
from stm_dlp.types import ARTERIAL_POOLING


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, nargs="*", default=None)
    ap.add_argument("--conditions", default="regular,noise",
                    help=f"comma-separated, of {', '.join(CROSS_CONDITIONS)} (default regular,noise)")
    ap.add_argument("--pooling", default=",".join(ARTERIAL_POOLING),
                    help=f"comma-separated, of {', '.join(ARTERIAL_POOLING)} (default both)")
    ap.add_argument("--deconvolution", action="store_true",
                    help="also our oSVD (the calculation approach's defaults, as the benchmark) and the plain textbook "
                         "oSVD of experiments.plain_osvd on the same studies: where deconvolution fails")
    ap.add_argument("--seeds", default="0", help="comma-separated cohorts (default 0: the runs' own test split)")
    ap.add_argument("--prior-variants", default=None,
                    help='JSON {label: {option: value}}: PRIOR_OPTIONS updated per variant (default: as they are)')
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    variants = json.loads(args.prior_variants) if args.prior_variants else {"": {}}
    if unknown := sorted({k for v in variants.values() for k in v} - set(PARAM_NAMES)):
        ap.error(f"unknown prior option {', '.join(unknown)}")
    conditions = args.conditions.split(",")
    poolings = args.pooling.split(",")
    for name, given, valid in (("condition", conditions, CROSS_CONDITIONS), ("pooling", poolings, ARTERIAL_POOLING)):
        if unknown := [g for g in given if g not in valid]:
            ap.error(f"unknown {name} {', '.join(unknown)}; valid: {', '.join(valid)}")
    runs = {"classic": args.bench_out / "runs" / "stm_dlp_lstm",
            "ribbon": args.bench_out / "runs" / "stm_dlp_lstm_ribbon"}
    metrics = json.loads((runs["classic"] / "metrics.json").read_text())
    ckpts = args.checkpoint or [best_checkpoint(runs["classic"], metrics)]
    models = {f"model {c}": ModelMaps(c) for c in ckpts}
    print(f"Cohorts (data.seed): {', '.join(map(str, seeds))}")
    print("| tested on | condition | reference | method | Dice TMAX>6 s | TMAX R² | CBF R² |")
    print("|---|---|---|---|---|---|---|")
    base_options = dict(context.PRIOR_OPTIONS)
    try:
        _rows(args, runs, models, seeds, variants, conditions, poolings, base_options)
    finally:  # the module-level options are the prior's for every later caller
        context.PRIOR_OPTIONS.clear()
        context.PRIOR_OPTIONS.update(base_options)


def _rows(args, runs, models, seeds, variants, conditions, poolings, base_options) -> None:
    """The printed rows of :func:`main` (``PRIOR_OPTIONS`` updated per variant)."""
    for family, run in runs.items():
        for cond in conditions:
            studies = cohort_studies(run, seeds, CROSS_CONDITIONS[cond])
            if args.deconvolution:
                for name, provider in (("our oSVD", CalcBaseline(method=CALC, aif="auto")),
                                       ("plain oSVD", PlainOSVDMaps())):
                    row(family, cond, "—", name, metrics_only(evaluate_studies(provider, studies)))
            for label, options in variants.items():
                context.PRIOR_OPTIONS.clear()
                context.PRIOR_OPTIONS.update({**base_options, **options})
                for pooling in poolings:
                    providers = {"prior alone": PriorMaps(pooling), **models}
                    for provider in models.values():  # the reference prediction gives the model (predict_study)
                        provider.model.arterial_pooling = pooling
                    for name, provider in providers.items():
                        row(family, cond, pooling, f"{name} ({label})" if label else name,
                            metrics_only(evaluate_studies(provider, studies)))


def row(family: str, cond: str, pooling: str, name: str, m: dict) -> None:
    """One printed table row: Dice(TMAX > 6 s) (median over the patients with a lesion), TMAX R², CBF R²."""
    dice = readout_value(m, "dice_tmax_gt_6")
    print(f"| {family} | {cond} | {pooling} | {name} | {'—' if dice is None else f'{dice:.3f}'} | "
          f"{m['tmax']['r2']:.2f} | {m['cbf']['r2']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
