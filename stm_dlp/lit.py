"""The LightningModule: loss, metrics in physical units, optimisation and logging (paper §4.2).

The wrapped model (any ``nn.Module`` with
``forward(frames, times_s, lengths, arterial_hu=None, prior_maps=None) -> (B, 3, H, W)``, called with
:meth:`~stm_dlp.types.CTPBatch.model_inputs`)
predicts CBV, CBF and TMAX divided by a per-parameter ``target_scale`` (a scale only, no shift, so a
non-negative model output is a non-negative physical value). The scale is a buffer, so it is saved
in every checkpoint and predictions come back in ml/100g, ml/100g/min and s.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn

from stm_dlp.data.context import batch_csf, exclude_csf
from stm_dlp.metrics import PerPatientMAE, StudyReadouts, metric_set, param_label_mask
from stm_dlp.types import ALL_PARAMS, NO_FLOW_CBF, PARAMS, CTPBatch, maps_by_name, physical_maps

LOSSES = ("charbonnier", "mse", "l1")


def _pixel_error(diff: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    if kind == "charbonnier":
        return torch.sqrt(diff * diff + eps * eps)
    if kind == "mse":
        return diff * diff
    if kind == "l1":
        return diff.abs()
    raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str | Sequence[str] = "charbonnier",
                eps: float = 1e-3, labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Per-task loss inside the mask. ``pred``/``target`` (B, P, H, W), ``mask`` (B, H, W) → (P,).

    ``kind`` is one loss for every task or one per task (CBV, CBF, TMAX order), e.g. Charbonnier for CBV
    and CBF and MSE for TMAX, whose rare large values (the lesion) an L1-like loss treats as outliers.
    ``labelled`` (B, P) bool leaves out the slices whose label for a task is missing (that task's loss
    is 0 when no slice of the batch has it)."""
    diff = pred - target
    kinds = [kind] * diff.shape[1] if isinstance(kind, str) else list(kind)
    if len(kinds) != diff.shape[1]:
        raise ValueError(f"one loss per task needs {diff.shape[1]} names, got {kinds}")
    err = torch.stack([_pixel_error(diff[:, i], k, eps) for i, k in enumerate(kinds)], dim=1)
    m = mask[:, None].to(err.dtype)
    if labelled is not None:
        m = m * labelled[:, :, None, None].to(err.dtype)
    return (err * m).sum(dim=(0, 2, 3)) / m.sum(dim=(0, 2, 3)).clamp(min=1.0)


def mtt_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, target_scale: torch.Tensor,
             eps: float = 1e-3, labelled: torch.Tensor | None = None) -> torch.Tensor:
    """Charbonnier loss on the MTT the normalised CBV and CBF imply, scalar.

    MTT = CBV / CBF · 60 amplifies any disagreement between the two maps (10 % too much CBV and 10 % too
    little CBF is 22 % of MTT), which the per-map losses do not see. In normalised units the MTT is
    ``cbv / cbf`` (its scale is ``scale_cbv / scale_cbf · 60``); it counts where the true CBF reaches
    :data:`~stm_dlp.types.NO_FLOW_CBF` (elsewhere MTT is 0 by definition) and both labels are real.
    ``pred``/``target`` (B, 3, H, W) normalised, ``mask`` (B, H, W), ``labelled`` (B, 3) bool.
    """
    i_cbv, i_cbf = PARAMS.index("cbv"), PARAMS.index("cbf")
    floor = NO_FLOW_CBF / float(target_scale[i_cbf])
    flow = mask & (target[:, i_cbf] >= floor)
    if labelled is not None:
        flow = flow & (labelled[:, i_cbv] & labelled[:, i_cbf])[:, None, None]
    if not bool(flow.any()):
        return pred.sum() * 0.0
    mtt_pred = pred[:, i_cbv] / pred[:, i_cbf].clamp_min(floor)
    mtt_true = target[:, i_cbv] / target[:, i_cbf].clamp_min(floor)
    diff = (mtt_pred - mtt_true)[flow]
    return torch.sqrt(diff * diff + eps * eps).mean()


