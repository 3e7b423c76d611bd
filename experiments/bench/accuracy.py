"""Accuracy against exact phantom truth: every model trained once on regular data (``python -m stm_dlp.run``
in a subprocess), tested on held-out patients under each condition (``eval_conditions``), beside the
calculation approach (``model=calc``, oSVD with automatic AIF) on the same input.

In-process additions (from the best checkpoint, with :func:`stm_dlp.predict.predict_study` and the
torchmetrics of :func:`stm_dlp.calc_eval.evaluate_studies`): dropped-frame severities other than the named
30 %, the label-noise run evaluated against truth, a consistency check of that path against the run's own
test metrics, and the colour maps per condition.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench.profiles import Profile
from stm_dlp.types import ALL_PARAMS, Study, maps_by_name

REPO = Path(__file__).resolve().parents[2]
CALC = "osvd"

#: Models trained on regular data: name → (label, overrides).
MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stm_dlp_cnn": ("STM-DLP CNN", ("model=stm_dlp", "encoder=cnn")),
    "stm_dlp_mlp_mixer": ("STM-DLP MLP-Mixer", ("model=stm_dlp", "encoder=mlp_mixer")),
    "stm_dlp_lstm": ("STM-DLP LSTM", ("model=stm_dlp", "encoder=lstm")),
    "unitobrain": ("UniToBrain", ("model=unitobrain",)),
}
LABEL_NOISE = "stm_dlp_lstm_calc_labels"
LABEL_NOISE_LABEL = "STM-DLP LSTM, trained on oSVD labels"
MAIN = "stm_dlp_lstm"
CALC_LABEL = "oSVD (calculation)"

#: Named evaluation conditions (run.py ``eval_conditions``): condition name → (label, condition mapping).
CORRUPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "noise": ("noisy (σ 15 HU)", {"eval_corruption": "noise"}),
    "motion": ("motion", {"eval_corruption": "motion"}),
    "dropped_frames": ("dropped frames 30 %", {"eval_corruption": "dropped_frames"}),
    "jittered_framing": ("jittered framing", {"eval_corruption": "jittered_framing"}),
}
IRREGULAR = ("noise", "motion", "dropped_frames", "jittered_framing")


def frames_name(fraction: float) -> str:
    return f"frames{fraction:g}"


def dropped_name(fraction: float) -> str:
    return f"dropped{int(round(100 * fraction))}"


def conditions(profile: Profile) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Every condition in table order: name → (label, eval_conditions mapping or None for in-process)."""
    out: dict[str, tuple[str, dict[str, Any] | None]] = {"regular": ("regular", None)}
    for k, (lab, c) in CORRUPTIONS.items():
        if k == "dropped_frames":
            for f in sorted(f for f in profile.dropped_fractions if f < 0.3):
                out[dropped_name(f)] = (f"dropped frames {int(round(100 * f))} %", None)
        out[k] = (lab, dict(c, name=k))
        if k == "dropped_frames":
            for f in sorted(f for f in profile.dropped_fractions if f >= 0.3):
                out[dropped_name(f)] = (f"dropped frames {int(round(100 * f))} %", None)
    for f in profile.frame_fractions:
        out[frames_name(f)] = (f"first {int(round(100 * f))} % of frames",
                               {"frame_fraction": float(f), "name": frames_name(f)})
    return out


def eval_conditions_override(profile: Profile) -> str:
    items = []
    for _name, (_label, cond) in conditions(profile).items():
        if cond:
            items.append("{" + ", ".join(f"{k}: {v}" for k, v in cond.items() if k != "name") + "}")
    return "+eval_conditions=[" + ", ".join(items) + "]"


