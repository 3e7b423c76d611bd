"""Sizes and budgets of the benchmark profiles (``smoke``, ``cpu``, ``gpu``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Profile:
    """Everything that differs between profiles. Times are wall-clock seconds."""

    name: str
    # ---- accuracy: phantom cohort and training (passed to ``python -m stm_dlp.run`` as overrides)
    trainer: str = "cpu"                      # conf/trainer group
    scale: str = "laptop"                     # conf/scale group
    n_patients: int = 10
    lesion_probability: float | None = None   # data.phantom.lesion_probability (None: the phantom's default)
    height: int = 32
    n_slices: int = 2
    frames_min: int = 40
    frames_max: int = 50
    batch_size: int = 4
    crop_size: int = 16
    max_epochs: int = 40
    max_time_s: int | None = None             # Lightning's max_time per training (None: epochs only)
    check_val_every_n_epoch: int = 2
    extra_train_overrides: tuple[str, ...] = ()
    label_noise_run: bool = True              # also train the default model on oSVD-derived labels
    # the trained models (names of experiments/bench/accuracy.py MODELS; None: all). The default model and
    # UniToBrain are always among them (the targets compare them).
    models: tuple[str, ...] | None = None
    parallel_runs: int = 1                    # training subprocesses at once (1: clean timings)
    frame_fractions: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
    dropped_fractions: tuple[float, ...] = (0.2, 0.4)   # in-process, besides the named 30 % condition
    # phantom families (PhantomConfig.family): the main runs use the first; the default model is also trained
    # on each other one and every trained family is tested on every family (cross-family). () = main runs on
    # the default family, no cross-family evaluation.
    cross_family: tuple[str, ...] = ("classic", "ribbon")
    # the matrix of the other families' cohorts (None: ``height``). The ribbon family draws 0.5-2 mm pixels and
    # shrinks the anatomy when the matrix cannot hold a head at 2 mm: at 64² its heads are miniatures.
    cross_family_height: int | None = None
    # ---- speed
    speed_sizes: tuple[int, ...] = (128, 256)
    speed_frames: int = 50
    speed_batch: int = 1
    speed_steps: int = 2
    speed_warmup: int = 1
    speed_variants: tuple[str, ...] = ("fp32",)         # gpu: bf16, channels_last, compile, cudnn_off
    speed_scale: str = "laptop"               # model widths used for speed (conf/scale values)
    speed_isolate: bool = True                # one subprocess per measurement (own peak memory)
    infer_slices: int = 16                    # slices actually run (the study has 16; extrapolated if fewer)
    infer_size: int = 256
    infer_frames: int = 50
    lstm_compare_n: int = 1024                # pixel sequences for packed vs gather
    lstm_compare_t: int = 50
    matmul_n: int = 2048
    # ---- data
    loader_workers: tuple[int, ...] = (0, 1)
    loader_passes: int = 2
    train_rate_steps: int = 3
    dicom_patients: int = 2
    dicom_size: int = 64
    dicom_slices: int = 4
    dicom_frames: int = 40
    # ---- deconvolution (experiments/bench_deconv.py)
    deconv_profile: str = "cpu"               # experiments/bench_deconv.py --profile
    deconv_timeout_s: int = 600
    # ---- profiling
    profile_batch: int = 4
    profile_crop: int = 16
    profile_frames: int = 50
    profile_infer_size: int = 64
    devices: tuple[str, ...] = ("cpu",)
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    # Toy size, for CI (tests/test_bench.py): the whole pipeline end to end, numbers meaningless.
    "smoke": Profile(
        name="smoke", trainer="smoke", n_patients=5, lesion_probability=1.0, height=24, n_slices=2, frames_min=12,
        frames_max=14, batch_size=2, crop_size=16, max_epochs=1, check_val_every_n_epoch=1,
        frame_fractions=(0.8, 0.6, 0.4), dropped_fractions=(0.2, 0.4),
        speed_sizes=(32,), speed_frames=8, speed_steps=1, speed_warmup=0, infer_slices=1, infer_size=32,
        infer_frames=8, lstm_compare_n=64, lstm_compare_t=12, matmul_n=256,
        loader_workers=(0,), loader_passes=1, train_rate_steps=1,
        dicom_patients=1, dicom_size=16, dicom_slices=1, dicom_frames=6,
        deconv_profile="smoke", deconv_timeout_s=300, parallel_runs=3, speed_isolate=False,
        profile_batch=1, profile_crop=16, profile_frames=8, profile_infer_size=32,
        notes=("smoke profile: toy sizes, one training batch per model, every patient with a lesion (so the "
               "clinical readout's Dice is exercised); the numbers test the pipeline, not the methods",),
    ),
    # This repository's 2-core CPU machine in about half an hour (shared with other work: conservative).
    "cpu": Profile(
        name="cpu", trainer="cpu", n_patients=16, height=64, n_slices=4, frames_min=40, frames_max=50,
        batch_size=8, crop_size=16, max_epochs=40, max_time_s=720, check_val_every_n_epoch=5,
        label_noise_run=False, models=("stm_dlp_lstm", "stm_dlp_lstm_paper", "unitobrain"), cross_family_height=128,
        speed_sizes=(128, 256), speed_frames=16, speed_steps=1, speed_warmup=1,
        infer_slices=2, infer_size=256, infer_frames=50, lstm_compare_n=512, lstm_compare_t=50,
        loader_workers=(0, 1), loader_passes=1, train_rate_steps=3,
        dicom_patients=2, dicom_size=64, dicom_slices=4, dicom_frames=40,
        notes=("cpu profile: the `make run` cohort but 40-50 frames instead of its 40-60 (16 phantom patients, "
               "64² at 3.4 mm resampled to 3 mm, 4 slices; 4 held-out test patients; the ribbon family at its "
               "realistic 128², 1.6-1.9 mm) and "
               "`make run`'s schedule (40 epochs, at most 12 min of training per model) on a 2-core CPU — far "
               "from the paper's 200 epochs; accuracy numbers compare methods at "
               "this budget only; at this size (time) only the default model (LSTM + arterial context), the paper's "
               "configuration and UniToBrain are trained, and the label-noise run (`data.label_source=calc`) is "
               "left out: the CNN and MLP-Mixer rows are in docs/reproducing.md's Table 1",
               "speed at 128²/256² uses 16 frames per slice (CPU time); model inference runs 2 of the study's 16 "
               "slices and scales linearly (stated in the table); oSVD runs the whole study"),
    ),
    # A real accelerator: paper-scale model, the paper's 200 epochs, full-size studies.
    "gpu": Profile(
        name="gpu", trainer="gpu", scale="paper", n_patients=48, height=128, n_slices=8, frames_min=40,
        frames_max=60, batch_size=8, crop_size=64, max_epochs=200, check_val_every_n_epoch=5,
        extra_train_overrides=("data.eval_batch_size=8",),
        speed_sizes=(128, 256), speed_frames=50, speed_batch=4, speed_steps=10, speed_warmup=3,
        speed_variants=("fp32", "bf16", "bf16+channels_last", "bf16+compile", "cudnn_off"),
        speed_scale="paper", infer_slices=16, lstm_compare_n=16384, matmul_n=8192,
        loader_workers=(0, 2, 4), loader_passes=2, train_rate_steps=10,
        dicom_patients=4, dicom_size=256, dicom_slices=8, dicom_frames=50, deconv_profile="gpu",
        profile_batch=8, profile_crop=64, profile_infer_size=256, devices=("cpu", "cuda"),
    ),
}


#: Model widths per scale (mirrors conf/scale/*.yaml, read from there when available).
def scale_values(scale: str) -> dict[str, Any]:
    from pathlib import Path

    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[2] / "conf" / "scale" / f"{scale}.yaml"
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
