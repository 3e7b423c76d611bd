"""The digital phantom: physics consistency and exact truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stm_dlp.data import phantom as ph
from stm_dlp.perfusion import physics


def test_tissue_table_matches_direct_convolution():
    aif_params = dict(t0_s=5.0, peak_hu=300.0, alpha=3.0, beta_s=1.5)
    times = torch.tensor(np.sort(np.random.default_rng(0).uniform(0, 60, 40)))
    t_fine = torch.arange(0.0, 80.0, 0.01, dtype=torch.float64)
    table = physics.TissueCurveTable(physics.arterial_input_function(t_fine, **aif_params), 0.01, "exponential")
    for cbf, mtt, delay in [(60.0, 4.0, 0.0), (25.0, 5.3, 1.7), (10.0, 11.0, 9.2)]:
        got = table.curves(times, torch.tensor([cbf]), torch.tensor([mtt]), torch.tensor([delay]))[0]
        ref = physics.tissue_curve(times, lambda t: physics.arterial_input_function(t, **aif_params),
                                   cbf, mtt, delay, dt_s=0.005)
        assert torch.allclose(got, ref, rtol=5e-3, atol=5e-3 * float(ref.max()))


@pytest.mark.parametrize("kind", physics.RESIDUE_KINDS)
def test_residue_area_is_mtt(kind):
    t = torch.arange(0.0, 200.0, 0.001, dtype=torch.float64)
    r = physics.residue_function(t, torch.tensor(6.0, dtype=torch.float64), kind)
    assert r[0] == pytest.approx(1.0)
    assert float(r.sum() * 0.001) == pytest.approx(6.0, rel=2e-3)


def test_tissue_area_obeys_central_volume_theorem():
    """∫C_tissue = (rho/kappa_H) * CBV/100 * ∫AIF  (CBV in ml/100g)."""
    t = torch.arange(0.0, 300.0, 0.01, dtype=torch.float64)
    aif_fn = lambda x: physics.arterial_input_function(x, recirculation=0.0)  # noqa: E731
    cbf, mtt = 50.0, 4.0
    c = physics.tissue_curve(t, aif_fn, cbf, mtt, 0.0, dt_s=0.01)
    cbv = cbf * mtt / 60.0
    expected = physics.RHO_BRAIN_G_ML / physics.KAPPA_H * cbv / 100.0 * float(aif_fn(t).sum() * 0.01)
    assert float(c.sum() * 0.01) == pytest.approx(expected, rel=1e-2)


def test_patient_truth_is_exact_and_ranges_are_realistic(tiny_study):
    s = tiny_study
    cbv, cbf, tmax = (s.maps[:, k] for k in range(3))
    m = s.mask
    labels = s.meta["labels"]
    # CBV = CBF * MTT / 60 exactly, MTT within the tissue ranges of the docstring
    mtt = np.where(cbf > 0, cbv / np.maximum(cbf, 1e-6) * 60, 0)
    assert np.all(mtt[(labels == ph.GM)] > 3) and np.all(mtt[(labels == ph.GM)] < 5.5)
    assert 45 < cbf[labels == ph.GM].mean() < 75
    assert 15 < cbf[labels == ph.WM].mean() < 35
    assert np.all(cbf[labels == ph.CSF] == 0) and np.all(tmax[labels == ph.CSF] == 0)
    assert not m[labels == ph.ARTERY].any() and not m[labels == ph.SKULL].any()
    assert s.frames.dtype == np.float32 and s.times_s.dtype == np.float32
    assert np.all(np.diff(s.times_s, axis=1) > 0)


def test_lesion_core_and_penumbra():
    cfg = ph.PhantomConfig(height=48, width=48, n_slices=3, frames_min=20, frames_max=20,
                           noise_hu=0.0, lesion_probability=1.0)
    s = ph.simulate_patient(cfg, seed=11)
    lab = s.meta["labels"]
    core, pen = lab == ph.CORE, lab == ph.PENUMBRA
    assert core.any() and pen.any()
    cbf, tmax = s.maps[:, 1], s.maps[:, 2]
    assert cbf[core].max() < cbf[pen].min() + 10
    assert tmax[core].min() >= 10 and 6 <= tmax[pen].min() and tmax[pen].max() <= 10
    cbv = s.maps[:, 0]
    assert cbv[pen].mean() > 2 * cbv[core].mean()  # CBV preserved in penumbra, low in core


def test_deterministic_and_frame_counts_vary():
    cfg = ph.PhantomConfig(height=16, width=16, n_slices=1)
    a, b = ph.simulate_patient(cfg, 5), ph.simulate_patient(cfg, 5)
    np.testing.assert_array_equal(a.frames, b.frames)
    counts = {ph.simulate_patient(cfg, i).n_frames for i in range(8)}
    assert len(counts) > 2 and min(counts) >= 40 and max(counts) <= 60
    t = a.times_s[0]
    assert np.std(np.diff(t)) > 0.2  # irregular framing


def test_curves_follow_the_physics(tiny_cfg):
    """A noise-free tissue pixel equals baseline + table curve built from its truth maps."""
    cfg = ph.PhantomConfig(height=24, width=24, n_slices=1, frames_min=30, frames_max=30, noise_hu=0.0)
    s = ph.simulate_patient(cfg, 2)
    lab = s.meta["labels"][0]
    r, c = np.argwhere(lab == ph.GM)[0]
    cbf, tmax = s.maps[0, 1, r, c], s.maps[0, 2, r, c]
    mtt = s.maps[0, 0, r, c] / cbf * 60
    aif_fn = lambda t: physics.arterial_input_function(t, **s.meta["aif_params"])  # noqa: E731
    ref = physics.tissue_curve(torch.from_numpy(s.times_s[0].astype(np.float64)), aif_fn, float(cbf),
                               float(mtt), float(tmax), dt_s=0.005)
    got = s.frames[0, :, r, c] - s.meta["baseline_hu"][0, r, c]
    np.testing.assert_allclose(got, ref.numpy(), atol=0.05 + 0.01 * float(ref.max()))


def test_validation_grid_layout():
    g = ph.validation_grid(tile=3)
    assert g.frames.shape == (3, 90, 18, 18)
    # tile (row i, col j) has MTT mtt_values[i], TMAX delay_values[j]
    cbv, cbf, tmax = g.maps[1]
    assert cbv[0, 0] == 4.0 and cbf[3, 0] == pytest.approx(4.0 / 4.0 * 60)
    assert tmax[0, 3] == 1.0 and tmax[0, 17] == 5.0


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="residue"):
        ph.PhantomConfig(residue="triangle")


def test_classic_outputs_unchanged_for_a_fixed_seed():
    """Reference values recorded before the ribbon family and the geometry options were added (frames and
    maps sums re-recorded when the core's CBF went from 8 to 4.5 ml/100g/min; frames re-recorded when the AIF
    got its systemic steady state, generator 3 — labels, maps, framing and the AIF's first pass unchanged)."""
    import hashlib

    cfg = ph.PhantomConfig(height=32, width=32, n_slices=2, frames_min=20, frames_max=30, residue="mixed",
                           lesion_probability=1.0)
    s = ph.simulate_patient(cfg, 12)
    assert hashlib.sha256(s.meta["labels"].astype(np.int64).tobytes()).hexdigest()[:16] == "9dbcc18dd1d42702"
    assert s.n_frames == 26 and s.meta["residue"] == "exponential" and int(s.mask.sum()) == 834
    assert s.meta["aif_params"]["t0_s"] == pytest.approx(4.535729541558368, rel=1e-12)
    assert s.meta["aif_params"]["steady_state"] == pytest.approx(0.14835511288741085, rel=1e-12)
    np.testing.assert_allclose(s.times_s[0, [1, 5, -1]], [1.2809584140777588, 5.625909328460693, 36.97569274902344],
                               rtol=1e-7)
    np.testing.assert_allclose(s.frames[1, ::6, 16, 10], [26.67168617248535, 26.573871612548828, 33.5058479309082,
                                                          28.99787712097168, 25.919755935668945], rtol=1e-5)
    assert float(s.frames.astype(np.float64).sum()) == pytest.approx(-20093720.00999546, rel=1e-7)
    np.testing.assert_allclose(s.maps.astype(np.float64).sum(axis=(0, 2, 3)),
                               [2442.3104677796364, 33658.41222381592, 974.8232138510793], rtol=1e-6)
    np.testing.assert_allclose(s.affine, ph.phantom_affine(32, 32, 2, 220.0, 5.0))
    assert s.meta["family"] == "classic"


def test_classic_realistic_geometry_keeps_the_head_size():
    """With pixel_mm the classic head keeps its physical size whatever the matrix; other draws unchanged."""
    areas = []
    for size in (160, 256):  # both hold the 220 mm design head at >= 1.4 mm
        cfg = ph.PhantomConfig(height=size, width=size, n_slices=1, frames_min=8, frames_max=8,
                               pixel_mm=(1.4, 2.0), slice_mm_range=(4.0, 10.0))
        s = ph.simulate_patient(cfg, 4)
        px = float(np.linalg.norm(s.affine[:3, 0]))
        assert 1.4 <= px <= 2.0 and 4.0 <= float(np.linalg.norm(s.affine[:3, 2])) <= 10.0
        areas.append((s.meta["labels"][0] != ph.AIR).sum() * px * px)
        default = ph.simulate_patient(ph.PhantomConfig(height=size, width=size, n_slices=1, frames_min=8,
                                                       frames_max=8), 4)
        np.testing.assert_array_equal(s.times_s, default.times_s)  # its own random stream
    assert areas[0] == pytest.approx(areas[1], rel=0.05)
    assert 2.3e4 < areas[0] < 3.6e4  # a ~175 x 210 mm head (outer skull), as in the default 220 mm FOV
