"""In-plane resampling to a target spacing and back (stm_dlp.data.resample)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_phantom

from stm_dlp.data.phantom import simulate_patient
from stm_dlp.data.resample import (
    ORIGINAL_GRID,
    axis_weights,
    pixel_spacing_mm,
    resample_study,
    restore_maps,
    target_grid,
)
from stm_dlp.geometry import affine_from_dicom_geometry
from stm_dlp.types import Study, StudyError


def _affine(n: int, pixel_mm: float, row_col_mm: tuple[float, float] | None = None) -> np.ndarray:
    """Axial grid of ``n``² pixels centred on the world origin (pixel centres symmetric about 0)."""
    dy, dx = row_col_mm or (pixel_mm, pixel_mm)
    first = np.array([-(n - 1) / 2 * dx, -(n - 1) / 2 * dy, 0.0])
    return affine_from_dicom_geometry(first, np.array([1, 0, 0, 0, 1, 0]), (dy, dx), np.array([0.0, 0.0, 5.0]))


def _world_xy(affine: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """World (x, y) mm of every pixel centre ``(H, W)``, from the affine alone."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = affine @ np.stack([c.ravel(), r.ravel(), np.zeros(r.size), np.ones(r.size)])
    return pts[0].reshape(h, w), pts[1].reshape(h, w)


def _smooth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth physical field (mm in, arbitrary units out): two broad blobs on a level."""
    return 10 + 30 * np.exp(-((x - 12) ** 2 + (y + 8) ** 2) / (2 * 18.0**2)) + 15 * np.exp(
        -((x + 20) ** 2 + (y - 15) ** 2) / (2 * 12.0**2))


def _analytic_study(n: int, pixel_mm: float, n_frames: int = 6, row_col_mm=None) -> Study:
    """The same anatomy (defined in world mm) sampled on an ``n``² grid of ``pixel_mm`` pixels."""
    affine = _affine(n, pixel_mm, row_col_mm)
    x, y = _world_xy(affine, n, n)
    field = _smooth(x, y)
    times = np.linspace(0, 25, n_frames, dtype=np.float32)
    bolus = np.exp(-((times - 10) ** 2) / 20.0)
    frames = (40 + bolus[:, None, None] * field[None] * 3).astype(np.float32)[None]
    maps = np.stack([field / 10, field * 2, field / 8])[None].astype(np.float32)
    mask = (x**2 + y**2 < 35.0**2)[None]
    return Study(frames=frames, times_s=times[None], affine=affine, maps=maps, mask=mask, patient_id="p",
                 source="analytic").validate()


def test_pixel_spacing_and_target_grid_keep_the_centre():
    affine = _affine(40, 0.0, row_col_mm=(0.8, 1.25))
    assert pixel_spacing_mm(affine) == pytest.approx((0.8, 1.25))
    (h, w), new = target_grid((40, 40), affine, 2.0)
    assert (h, w) == (16, 25)  # round(40 * 0.8 / 2), round(40 * 1.25 / 2)
    assert pixel_spacing_mm(new) == pytest.approx((2.0, 2.0))
    centre_old = affine @ np.array([19.5, 19.5, 0, 1])
    centre_new = new @ np.array([(w - 1) / 2, (h - 1) / 2, 0, 1])
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)
    np.testing.assert_array_equal(new[:, 2], affine[:, 2])  # slices untouched
    with pytest.raises(ValueError, match="positive"):
        target_grid((4, 4), affine, 0.0)


def test_axis_weights_average_when_downsampling_and_interpolate_when_upsampling():
    down = axis_weights(8, 4, 2.0, 0.5)
    np.testing.assert_allclose(down.sum(axis=1), 1.0)
    assert (down > 0).sum(axis=1).min() >= 3  # several input pixels per output: an average, not a pick
    up = axis_weights(4, 8, 0.5, -0.25)
    np.testing.assert_allclose(up @ np.arange(4.0), np.clip(np.arange(8) * 0.5 - 0.25, 0, 3))


@pytest.mark.parametrize("target", [0.7, 2.6])
def test_resampled_values_sit_where_the_new_affine_says(target):
    """Independent of the implementation: the resampled field at each new pixel equals the analytic field
    at that pixel's world position computed from the new affine."""
    study = _analytic_study(48, 1.5)
    out = resample_study(study, target)
    assert pixel_spacing_mm(out.affine) == pytest.approx((target, target))
    x, y = _world_xy(out.affine, *out.shape_hw)
    inside = x**2 + y**2 < 30.0**2  # away from the border, where values are extrapolated
    truth = _smooth(x, y)
    err = np.abs(out.maps[0, 1] - 2 * truth)[inside]
    assert err.max() < 0.02 * 2 * truth[inside].min()
    np.testing.assert_array_equal(out.times_s, study.times_s)
    assert out.frames.shape[:2] == study.frames.shape[:2] and out.frames.dtype == np.float32
    assert out.mask.dtype == bool and out.mask.shape == (1, *out.shape_hw)
    assert abs(out.mask.sum() * target**2 - study.mask.sum() * 1.5**2) < 0.05 * study.mask.sum() * 1.5**2


