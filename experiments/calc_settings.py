"""The calculation approach's settings chosen across phantom families, against a plain oSVD.

    python -m experiments.calc_settings [--profile quick|full] [--out FILE.json] [--md FILE.md] [--threads N]

What it measures: the error of :func:`stm_dlp.perfusion.maps.calculate_maps` (automatic brain mask,
automatic AIF, the study's pixel spacing) under a grid of settings, on studies of **both** phantom
families (:func:`stm_dlp.data.phantom.simulate_patient`, ``family="classic"`` and ``"ribbon"``),
next to the plain numpy block-circulant oSVD of :mod:`experiments.plain_osvd` run on the same
studies — and which settings transfer: tuned on one family, reported on the other.

* Studies (``full``: 3 patients per family, 128², 4 slices, 40-60 frames; ``quick``: 1 patient,
  64², 2 slices), each under the conditions of issue 14 — ``clean`` (no noise), ``regular`` (the
  family's own noise, 3-8 HU: classic white, ribbon correlated with streaks), and from ``regular``:
  ``missing`` (30 % of the frames dropped), ``jittered`` (re-acquired at jittered times),
  ``truncated`` (the last 30 % of the frames lost), ``noisy`` (+15-30 HU white noise and 0.1 %
  impulses of 300-1000 HU) and ``motion`` (the project's ``motion`` corruption: 30 % of the frames
  moved by up to 2 px / 3°). Corruptions are seeded per patient, so conditions are paired.
* Truth: ``study.maps`` inside ``study.mask`` (brain without vessels; the automatic mask is
  evaluated by what it keeps of it).
* Metrics per family x condition x method, pixels pooled over patients: MAE of CBF, CBV and TMAX,
  Dice of TMAX > 6 s, the percentage of the true perfused brain (truth CBF > 0) whose CBF is 0,
  and the number of studies that failed.
* ``truncated, scan long enough``: the ``truncated`` studies that still go on long enough after the true
  arterial peak for tissue delayed past 6 s to show (:func:`scan_long_enough`; the calc warns on the
  others, docs/calc/issue14_targets.md §6), pooled alone and reported next to ``truncated``.
* Choice: each setting's score on a family is the mean, over the target conditions ``regular``,
  ``missing``, ``jittered``, ``truncated``, of ``(CBF, CBV, TMAX MAE ratios to the plain oSVD) / 3 +
  (1 - Dice)``; the best setting on each family is evaluated on the other (held out), and the
  candidate with the better held-out score becomes the default. ``motion=True`` is then compared
  with ``False`` for that setting on the motion and regular conditions of both families.

Output: Markdown tables on stdout (``--md`` writes them with a header), everything as JSON
(``--out``). A ``full`` run is ~650 ``calculate_maps`` calls, ~6 minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from experiments.plain_osvd import plain_osvd
from stm_dlp.data.corrupt import (
    Compose,
    DropFrames,
    GaussianNoise,
    JitterFraming,
    RandomTransform,
    Truncate,
    corrupt_study,
    named_corruption,
)
from stm_dlp.data.phantom import PhantomConfig, simulate_patient
from stm_dlp.perfusion.arterial import scan_window
from stm_dlp.perfusion.maps import CalcParams, calculate_maps
from stm_dlp.types import Study

FAMILIES: tuple[str, ...] = ("classic", "ribbon")
CONDITIONS: tuple[str, ...] = ("clean", "regular", "missing", "jittered", "truncated", "noisy", "motion")
#: The conditions the targets (and the choice of defaults) are about.
TARGET_CONDITIONS: tuple[str, ...] = ("regular", "missing", "jittered", "truncated")
#: ``truncated`` pooled over the studies whose scan goes on long enough after the (true) arterial peak to show
#: tissue delayed past 6 s (:func:`stm_dlp.perfusion.arterial.scan_window`; the calc warns on the others):
#: what the data allow. Reported next to ``truncated``; the score and the choice do not use it.
TRUNCATED_LONG = "truncated, scan long enough"
MAPS: tuple[str, ...] = ("cbf", "cbv", "tmax")
PROFILES: dict[str, dict[str, Any]] = {
    "micro": dict(size=32, slices=1, patients=1, frames=(20, 24)),  # the test suite's smoke run
    "quick": dict(size=64, slices=2, patients=1, frames=(30, 36)),
    "full": dict(size=128, slices=4, patients=3, frames=(40, 60)),
}


@dataclass(frozen=True)
class Setting:
    """One point of the grid: :class:`CalcParams` fields that differ from the defaults."""

    spatial_sigma_mm: float = 2.6
    tmax_method: str = "half_rise"
    oi_target: float = 0.095
    noise_ref_hu: float | None = 8.0
    tmax_median_px: int = 0
    tmax_oi_target: float | None = None
    tmax_sigma_mm: float | None = None
    motion: bool = False

    @property
    def label(self) -> str:
        nr = "off" if self.noise_ref_hu is None else f"{self.noise_ref_hu:g}"
        med = f", TMAX median {2 * self.tmax_median_px + 1}²" if self.tmax_median_px else ""
        tpass = ""
        if self.tmax_oi_target is not None:
            tpass += f", TMAX OI {self.tmax_oi_target:g}"
        if self.tmax_sigma_mm is not None:
            tpass += f", TMAX σ {self.tmax_sigma_mm:g} mm"
        return (f"σ {self.spatial_sigma_mm:g} mm, {self.tmax_method}, OI {self.oi_target:g}, noise-widen {nr}{med}"
                + tpass + (", motion" if self.motion else ""))

    def options(self) -> dict[str, Any]:
        return asdict(self)


def build_grid(quick: bool) -> list[Setting]:
    """The settings compared (``quick``: three)."""
    if quick:
        return [Setting(), Setting(tmax_method="calibrated"), Setting(spatial_sigma_mm=1.5), _tmax_pass()]
    # the one-pass settings of the previous choice (TMAX from the CBF smoothing and truncation) ...
    grid = [Setting(), Setting(spatial_sigma_mm=5.5, tmax_method="half_rise"),
            Setting(spatial_sigma_mm=7.0, tmax_method="calibrated")]
    grid += [Setting(spatial_sigma_mm=s, tmax_method="calibrated", tmax_median_px=1) for s in (4.0, 5.5)]
    # ... and TMAX from its own pass: lighter smoothing, less regularised truncation, wider median
    grid += [_tmax_pass(), _tmax_pass(tmax_median_px=3), _tmax_pass(tmax_sigma_mm=2.6), _tmax_pass(tmax_sigma_mm=4.0),
             _tmax_pass(tmax_oi_target=0.05), _tmax_pass(tmax_method="calibrated"), _tmax_pass(tmax_method="argmax"),
             _tmax_pass(tmax_method="half_rise"), _tmax_pass(spatial_sigma_mm=4.0)]
    return grid


def _tmax_pass(**kw: Any) -> Setting:
    """A setting whose TMAX comes from its own pass (``tmax_sigma_mm``, ``tmax_oi_target``); without
    ``kw``, :class:`CalcParams`' defaults."""
    base = dict(spatial_sigma_mm=5.5, tmax_method="calibrated_dispersion", tmax_median_px=4, tmax_oi_target=0.03,
                tmax_sigma_mm=1.5)
    return Setting(**{**base, **kw})