def rng_state() -> dict[str, Any]:
    """The global torch / numpy / Python RNG states as tensors and plain lists (loadable with
    ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_version, list(py_state), py_gauss]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
    version, values, py_gauss = state["python"]
    random.setstate((version, tuple(values), py_gauss))


class PerfusionLitModule(L.LightningModule):
    """Trains a perfusion model with a masked Charbonnier (or MSE) loss; reports MAE/RMSE/R².

    Args:
        model: the network (``STMDLP`` or ``UniToBrain``).
        target_scale: ``(3,)`` per-parameter scale of the normalised targets.
        model_config: plain-dict Hydra config of ``model`` (``_target_`` + args), stored in the
            checkpoint so ``stm_dlp.predict`` can rebuild the network without this run's config.
        loss: ``charbonnier`` (paper) | ``mse`` (UniToBrain) | ``l1``, or one per task (CBV, CBF, TMAX).
        task_weights: weights of the CBV, CBF, TMAX losses (paper: equal).
        mtt_weight: weight of a loss on the MTT the prediction implies (CBV / CBF, still derived, never a
            fourth output; :func:`mtt_loss`); 0 = the paper's three losses only.
        lr, betas, weight_decay: Adam (paper: 5e-4, (0.9, 0.999), 0).
        step_size, gamma: StepLR (paper: ×0.995 every 10 epochs).
        target_spacing_mm: the in-plane pixel size (mm) the data was resampled to (``data.target_spacing_mm``;
            ``None``: each study's own grid), stored in the checkpoint so prediction resamples to it.
    """

    def __init__(self, model: nn.Module, target_scale: Sequence[float] | torch.Tensor | None = None,
                 model_config: dict[str, Any] | None = None, loss: str | Sequence[str] = "charbonnier",
                 charbonnier_eps: float = 1e-3, task_weights: Sequence[float] = (1.0, 1.0, 1.0),
                 lr: float = 5e-4, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0,
                 step_size: int = 10, gamma: float = 0.995, n_log_images: int = 2,
                 target_spacing_mm: float | None = None, mtt_weight: float = 0.0):
        super().__init__()
        losses = [loss] if isinstance(loss, str) else list(loss)
        if any(k not in LOSSES for k in losses) or len(losses) not in (1, len(PARAMS)):
            raise ValueError(f"lit.loss must be one of {LOSSES} or a list of {len(PARAMS)} of them (CBV, CBF, TMAX), "
                             f"got {loss!r}")
        if not (float(mtt_weight) >= 0.0 and np.isfinite(mtt_weight)):
            raise ValueError(f"lit.mtt_weight must be a finite number >= 0, got {mtt_weight}")
        if len(task_weights) != len(PARAMS):
            raise ValueError(f"lit.task_weights needs {len(PARAMS)} values (CBV, CBF, TMAX), got {task_weights}")
        self.save_hyperparameters(ignore=["model", "target_scale"])
        self.model = model
        self.model_config = model_config or {}
        self.target_spacing_mm = None if target_spacing_mm is None else float(target_spacing_mm)
        scale = torch.ones(len(PARAMS)) if target_scale is None else torch.as_tensor(target_scale, dtype=torch.float32)
        self.register_buffer("target_scale", scale.clone())
        if hasattr(model, "set_target_scale"):  # a network whose output depends on it (STMDLP.tmax_from_prior)
            model.set_target_scale(self.target_scale)
        self.register_buffer("task_weights", torch.tensor(list(task_weights), dtype=torch.float32))
        self.val_metrics = nn.ModuleDict({p: metric_set() for p in ALL_PARAMS})
        self.test_metrics = nn.ModuleDict({p: metric_set() for p in ALL_PARAMS})
        self._per_patient = PerPatientMAE()
        self._readouts = {"val": StudyReadouts(), "test": StudyReadouts()}
        self._updated: set[str] = set()  # parameters some labelled pixel reached since the last compute
        self.test_results: dict[str, Any] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, batch: CTPBatch) -> torch.Tensor:
        """Normalised prediction ``(B, 3, H, W)``."""
        return self.model(**batch.model_inputs())

    def _loss(self, pred: torch.Tensor, batch: CTPBatch) -> tuple[torch.Tensor, torch.Tensor]:
        target = batch.maps / self.target_scale.view(1, -1, 1, 1)
        per_task = masked_loss(pred, target, batch.mask, self.hparams.loss, self.hparams.charbonnier_eps,
                               batch.label_mask)
        loss = (per_task * self.task_weights).sum()
        if self.hparams.mtt_weight > 0:
            loss = loss + self.hparams.mtt_weight * mtt_loss(pred, target, batch.mask, self.target_scale,
                                                             self.hparams.charbonnier_eps, batch.label_mask)
        return loss, per_task

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: CTPBatch, batch_idx: int) -> torch.Tensor:
        pred = self(batch)
        loss, per_task = self._loss(pred, batch)
        bs = batch.batch_size
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, on_step=True, on_epoch=True)
        for p, v in zip(PARAMS, per_task):
            self.log(f"train/loss_{p}", v, batch_size=bs, on_step=False, on_epoch=True)
        return loss

    def _update_metrics(self, metrics: nn.ModuleDict, pred: torch.Tensor,
                        batch: CTPBatch) -> tuple[dict, torch.Tensor]:
        """Physical maps (0 on CSF) into ``metrics``; returns them and the brain without CSF ``(B, H, W)``."""
        csf = batch_csf(batch)
        phys = exclude_csf(physical_maps(pred.float(), self.target_scale), csf)
        truth = maps_by_name(batch.maps)
        labelled = param_label_mask(batch.label_mask)
        for p in ALL_PARAMS:
            m = batch.mask & labelled[p][:, None, None]
            if m.any():
                metrics[p].update(phys[p][m], truth[p][m])
                self._updated.add(p)
        return phys, batch.mask & ~csf

    def _update_readouts(self, stage: str, phys: dict[str, torch.Tensor], batch: CTPBatch,
                         tissue: torch.Tensor) -> None:
        """Collect whole-slice predictions for the clinical readout (needs CBF and TMAX labels) inside
        ``tissue`` (the brain without CSF, for prediction and labels alike)."""
        if batch.voxel_ml is None:
            return
        labelled = batch.label_mask
        truth = maps_by_name(batch.maps)
        for b, pid in enumerate(batch.patient_ids):
            if bool(labelled[b, PARAMS.index("cbf")]) and bool(labelled[b, PARAMS.index("tmax")]):
                self._readouts[stage].update(pid, int(batch.slice_index[b]), {p: v[b] for p, v in phys.items()},
                                             {p: v[b] for p, v in truth.items()}, tissue[b],
                                             float(batch.voxel_ml[b]))

    def _readout_results(self, stage: str) -> dict[str, Any] | None:
        acc = self._readouts[stage]
        if not len(acc):
            return None
        out = acc.compute()
        acc.reset()
        for key in ("dice_tmax_gt_6", "dice_core"):
            value = out["summary"][key]["median"]
            if value is not None:
                self.log(f"{stage}/{key}", float(value))
        return out

    def validation_step(self, batch: CTPBatch, batch_idx: int) -> None:
        pred = self(batch)
        loss, _ = self._loss(pred, batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch.batch_size, sync_dist=True)
        phys, tissue = self._update_metrics(self.val_metrics, pred, batch)
        self._update_readouts("val", phys, batch, tissue)
        if batch_idx == 0:
            self._log_images(phys, batch)

    def _compute(self, metrics: nn.ModuleDict) -> dict[str, dict[str, float]]:
        """MAE/RMSE/R² per parameter; NaN for a parameter no label reached (a dataset without that map)."""
        out = {}
        for p in ALL_PARAMS:
            if p in self._updated:
                out[p] = {k: float(v) for k, v in metrics[p].compute().items()}
            else:
                out[p] = {k: float("nan") for k in ("mae", "rmse", "r2")}
            metrics[p].reset()
        self._updated.clear()
        return out

    def on_validation_epoch_end(self) -> None:
        for p, values in self._compute(self.val_metrics).items():
            for name, value in values.items():
                self.log(f"val/{name}_{p}", value, sync_dist=False)
        self._readout_results("val")

    def test_step(self, batch: CTPBatch, batch_idx: int) -> None:
        pred = self(batch)
        phys, tissue = self._update_metrics(self.test_metrics, pred, batch)
        self._update_readouts("test", phys, batch, tissue)
        truth = maps_by_name(batch.maps)
        labelled = param_label_mask(batch.label_mask)
        for b, pid in enumerate(batch.patient_ids):
            self._per_patient.update(pid, {p: v[b] for p, v in phys.items()}, {p: v[b] for p, v in truth.items()},
                                     batch.mask[b], {p: bool(v[b]) for p, v in labelled.items()})

    def on_test_epoch_end(self) -> None:
        results: dict[str, Any] = self._compute(self.test_metrics)
        for p in ALL_PARAMS:
            for k, v in results[p].items():
                self.log(f"test/{k}_{p}", v)
        results["per_patient_mae"] = self._per_patient.compute()
        readout = self._readout_results("test")
        if readout is not None:
            results["readout"] = readout
        self.test_results = results
        self._per_patient.reset()

    # ------------------------------------------------------------------ logging helpers
    def _log_images(self, phys: dict[str, torch.Tensor], batch: CTPBatch) -> None:
        """Colour-mapped prediction/truth images for loggers that take images (W&B)."""
        n = int(self.hparams.n_log_images)
        if n <= 0 or self.trainer is None or self.trainer.sanity_checking:
            return
        for logger in self.loggers:
            log_images = getattr(logger, "log_image", None)
            if log_images is None or type(logger).__name__ != "WandbLogger":
                continue
            from stm_dlp.io.png import colorize

            truth = maps_by_name(batch.maps)
            images, captions = [], []
            for b in range(min(n, batch.batch_size)):
                for p in ALL_PARAMS:
                    for kind, src in (("pred", phys), ("truth", truth)):
                        images.append(colorize(src[p][b].detach().float().cpu().numpy(), p))
                        captions.append(f"slice {b} {p} {kind}")  # never a patient identifier
            log_images(key="val/maps", images=images, caption=captions, step=self.global_step)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                               weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.hparams.step_size, gamma=self.hparams.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["stm_dlp"] = {"model_config": self.model_config,
                                 "target_scale": self.target_scale.detach().cpu().tolist(),
                                 "params": list(PARAMS), "target_spacing_mm": self.target_spacing_mm}
        # Lightning restores loops, optimiser and schedulers but not the global RNGs that draw the
        # shuffle order and the random crops/augmentation of the next epoch: keep them with the weights.
        checkpoint["stm_dlp_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume with the RNGs as they were when the checkpoint was written, so a resumed run draws the
        same data order and crops as an uninterrupted one (single process; with DDP each rank has its own
        RNG and the DistributedSampler reseeds from ``seed + epoch`` anyway)."""
        state = checkpoint.get("stm_dlp_rng")
        trainer = getattr(self, "_trainer", None)
        if state and (trainer is None or trainer.world_size == 1):
            set_rng_state(state)
