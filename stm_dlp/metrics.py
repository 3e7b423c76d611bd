"""Agreement of predicted maps with labels, one definition for models (:mod:`stm_dlp.lit`) and the
calculation approach (:mod:`stm_dlp.calc_eval`): MAE, RMSE and R² (torchmetrics) per parameter inside
the brain mask, in physical units, per-patient MAE, and the clinical readout's agreement per patient
(Dice of TMAX > 6 s and of the core, volume errors with Bland-Altman limits, voxelwise Pearson r)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from stm_dlp.types import ALL_PARAMS, PARAMS


def param_label_mask(labelled: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(B, P)`` labelled flags (:data:`PARAMS` order) → ``{param: (B,) bool}`` for every parameter of
    :data:`ALL_PARAMS`; MTT counts where both CBV and CBF are labelled (it is derived from them)."""
    out = {p: labelled[:, i] for i, p in enumerate(PARAMS)}
    out["mtt"] = out["cbv"] & out["cbf"]
    return out


def metric_set() -> MetricCollection:
    """MAE, RMSE and R² of one parameter (update with the masked prediction and truth pixels)."""
    return MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False),
                             "r2": R2Score()})


class PerPatientMAE:
    """Sums absolute errors per patient and parameter over slices; :meth:`compute` gives the MAEs."""

    def __init__(self) -> None:
        self._acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))

    def update(self, patient_id: str, pred: dict[str, torch.Tensor], truth: dict[str, torch.Tensor],
               mask: torch.Tensor, labelled: dict[str, bool] | None = None) -> None:
        """Add one slice (or study): ``pred``/``truth`` maps of any matching shape, ``mask`` bool of that
        shape; parameters with ``labelled[p]`` False are skipped."""
        n = float(mask.sum())
        for p in ALL_PARAMS:
            if labelled is not None and not labelled.get(p, True):
                continue
            acc = self._acc[patient_id][p]
            acc[0] += float((pred[p][mask] - truth[p][mask]).abs().sum())
            acc[1] += n

    def compute(self) -> dict[str, dict[str, float]]:
        return {pid: {p: s / max(n, 1.0) for p, (s, n) in accs.items()} for pid, accs in self._acc.items()}

    def reset(self) -> None:
        self._acc.clear()


#: Agreement measures summarised over patients (the ones the field publishes).
DICE_KEYS = ("dice_tmax_gt_6", "dice_core")
#: Volumes compared per patient (predicted − true, ml) with Bland-Altman bias and limits of agreement.
VOLUME_KEYS = ("hypoperfusion", "core", "mismatch")


class StudyReadouts:
    """The clinical readout's agreement with the labels (:func:`stm_dlp.perfusion.readout.readout_agreement`)
    per patient, from slices as they come (a test loop's batches, or whole studies).

    A study's readout needs all its slices (the contralateral CBF reference and the cluster filter are
    3-D), so slices are kept per patient until :meth:`compute`.
    """

    def __init__(self, thresholds: Any | None = None) -> None:
        self.thresholds = thresholds
        self._slices: dict[str, dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]]] = {}
        self._voxel_ml: dict[str, float] = {}

    def update(self, patient_id: str, slice_index: int, pred: dict[str, Any], truth: dict[str, Any],
               mask: Any, voxel_ml: float) -> None:
        """One slice: ``pred``/``truth`` maps ``{cbv, cbf, tmax[, mtt]}`` of ``(H, W)`` (or a study's
        ``(S, H, W)`` with ``slice_index`` its first slice), ``mask`` bool of that shape, ``voxel_ml`` ml."""
        def as_np(x: Any, dtype: Any = np.float32) -> np.ndarray:
            return (x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(dtype)

        p = {k: as_np(pred[k]) for k in ("cbv", "cbf", "tmax")}
        t = {k: as_np(truth[k]) for k in ("cbv", "cbf", "tmax")}
        m = as_np(mask, bool)
        if m.ndim == 2:
            p, t, m = {k: v[None] for k, v in p.items()}, {k: v[None] for k, v in t.items()}, m[None]
        store = self._slices.setdefault(patient_id, {})
        for i in range(m.shape[0]):
            store[int(slice_index) + i] = ({k: v[i] for k, v in p.items()}, {k: v[i] for k, v in t.items()}, m[i])
        self._voxel_ml[patient_id] = float(voxel_ml)

    def compute(self) -> dict[str, Any]:
        """``{"per_patient": {patient: agreement}, "summary": {...}}``.

        ``summary``: for Dice of TMAX > 6 s and of the core, the median, mean and count over patients
        whose true region is not empty (a lesion-free patient's Dice of 1.0 says nothing); Bland-Altman
        ``{bias, sd, loa_low, loa_high, n}`` of the hypoperfusion, core and mismatch volume errors (ml);
        and the median voxelwise Pearson r per parameter.
        """
        from stm_dlp.perfusion.readout import bland_altman, readout_agreement

        per_patient: dict[str, dict[str, Any]] = {}
        for pid, slices in self._slices.items():
            order = sorted(slices)
            pred = {k: np.stack([slices[s][0][k] for s in order]) for k in ("cbv", "cbf", "tmax")}
            truth = {k: np.stack([slices[s][1][k] for s in order]) for k in ("cbv", "cbf", "tmax")}
            mask = np.stack([slices[s][2] for s in order])
            per_patient[pid] = readout_agreement(pred, truth, mask, self._voxel_ml[pid], self.thresholds)
        return {"per_patient": per_patient, "summary": summarise_agreement(list(per_patient.values()), bland_altman)}

    def __len__(self) -> int:
        """Patients collected so far."""
        return len(self._slices)

    def reset(self) -> None:
        self._slices.clear()
        self._voxel_ml.clear()


def summarise_agreement(rows: list[dict[str, Any]], bland_altman: Any | None = None) -> dict[str, Any]:
    """Summary of per-patient :func:`~stm_dlp.perfusion.readout.readout_agreement` rows (see
    :meth:`StudyReadouts.compute`)."""
    if bland_altman is None:
        from stm_dlp.perfusion.readout import bland_altman
    out: dict[str, Any] = {"n_patients": len(rows)}
    truth_volume = {"dice_tmax_gt_6": "hypoperfusion_ml_true", "dice_core": "core_ml_true"}
    for key in DICE_KEYS:
        vals = [r[key] for r in rows if r.get(truth_volume[key], 0.0) > 0 and r.get(key) is not None]
        out[key] = {"median": float(np.median(vals)) if vals else None,
                    "mean": float(np.mean(vals)) if vals else None, "n": len(vals)}
    for name in VOLUME_KEYS:
        out[f"{name}_ml_error"] = bland_altman([r[f"{name}_ml_pred"] for r in rows],
                                               [r[f"{name}_ml_true"] for r in rows])
    for p in ALL_PARAMS:
        vals = [r[f"pearson_r_{p}"] for r in rows if r.get(f"pearson_r_{p}") is not None]
        out[f"pearson_r_{p}"] = float(np.median(vals)) if vals else None
    return out
