"""LightningDataModule: patient-wise splits, cached studies, slice datasets, padded batches.

Sources (``source=``):

* ``phantom`` — the embedded digital phantom (zero set-up, exact labels);
* ``dicom``   — ``ROOT/<patient>/ctp/`` DICOM + ``ROOT/<patient>/maps/*.nii.gz`` (DESIGN.md);
* ``nifti``   — ``ROOT/<patient>/ctp.nii.gz`` (4-D, real times) + the same ``maps/``;
* ``isles2018`` — ISLES 2018 case folders;
* ``isles2024`` — an ISLES'24 release (``raw_data/``, ``derivatives/``);
* ``unitobrain`` — UniToBrain (DICOM CTP + NLR maps; CBV and CBF labelled, no TMAX).

Every source is read through :func:`stm_dlp.data.studies.read_any_study`, which tells the layout of
each patient itself; the name says what the root is and keys the cache.

Label source (``label_source=``): ``maps`` (labels on disk / phantom truth) or ``calc`` (our own
deconvolution, :func:`stm_dlp.perfusion.calculate_maps`, computed once and cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from stm_dlp.data.cache import StudyCache
from stm_dlp.data.context import attach_arterial, deconvolution_prior, delay_tissue, reference_on, study_references
from stm_dlp.data.corrupt import Compose, Truncate, corrupt_study, named_corruption
from stm_dlp.data.motion import motion_corrected
from stm_dlp.data.phantom import GENERATOR_VERSION, PhantomConfig, cohort_member, simulate_patient
from stm_dlp.data.splits import resolve_split
from stm_dlp.types import ARTERIAL_POOLING, PARAMS, SliceSample, Study, StudyError, collate_slices

log = logging.getLogger(__name__)

SOURCES = ("phantom", "dicom", "nifti", "isles2018", "isles2024", "unitobrain")
LABEL_SOURCES = ("maps", "calc")
#: Hypoperfusion threshold (s) for lesion-centred training crops (the readout's TMAX > 6 s).
LESION_TMAX_S = 6.0
#: ``frame_fraction`` / ``train_frame_fraction`` lie in (lo, hi]: some frames, at most all of them.
FRAME_FRACTION_RANGE = (0.0, 1.0)


class SliceDataset(Dataset):
    """Slices of a list of studies, with optional augmentation and random crops.

    Randomness comes from torch's generator (seeded per worker by Lightning's
    ``seed_everything(workers=True)``), so runs are reproducible.

    With ``deconv_prior`` every sample carries its slice's deconvolution prior
    (:func:`~stm_dlp.data.context.deconvolution_prior`, ~60 ms a 3 mm slice). With ``prior_cache`` and a
    transform that only adds noise (``noise_only``: the laptop scale's augmentation) or none, it is the prior
    of the slice as acquired, computed once: the frames vary per sample, the prior does not, which cut
    ``make run`` from 13 min 50 s to the time without a prior plus one pass over the slices. Transforms
    that move frames or change their timing always get the prior recomputed on the augmented slice.

    With ``prior_bank`` ``K > 0`` (and ``deconv_prior`` and a transform), each slice gets ``K`` augmented
    versions drawn once (seeded by slice and version), each with the prior of *its own* frames, and every
    sample picks one of them: the network then learns from priors as noisy as its curves, as at test time
    (the cached acquired prior is always clean), for ``K`` prior computations per slice instead of one per
    sample. The price is ``K`` fixed augmentations per slice instead of a fresh one per sample, and
    ``K`` copies of each slice's frames in memory (per loader worker: each draws the same, seeded bank).

    With ``tissue_delay_s`` ``(lo, hi)`` seconds, every sample's tissue is delayed against its arterial
    reference by a uniform draw from it (:func:`~stm_dlp.data.context.delay_tissue`, TMAX labels and prior
    move with it); a negative draw is limited to the slice's 5th-percentile TMAX, so that hardly any pixel
    would arrive before its artery.

    Every sample's arterial reference is its study's (``arterial_pooling="study"``, default: the median over the
    study's slices, :func:`~stm_dlp.data.context.study_references`, computed once per study from the frames as
    given); on an augmented framing it is interpolated at the new frame times, so the augmentation's noise does
    not reach it (it is pooled at test time too). ``"slice"``: each sample's own, from its augmented frames.
    """

    def __init__(self, studies: Sequence[Study], transform=None, crop_size: int | None = None,
                 samples_per_slice: int = 1, lesion_crop_fraction: float = 0.0, deconv_prior: bool = False,
                 prior_cache: bool = True, tissue_delay_s: Sequence[float] | None = None, prior_bank: int = 0,
                 arterial_pooling: str = "study"):
        self.deconv_prior = bool(deconv_prior)
        if arterial_pooling not in ARTERIAL_POOLING:
            raise ValueError(f"data.arterial_pooling must be one of {ARTERIAL_POOLING}, got {arterial_pooling!r}")
        self.arterial_pooling = arterial_pooling
        self._references: dict[int, np.ndarray] = {}  # study index -> (S, T) references as given
        if int(prior_bank) < 0:
            raise ValueError(f"data.prior_bank must be >= 0 (augmented versions per slice), got {prior_bank}")
        # augmented versions per slice, each with its own prior (see the class docstring)
        self.prior_bank = int(prior_bank) if (self.deconv_prior and transform is not None) else 0
        self._bank: dict[tuple[int, int], list[SliceSample]] = {}
        self.tissue_delay_s = None if tissue_delay_s is None else tuple(float(v) for v in tissue_delay_s)
        if self.tissue_delay_s is not None and not (len(self.tissue_delay_s) == 2
                                                    and self.tissue_delay_s[0] <= self.tissue_delay_s[1]):
            raise ValueError(f"data.tissue_delay_s must be [lo, hi] seconds with lo <= hi, got {tissue_delay_s}")
        # the acquired slice's deconvolution prior, kept while the transform only adds noise (see prior_cache)
        self.prior_cache = bool(prior_cache) and (transform is None or bool(getattr(transform, "noise_only", False)))
        self._priors: dict[tuple[int, int], np.ndarray] = {}
        if not 0.0 <= lesion_crop_fraction <= 1.0:
            raise ValueError(f"data.lesion_crop_fraction must be in [0, 1], got {lesion_crop_fraction}")
        self.lesion_crop_fraction = lesion_crop_fraction
        self.studies = list(studies)
        # With random crops, one slice yields several different samples per epoch.
        self.index = [(i, s) for i, st in enumerate(self.studies) for s in range(st.n_slices)] * samples_per_slice
        self.transform = transform
        self.crop_size = crop_size
        if samples_per_slice < 1:
            raise ValueError(f"data.samples_per_slice must be >= 1, got {samples_per_slice}")
        self.samples_per_slice = samples_per_slice

    def __len__(self) -> int:
        return len(self.index)

    def shape_of(self, item: int) -> tuple[int, int]:
        return self.studies[self.index[item][0]].shape_hw

    def __getitem__(self, item: int) -> SliceSample:
        study_idx, slice_idx = self.index[item]
        sample = self.studies[study_idx].slice_sample(slice_idx)
        if self.transform is None and not self.crop_size and self.tissue_delay_s is None:
            return self._with_context(sample, (study_idx, slice_idx))
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        frames, times = sample.frames, sample.times_s
        if self.prior_bank:  # a banked version carries its arterial context and prior already
            sample = self._banked(sample, (study_idx, slice_idx), rng)
            frames = sample.frames
        else:
            if self.transform is not None:
                frames, times = self._augment(frames, times, rng)
            # the arterial context comes from the whole (augmented) slice, before the crop
            acquired = sample
            sample = attach_arterial(replace(sample, frames=np.ascontiguousarray(frames, np.float32), times_s=times),
                                     self.deconv_prior and not self.prior_cache,
                                     self._reference((study_idx, slice_idx),
                                                     times if self.transform is not None else None))
            if self.deconv_prior and self.prior_cache:
                sample = replace(sample, prior_maps=self._acquired_prior(acquired, (study_idx, slice_idx)))
        if self.tissue_delay_s is not None:
            sample = delay_tissue(sample, self._draw_delay(sample, rng))
        maps, mask, prior = sample.maps, sample.mask, sample.prior_maps
        if self.crop_size:
            h, w = frames.shape[-2:]
            c = min(self.crop_size, h, w)
            y0, x0 = self._crop_origin(sample, c, rng)
            frames = frames[:, y0:y0 + c, x0:x0 + c]
            maps, mask = maps[:, y0:y0 + c, x0:x0 + c], mask[y0:y0 + c, x0:x0 + c]
            prior = None if prior is None else np.ascontiguousarray(prior[:, y0:y0 + c, x0:x0 + c])
        return replace(sample, frames=np.ascontiguousarray(frames, np.float32),
                       maps=np.ascontiguousarray(maps), mask=np.ascontiguousarray(mask), prior_maps=prior)

    def _augment(self, frames: np.ndarray, times_s: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The training transform applied once: frames ``(T, H, W)`` float32 and times (s) from the first frame."""
        frames, times = self.transform(frames, times_s, rng)
        times = np.asarray(times, np.float32)
        return np.ascontiguousarray(frames, np.float32), times - times[0]

    def _banked(self, sample: SliceSample, key: tuple[int, int], rng: np.random.Generator) -> SliceSample:
        """One of the slice's ``prior_bank`` augmented versions (drawn on first use, seeded by ``key`` and the
        version), with its arterial reference and the prior of its own frames."""
        if key not in self._bank:
            versions = []
            for k in range(self.prior_bank):
                frames, times = self._augment(sample.frames, sample.times_s, np.random.default_rng([*key, k]))
                versions.append(attach_arterial(replace(sample, frames=frames, times_s=times), True,
                                                self._reference(key, times)))
            self._bank[key] = versions
        return self._bank[key][int(rng.integers(self.prior_bank))]

    def _acquired_prior(self, sample: SliceSample, key: tuple[int, int]) -> np.ndarray:
        """The deconvolution prior of the slice as acquired (``sample``, with or without its arterial
        reference), computed once, then kept."""
        if key not in self._priors:
            with_reference = (sample if sample.arterial_hu is not None
                              else attach_arterial(sample, reference=self._reference(key)))
            self._priors[key] = deconvolution_prior(with_reference)
        return self._priors[key]

    def _with_context(self, sample: SliceSample, key: tuple[int, int]) -> SliceSample:
        """``sample`` (as acquired) with its arterial reference and, for ``deconv_prior``, its prior."""
        if not (self.deconv_prior and self.prior_cache):
            return attach_arterial(sample, self.deconv_prior, self._reference(key))
        sample = attach_arterial(sample, reference=self._reference(key))
        return replace(sample, prior_maps=self._acquired_prior(sample, key))

    def _reference(self, key: tuple[int, int], times_s: np.ndarray | None = None) -> np.ndarray | None:
        """The arterial reference ``(T,)`` of slice ``key`` (study, slice) from its study as given
        (:func:`study_references`, computed once per study); with ``times_s`` (an augmented framing, s from the
        slice's first frame) interpolated at those times — ``None`` there with ``arterial_pooling="slice"``,
        whose reference is the augmented slice's own."""
        study_idx, slice_idx = key
        if study_idx not in self._references:
            self._references[study_idx] = study_references(self.studies[study_idx], self.arterial_pooling)
        reference = self._references[study_idx][slice_idx]
        if times_s is None:
            return reference
        if self.arterial_pooling == "slice":
            return None
        acquired = np.asarray(self.studies[study_idx].times_s[slice_idx], np.float64)
        return reference_on(reference, acquired - acquired[0], times_s)

    def _draw_delay(self, sample: SliceSample, rng: np.random.Generator) -> float:
        """A tissue delay (s) from ``tissue_delay_s``, its negative side limited to the slice's 5th-percentile
        TMAX (labels inside the mask; no negative side when TMAX is unlabelled)."""
        lo, hi = self.tissue_delay_s
        tmax = sample.maps[PARAMS.index("tmax")][np.asarray(sample.mask, bool)]
        tmax = tmax[tmax > 0] if "tmax" in sample.labelled else np.zeros(0)
        floor = -float(np.percentile(tmax, 5)) if tmax.size else 0.0
        lo = min(max(lo, floor), hi)
        return float(rng.uniform(lo, hi))

    def _crop_origin(self, sample: SliceSample, c: int, rng: np.random.Generator) -> tuple[int, int]:
        """A random crop's top-left corner; with probability ``lesion_crop_fraction`` the crop is centred on a
        random hypoperfused (labelled TMAX > 6 s) pixel of the slice, when it has any — nnU-Net's foreground
        oversampling: lesions are ~3 % of the brain and in ~12 % of random 16² crops (experiments.tmax_diagnostics)."""
        h, w = sample.mask.shape
        if self.lesion_crop_fraction > 0 and "tmax" in sample.labelled and rng.uniform() < self.lesion_crop_fraction:
            ys, xs = np.nonzero(sample.mask & (sample.maps[PARAMS.index("tmax")] > LESION_TMAX_S))
            if ys.size:
                k = int(rng.integers(ys.size))
                return (int(np.clip(ys[k] - c // 2, 0, h - c)), int(np.clip(xs[k] - c // 2, 0, w - c)))
        return int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))


class SizeGroupedBatchSampler(BatchSampler):
    """Deterministic batches of slices that share (H, W), for whole-slice evaluation.

    Follows :class:`~torch.utils.data.BatchSampler`'s API (``sampler, batch_size, drop_last``), so
    Lightning can swap ``sampler`` for a ``DistributedSampler`` under DDP: each rank then batches
    only its own share of the slices (and torchmetrics syncs the metrics over all ranks).
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool = False):
        super().__init__(sampler, batch_size, drop_last)
        self.dataset = getattr(sampler, "dataset", None) or sampler.data_source

    def _batches(self) -> list[list[int]]:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in self.sampler:
            groups[self.dataset.shape_of(i)].append(i)
        return [idx[j:j + self.batch_size] for idx in groups.values() for j in range(0, len(idx), self.batch_size)]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class CTPDataModule(L.LightningDataModule):
    """Patient-split slice loading with variable-length frame collation.

    Args:
        source: one of :data:`SOURCES`.
        root: dataset root for ``dicom`` / ``isles2018``.
        n_patients: phantom cohort size.
        phantom: :class:`~stm_dlp.data.phantom.PhantomConfig` fields for the phantom.
        seed: seeds the phantom cohort and the split.
        val_fraction, test_fraction: patient fractions.
        batch_size, eval_batch_size, num_workers: loader settings.
        crop_size: random square crops for training (None: whole slices).
        samples_per_slice: training samples (random crops) drawn from each slice per epoch.
        augment: list of corruption transforms for training (see :mod:`stm_dlp.data.corrupt`).
        eval_corruption: name of a corruption applied to val/test studies (robustness study).
        frame_fraction: keep the first fraction of frames at val/test (paper Figure 7); 1.0 = all.
        train_frame_fraction: the same for training (None: train on all frames).
        label_source: ``maps`` or ``calc``.
        calc: keyword arguments for :func:`stm_dlp.perfusion.calculate_maps` when ``label_source=calc``.
        cache_dir: preprocessing cache (default ``$STM_DLP_CACHE`` or ``~/.cache/stm_dlp``).
        frame_interval_s: ISLES frame interval when the header does not give it.
        pseudonym_key: HMAC key for patient pseudonyms (DICOM and ISLES alike).
        split_file: the patient split to read back, created on first use (:mod:`stm_dlp.data.splits`);
            default ``ROOT/splits.json`` for a dataset root, none for the phantom.
        new_patients: where patients the split file does not know go (``train``, ``val``, ``test``, ``ignore``).
        lesion_crop_fraction: share of training crops centred on a hypoperfused (TMAX > 6 s) pixel.
        target_spacing_mm: in-plane pixel size (mm) every study is resampled to after reading or simulating
            and before caching (:func:`stm_dlp.data.resample.resample_study`; part of the cache
            fingerprint); ``None`` keeps each study's own grid.
        motion_correction: register every frame of the val/test studies (after their corruption) to the
            slice's pre-contrast reference before the model sees them (:func:`stm_dlp.data.motion.motion_corrected`,
            the calculation approach's correction; ``stm_dlp.predict`` does the same with ``motion=true``).
            Training studies are used as they are (augmented motion included).
        prior_cache: keep each slice's prior when the training augmentation only adds noise
            (:class:`SliceDataset`); ``False`` recomputes it on every augmented sample.
        prior_bank: ``K > 0``: each training slice gets ``K`` augmented versions drawn once, each with the
            prior of its own frames (:class:`SliceDataset`); 0 (default): off.
        deconv_prior: give every sample its deconvolution prior (:func:`stm_dlp.data.context.deconvolution_prior`,
            computed on the whole augmented slice), for models built with ``deconv_prior``; the configs set it
            from ``model.deconv_prior``.
        tissue_delay_s: ``[lo, hi]`` seconds: delay each training sample's tissue against its arterial
            reference by a uniform draw (:func:`stm_dlp.data.context.delay_tissue`; TMAX labels move with it);
            ``None``: off.
        arterial_pooling: ``study`` (each slice's arterial reference is the median over its study's slices) or
            ``slice`` (its own) — :func:`stm_dlp.perfusion.arterial.pool_references`; the configs set it from
            ``model.arterial_pooling``, which prediction reads back from the checkpoint.
    """

    def __init__(self, source: str = "phantom", root: str | None = None, n_patients: int = 12,
                 phantom: dict[str, Any] | None = None, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.25, batch_size: int = 4, eval_batch_size: int = 8,
                 num_workers: int = 0, crop_size: int | None = None, samples_per_slice: int = 1,
                 augment: Sequence | None = None,
                 eval_corruption: str = "none", eval_corruption_seed: int = 1234, frame_fraction: float = 1.0,
                 train_frame_fraction: float | None = None, label_source: str = "maps",
                 calc: dict[str, Any] | None = None, cache_dir: str | None = None,
                 frame_interval_s: float | None = None, pseudonym_key: str | None = None,
                 split_file: str | None = None, new_patients: str = "train", lesion_crop_fraction: float = 0.0,
                 target_spacing_mm: float | None = None, motion_correction: bool = True,
                 deconv_prior: bool = False, prior_cache: bool = True,
                 tissue_delay_s: Sequence[float] | None = None, prior_bank: int = 0,
                 arterial_pooling: str = "study"):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
        if label_source not in LABEL_SOURCES:
            raise ValueError(f"data.label_source must be one of {LABEL_SOURCES}, got {label_source!r}")
        if source != "phantom" and not root:
            raise ValueError(f"data.root is required for source={source!r}")
        lo, hi = FRAME_FRACTION_RANGE
        for key, value in (("frame_fraction", frame_fraction), ("train_frame_fraction", train_frame_fraction)):
            if value is not None and not lo < value <= hi:
                raise ValueError(f"data.{key} must be in ({lo:g}, {hi:g}], got {value}")
        named_corruption(eval_corruption)  # fail at start-up on an unknown name
        self.source, self.root, self.n_patients = source, root, n_patients
        self.phantom_cfg = PhantomConfig(**(phantom or {}))
        self.seed, self.val_fraction, self.test_fraction = seed, val_fraction, test_fraction
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.crop_size = crop_size
        if samples_per_slice < 1:
            raise ValueError(f"data.samples_per_slice must be >= 1, got {samples_per_slice}")
        self.samples_per_slice = samples_per_slice
        self.augment = Compose(list(augment)) if augment else None
        self.eval_corruption, self.eval_corruption_seed = eval_corruption, eval_corruption_seed
        self.motion_correction = bool(motion_correction)
        self.deconv_prior, self.prior_cache = bool(deconv_prior), bool(prior_cache)
        self.prior_bank = int(prior_bank)  # validated by SliceDataset
        if arterial_pooling not in ARTERIAL_POOLING:
            raise ValueError(f"data.arterial_pooling must be one of {ARTERIAL_POOLING}, got {arterial_pooling!r}")
        self.arterial_pooling = arterial_pooling
        self.tissue_delay_s = None if tissue_delay_s is None else list(tissue_delay_s)
        self.frame_fraction, self.train_frame_fraction = frame_fraction, train_frame_fraction
        self.label_source, self.calc_kwargs = label_source, dict(calc or {})
        self.cache = StudyCache(cache_dir)
        self.frame_interval_s = frame_interval_s
        self.pseudonym_key = pseudonym_key.encode() if pseudonym_key else None
        # a dataset root keeps its split in ROOT/splits.json; the phantom cohort is a function of its seed
        default_split = None if source == "phantom" else str(Path(root) / "splits.json")
        self.split_file = split_file or default_split
        self.new_patients = new_patients
        self.lesion_crop_fraction = lesion_crop_fraction
        if target_spacing_mm is not None and not float(target_spacing_mm) > 0:
            raise ValueError(f"data.target_spacing_mm must be a positive number of mm or null, got {target_spacing_mm}")
        self.target_spacing_mm = None if target_spacing_mm is None else float(target_spacing_mm)
        self.studies: dict[str, Study] = {}
        self.splits: dict[str, list[str]] = {}

    # ----------------------------------------------------------------------------- loading
    def _load_phantom(self) -> list[Study]:
        cfg = asdict(self.phantom_cfg)
        out = []
        for i in range(self.n_patients):
            seed, pid = cohort_member(i, self.seed)
            parts = {"kind": "phantom", "config": cfg, "seed": seed, "id": pid,
                     "generator": GENERATOR_VERSION[self.phantom_cfg.family],
                     "target_spacing_mm": self.target_spacing_mm}
            out.append(self.cache.get(parts, lambda seed=seed, pid=pid: self._on_target_grid(
                simulate_patient(self.phantom_cfg, seed, pid))))
        return out

    def _load_disk(self) -> list[Study]:
        """Every patient under ``root`` through :func:`~stm_dlp.data.studies.read_any_study` — the one
        reading path that predict and calc use too — each parsed once into the cache."""
        from rich.progress import track

        from stm_dlp.data.studies import list_patients, read_any_study, study_fingerprint

        root = Path(self.root)
        if not root.is_dir():
            raise StudyError(f"{root}: dataset root does not exist or is not a directory")
        patients = list_patients(root)
        if not patients:
            raise StudyError(f"{root}: no patient folders found (expected ROOT/<patient>/ctp/ or ISLES cases)")
        out = []
        for p in track(patients, description="Reading studies"):
            parts = {"kind": self.source, "src": study_fingerprint(p), "brain_mask": "auto-v1",
                     "frame_interval_s": self.frame_interval_s, "target_spacing_mm": self.target_spacing_mm,
                     # a changed key must re-pseudonymise, so the key's hash (never the key) is in the fingerprint
                     "key": hashlib.sha256(self.pseudonym_key).hexdigest() if self.pseudonym_key else None}
            out.append(self.cache.get(parts, lambda p=p: self._on_target_grid(read_any_study(
                p, pseudonym_key=self.pseudonym_key, frame_interval_s=self.frame_interval_s))))
        return out

    def _on_target_grid(self, study: Study) -> Study:
        """``study`` resampled in-plane to ``target_spacing_mm`` (unchanged when that is ``None``)."""
        from stm_dlp.data.resample import resample_study

        return study if self.target_spacing_mm is None else resample_study(study, self.target_spacing_mm)

    def _with_calc_labels(self, study: Study) -> Study:
        from stm_dlp.perfusion import calculate_maps

        def build() -> Study:
            maps, _info = calculate_maps(np.asarray(study.frames), np.asarray(study.times_s),
                                         None if study.mask is None else np.asarray(study.mask),
                                         affine=study.affine, **self.calc_kwargs)  # smoothing in mm
            labels = np.stack([maps[p] for p in PARAMS], axis=1).astype(np.float32)
            mask = np.asarray(study.mask) if study.mask is not None else maps.get("mask")
            return replace(study, maps=labels, mask=mask, meta={k: v for k, v in study.meta.items()
                                                               if not isinstance(v, np.ndarray)})

        parts = {"kind": "calc_labels", "study": study.source, "pid": study.patient_id,
                 "frames_shape": list(study.frames.shape), "calc": self.calc_kwargs,
                 "frames_sum": float(np.asarray(study.frames, np.float64).sum()),
                 "affine": np.asarray(study.affine, np.float64).round(6).tolist()}
        return self.cache.get(parts, build)

    def prepare_data(self) -> None:
        """Nothing to download; studies are read (and cached) in :meth:`setup`."""

    def setup(self, stage: str | None = None) -> None:
        if self.studies:
            return
        studies = self._load_phantom() if self.source == "phantom" else self._load_disk()
        if self.label_source == "calc":
            studies = [self._with_calc_labels(s) for s in studies]
        for s in studies:
            if s.maps is None:
                raise StudyError(f"{s.source}: no label maps; use data.label_source=calc to label it with "
                                 "the calculation approach")
        self.studies = {s.patient_id: s for s in studies}
        self.splits = resolve_split(list(self.studies), self.seed, self.val_fraction, self.test_fraction,
                                    self.split_file, self.new_patients)
        train_tf = list(self.augment.transforms) if self.augment else []
        if self.train_frame_fraction is not None and self.train_frame_fraction < 1.0:
            train_tf.append(Truncate(keep_fraction=self.train_frame_fraction))
        self.train_set = SliceDataset([self.studies[p] for p in self.splits["train"]],
                                      Compose(train_tf) if train_tf else None, self.crop_size,
                                      self.samples_per_slice, self.lesion_crop_fraction, self.deconv_prior,
                                      self.prior_cache, self.tissue_delay_s, self.prior_bank, self.arterial_pooling)
        self.val_set = SliceDataset(self._eval_studies("val"), deconv_prior=self.deconv_prior,
                                    arterial_pooling=self.arterial_pooling)
        self.test_set = SliceDataset(self._eval_studies("test"), deconv_prior=self.deconv_prior,
                                     arterial_pooling=self.arterial_pooling)

    def _eval_studies(self, split: str) -> list[Study]:
        transforms = [named_corruption(self.eval_corruption)]
        if self.frame_fraction < 1.0:
            transforms.append(Truncate(keep_fraction=self.frame_fraction))
        out = []
        for i, pid in enumerate(self.splits[split]):
            st = self.studies[pid]
            if self.eval_corruption != "none" or self.frame_fraction < 1.0:
                st = corrupt_study(st, Compose(transforms), self.eval_corruption_seed + i)
            if self.motion_correction:
                st = motion_corrected(st)
            out.append(st)
        return out

    # ----------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=False,
                          num_workers=self.num_workers, collate_fn=collate_slices,
                          persistent_workers=self.num_workers > 0)

    def _eval_loader(self, ds: SliceDataset) -> DataLoader:
        sampler = SizeGroupedBatchSampler(SequentialSampler(ds), self.eval_batch_size)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate_slices)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    # ----------------------------------------------------------------------------- facts
    def target_scale(self) -> torch.Tensor:
        """Per-parameter scale ``(P,)`` for target normalisation: the 95th percentile of the
        training labels inside the brain mask (a positive scale, no shift, keeps outputs ≥ 0)."""
        vals = []
        for p in self.splits["train"]:
            st = self.studies[p]
            m = np.asarray(st.mask, bool)
            maps = np.asarray(st.maps)
            vals.append(np.stack([maps[:, k][m] for k in range(len(PARAMS))]))
        allv = np.concatenate(vals, axis=1)
        scale = np.percentile(allv, 95, axis=1)
        return torch.tensor(np.maximum(scale, 1e-3), dtype=torch.float32)

    def save_split(self, path: str | Path) -> None:
        """Write the patient split (pseudonymised IDs) as JSON."""
        from stm_dlp.io.atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps({"seed": self.seed, **self.splits}, indent=2))
