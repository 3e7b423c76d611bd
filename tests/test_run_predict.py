"""`python -m stm_dlp.run` writes what it promises; resume continues; `python -m stm_dlp.predict` on a study."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import subprocess_env, tiny_phantom

from stm_dlp.data.phantom import simulate_patient
from stm_dlp.io.dicom_writer import write_study_dicom
from stm_dlp.types import ALL_PARAMS

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(cache), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    run = tmp / "run"
    proc = _run("-m", "stm_dlp.run", "trainer=smoke", "encoder=cnn", f"hydra.run.dir={run}", cache=tmp / "cache")
    assert "CBF" in proc.stdout and "MAE" in proc.stdout  # the printed metrics table
    return run


def test_run_dir_contents(trained: Path) -> None:
    for name in ("config.yaml", "split.json", "metrics.json", "checkpoints/last.ckpt"):
        assert (trained / name).exists(), name
    assert list((trained / "checkpoints").glob("best-*.ckpt"))
    assert (trained / "csv_logs" / "metrics.csv").exists()
    metrics = json.loads((trained / "metrics.json").read_text())
    for p in ALL_PARAMS:
        assert set(metrics["test"][p]) == {"mae", "rmse", "r2"}
        assert np.isfinite(metrics["test"][p]["mae"]) and metrics["test"][p]["mae"] >= 0
    assert metrics["units"]["cbf"] == "ml/100g/min"
    split = json.loads((trained / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])


def test_resume_continues_from_the_saved_epoch_and_optimiser_state(trained: Path, tmp_path: Path) -> None:
    last = trained / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0
    run2 = tmp_path / "resumed"
    _run("-m", "stm_dlp.run", "trainer=smoke", "encoder=cnn", "trainer.max_epochs=2", f"ckpt_path={last}",
         f"hydra.run.dir={run2}", cache=tmp_path / "cache")
    resumed = torch.load(run2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1  # one more epoch, not two from scratch
    assert resumed["global_step"] == saved["global_step"] + 2  # smoke: 2 batches per epoch
    # Adam's step counter continued from the saved state instead of restarting at 0
    steps_before = max(float(s["step"]) for s in saved["optimizer_states"][0]["state"].values())
    steps_after = max(float(s["step"]) for s in resumed["optimizer_states"][0]["state"].values())
    assert steps_after == steps_before + 2
    assert resumed["lr_schedulers"][0]["last_epoch"] == saved["lr_schedulers"][0]["last_epoch"] + 1


def test_predict_writes_maps_with_the_scan_geometry(trained: Path, tmp_path: Path) -> None:
    cfg = tiny_phantom(height=24, width=24, frames_min=12, frames_max=12)
    study = simulate_patient(cfg, seed=99)
    study_dir = tmp_path / "study"
    write_study_dicom(study, study_dir, time_style="acquisition_time", patient_name="PHANTOM^TEST",
                      patient_id="PHANTOM-TEST", seed=1)
    out = tmp_path / "out"
    metrics = json.loads((trained / "metrics.json").read_text())
    _run("-m", "stm_dlp.predict", f"ckpt={metrics['best_checkpoint']}", f"input={study_dir}", f"output={out}",
         "device=cpu", cache=tmp_path / "cache")
    for p in ALL_PARAMS:
        img = nib.load(out / f"{p}.nii.gz")
        data = np.asarray(img.dataobj)
        assert data.shape == (24, 24, 2) and data.dtype == np.float32  # (W, H, S)
        np.testing.assert_allclose(img.affine, study.affine, atol=1e-3)
        assert np.all(np.isfinite(data)) and data.min() >= 0
    cbf = np.asarray(nib.load(out / "cbf.nii.gz").dataobj)
    assert cbf.max() < 1000 and np.asarray(nib.load(out / "tmax.nii.gz").dataobj).max() < 200
    assert (out / "maps.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "stm_dlp" and summary["failed_slices"] == []
    assert summary["motion_correction"]["enabled"] and summary["motion_correction"]["moved_frames"] == 0
    assert "PHANTOM" not in json.dumps(summary)
    window = summary["scan_window"]  # the scan-length check (tests/test_arterial.py) reaches summary.json
    assert window["after_peak_s"] == pytest.approx(window["scan_end_s"] - window["arterial_peak_s"], abs=0.01)


def test_predicted_maps_are_zero_on_csf_as_the_calc_does() -> None:
    """A model's maps leave CSF out (pre-bolus HU < 15 inside the brain, the calc's own test): every map is
    0 in the phantom's ventricles, while the parenchyma keeps its values — also (up to the partial volume of
    the resampling) on the scan grid when the model runs at another pixel size."""
    from stm_dlp.data.phantom import PhantomConfig
    from stm_dlp.models.stm_dlp import STMDLP
    from stm_dlp.predict import predict_on_scan_grid, predict_study

    study = simulate_patient(PhantomConfig(height=48, width=48, n_slices=1, noise_hu=3.0), seed=2)
    torch.manual_seed(0)
    model = STMDLP(encoder="cnn", spatial_channels=4, unet_depth=1, temporal_hidden=8, arterial_context=True).eval()
    scale = torch.tensor([4.0, 60.0, 5.0])
    base = study.frames[:, :2].mean(1)
    brain = study.mask.astype(bool)
    csf = brain & (study.maps[:, 1] == 0) & (base < 10)   # true CSF, well below the threshold
    tissue = brain & (base > 22)
    assert csf.sum() >= 5 and tissue.sum() > 100
    on_grid, _ = predict_study(model, scale, study)
    # at 3 mm (the scan has 4.6 mm pixels) the ventricle's edge is partial volume after the round trip
    resampled, _ = predict_on_scan_grid(model, scale, study, 3.0)
    for maps, zero_share in ((on_grid, 0.9), (resampled, 0.5)):
        for p in ALL_PARAMS:
            assert (maps[p][csf] == 0).mean() >= zero_share, p
        assert maps["cbf"][csf].mean() < 0.3 * maps["cbf"][tissue].mean()
        assert (maps["cbf"][tissue] > 0).mean() > 0.95
