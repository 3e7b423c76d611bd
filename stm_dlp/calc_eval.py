"""The calculation approach evaluated exactly like a trained model (``python -m stm_dlp.run model=calc``).

``model=calc`` (``conf/model/calc.yaml``) instantiates :class:`CalcBaseline`; :func:`stm_dlp.run.train`
sees it, skips training and calls :func:`evaluate_calculation`, which runs :func:`evaluate_studies` on
the DataModule's test studies — the
same patients, the same corruption (``data.eval_corruption``) and frame truncation
(``data.frame_fraction``) the model is tested on — and writes the same ``metrics.json``: MAE, RMSE
and R² per parameter inside the brain mask, in physical units, with the torchmetrics definitions of
:mod:`stm_dlp.lit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from stm_dlp.data.context import study_csf
from stm_dlp.metrics import PerPatientMAE, StudyReadouts, metric_set, param_label_mask
from stm_dlp.types import ALL_PARAMS, PARAMS, Study, maps_by_name, mtt_from_cbv_cbf


@dataclass
class CalcBaseline:
    """Deconvolution maps for a study (``stm_dlp.perfusion.calculate_maps``) as a drop-in "model".

    Args:
        method: ``osvd`` (default), ``bcsvd``, ``ssvd`` or ``tikhonov``.
        aif: ``"auto"`` or anything :func:`~stm_dlp.perfusion.calculate_maps` accepts.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        params: other ``calculate_maps`` keyword arguments.
    """

    method: str = "osvd"
    aif: Any = "auto"
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return {"osvd": "oSVD", "bcsvd": "bcSVD", "ssvd": "sSVD"}.get(self.method, self.method)

    def maps(self, study: Study) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``{cbv, cbf, tmax, mtt}`` of ``(S, H, W)`` float32 in physical units, and the info dict."""
        from stm_dlp.perfusion import calculate_maps

        mask = None if study.mask is None else np.array(study.mask, bool)  # a writable copy for torch
        maps, info = calculate_maps(np.array(study.frames, np.float32), np.array(study.times_s, np.float32),
                                    mask, method=self.method, aif=self.aif, device=self.device,
                                    **{"affine": study.affine, **dict(self.params or {})})  # mm options
        out = {p: np.asarray(maps[p], np.float32) for p in PARAMS}
        out["mtt"] = (np.asarray(maps["mtt"], np.float32) if "mtt" in maps
                      else mtt_from_cbv_cbf(out["cbv"], out["cbf"]))
        return out, info


def evaluate_studies(baseline: CalcBaseline, studies: Sequence[Study],
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Metrics of the calculation approach over ``studies`` (each with label ``maps`` and ``mask``).

    Returns the structure of :attr:`stm_dlp.lit.PerfusionLitModule.test_results`:
    ``{param: {mae, rmse, r2}, "per_patient_mae": {patient: {param: mae}}}`` plus ``"seconds"`` and
    ``"failed_studies"`` (how many studies the calculation could not process) and ``"failures"``.
    Pixels count where the study's brain mask is true, exactly as for the model's test step.

    A study the calculation approach refuses (e.g. no usable arterial input function on heavily
    truncated or corrupted input — the failure the paper's D_fail study is about) scores as all-zero
    maps, what a reader gets from a failed calculation, and is counted in ``failed_studies``.
    """
    metrics = {p: metric_set() for p in ALL_PARAMS}
    per_patient = PerPatientMAE()
    readouts = StudyReadouts()
    updated: set[str] = set()
    failures: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for k, study in enumerate(studies):
        if study.maps is None:
            raise ValueError(f"{study.source or 'a study'}: no label maps to evaluate the calculation approach against")
        try:
            pred, _info = baseline.maps(study)
        except ValueError as exc:  # StudyError included: the calculation gives no maps for this study
            pred = {p: np.zeros(np.asarray(study.maps[:, 0]).shape, np.float32) for p in ALL_PARAMS}
            failures.append({"study": k, "error": str(exc).splitlines()[0][:300]})
        truth = maps_by_name(torch.from_numpy(np.asarray(study.maps, np.float32)))
        if study.mask is not None:
            mask = torch.from_numpy(np.asarray(study.mask, bool))
        else:
            mask = torch.ones(truth["cbv"].shape, dtype=torch.bool)
        pred_t = {p: torch.from_numpy(np.nan_to_num(pred[p], nan=0.0, posinf=0.0, neginf=0.0)) for p in ALL_PARAMS}
        flags = param_label_mask(torch.tensor([[p in study.labelled for p in PARAMS]]))
        labelled = {p: bool(v[0]) for p, v in flags.items()}
        if mask.any():
            for p in ALL_PARAMS:
                if labelled[p]:
                    metrics[p].update(pred_t[p][mask], truth[p][mask])
                    updated.add(p)
        per_patient.update(study.patient_id, pred_t, truth, mask, labelled)
        if labelled["cbf"] and labelled["tmax"]:
            # the readout on the brain without CSF, as the model's test step takes it
            tissue = mask & ~torch.from_numpy(study_csf(study))
            readouts.update(study.patient_id, 0, pred_t, truth, tissue, study.voxel_ml)
        if progress is not None:
            progress(k + 1, len(studies))
    results: dict[str, Any] = {}
    for p in ALL_PARAMS:  # NaN for a parameter no study has a label for (shown as "—")
        results[p] = ({name: float(v) for name, v in metrics[p].compute().items()} if p in updated
                      else {name: float("nan") for name in ("mae", "rmse", "r2")})
    results["per_patient_mae"] = per_patient.compute()
    if len(readouts):
        results["readout"] = readouts.compute()
    results["seconds"] = round(time.perf_counter() - t0, 3)
    results["failed_studies"] = len(failures)
    results["failures"] = failures  # study index within the split and the reason; no patient identifier
    return results


def evaluate_calculation(cfg: DictConfig, baseline: CalcBaseline, out_dir: Path) -> dict[str, Any]:
    """``model=calc``: no training; the calculation approach on the test split (+ each eval condition),
    with the same run files, ``metrics.json``, loggers and printed table as a trained model."""
    from hydra.utils import instantiate

    from stm_dlp.conditions import condition_datamodule, conditions
    from stm_dlp.launch import is_global_zero_env
    from stm_dlp.reporting import log_final, print_results, run_loggers, write_metrics, write_run_files

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    zero = is_global_zero_env()
    if zero:
        write_run_files(cfg, out_dir, datamodule)
    with run_loggers(cfg, enabled=zero) as loggers:
        t0 = time.perf_counter()
        results = evaluate_studies(baseline, datamodule.test_set.studies)
        by_condition = {}
        for name, overrides in conditions(cfg):
            studies = condition_datamodule(cfg, overrides).test_set.studies
            by_condition[name] = (overrides, evaluate_studies(baseline, studies))
        seconds = time.perf_counter() - t0
        if zero:
            n_test = len(datamodule.splits["test"])
            write_metrics(cfg, out_dir, results, by_condition, n_test,
                          {"best_checkpoint": None, "epochs": 0, "fit_seconds": 0.0,
                           "method": baseline.method, "eval_seconds": round(seconds, 2)})
            log_final(loggers, results, by_condition, step=0, log_test=True)
            print_results(out_dir, n_test, results, by_condition, f"calculation approach ({baseline.label})")
    return results