@dataclass
class Impulses(RandomTransform):
    """Impulse noise: a ``rate`` of the samples get ±300-1000 HU (bad detector readings)."""

    rate: float = 1e-3

    def apply(self, frames: np.ndarray, times_s: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        out = np.array(frames, np.float32, copy=True)
        hit = rng.uniform(size=out.shape) < self.rate
        out[hit] += (rng.choice([-1.0, 1.0], hit.sum()) * rng.uniform(300.0, 1000.0, hit.sum())).astype(np.float32)
        return out, times_s


def make_studies(family: str, patient: int, prof: dict[str, Any]) -> dict[str, Study]:
    """The patient's study under every condition (see the module docstring)."""
    rng = np.random.default_rng(1000 * (FAMILIES.index(family) + 1) + patient)
    seed = 7000 + 31 * patient + (0 if family == "classic" else 5)
    noise = float(rng.uniform(3.0, 8.0))
    common = dict(family=family, height=prof["size"], width=prof["size"], n_slices=prof["slices"],
                  frames_min=prof["frames"][0], frames_max=prof["frames"][1])
    clean = simulate_patient(PhantomConfig(noise_hu=0.0, ribbon={"noise_hu": (0.0, 0.0)}, **common), seed=seed)
    regular = simulate_patient(PhantomConfig(noise_hu=noise, ribbon={"noise_hu": (3.0, 8.0)}, **common), seed=seed)
    out = {"clean": clean, "regular": regular}
    heavy = float(rng.uniform(15.0, 30.0))
    corruptions = {"missing": DropFrames(fraction=0.3), "jittered": JitterFraming(sigma_fraction=0.35),
                   "truncated": Truncate(keep_fraction=0.7),
                   "noisy": Compose([GaussianNoise(sigma_hu=heavy), Impulses(1e-3)]),
                   "motion": named_corruption("motion")}
    for k, (name, tr) in enumerate(corruptions.items()):
        out[name] = corrupt_study(regular, tr, seed=seed * 10 + k)
    return out


def scan_long_enough(truncated: Study, full: Study) -> bool:
    """Whether ``truncated`` (``full`` cut short) still lasts long enough after the true arterial peak
    (the phantom's AIF on ``full``'s slice-0 clock) for TMAX > 6 s (:func:`scan_window`)."""
    peak_s = float(full.times_s[0][int(np.argmax(full.meta["aif_hu"][0]))])
    return not scan_window(peak_s, float(np.min(np.asarray(truncated.times_s)[:, -1])))["short"]


def _truth(study: Study) -> dict[str, np.ndarray]:
    m = np.asarray(study.mask, bool)
    return {"cbv": study.maps[:, 0][m], "cbf": study.maps[:, 1][m], "tmax": study.maps[:, 2][m]}


def _masked(maps: dict[str, np.ndarray], study: Study) -> dict[str, np.ndarray]:
    m = np.asarray(study.mask, bool)
    out = {k: np.nan_to_num(np.asarray(maps[k], np.float64))[m] for k in MAPS}
    if "mask" in maps:
        out["in_mask"] = np.asarray(maps["mask"], bool)[m]
    return out


def metrics(est: dict[str, list[np.ndarray]], truth: dict[str, list[np.ndarray]], failed: int) -> dict[str, Any]:
    """Pooled metrics of one method on one family x condition."""
    if not est["cbf"]:
        return {"failed": failed}
    e = {k: np.concatenate(v) for k, v in est.items() if v}
    t = {k: np.concatenate(v) for k, v in truth.items()}
    out: dict[str, Any] = {f"mae_{k}": round(float(np.abs(e[k] - t[k]).mean()), 4) for k in MAPS}
    a, b = t["tmax"] > 6.0, e["tmax"] > 6.0
    # no hypoperfusion in the truth: Dice is undefined (None), not 0
    out["dice_tmax6"] = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 4) if a.any() else None
    perfused = t["cbf"] > 0
    out["zero_pct"] = round(100.0 * float((e["cbf"][perfused] <= 0).mean()), 3)
    if "in_mask" in e:
        out["outside_mask_pct"] = round(100.0 * float((~e["in_mask"][perfused]).mean()), 3)
    out["bias_cbf"] = round(float(np.median(e["cbf"][perfused] - t["cbf"][perfused])), 3)
    out["bias_tmax"] = round(float(np.median(e["tmax"][perfused] - t["tmax"][perfused])), 3)
    out["failed"] = failed
    return out


