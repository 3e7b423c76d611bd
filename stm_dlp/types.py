"""The data contracts of STM-DLP, defined once and used everywhere.

* :class:`Study` — one patient's CTP scan in memory (all slices), as readers return it.
* :class:`SliceSample` — one slice of a study, the unit the DataModule serves.
* :class:`CTPBatch` — a padded batch of slices, the only thing models and the LightningModule see.

Parameter order for maps is :data:`PARAMS` (CBV, CBF, TMAX). MTT is derived as
``CBV / CBF * 60`` (:func:`mtt_from_cbv_cbf`), never predicted; :func:`maps_by_name` turns a stack into
named maps with MTT, :func:`physical_maps` a model's normalised output into physical units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: Predicted parameters, in the channel order of every ``maps`` array.
PARAMS: tuple[str, ...] = ("cbv", "cbf", "tmax")
#: Every parameter a user sees (MTT derived from CBV and CBF).
ALL_PARAMS: tuple[str, ...] = ("cbv", "cbf", "tmax", "mtt")
#: Physical units of each parameter.
UNITS: dict[str, str] = {"cbv": "ml/100g", "cbf": "ml/100g/min", "tmax": "s", "mtt": "s"}
#: How a slice's arterial reference is obtained (:func:`stm_dlp.perfusion.arterial.pool_references`): ``study`` —
#: the frame-by-frame median of the references of all the study's slices (when they share their frame times),
#: ``slice`` — the slice's own.
ARTERIAL_POOLING: tuple[str, ...] = ("study", "slice")
#: File-name stems with units, for tables and summaries.
LONG_NAMES: dict[str, str] = {
    "cbv": "cbv_ml_100g",
    "cbf": "cbf_ml_100g_min",
    "tmax": "tmax_s",
    "mtt": "mtt_s",
}


class StudyError(ValueError):
    """A study or label file cannot be used. The message names the file and the problem."""


#: CBF (ml/100g/min) below which there is no measurable flow: MTT is 0 there (:func:`mtt_from_cbv_cbf`), as
#: in the calculation approach (``CalcParams.cbf_floor``) and the readout (``tissue_min_cbf``). Without a
#: floor a prediction of 0.01 ml/100g/min with 0.3 ml/100g of CBV reads as an MTT of half an hour.
NO_FLOW_CBF: float = 0.5


def mtt_from_cbv_cbf(cbv: Any, cbf: Any, eps: float = NO_FLOW_CBF) -> Any:
    """MTT (s) = CBV (ml/100g) / CBF (ml/100g/min) * 60; 0 where CBF is below ``eps`` (no flow).

    Works on numpy arrays and torch tensors of any (matching) shape.
    """
    if isinstance(cbf, torch.Tensor):
        safe = torch.where(cbf >= eps, cbf, torch.ones_like(cbf))
        return torch.where(cbf >= eps, cbv / safe * 60.0, torch.zeros_like(cbf))
    cbf = np.asarray(cbf)
    cbv = np.asarray(cbv)
    safe = np.where(cbf >= eps, cbf, 1.0)
    return np.where(cbf >= eps, cbv / safe * 60.0, 0.0).astype(np.float32)


def voxel_volume_ml(affine: Any) -> float:
    """Volume of one voxel in ml: ``|det(affine[:3, :3])|`` mm³ / 1000 (``affine`` ``(4, 4)``, mm)."""
    a = np.asarray(affine, np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    return float(abs(np.linalg.det(a[:3, :3])) / 1000.0)


def pixel_spacing_mm(affine: Any) -> tuple[float, float]:
    """``(row_step_mm, column_step_mm)`` of an affine for ``(W, H, S)`` arrays (:class:`Study`): the norms of
    its second column (one row down) and its first column (one column right), in mm."""
    a = np.asarray(affine, np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    return float(np.linalg.norm(a[:3, 1])), float(np.linalg.norm(a[:3, 0]))


def maps_by_name(stack: Any, axis: int = 1) -> dict[str, Any]:
    """Split a CBV/CBF/TMAX stack (:data:`PARAMS` order along ``axis``) into ``{cbv, cbf, tmax, mtt}``.

    ``stack`` is a numpy array or torch tensor, e.g. labels ``(S, 3, H, W)`` of a study (``axis=1``)
    or a batch's ``maps`` ``(B, 3, H, W)``; MTT is derived by :func:`mtt_from_cbv_cbf`.
    """
    if not isinstance(stack, torch.Tensor):
        stack = np.asarray(stack, np.float32)
    if stack.shape[axis] != len(PARAMS):
        raise ValueError(f"expected {len(PARAMS)} maps (CBV, CBF, TMAX) along axis {axis}, "
                         f"got shape {tuple(stack.shape)}")
    index = [slice(None)] * stack.ndim
    out = {}
    for i, p in enumerate(PARAMS):
        index[axis] = i
        out[p] = stack[tuple(index)]
    out["mtt"] = mtt_from_cbv_cbf(out["cbv"], out["cbf"])
    return out


def physical_maps(pred_scaled: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """A model's normalised ``(B, 3, H, W)`` output times the per-parameter ``scale`` ``(3,)`` →
    ``{cbv, cbf, tmax, mtt}`` each ``(B, H, W)`` in ml/100g, ml/100g/min, s, s."""
    return maps_by_name(pred_scaled * scale.view(1, -1, 1, 1), axis=1)


@dataclass
class Study:
    """One patient's CTP scan.

    Attributes:
        frames: float32 ``(S, T, H, W)`` in HU; S slices ordered along the slice normal, T frames.
        times_s: float32 ``(S, T)`` acquisition time of each frame in seconds from the study's first
            frame; strictly increasing along T for every slice (spacing may be irregular).
        affine: float64 ``(4, 4)`` NIfTI affine for arrays stored in ``(W, H, S)`` order
            (index ``[c, r, s]`` = column c, row r, slice s), mapping to RAS+ millimetres.
        maps: float32 ``(S, P, H, W)`` label maps in :data:`PARAMS` order, or ``None`` (unlabelled).
        mask: bool ``(S, H, W)`` brain mask (where metrics and losses count), or ``None``.
        labelled: the parameters whose label channel in ``maps`` is real (a dataset may lack a map, e.g.
            UniToBrain has no TMAX); the others are zero-filled and losses and metrics skip them.
        patient_id: pseudonymised identifier (never a real name or ID).
        source: where the study came from (a path, or ``"phantom"``); for error messages.
        meta: free-form extras (e.g. phantom truth AIF, series UID hash, vendor time-tag style).
    """

    frames: np.ndarray
    times_s: np.ndarray
    affine: np.ndarray
    maps: np.ndarray | None = None
    mask: np.ndarray | None = None
    patient_id: str = "anonymous"
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    labelled: tuple[str, ...] = PARAMS

    @property
    def n_slices(self) -> int:
        return int(self.frames.shape[0])

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[1])

    @property
    def shape_hw(self) -> tuple[int, int]:
        return int(self.frames.shape[2]), int(self.frames.shape[3])

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel (ml), from the affine."""
        return voxel_volume_ml(self.affine)

    def validate(self) -> Study:
        """Check shapes, dtypes and values; raise :class:`StudyError` naming ``source`` otherwise."""
        where = self.source or self.patient_id
        if self.frames.ndim != 4:
            raise StudyError(f"{where}: frames must be (S, T, H, W), got shape {self.frames.shape}")
        s, t, h, w = self.frames.shape
        if t < 2:
            raise StudyError(f"{where}: a CTP study needs at least 2 frames, got {t}")
        if self.times_s.shape != (s, t):
            raise StudyError(f"{where}: times_s must have shape {(s, t)}, got {self.times_s.shape}")
        if not np.all(np.isfinite(self.times_s)):
            raise StudyError(f"{where}: frame times contain NaN or inf")
        bad = np.nonzero(np.diff(self.times_s, axis=1) <= 0)
        if bad[0].size:
            raise StudyError(
                f"{where}: frame times are not strictly increasing "
                f"(slice {int(bad[0][0])}, frame {int(bad[1][0]) + 1})"
            )
        if not np.all(np.isfinite(self.frames)):
            raise StudyError(f"{where}: frames contain NaN or inf values")
        if self.affine.shape != (4, 4):
            raise StudyError(f"{where}: affine must be 4x4, got {self.affine.shape}")
        if self.maps is not None:
            if self.maps.shape != (s, len(PARAMS), h, w):
                raise StudyError(
                    f"{where}: label maps have shape {self.maps.shape}, but the frames need "
                    f"{(s, len(PARAMS), h, w)} (slices, CBV/CBF/TMAX, rows, columns)"
                )
            if not np.all(np.isfinite(self.maps)):
                raise StudyError(f"{where}: label maps contain NaN or inf values")
        if self.mask is not None and self.mask.shape != (s, h, w):
            raise StudyError(f"{where}: mask has shape {self.mask.shape}, expected {(s, h, w)}")
        unknown = [p for p in self.labelled if p not in PARAMS]
        if unknown:
            raise StudyError(f"{where}: labelled parameters {unknown} are not among {PARAMS}")
        return self

    def slice_sample(self, index: int) -> SliceSample:
        """The slice ``index`` as a :class:`SliceSample` (times re-zeroed at its first frame)."""
        h, w = self.shape_hw
        times = self.times_s[index].astype(np.float32)
        maps = (
            self.maps[index].astype(np.float32)
            if self.maps is not None
            else np.zeros((len(PARAMS), h, w), np.float32)
        )
        mask = self.mask[index] if self.mask is not None else np.ones((h, w), bool)
        return SliceSample(
            frames=self.frames[index].astype(np.float32),
            times_s=times - times[0],
            maps=maps,
            mask=mask.astype(bool),
            patient_id=self.patient_id,
            slice_index=index,
            labelled=tuple(self.labelled) if self.maps is not None else (),
            voxel_ml=self.voxel_ml,
            pixel_mm=pixel_spacing_mm(self.affine),
        )


