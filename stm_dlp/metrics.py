"""Agreement of predicted maps with labels, one definition for models (:mod:`stm_dlp.lit`) and the
calculation approach (:mod:`stm_dlp.calc_eval`): MAE, RMSE and R² (torchmetrics) per parameter inside
the brain mask, in physical units, plus per-patient MAE."""

from __future__ import annotations

from collections import defaultdict

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