def test_downsampling_averages_noise():
    """Halving the resolution averages a 4 × 4 footprint (not the 2 × 2 a plain linear pick would): white
    noise keeps under 40 % of its standard deviation (antialiased triangle: 31 %, plain linear: 50 %)."""
    rng = np.random.default_rng(0)
    study = _analytic_study(64, 1.0)
    noisy = Study(frames=(study.frames + rng.normal(0, 20, study.frames.shape)).astype(np.float32),
                  times_s=study.times_s, affine=study.affine, source="noise")
    out = resample_study(noisy, 2.0)
    clean = resample_study(Study(frames=study.frames, times_s=study.times_s, affine=study.affine), 2.0)
    assert float((out.frames - clean.frames).std()) < 0.4 * 20


def test_round_trip_restores_the_scan_grid():
    study = _analytic_study(50, 1.1)
    out = resample_study(study, 2.0)
    assert out.shape_hw == (28, 28)
    grid = out.meta[ORIGINAL_GRID]
    assert grid["shape_hw"] == [50, 50]
    np.testing.assert_array_equal(np.asarray(grid["affine"]), study.affine)
    back = restore_maps(out.maps, out)
    assert back.shape == study.maps.shape
    m = np.broadcast_to(study.mask[:, None], study.maps.shape)
    rel = np.abs(back - study.maps)[m] / np.abs(study.maps)[m]
    assert rel.max() < 0.02  # smooth maps come back within a small error
    const = np.full(out.maps.shape, 7.25, np.float32)
    np.testing.assert_array_equal(restore_maps(const, out), np.full(study.maps.shape, 7.25, np.float32))
    named = restore_maps({"cbv": out.maps[:, 0], "cbf": out.maps[:, 1], "tmax": out.maps[:, 2],
                          "mtt": np.zeros_like(out.maps[:, 0])}, out)
    assert named["cbf"].shape == study.mask.shape
    np.testing.assert_allclose(named["mtt"], named["cbv"] / named["cbf"] * 60, rtol=1e-5)
    assert restore_maps(out.mask, out).dtype == bool
    # resampling twice still knows the scan's grid
    again = resample_study(out, 3.0)
    assert again.meta[ORIGINAL_GRID] == grid
    assert restore_maps(again.maps, again).shape == study.maps.shape


def test_one_mm_and_two_mm_of_the_same_anatomy_agree_at_two_mm():
    fine, coarse = _analytic_study(96, 1.0), _analytic_study(48, 2.0)
    out = resample_study(fine, 2.0)
    assert out.shape_hw == coarse.shape_hw
    np.testing.assert_allclose(out.affine, coarse.affine, atol=1e-9)
    m = coarse.mask[0]
    for k in range(3):
        rel = np.abs(out.maps[0, k] - coarse.maps[0, k])[m] / coarse.maps[0, k][m]
        assert rel.max() < 0.01, k
    rel = np.abs(out.frames - coarse.frames)[0][:, m] / coarse.frames[0][:, m]
    assert rel.max() < 0.01
    assert (out.mask != coarse.mask).mean() < 0.02


