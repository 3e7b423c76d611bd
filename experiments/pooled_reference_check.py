"""A study-level arterial reference at test time: does it help the trained model and its prior?

    python -m experiments.pooled_reference_check --bench-out OUT [--checkpoint CKPT ...]

``OUT`` is the ``--out`` folder of ``python -m experiments.bench --profile cpu`` (its ``runs/stm_dlp_lstm`` and
``runs/stm_dlp_lstm_ribbon`` give the checkpoints and each family's held-out test studies). Every slice normally gets
its *own* arterial reference (:func:`stm_dlp.data.context.attach_arterial`). Here each study's slices instead get
the median over its slices' references (same frame times only; shuttle-mode studies keep their own). This is done
at test time only, for the deconvolution prior and the model's context alike, without retraining. Prints Dice(TMAX >
6 s) / TMAX R² / CBF R² per family × condition (regular, 15 HU noise) × reference (slice, pooled) for the prior
alone and each checkpoint (default: the bench's classic-trained model). docs/tmax.md §13 has the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

import stm_dlp.data.context as context
import stm_dlp.predict as predict
from experiments.bench.accuracy import ModelMaps, PriorMaps, best_checkpoint, metrics_only, test_studies
from stm_dlp.calc_eval import evaluate_studies
from stm_dlp.types import SliceSample, Study

_own_reference = context.attach_arterial
_pooled: dict[str, np.ndarray] = {}


def _attach(sample: SliceSample, prior: bool = False) -> SliceSample:
    """:func:`attach_arterial` with the study's pooled curve in place of the slice's, when one is set."""
    out = _own_reference(sample, False)
    curve = _pooled.get(sample.patient_id)
    if curve is not None and curve.shape == out.arterial_hu.shape:
        out = dataclasses.replace(out, arterial_hu=curve)
    if prior:
        out = dataclasses.replace(out, prior_maps=context.deconvolution_prior(out))
    return out


class WithReference:
    """A ``.maps(study)`` provider run with the slices' own references (``pooled=False``) or the study's median."""

    def __init__(self, inner: Any, pooled: bool) -> None:
        self.inner, self.pooled = inner, pooled

    def maps(self, study: Study) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        _pooled.clear()
        times = np.asarray(study.times_s)
        if self.pooled and np.allclose(times, times[:1]):
            refs = np.stack([_own_reference(study.slice_sample(s)).arterial_hu for s in range(study.n_slices)])
            _pooled[study.patient_id] = np.median(refs, 0).astype(np.float32)
        return self.inner.maps(study)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-out", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, nargs="*", default=None)
    args = ap.parse_args()
    runs = {"classic": args.bench_out / "runs" / "stm_dlp_lstm",
            "ribbon": args.bench_out / "runs" / "stm_dlp_lstm_ribbon"}
    metrics = json.loads((runs["classic"] / "metrics.json").read_text())
    ckpts = args.checkpoint or [best_checkpoint(runs["classic"], metrics)]
    providers = {"prior alone": PriorMaps(), **{f"model {c}": ModelMaps(c) for c in ckpts}}
    context.attach_arterial = _attach  # the prior (PriorMaps) and prediction both look it up at call time
    predict.attach_arterial = _attach
    print("| tested on | condition | reference | method | Dice TMAX>6 s | TMAX R² | CBF R² |")
    print("|---|---|---|---|---|---|---|")
    for family, run in runs.items():
        for cond, overrides in (("regular", {}), ("noise 15 HU", {"eval_corruption": "noise"})):
            studies = test_studies(run, **overrides)
            for name, provider in providers.items():
                for pooled in (False, True):
                    m = metrics_only(evaluate_studies(WithReference(provider, pooled), studies))
                    dice = ((m.get("readout") or {}).get("dice_tmax_gt_6") or {}).get("median")
                    print(f"| {family} | {cond} | {'study (pooled)' if pooled else 'slice'} | {name} | "
                          f"{'—' if dice is None else f'{dice:.3f}'} | {m['tmax']['r2']:.2f} | {m['cbf']['r2']:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()
