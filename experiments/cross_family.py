"""The benchmark's cross-family check alone: the default model trained on each phantom family, tested on both.

    python -m experiments.cross_family [--profile cpu] [--out DIR] [--md FILE] [--seed N] [--resume] [OVERRIDE ...]

The same runs, overrides and in-process evaluation as the cross-family section of
``python -m experiments.bench`` (:func:`experiments.bench.accuracy.run_cross_family`): the default model
(STM-DLP LSTM + arterial context) trained once on the classic family's cohort of the profile and once on
the ribbon family's (``Profile.cross_family_height``), each checkpoint tested on both families' held-out
patients under the regular, noise, heavy-noise and motion conditions, oSVD on the same studies. It exists because the
whole benchmark takes half an hour on the 2-core machine and this part (~15 minutes) is what a change to
the arterial context or the training data is judged by. ``--seed`` sets the model seed (the cohorts and
their split stay fixed), so several seeds give the spread; trailing Hydra overrides (``model.arterial_normalise=true``)
go to both trainings, for an ablation.

Prints one Markdown table (Dice(TMAX > 6 s), R² and MAE per trained → tested family and condition) and
writes it with the machine and date to ``--md`` when given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from experiments.bench.accuracy import (
    MAIN,
    MODELS,
    _r2,
    cross_run_name,
    readout_value,
    run_cross_family,
    run_training,
)
from experiments.bench.profiles import PROFILES


def table(res: dict[str, Any]) -> str:
    """Markdown table of :func:`run_cross_family`'s result."""
    fams = res["families"]
    head = ("| trained on | tested on | condition | method | Dice TMAX>6 s | R² CBV | R² CBF | R² TMAX | R² MTT "
            "| MAE CBF | MAE TMAX |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.3g}"

    conds = list(next(iter(res["model"].values())))  # the result's own conditions (older results: fewer)
    for test in fams:
        for cond in conds:
            rows = [(train, "STM-DLP LSTM", res["model"][f"{train}->{test}"][cond]) for train in fams]
            rows.append(("—", "oSVD", res["calc"][test][cond]))
            if cond in res.get("prior", {}).get(test, {}):  # the network's input alone
                rows.append(("—", "prior alone", res["prior"][test][cond]))
            for train, method, m in rows:
                lines.append(f"| {train} | {test} | {cond} | {method} | {fmt(readout_value(m, 'dice_tmax_gt_6'))} | "
                             + " | ".join(fmt(_r2(m, p)) for p in ("cbv", "cbf", "tmax", "mtt"))
                             + f" | {fmt(m['cbf']['mae'])} | {fmt(m['tmax']['mae'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--out", default=None, help="work dir (default outputs/cross_family/<profile>[_seedN])")
    ap.add_argument("--md", default=None, help="also write the table here")
    ap.add_argument("--seed", type=int, default=None, help="model seed (default: the config's)")
    ap.add_argument("--resume", action="store_true", help="reuse finished training runs in OUT/runs")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both trainings (e.g. model.x=y)")
    args = ap.parse_args(argv)
    profile = PROFILES[args.profile]
    if len(profile.cross_family) < 2:
        print(f"error: profile {profile.name} names no second phantom family", file=sys.stderr)
        return 2
    suffix = "" if args.seed is None else f"_seed{args.seed}"
    out = Path(args.out or Path("outputs") / "cross_family" / f"{profile.name}{suffix}").resolve()
    if (out / "runs").exists() and not args.resume:
        print(f"error: {out}/runs exists; pass --resume to reuse it or choose another --out", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("STM_DLP_CACHE", str(out / "cache"))
    env.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("STM_DLP_CACHE", env["STM_DLP_CACHE"])
    seed = [] if args.seed is None else [f"seed={args.seed}"]
    size = ([f"data.phantom.height={profile.cross_family_height}", f"data.phantom.width={profile.cross_family_height}"]
            if profile.cross_family_height else [])
    runs: dict[str, dict[str, Any]] = {}
    for i, fam in enumerate(profile.cross_family):
        name = MAIN if i == 0 else cross_run_name(fam)
        extra = [f"data.phantom.family={fam}", *(size if i else []), *seed, *args.overrides]
        runs[name] = run_training(name, list(MODELS[MAIN][1]), profile, out, env, extra, eval_conditions=False)
    from stm_dlp.calc_eval import CalcBaseline

    res = run_cross_family(profile, out, runs, {}, CalcBaseline(), "cpu")
    (out / "cross_family.json").write_text(json.dumps(res, indent=2, default=float))
    text = table(res)
    print(text)
    if args.md:
        when = datetime.date.today().isoformat()
        Path(args.md).write_text(
            f"# Cross-family check ({profile.name} profile{', seed ' + str(args.seed) if seed else ''})\n\n"
            f"`python -m experiments.cross_family --profile {profile.name}"
            f"{' --seed ' + str(args.seed) if seed else ''}{''.join(' ' + o for o in args.overrides)}` — "
            f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, {when}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