def test_same_spacing_is_a_no_op_and_phantom_meta_follows():
    study = simulate_patient(tiny_phantom(height=24, width=24), 2)
    dy, _ = pixel_spacing_mm(study.affine)
    same = resample_study(study, dy)
    assert same.frames is study.frames and ORIGINAL_GRID in same.meta
    out = resample_study(study, dy / 2)
    assert out.shape_hw == (48, 48)
    assert out.meta["labels"].shape == (2, 48, 48) and out.meta["labels"].dtype == study.meta["labels"].dtype
    assert set(np.unique(out.meta["labels"])) <= set(np.unique(study.meta["labels"]))  # classes, not blends
    assert all(0 <= r < 48 and 0 <= c < 48 for _, r, c in out.meta["aif_pixels"])
    out.validate()


def test_oblique_grids_refuse_in_plane_restore():
    study = _analytic_study(16, 2.0)
    out = resample_study(study, 3.0)
    rot = np.eye(4)
    rot[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    bad = Study(frames=out.frames, times_s=out.times_s, affine=rot @ out.affine, source="oblique.nii",
                meta={ORIGINAL_GRID: out.meta[ORIGINAL_GRID]})
    with pytest.raises(StudyError, match="oblique.nii"):
        restore_maps(out.maps, bad)


def test_datamodule_resamples_before_the_cache_and_the_spacing_keys_it(tmp_path):
    from stm_dlp.data.datamodule import CTPDataModule

    phantom = dict(height=16, width=16, n_slices=2, frames_min=6, frames_max=6, noise_hu=1.0)
    entries, shapes = set(), {}
    for target in (9.0, 18.0, 9.0):
        dm = CTPDataModule(n_patients=3, phantom=phantom, cache_dir=str(tmp_path), target_spacing_mm=target)
        dm.setup("fit")
        entries |= {p.name for p in tmp_path.iterdir()}
        study = next(iter(dm.studies.values()))
        shapes[target] = study.shape_hw
        assert pixel_spacing_mm(study.affine) == pytest.approx((target, target))
        assert study.meta[ORIGINAL_GRID]["shape_hw"] == [16, 16]  # survives the cache
        assert dm.train_set[0].frames.shape[-2:] == study.shape_hw
    assert len(entries) == 6  # three patients x two spacings; the repeated 9 mm is read back
    assert shapes[9.0] == (24, 24) and shapes[18.0] == (12, 12)  # from 16² of 13.75 mm
    with pytest.raises(ValueError, match="target_spacing_mm"):
        CTPDataModule(n_patients=3, phantom=phantom, target_spacing_mm=-1.0)


def test_predict_at_the_training_spacing_writes_maps_on_the_scan_grid(tmp_path, monkeypatch):
    """A checkpoint trained at 9 mm on a 13.75 mm study: the model runs on 9 mm pixels, the NIfTI maps come
    out on the study's own 16² grid with its affine."""
    import json

    import torch

    from stm_dlp import predict as P
    from stm_dlp.io.layouts import write_nifti_patient
    from stm_dlp.io.nifti import read_nifti_maps
    from stm_dlp.models import STMDLP

    config = {"_target_": "stm_dlp.models.STMDLP", "encoder": "cnn", "spatial_channels": 4, "temporal_hidden": 4,
              "mpp_hidden": 4, "unet_depth": 1}
    model = STMDLP(**{k: v for k, v in config.items() if k != "_target_"})
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "stm_dlp": {"model_config": config, "target_scale": [4.0, 60.0, 8.0], "params": ["cbv", "cbf", "tmax"],
                            "target_spacing_mm": 9.0}}, ckpt)
    study = simulate_patient(tiny_phantom(), 4)
    write_nifti_patient(tmp_path / "patient", study)
    seen = []
    real = P.predict_study
    monkeypatch.setattr(P, "predict_study",
                        lambda m, s, st, *a, **k: seen.append(st.shape_hw) or real(m, s, st, *a, **k))
    summary = P.run_predict(str(ckpt), str(tmp_path / "patient"), str(tmp_path / "out"), device="cpu")
    assert seen == [(24, 24)]  # round(16 * 13.75 / 9)
    vol, affine = read_nifti_maps(tmp_path / "out" / "cbf.nii.gz")
    assert vol.shape == (2, 16, 16)  # (S, H, W) of the scan
    np.testing.assert_allclose(affine, study.affine, atol=1e-4)
    assert np.all(vol[~study.mask] == 0) and np.all(vol[study.mask] > 0)  # masked with the scan's own mask
    assert summary["pixel_spacing_mm"] == {"scan": [13.75, 13.75], "model": 9.0}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["pixel_spacing_mm"]["model"] == 9.0