@dataclass
class SliceSample:
    """One slice: ``frames`` (T, H, W) HU, ``times_s`` (T,), ``maps`` (P, H, W), ``mask`` (H, W) bool;
    ``labelled`` names the parameters whose label channel is real; ``voxel_ml`` is one voxel's volume
    (ml; 0 when unknown), for the clinical readout's volumes; ``arterial_hu`` ``(T,)`` is the slice's
    arterial reference curve (enhancement in HU at the frame times, from the *whole* study — by default the
    median over its slices — before any crop: :func:`stm_dlp.data.context.study_references`), or ``None``;
    ``prior_maps`` ``(P, H, W)`` the
    deconvolution of the slice's curves with that reference (physical units, :data:`PARAMS` order —
    :func:`stm_dlp.data.context.deconvolution_prior`), or ``None``; ``pixel_mm`` the ``(row, column)``
    pixel spacing (mm), or ``None`` when unknown."""

    frames: np.ndarray
    times_s: np.ndarray
    maps: np.ndarray
    mask: np.ndarray
    patient_id: str
    slice_index: int
    labelled: tuple[str, ...] = PARAMS
    voxel_ml: float = 0.0
    arterial_hu: np.ndarray | None = None
    prior_maps: np.ndarray | None = None
    pixel_mm: tuple[float, float] | None = None

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class CTPBatch:
    """A batch of slices padded to the longest T (never truncated, never resampled).

    Attributes:
        frames: float32 ``(B, T, H, W)`` HU; frames past ``lengths[b]`` are zero padding.
        times_s: float32 ``(B, T)`` seconds from each slice's first frame; padding repeats the
            last valid time so it stays monotone (models must still ignore it via ``lengths``).
        lengths: int64 ``(B,)`` number of valid frames per slice.
        maps: float32 ``(B, P, H, W)`` labels in :data:`PARAMS` order (zeros when unlabelled).
        mask: bool ``(B, H, W)`` where losses and metrics count.
        patient_ids: pseudonymised patient of each slice.
        slice_index: int64 ``(B,)`` slice position within its study.
        labelled: bool ``(B, P)``: which label channels of each slice are real (losses and metrics skip
            the others); ``None`` means all.
        voxel_ml: float64 ``(B,)`` one voxel's volume (ml) of each slice's study, or ``None``.
        arterial_hu: float32 ``(B, T)`` each slice's arterial reference curve (enhancement over baseline,
            HU, at its frame times; computed on the whole study before any crop — the median over its slices,
            or the slice's own with ``arterial_pooling="slice"`` —, so a crop carries its study's curve), zero
            past ``lengths``; ``None`` when the samples carry none. Models with
            arterial context read it at every time step.
        prior_maps: float32 ``(B, P, H, W)`` each slice's deconvolution with its arterial reference
            (physical units, :data:`PARAMS` order), for models with a deconvolution prior; ``None`` when the
            samples carry none.
    """

    frames: torch.Tensor
    times_s: torch.Tensor
    lengths: torch.Tensor
    maps: torch.Tensor
    mask: torch.Tensor
    patient_ids: list[str]
    slice_index: torch.Tensor
    labelled: torch.Tensor | None = None
    voxel_ml: torch.Tensor | None = None
    arterial_hu: torch.Tensor | None = None
    prior_maps: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.frames.shape[0])

    @property
    def valid_frames(self) -> torch.Tensor:
        """bool ``(B, T)``: True for real frames, False for padding."""
        t = self.frames.shape[1]
        return torch.arange(t, device=self.lengths.device)[None, :] < self.lengths[:, None]

    @property
    def label_mask(self) -> torch.Tensor:
        """bool ``(B, P)``: :attr:`labelled`, or all True."""
        if self.labelled is not None:
            return self.labelled
        return torch.ones(self.maps.shape[:2], dtype=torch.bool, device=self.maps.device)

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The keyword arguments of a model's ``forward``: ``model(**batch.model_inputs())``; ``prior_maps``
        only when the batch carries them (a model without a deconvolution prior need not accept it)."""
        inputs = {"frames": self.frames, "times_s": self.times_s, "lengths": self.lengths,
                  "arterial_hu": self.arterial_hu}
        return inputs if self.prior_maps is None else {**inputs, "prior_maps": self.prior_maps}

    def to(self, device: torch.device | str) -> CTPBatch:
        return CTPBatch(
            frames=self.frames.to(device),
            times_s=self.times_s.to(device),
            lengths=self.lengths.to(device),
            maps=self.maps.to(device),
            mask=self.mask.to(device),
            patient_ids=list(self.patient_ids),
            slice_index=self.slice_index.to(device),
            labelled=None if self.labelled is None else self.labelled.to(device),
            voxel_ml=self.voxel_ml,
            arterial_hu=None if self.arterial_hu is None else self.arterial_hu.to(device),
            prior_maps=None if self.prior_maps is None else self.prior_maps.to(device),
        )


def collate_slices(samples: Sequence[SliceSample]) -> CTPBatch:
    """Pad a list of slices (possibly different T) into one :class:`CTPBatch`.

    All slices must share (H, W) (crop first when training on mixed sizes).
    """
    if not samples:
        raise ValueError("collate_slices needs at least one sample")
    hw = samples[0].frames.shape[1:]
    for s in samples:
        if s.frames.shape[1:] != hw:
            raise ValueError(
                f"cannot batch slices of different sizes {hw} and {s.frames.shape[1:]} "
                f"(patient {s.patient_id}, slice {s.slice_index}); use random crops or batch_size=1"
            )
    b, t_max = len(samples), max(s.n_frames for s in samples)
    frames = torch.zeros((b, t_max, *hw), dtype=torch.float32)
    times = torch.zeros((b, t_max), dtype=torch.float32)
    with_arterial = [s.arterial_hu is not None for s in samples]
    if any(with_arterial) and not all(with_arterial):
        raise ValueError("cannot batch slices with and without an arterial reference curve")
    arterial = torch.zeros((b, t_max), dtype=torch.float32) if all(with_arterial) else None
    with_prior = [s.prior_maps is not None for s in samples]
    if any(with_prior) and not all(with_prior):
        raise ValueError("cannot batch slices with and without a deconvolution prior")
    for i, s in enumerate(samples):
        t = s.n_frames
        frames[i, :t] = torch.from_numpy(np.ascontiguousarray(s.frames, dtype=np.float32))
        times[i, :t] = torch.from_numpy(np.ascontiguousarray(s.times_s, dtype=np.float32))
        times[i, t:] = float(s.times_s[-1])
        if arterial is not None:
            if s.arterial_hu.shape != (t,):
                raise ValueError(f"arterial reference of patient {s.patient_id}, slice {s.slice_index} has shape "
                                 f"{s.arterial_hu.shape}, its frames need ({t},)")
            arterial[i, :t] = torch.from_numpy(np.ascontiguousarray(s.arterial_hu, dtype=np.float32))
    return CTPBatch(
        frames=frames,
        times_s=times,
        lengths=torch.tensor([s.n_frames for s in samples], dtype=torch.int64),
        maps=torch.stack([torch.from_numpy(np.ascontiguousarray(s.maps, np.float32)) for s in samples]),
        mask=torch.stack([torch.from_numpy(np.ascontiguousarray(s.mask, bool)) for s in samples]),
        patient_ids=[s.patient_id for s in samples],
        slice_index=torch.tensor([s.slice_index for s in samples], dtype=torch.int64),
        labelled=torch.tensor([[p in s.labelled for p in PARAMS] for s in samples], dtype=torch.bool),
        voxel_ml=torch.tensor([s.voxel_ml for s in samples], dtype=torch.float64),
        arterial_hu=arterial,
        prior_maps=(torch.stack([torch.from_numpy(np.ascontiguousarray(s.prior_maps, np.float32)) for s in samples])
                    if all(with_prior) else None),
    )
