"""What a run leaves behind and prints: run files, ``metrics.json``, the metrics table, logger set-up.

Used by :mod:`stm_dlp.run` for trained models and by :mod:`stm_dlp.calc_eval` for the calculation
approach, so both write exactly the same files:

* ``config.yaml`` (resolved) and ``split.json`` (the patient split) — :func:`write_run_files`;
* ``metrics.json`` (+ ``metrics_<condition>.json``) — :func:`write_metrics`;
* the printed table of MAE / RMSE / R² per parameter — :func:`metrics_table`;
* the loggers (CSV, TensorBoard, W&B) with the resolved config as hyper-parameters — :func:`run_loggers`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stm_dlp.conditions import BASE_CONDITION, condition_record
from stm_dlp.io.atomic import atomic_write_text
from stm_dlp.types import ALL_PARAMS, UNITS

#: The metrics each parameter reports, in table order.
METRICS = ("mae", "rmse", "r2")


def metrics_table(results: Mapping[str, Any]) -> str:
    """A printable table of MAE / RMSE / R² per parameter in physical units."""
    def cell(value: Any, width: int) -> str:  # "—" for a parameter the dataset has no label for
        return f"{'—':>{width}}" if value is None or value != value else f"{value:>{width}.3f}"

    lines = [f"{'parameter':<10}{'unit':<14}{'MAE':>10}{'RMSE':>10}{'R2':>9}"]
    for p in ALL_PARAMS:
        r = results[p]
        lines.append(f"{p.upper():<10}{UNITS[p]:<14}{cell(r['mae'], 10)}{cell(r['rmse'], 10)}{cell(r['r2'], 9)}")
    return "\n".join(lines)


def readout_summary_line(results: Mapping[str, Any]) -> str | None:
    """One line of the clinical readout's agreement (Dice of TMAX > 6 s and of the core over patients with
    that lesion, hypoperfusion volume bias and limits of agreement), or ``None`` without readout."""
    readout = results.get("readout")
    if not readout:
        return None
    s = readout["summary"]

    def dice(key: str) -> str:
        d = s[key]
        return "—" if d["median"] is None else f"{d['median']:.2f} (n={d['n']})"

    ba = s["hypoperfusion_ml_error"]
    volume = ("—" if ba.get("bias") is None else
              f"{ba['bias']:+.1f} ml" + ("" if ba.get("loa_low") is None
                                          else f" [LoA {ba['loa_low']:+.1f}, {ba['loa_high']:+.1f}]"))
    return (f"clinical readout vs labels ({s['n_patients']} patients): median Dice TMAX>6 s {dice('dice_tmax_gt_6')}"
            f" · Dice core {dice('dice_core')} · TMAX>6 s volume error {volume}")


def describe(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity in tables: model target, encoder, variant, experiment and seed."""
    variant = cfg.get("variant") or {}
    return {
        "model": cfg.model.get("_target_"),
        "encoder": cfg.model.get("encoder"),
        "variant": variant.get("name"),
        "label": variant.get("label"),
        "experiment": cfg.get("experiment_name"),
        "seed": int(cfg.seed),
    }


def write_run_files(cfg: DictConfig, out_dir: Path, datamodule: Any) -> None:
    """``config.yaml`` (resolved) and ``split.json`` (the patient split actually used)."""
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    datamodule.save_split(out_dir / "split.json")


def write_metrics(cfg: DictConfig, out_dir: Path, results: Mapping[str, Any],
                  conditions: Mapping[str, tuple[dict[str, Any], dict[str, Any]]], n_test: int,
                  extra: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics.json`` (+ one ``metrics_<condition>.json`` per condition); returns the summary."""
    summary = {
        "test": {p: results[p] for p in ALL_PARAMS},
        "per_patient_mae": results.get("per_patient_mae", {}),
        "units": UNITS,
        **extra,
        **describe(cfg),
        "eval_corruption": cfg.data.get("eval_corruption"),
        "frame_fraction": cfg.data.get("frame_fraction"),
        "train_frame_fraction": cfg.data.get("train_frame_fraction"),
        "n_test_patients": n_test,
        **{k: results[k] for k in ("failed_studies", "failures", "readout") if k in results},
        "conditions": {name: condition_record(cfg, ov, res, ALL_PARAMS) for name, (ov, res) in conditions.items()},
    }
    for name, (ov, res) in conditions.items():
        record = {"condition": name, **condition_record(cfg, ov, res, ALL_PARAMS),
                  "per_patient_mae": res.get("per_patient_mae", {}), "units": UNITS, **describe(cfg)}
        atomic_write_text(out_dir / f"metrics_{name}.json", json.dumps(record, indent=2))
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
    return summary


def print_results(out_dir: Path, n_test: int, results: Mapping[str, Any],
                  conditions: Mapping[str, tuple[dict, dict]], what: str) -> None:
    """The test table (and one per condition) on stdout."""
    def block(res: Mapping[str, Any]) -> str:
        line = readout_summary_line(res)
        return metrics_table(res) + ("" if line is None else "\n" + line)

    print(f"\nTest metrics of {what} ({n_test} held-out patients, inside the brain mask, "
          f"physical units) — {out_dir}\n" + block(results), flush=True)
    for name, (_ov, res) in conditions.items():
        print(f"\ncondition {name}:\n" + block(res), flush=True)


def log_final(loggers: list, results: Mapping[str, Any], conditions: Mapping[str, tuple[dict, dict]],
              step: int, log_test: bool = False) -> None:
    """Condition metrics as ``<condition>/<metric>_<param>``, the final metrics table (W&B), and with
    ``log_test`` the run's own ``test/<metric>_<param>`` (a trained model's test loop logs those itself)."""
    rows = [(BASE_CONDITION, results)] + [(name, res) for name, (_ov, res) in conditions.items()]
    for lg in loggers:
        if log_test:
            lg.log_metrics({f"test/{k}_{p}": float(results[p][k]) for p in ALL_PARAMS for k in METRICS}, step=step)
        if conditions:
            lg.log_metrics({f"{name}/{k}_{p}": float(res[p][k]) for name, res in rows[1:]
                            for p in ALL_PARAMS for k in METRICS}, step=step)
        if type(lg).__name__ == "WandbLogger":
            lg.log_table(key="test/metrics", columns=["condition", "parameter", "unit", *METRICS],
                         data=[[name, p, UNITS[p], *(res[p][k] for k in METRICS)]
                               for name, res in rows for p in ALL_PARAMS])
        lg.save()


@contextlib.contextmanager
def run_loggers(cfg: DictConfig, enabled: bool = True) -> Iterator[list]:
    """The loggers of ``cfg.logger`` with the resolved config as hyper-parameters; the W&B run is
    finished on exit (one W&B run per multirun job). ``enabled=False`` (non-zero ranks) yields ``[]``."""
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()] if enabled else []
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        yield loggers
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            if wandb.run is not None:
                wandb.finish()
