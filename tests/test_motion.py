"""Rigid in-plane motion correction (``stm_dlp.perfusion.motion``): known motions recovered, failures reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stm_dlp.data.corrupt import rigid_warp
from stm_dlp.data.phantom import PhantomConfig, simulate_patient
from stm_dlp.perfusion.motion import correct_motion, warp


@pytest.fixture(scope="module")
def still():
    return simulate_patient(PhantomConfig(height=64, width=64, n_slices=2, noise_hu=20.0, frames_min=30,
                                          frames_max=30), seed=1)


def _move(st, shifts: np.ndarray, angles_rad: np.ndarray) -> np.ndarray:
    fr = st.frames.copy()
    for s in range(fr.shape[0]):
        fr[s] = rigid_warp(fr[s], shifts, angles_rad)
    return fr


def _errors(rep: dict, shifts: np.ndarray, angles_rad: np.ndarray, s: int) -> tuple[float, float]:
    """Largest shift (px) and rotation (deg) error, up to the reference's own pose (the median of the
    pre-bolus frames, which move too)."""
    ds = np.asarray(rep["shift_px"][s]) - shifts
    da = np.asarray(rep["rotation_deg"][s]) - np.rad2deg(angles_rad)
    return float(np.abs(ds - np.median(ds, 0)).max()), float(np.abs(da - np.median(da)).max())


def test_known_shifts_and_rotations(still):
    t = still.n_frames
    rng = np.random.default_rng(0)
    shifts = np.zeros((t, 2))
    angles = np.zeros(t)
    shifts[6:] = rng.uniform(-4, 4, (t - 6, 2))
    angles[6:] = np.deg2rad(rng.uniform(-5, 5, t - 6))
    out, rep = correct_motion(torch.from_numpy(_move(still, shifts, angles)), 4)
    for s in range(2):
        e_shift, e_rot = _errors(rep, shifts, angles, s)
        assert e_shift < 0.5 and e_rot < 1.0, (e_shift, e_rot)
    assert rep["failed_frames"] == [] and rep["moved_frames"] >= 2 * (t - 6)
    # the corrected frames are back where the reference is: bone edges line up again
    fixed = out.numpy()
    err_before = np.abs(_move(still, shifts, angles) - still.frames)[:, 6:].mean()
    assert np.abs(fixed - still.frames)[:, 6:].mean() < 0.35 * err_before


def test_drift_with_jitter_and_sudden_jumps_on_noisy_frames(still):
    t = still.n_frames
    rng = np.random.default_rng(2)
    shifts = np.linspace(0, 1, t)[:, None] * np.array([3.0, -2.0]) + rng.normal(0, 0.3, (t, 2))
    angles = np.deg2rad(np.linspace(0, 2.0, t) + rng.normal(0, 0.3, t))
    for j in (12, 20):  # 8-12 px, 4-8 degree jumps
        shifts[j] = rng.choice([-1, 1], 2) * rng.uniform(8, 12, 2)
        angles[j] = np.deg2rad(rng.choice([-1, 1]) * rng.uniform(4, 8))
    frames = _move(still, shifts, angles)
    frames = frames + np.random.default_rng(3).normal(0, 10.0, frames.shape).astype(np.float32)  # ~22 HU in all
    _, rep = correct_motion(torch.from_numpy(frames), 4)
    for s in range(2):
        e_shift, e_rot = _errors(rep, shifts, angles, s)
        assert e_shift < 0.5 and e_rot < 1.0, (e_shift, e_rot)
    assert rep["failed_frames"] == []
    assert rep["max_shift_px"] > 8 and rep["max_rotation_deg"] > 4


def test_still_study_is_left_alone_and_bad_frames_are_reported(still):
    out, rep = correct_motion(torch.from_numpy(still.frames), 4)
    assert rep["failed_frames"] == [] and rep["max_shift_px"] < 0.1 and rep["max_rotation_deg"] < 0.2
    frames = still.frames.copy()
    frames[0, 15] = np.rot90(frames[0, 15])  # turned 90 degrees: beyond the search (a corrupted frame)
    frames[1, 22] = np.random.default_rng(0).normal(30.0, 300.0, frames[1, 22].shape)  # a corrupted frame
    times = torch.from_numpy(still.times_s)
    out, rep = correct_motion(torch.from_numpy(frames), 4, times)
    assert [0, 15] in rep["failed_frames"] and [1, 22] in rep["failed_frames"]
    assert len(rep["failed_frames"]) <= 3
    # a frame that could not be registered is interpolated from its neighbours in time
    t = still.times_s[1]
    w = (t[22] - t[21]) / (t[23] - t[21])
    np.testing.assert_allclose(out[1, 22].numpy(), (1 - w) * frames[1, 21] + w * frames[1, 23], atol=1e-3)
    kept, rep = correct_motion(torch.from_numpy(frames), 4, failed="keep")
    np.testing.assert_array_equal(kept[1, 22].numpy(), frames[1, 22])


def test_no_skull_or_tiny_images_are_left_alone():
    """A synthetic grid (no bone to lock onto) and a tiny image are not registered, and say so."""
    from stm_dlp.data.phantom import validation_grid

    grid = validation_grid(tile=2)
    out, rep = correct_motion(torch.from_numpy(grid.frames), 3)
    assert rep["skipped_slices"] == list(range(grid.frames.shape[0]))
    assert torch.equal(out, torch.from_numpy(grid.frames))
    tiny = torch.full((1, 6, 8, 8), 1000.0)
    _, rep = correct_motion(tiny, 2)
    assert rep["skipped_slices"] == [0] and rep["moved_frames"] == 0


def test_warp_matches_the_corruption_convention():
    img = torch.zeros(1, 32, 32)
    img[0, 10:14, 8:20] = 100.0
    shift, ang = np.array([[2.0, -3.0]]), np.deg2rad(np.array([6.0]))
    moved = torch.from_numpy(rigid_warp(img.numpy(), shift, ang))
    # correction: sample the moved image at R(-a)(p + s)
    a = -torch.tensor(ang, dtype=torch.float32)
    c, s_ = torch.cos(a), torch.sin(a)
    t = torch.tensor([[float(s_ * 2.0 * 0 + c * 2.0 + s_ * -3.0), float(c * -3.0 - s_ * 2.0)]])
    back = warp(moved, a, t, torch.zeros(1))
    assert float((back - img).abs().mean()) < 3.0


def test_calculate_maps_with_motion_correction(still):
    from stm_dlp.perfusion.maps import calculate_maps

    t = still.n_frames
    rng = np.random.default_rng(5)
    shifts = np.zeros((t, 2))
    angles = np.zeros(t)
    shifts[8:] = rng.uniform(-3, 3, (t - 8, 2))
    angles[8:] = np.deg2rad(rng.uniform(-3, 3, t - 8))
    frames = _move(still, shifts, angles)
    mask = still.mask
    ref, _ = calculate_maps(still.frames, still.times_s, mask, motion=False)
    raw, _ = calculate_maps(frames, still.times_s, mask, motion=False)
    fixed, info = calculate_maps(frames, still.times_s, mask)  # motion correction is on by default
    assert info["motion"]["enabled"] and info["motion"]["moved_frames"] > 0

    def mae(m):
        return float(np.abs(m["cbf"] - ref["cbf"])[mask].mean())

    assert mae(fixed) < 0.7 * mae(raw), (mae(fixed), mae(raw))