def score(res: dict[str, Any], family: str, label: str) -> float:
    """Mean over :data:`TARGET_CONDITIONS` of the MAE ratios to the plain oSVD (/3) plus 1 - Dice."""
    vals = []
    for cond in TARGET_CONDITIONS:
        ours, plain = res[family][cond][label], res[family][cond]["plain"]
        if "mae_cbf" not in ours:
            return float("inf")
        ratio = sum(ours[f"mae_{k}"] / max(plain[f"mae_{k}"], 1e-9) for k in MAPS) / 3
        vals.append(ratio + (1.0 - ours["dice_tmax6"] if ours["dice_tmax6"] is not None else 0.0))
    return round(float(np.mean(vals)), 4)


def run(profile: str, grid: list[Setting], motion_check: bool = True, log=print) -> dict[str, Any]:
    prof = PROFILES[profile]
    base = CalcParams()
    labels = [s.label for s in grid]
    est: dict = {}
    truth: dict = {}
    failed: dict = {}
    seconds: dict = {}

    def add(fam: str, cond: str, label: str, maps: dict[str, np.ndarray] | None, study: Study, secs: float) -> None:
        key = (fam, cond, label)
        est.setdefault(key, {k: [] for k in (*MAPS, "in_mask")})
        failed.setdefault(key, 0)
        seconds.setdefault(key, []).append(secs)
        if maps is None:
            failed[key] += 1
            return
        for k, v in _masked(maps, study).items():
            est[key][k].append(v)

    t_start = time.perf_counter()
    motion_settings: list[Setting] = []
    for fam in FAMILIES:
        for patient in range(prof["patients"]):
            studies = make_studies(fam, patient, prof)
            for cond, st in studies.items():
                # the truncated study also counts under TRUNCATED_LONG when the data allow TMAX > 6 s
                conds = [cond] + ([TRUNCATED_LONG] if cond == "truncated"
                                  and scan_long_enough(st, studies["regular"]) else [])
                t = _truth(st)
                for c in conds:
                    truth.setdefault((fam, c), {k: [] for k in MAPS})
                    for k in MAPS:
                        truth[(fam, c)][k].append(t[k])
                t0 = time.perf_counter()
                maps = plain_osvd(st.frames, st.times_s, st.mask)
                secs = time.perf_counter() - t0
                for c in conds:
                    add(fam, c, "plain", maps, st, secs)
                for setting in grid:
                    t0 = time.perf_counter()
                    try:
                        maps, _ = calculate_maps(st.frames, st.times_s, None, affine=st.affine, device="cpu",
                                                 params=base, **setting.options())
                    except ValueError as exc:
                        log(f"  {fam} {cond} patient {patient} {setting.label}: FAILED {exc}")
                        maps = None
                    secs = time.perf_counter() - t0
                    for c in conds:
                        add(fam, c, setting.label, maps, st, secs)
            log(f"{fam} patient {patient} done ({time.perf_counter() - t_start:.0f} s)")
    res: dict[str, Any] = {fam: {cond: {} for cond in CONDITIONS} for fam in FAMILIES}
    for (fam, cond, label), e in est.items():
        res[fam].setdefault(cond, {})[label] = {**metrics(e, truth[(fam, cond)], failed[(fam, cond, label)]),
                                 "seconds_mean": round(float(np.mean(seconds[(fam, cond, label)])), 3)}
    scores = {label: {fam: score(res, fam, label) for fam in FAMILIES} for label in labels}
    best = {fam: min(labels, key=lambda lb, f=fam: scores[lb][f]) for fam in FAMILIES}
    held_out = {fam: {"tuned_on": fam, "setting": best[fam],
                      "held_out_family": [f for f in FAMILIES if f != fam][0],
                      "held_out_score": scores[best[fam]][[f for f in FAMILIES if f != fam][0]]} for fam in FAMILIES}
    chosen = min(held_out.values(), key=lambda h: (h["held_out_score"], sum(scores[h["setting"]].values())))
    chosen_setting = grid[labels.index(chosen["setting"])]
    out = {"profile": profile, "config": prof, "grid": [s.options() for s in grid], "labels": labels,
           "results": res, "scores": scores, "best_per_family": best, "cross_validation": held_out,
           "chosen": chosen_setting.options(), "chosen_label": chosen["setting"]}
    if motion_check:
        on = Setting(**{**chosen_setting.options(), "motion": True})
        motion_settings.append(on)
        for fam in FAMILIES:
            for patient in range(prof["patients"]):
                studies = make_studies(fam, patient, prof)
                for cond in ("motion", "regular"):
                    st = studies[cond]
                    t0 = time.perf_counter()
                    try:
                        maps, _ = calculate_maps(st.frames, st.times_s, None, affine=st.affine, device="cpu",
                                                 params=base, **on.options())
                    except ValueError as exc:
                        log(f"  {fam} {cond} patient {patient} motion=True: FAILED {exc}")
                        maps = None
                    add(fam, cond, on.label, maps, st, time.perf_counter() - t0)
        for fam in FAMILIES:
            for cond in ("motion", "regular"):
                key = (fam, cond, on.label)
                res[fam][cond][on.label] = {**metrics(est[key], truth[(fam, cond)], failed[key]),
                                            "seconds_mean": round(float(np.mean(seconds[key])), 3)}
        out["motion_label"] = on.label
    out["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return out


def _f(x: Any, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def markdown(doc: dict[str, Any]) -> str:
    res, chosen = doc["results"], doc["chosen_label"]
    lines = ["## Chosen defaults and the issue's targets", "",
             f"Chosen by cross-validation: **{chosen}**; motion correction on (\"motion, corrected\" rows; "
             "the other rows are without it, which changes nothing on still studies). Each row: ours (chosen "
             "settings, automatic mask and AIF) vs the plain oSVD on the same studies. Targets (regular, missing, "
             "jittered, truncated): CBF and CBV "
             "MAE ≤ 0.9 x plain, TMAX MAE ≤ 0.5 x plain, Dice(TMAX > 6 s) ≥ 0.85; every condition: no failed "
             "study, ≤ 1 % of the perfused brain at CBF 0; motion, corrected: CBF MAE ≤ 1.5 x regular.", "",
             "| family | condition | CBF MAE ours / plain | CBV MAE ours / plain | TMAX MAE ours / plain | "
             "Dice TMAX>6 ours / plain | CBF 0 % | outside mask % | failed | targets |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = [(fam, cond, chosen, cond) for fam in FAMILIES
            for cond in (*CONDITIONS[:5], TRUNCATED_LONG, *CONDITIONS[5:]) if res[fam].get(cond)]
    if "motion_label" in doc:  # the motion condition again, with motion correction (the default)
        rows += [(fam, "motion", doc["motion_label"], "motion, corrected") for fam in FAMILIES]
    for fam, cond, label, name in rows:
        o, p = res[fam][cond].get(label, {}), res[fam][cond]["plain"]
        if "mae_cbf" not in o:
            lines.append(f"| {fam} | {name} | failed ({o.get('failed')}) | | | | | | | ✗ |")
            continue
        ok = []
        if cond in TARGET_CONDITIONS or cond == TRUNCATED_LONG:
            ok += [o["mae_cbf"] <= 0.9 * p["mae_cbf"], o["mae_cbv"] <= 0.9 * p["mae_cbv"],
                   o["mae_tmax"] <= 0.5 * p["mae_tmax"], o["dice_tmax6"] is None or o["dice_tmax6"] >= 0.85]
        ok += [o["failed"] == 0, o["zero_pct"] <= 1.0]
        if name == "motion, corrected":  # the target is the corrected one; the raw row is shown for contrast
            ok.append(o["mae_cbf"] <= 1.5 * res[fam]["regular"][chosen]["mae_cbf"])
        lines.append(
            f"| {fam} | {name} | {_f(o['mae_cbf'], 1)} / {_f(p['mae_cbf'], 1)} | {_f(o['mae_cbv'])} / "
            f"{_f(p['mae_cbv'])} | {_f(o['mae_tmax'])} / {_f(p['mae_tmax'])} | {_f(o['dice_tmax6'])} / "
            f"{_f(p['dice_tmax6'])} | {_f(o['zero_pct'])} | {_f(o.get('outside_mask_pct'))} | {o['failed']} | "
            f"{'✓' if all(ok) else '✗ ' + str(sum(not x for x in ok))} |")
    lines += ["", "## Cross-validation (score: mean over the target conditions of the MAE ratios to plain / 3 "
              "+ 1 - Dice; lower is better)", "",
              "| setting | classic | ribbon |", "|---|---:|---:|"]
    for label in doc["labels"]:
        star = " **(chosen)**" if label == chosen else ""
        sc = doc["scores"][label]
        lines.append(f"| {label}{star} | {sc['classic']:.3f} | {sc['ribbon']:.3f} |")
    lines += [""]
    for fam, h in doc["cross_validation"].items():
        lines.append(f"* tuned on {fam}: {h['setting']} — held out on {h['held_out_family']}: score "
                     f"{h['held_out_score']:.3f}")
    if "motion_label" in doc:
        ml = doc["motion_label"]
        lines += ["", "## Motion correction (chosen settings, motion=True vs False)", "",
                  "| family | condition | CBF MAE off / on | CBV MAE off / on | TMAX MAE off / on | s/study off / on |",
                  "|---|---|---:|---:|---:|---:|"]
        for fam in FAMILIES:
            for cond in ("regular", "motion"):
                a, b = res[fam][cond][chosen], res[fam][cond][ml]
                if "mae_cbf" not in b:
                    continue
                lines.append(f"| {fam} | {cond} | {_f(a['mae_cbf'], 1)} / {_f(b['mae_cbf'], 1)} | {_f(a['mae_cbv'])}"
                             f" / {_f(b['mae_cbv'])} | {_f(a['mae_tmax'])} / {_f(b['mae_tmax'])} | "
                             f"{a['seconds_mean']:.2f} / {b['seconds_mean']:.2f} |")
    lines += ["", "## Every setting, every condition (CBF / CBV / TMAX MAE, Dice)", "",
              "| family | condition | setting | CBF | CBV | TMAX | Dice | CBF bias | TMAX bias | CBF 0 % | s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fam in FAMILIES:
        for cond in (*CONDITIONS, TRUNCATED_LONG):
            for label, m in res[fam].get(cond, {}).items():
                if "mae_cbf" not in m:
                    continue
                lines.append(f"| {fam} | {cond} | {label} | {_f(m['mae_cbf'], 1)} | {_f(m['mae_cbv'])} | "
                             f"{_f(m['mae_tmax'])} | {_f(m['dice_tmax6'])} | {_f(m['bias_cbf'], 1)} | "
                             f"{_f(m['bias_tmax'])} | {_f(m['zero_pct'])} | {m['seconds_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def md_header(argv: list[str], doc: dict[str, Any]) -> str:
    import os
    from datetime import datetime, timezone

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    p = doc["config"]
    cmd = f"python -m experiments.calc_settings {' '.join(argv)}".rstrip()
    return (f"# Calculation-approach settings across phantom families\n\nGenerated by `{cmd}` on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}, {os.cpu_count()} CPUs, torch "
            f"{torch.__version__}; {doc['elapsed_s']:.0f} s. "
            f"{p['patients']} patients per family, {p['size']}², {p['slices']} slices. Definitions: the module "
            "docstring of `experiments/calc_settings.py`; the plain reference: `experiments/plain_osvd.py`.\n\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--out", default=None, help="write everything as JSON here")
    ap.add_argument("--md", default=None, help="also write the Markdown tables here")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-motion-check", action="store_true", help="skip the motion=True comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    from pathlib import Path

    doc = run(args.profile, build_grid(args.profile != "full"), motion_check=not args.no_motion_check,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    md = markdown(doc)
    print(md)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md_header([a for a in argv if not a.startswith("--threads")], doc) + md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