def data_overrides(profile: Profile) -> list[str]:
    return [f"scale={profile.scale}", f"trainer={profile.trainer}", f"data.n_patients={profile.n_patients}",
            f"data.phantom.height={profile.height}", f"data.phantom.width={profile.height}",
            f"data.phantom.n_slices={profile.n_slices}", f"data.phantom.frames_min={profile.frames_min}",
            f"data.phantom.frames_max={profile.frames_max}", f"data.batch_size={profile.batch_size}",
            f"data.crop_size={profile.crop_size}", "data.num_workers=0"]


def trainer_overrides(profile: Profile) -> list[str]:
    out = [f"trainer.max_epochs={profile.max_epochs}",
           f"trainer.check_val_every_n_epoch={profile.check_val_every_n_epoch}",
           "trainer.enable_progress_bar=false", "lit.n_log_images=0"]
    if profile.max_time_s:
        s = int(profile.max_time_s)
        out.append(f"+trainer.max_time='00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}'")
    return out + list(profile.extra_train_overrides)


def run_command(name: str, model_overrides: Sequence[str], profile: Profile, run_dir: Path,
                extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "stm_dlp.run", *model_overrides, *data_overrides(profile)]
    if "model=calc" not in model_overrides:
        cmd += trainer_overrides(profile)
    cmd += [*extra, eval_conditions_override(profile), f"experiment_name=bench_{name}",
            f"hydra.run.dir={run_dir}"]
    return cmd


def run_training(name: str, model_overrides: Sequence[str], profile: Profile, out: Path, env: dict[str, str],
                 extra: Sequence[str] = (), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train + test one model (or evaluate ``model=calc``) in a subprocess; returns its metrics.json."""
    run_dir = out / "runs" / name
    metrics_path = run_dir / "metrics.json"
    cmd = run_command(name, model_overrides, profile, run_dir, extra)
    if metrics_path.is_file():  # resumable: a finished run is not repeated
        log(f"  {name}: reusing {metrics_path}")
        return json.loads(metrics_path.read_text())
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log(f"  {name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    with open(out / "runs" / f"{name}.log", "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not metrics_path.is_file():
        tail = (out / "runs" / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name}: python -m stm_dlp.run failed (exit {proc.returncode}); log tail:\n{tail}")
    metrics = json.loads(metrics_path.read_text())
    metrics["wall_seconds"] = round(seconds, 1)
    metrics["command"] = "python -m stm_dlp.run " + " ".join(cmd[3:])
    metrics_path.with_name("bench_run.json").write_text(json.dumps(
        {"wall_seconds": metrics["wall_seconds"], "command": metrics["command"]}, indent=2))
    log(f"  {name}: done in {seconds:.0f} s")
    return metrics


def _with_wall(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    extra = run_dir / "bench_run.json"
    if extra.is_file():
        metrics.update(json.loads(extra.read_text()))
    return metrics


# --------------------------------------------------------------------------------- in-process evaluation
class ModelMaps:
    """A trained checkpoint as a ``.maps(study)`` provider for :func:`stm_dlp.calc_eval.evaluate_studies`."""

    def __init__(self, ckpt: str | Path, device: str = "cpu", batch_size: int = 4) -> None:
        from stm_dlp.predict import load_model

        self.model, self.scale, self.info = load_model(ckpt, device)
        self.device, self.batch_size = device, batch_size

    def maps(self, study: Study) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from stm_dlp.predict import predict_study

        out, failed = predict_study(self.model, self.scale, study, self.batch_size, self.device)
        return out, {"failed_slices": failed}


def best_checkpoint(run_dir: Path, metrics: dict[str, Any]) -> Path:
    best = metrics.get("best_checkpoint")
    if best and Path(best).is_file():
        return Path(best)
    return run_dir / "checkpoints" / "last.ckpt"


def run_data_config(run_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml")


def test_studies(run_dir: Path, **overrides: Any) -> list[Study]:
    """The test studies of a finished run (its own resolved data config), with ``overrides`` applied."""
    import stm_dlp.launch  # noqa: F401  (registers the config resolvers)
    from stm_dlp.conditions import condition_datamodule

    cfg = run_data_config(run_dir)
    return list(condition_datamodule(cfg, overrides).test_set.studies)


def dropped_studies(studies: Sequence[Study], fraction: float, seed: int) -> list[Study]:
    """Test studies with ``fraction`` of the frames dropped, seeded per study like the DataModule."""
    from stm_dlp.data.corrupt import DropFrames, corrupt_study

    return [corrupt_study(st, DropFrames(fraction=fraction), seed + i) for i, st in enumerate(studies)]


def metrics_only(results: dict[str, Any]) -> dict[str, Any]:
    out = {p: results[p] for p in ALL_PARAMS}
    for k in ("failed_studies", "seconds"):
        if k in results:
            out[k] = results[k]
    return out


# --------------------------------------------------------------------------------- the whole section
def run_accuracy(profile: Profile, out: Path, figures: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    from stm_dlp.calc_eval import CalcBaseline, evaluate_studies

    env = dict(os.environ)
    env.setdefault("STM_DLP_CACHE", str(out / "cache"))
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("STM_DLP_CACHE", env["STM_DLP_CACHE"])
    t_section = time.perf_counter()
    conds = conditions(profile)
    result: dict[str, Any] = {"conditions": {k: v[0] for k, v in conds.items()}, "models": {}, "runs": {}}

    # 1. the calculation approach and every model, through python -m stm_dlp.run
    jobs = [("calc", ["model=calc"], []), *[(n, list(ov), []) for n, (_l, ov) in MODELS.items()],
            (LABEL_NOISE, list(MODELS[MAIN][1]), ["data.label_source=calc"])]
    outcomes: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=max(1, profile.parallel_runs)) as pool:
        futures = {name: pool.submit(run_training, name, ov, profile, out, env, extra, log)
                   for name, ov, extra in jobs}
        for name, fut in futures.items():
            try:
                outcomes[name] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported; only the label-noise run is optional
                outcomes[name] = exc
    for name, value in outcomes.items():
        if isinstance(value, Exception) and name != LABEL_NOISE:
            raise value
    runs: dict[str, dict[str, Any]] = {k: v for k, v in outcomes.items() if not isinstance(v, Exception)}
    for name, m in runs.items():
        _with_wall(m, out / "runs" / name)

    labels = {"calc": CALC_LABEL, **{k: v[0] for k, v in MODELS.items()}}
    for name in ["calc", *MODELS]:
        m = runs[name]
        per_cond = {"regular": metrics_only(m["test"])}
        for cname, rec in (m.get("conditions") or {}).items():
            per_cond[cname] = metrics_only(rec["test"])
        result["models"][name] = {"label": labels[name], "metrics": per_cond}
        result["runs"][name] = {k: m.get(k) for k in ("epochs", "fit_seconds", "wall_seconds", "command",
                                                        "n_test_patients", "eval_seconds", "failed_studies")}
    if LABEL_NOISE in runs:
        result["runs"][LABEL_NOISE] = {k: runs[LABEL_NOISE].get(k) for k in
                                       ("epochs", "fit_seconds", "wall_seconds", "command", "n_test_patients")}

    # 2. in-process: dropped-frame severities, consistency check, label noise, colour maps
    calc = CalcBaseline(method=CALC, aif="auto")
    main_dir = out / "runs" / MAIN
    regular = test_studies(main_dir)
    seed = int(run_data_config(main_dir).data.get("eval_corruption_seed", 1234))
    dropped = {dropped_name(f): dropped_studies(regular, f, seed) for f in profile.dropped_fractions}
    providers: dict[str, Any] = {"calc": calc}
    device = "cuda" if "cuda" in profile.devices and torch.cuda.is_available() else "cpu"
    for name in MODELS:
        providers[name] = ModelMaps(best_checkpoint(out / "runs" / name, runs[name]), device)
    t0 = time.perf_counter()
    for cname, studies in dropped.items():
        for name, prov in providers.items():
            result["models"][name]["metrics"][cname] = metrics_only(evaluate_studies(prov, studies))
    log(f"  in-process dropped-frame conditions: {time.perf_counter() - t0:.0f} s")

    # the in-process path reproduces the run's own test metrics (same checkpoint, same studies)
    again = metrics_only(evaluate_studies(providers[MAIN], regular))
    ref = runs[MAIN]["test"]
    result["consistency"] = {
        "max_rel_diff_mae": max(abs(again[p]["mae"] - ref[p]["mae"]) / max(abs(ref[p]["mae"]), 1e-9)
                                for p in ALL_PARAMS),
        "what": "STM-DLP LSTM regular test MAE: in-process (predict_study + evaluate_studies) vs metrics.json",
    }

    # label noise: trained against oSVD labels, evaluated against truth (same held-out patients)
    if LABEL_NOISE in runs:
        ln_dir = out / "runs" / LABEL_NOISE
        ln = ModelMaps(best_checkpoint(ln_dir, runs[LABEL_NOISE]), device)
        truth_studies = test_studies(ln_dir, label_source="maps")
        result["label_noise"] = {
            "label": LABEL_NOISE_LABEL,
            "vs_truth": metrics_only(evaluate_studies(ln, truth_studies)),
            "vs_osvd_labels": metrics_only(runs[LABEL_NOISE]["test"]),
            "truth_trained_vs_truth": result["models"][MAIN]["metrics"]["regular"],
            "osvd_vs_truth": result["models"]["calc"]["metrics"]["regular"],
        }
    else:
        err = str(outcomes[LABEL_NOISE])
        result["label_noise"] = {"label": LABEL_NOISE_LABEL, "error": err[-1500:]}
        log(f"  label-noise run failed: {err.splitlines()[0][:200]}")

    # 3. derived numbers, targets, figures
    result["ratios"] = ratios(result)
    result["targets"] = targets(result, profile)
    result["figures"] = make_figures(result, profile, providers, regular, dropped, main_dir, figures, log)
    result["seconds"] = round(time.perf_counter() - t_section, 1)
    return result


# --------------------------------------------------------------------------------- ratios and targets
def mae(result: dict[str, Any], model: str, cond: str, p: str) -> float | None:
    m = result["models"].get(model, {}).get("metrics", {}).get(cond)
    return None if m is None else float(m[p]["mae"])


def ratios(result: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """condition → model → parameter → MAE(model) / MAE(oSVD)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for cond in result["conditions"]:
        out[cond] = {}
        for model in MODELS:
            row = {}
            for p in ALL_PARAMS:
                a, b = mae(result, model, cond, p), mae(result, "calc", cond, p)
                row[p] = None if a is None or not b else a / b
            out[cond][model] = row
    return out


def _check(values: dict[str, float | None], limit: float) -> dict[str, Any]:
    ok = all(v is not None and v <= limit for v in values.values())
    return {"values": values, "limit": limit, "met": ok}


def targets(result: dict[str, Any], profile: Profile) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured ratios and whether it is met (reported, not asserted)."""
    r = result["ratios"]
    out = [{"target": "regular: STM-DLP-LSTM MAE ≤ 1.1 × oSVD on every parameter",
            **_check(r["regular"][MAIN], 1.1)}]
    for cond in IRREGULAR + tuple(dropped_name(f) for f in profile.dropped_fractions):
        if cond in r:
            out.append({"target": f"{result['conditions'][cond]}: STM-DLP-LSTM MAE ≤ 0.6 × oSVD on every parameter",
                        **_check(r[cond][MAIN], 0.6)})
    if "frames0.6" in result["conditions"]:
        own = {p: (lambda a, b: None if a is None or not b else a / b)(mae(result, MAIN, "frames0.6", p),
                                                                     mae(result, MAIN, "regular", p))
               for p in ALL_PARAMS}
        out.append({"target": "60 % of frames: STM-DLP-LSTM MAE ≤ 1.1 × its own full-frame MAE", **_check(own, 1.1)})
    vs_unito = {p: (lambda a, b: None if a is None or not b else a / b)(mae(result, MAIN, "regular", p),
                                                                       mae(result, "unitobrain", "regular", p))
                for p in ALL_PARAMS}
    out.append({"target": "STM-DLP-LSTM better than UniToBrain on every parameter (MAE ratio ≤ 0.85)",
                **_check(vs_unito, 0.85)})
    return out


# --------------------------------------------------------------------------------- figures
def _curves(result: dict[str, Any], profile: Profile, models: Sequence[str]) -> dict:
    curves: dict[str, dict[float, dict]] = {}
    for model in models:
        entry = result["models"][model]
        by_f = {1.0: entry["metrics"]["regular"]}
        for f in profile.frame_fractions:
            if frames_name(f) in entry["metrics"]:
                by_f[float(f)] = entry["metrics"][frames_name(f)]
        curves[entry["label"]] = {f: {p: {k: (m[p][k], float("nan")) for k in ("mae", "rmse", "r2")}
                                      for p in ALL_PARAMS} for f, m in by_f.items()}
    return curves


def make_figures(result: dict[str, Any], profile: Profile, providers: dict[str, Any], regular: list[Study],
                 dropped: dict[str, list[Study]], main_dir: Path, figures: Path,
                 log: Callable[[str], None] = print) -> dict[str, str]:
    from experiments.figures import plot_condition_bars, plot_frames_curves
    from stm_dlp.io.png import save_comparison_png

    figures.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    path = plot_frames_curves(figures / "figure7_frames.png", _curves(result, profile, [MAIN, "calc", "unitobrain"]),
                              title="Figure 7: held-out phantom patients vs fraction of frames kept")
    out["figure7"] = path.name
    bars = {result["conditions"][c]: {result["models"][m]["label"]: {p: (mae(result, m, c, p), float("nan"))
                                                                      for p in ALL_PARAMS}
                                      for m in ["calc", *MODELS]}
            for c in ("regular", *IRREGULAR, *dropped)}
    out["conditions_mae"] = plot_condition_bars(figures / "conditions_mae.png", bars, "mae",
                                                title="MAE per condition (held-out phantom patients)").name
    # colour maps: the model, oSVD and truth on the same slice of the first held-out patient
    map_conditions = ["regular", *IRREGULAR, frames_name(0.6) if 0.6 in profile.frame_fractions else None]
    for cond in [c for c in map_conditions if c]:
        if cond == "regular":
            studies = regular
        else:
            spec = dict(conditions(profile)[cond][1] or {})
            spec.pop("name", None)
            studies = test_studies(main_dir, **spec) if spec else dropped[cond]
        study = studies[0]
        s = study.n_slices // 2
        model_maps, _ = providers[MAIN].maps(study)
        try:
            calc_maps, _ = providers["calc"].maps(study)
        except ValueError as exc:  # no AIF found: the calculation gives nothing
            log(f"  {cond}: oSVD failed on the shown study ({str(exc).splitlines()[0][:120]}); shown as zeros")
            calc_maps = {p: np.zeros_like(model_maps[p]) for p in ALL_PARAMS}
        truth = maps_by_name(study.maps[s], axis=0)
        rows = {result["models"][MAIN]["label"]: {p: model_maps[p][s] for p in ALL_PARAMS},
                CALC_LABEL: {p: np.asarray(calc_maps[p])[s] for p in ALL_PARAMS},
                "truth": truth}
        name = f"maps_{cond}.png"
        save_comparison_png(figures / name, rows, mask=None if study.mask is None else study.mask[s],
                            title=f"{result['conditions'][cond]} — held-out patient, slice {s}")
        out[f"maps_{cond}"] = name
    return out
