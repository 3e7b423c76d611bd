"""Corruption transforms: seeded, composable, shape-consistent, usable on slices and studies."""

from __future__ import annotations

import numpy as np
import pytest

from stm_dlp.data import corrupt as C


@pytest.mark.parametrize("name", list(C.NAMED_CORRUPTIONS))
def test_named_corruptions_are_seeded_and_valid(tiny_study, name):
    tr = C.named_corruption(name)
    a = C.corrupt_study(tiny_study, tr, seed=7)
    b = C.corrupt_study(tiny_study, tr, seed=7)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.maps, tiny_study.maps)  # labels never change
    assert a.frames.shape[0] == tiny_study.frames.shape[0]
    assert np.all(np.diff(a.times_s, axis=1) > 0)
    if name != "none":
        assert a.frames.shape != tiny_study.frames.shape or not np.allclose(a.frames, tiny_study.frames)


def test_single_slice_and_study_inputs(tiny_study):
    rng = np.random.default_rng(0)
    f, t = C.RigidMotion(fraction=1.0)(tiny_study.frames[0], tiny_study.times_s[0], rng)
    assert f.shape == tiny_study.frames[0].shape and t.shape == tiny_study.times_s[0].shape


def test_drop_frames_keeps_times_and_first_frame(tiny_study):
    f, t = C.DropFrames(fraction=0.3, min_frames=4)(tiny_study.frames, tiny_study.times_s,
                                                     np.random.default_rng(1))
    n = tiny_study.n_frames
    assert f.shape[1] == n - round(0.3 * n)
    assert t[0, 0] == tiny_study.times_s[0, 0]
    assert set(t[0].tolist()) <= set(tiny_study.times_s[0].tolist())  # kept frames keep their times
    k = list(tiny_study.times_s[0]).index(t[0, 3])
    np.testing.assert_array_equal(f[:, 3], tiny_study.frames[:, k])


def test_truncate_first_k(tiny_study):
    f, t = C.Truncate(keep_fraction=0.5)(tiny_study.frames, tiny_study.times_s, np.random.default_rng(0))
    k = round(0.5 * tiny_study.n_frames)
    np.testing.assert_array_equal(f, tiny_study.frames[:, :k])
    with pytest.raises(ValueError, match="keep_fraction"):
        C.Truncate(keep_fraction=0.0)


def test_rigid_warp_identity_and_shift():
    img = np.zeros((1, 16, 16), np.float32)
    img[0, 8, 8] = 1.0
    same = C.rigid_warp(img, np.zeros((1, 2)), np.zeros(1))
    np.testing.assert_allclose(same, img, atol=1e-5)
    moved = C.rigid_warp(img, np.array([[0.0, 2.0]]), np.zeros(1))
    assert moved[0, 8, 10] == pytest.approx(1.0, abs=1e-4)


def test_jitter_interpolates_linear_signals_exactly():
    times = np.arange(20, dtype=np.float32) * 2.0
    frames = (3.0 * times[:, None, None] + np.zeros((20, 4, 4))).astype(np.float32)
    f, t = C.JitterFraming(sigma_fraction=0.3)(frames, times, np.random.default_rng(3))
    assert not np.allclose(t, times)
    np.testing.assert_allclose(f[:, 0, 0], 3.0 * t, rtol=1e-4, atol=1e-3)


def test_compose_and_noise_level(tiny_study):
    tr = C.Compose([C.GaussianNoise(sigma_hu=10.0), C.Truncate(keep_frames=6)])
    f, _ = tr(tiny_study.frames, tiny_study.times_s, np.random.default_rng(0))
    assert f.shape[1] == 6
    assert 8.5 < float((f - tiny_study.frames[:, :6]).std()) < 11.5


def test_unknown_corruption_lists_valid_names():
    with pytest.raises(ValueError, match="motion"):
        C.named_corruption("earthquake")


def test_base_class_probability_check_and_study_view(tiny_study):
    """p gates every transform the same way (one draw per call); a StudyTransform sees a study even for a slice."""
    seen = []

    class Record(C.StudyTransform):
        def apply_study(self, frames, times_s, rng):
            seen.append(frames.shape)
            return frames + 1.0, times_s

    f, t = tiny_study.frames[0], tiny_study.times_s[0]
    rng = np.random.default_rng(5)
    out_f, out_t = Record(p=0.0)(f, t, rng)
    assert out_f is f and out_t is t and not seen  # skipped, input returned as is
    assert rng.uniform() == np.random.default_rng(5).uniform(size=2)[1]  # exactly one draw was used
    out_f, out_t = Record()(f, t, np.random.default_rng(5))
    assert seen == [(1, *f.shape)] and out_f.shape == f.shape and out_t.shape == t.shape
    np.testing.assert_array_equal(out_f, f + 1.0)
    # every named corruption is a RandomTransform (or the empty Compose); p stays keyword-only
    assert all(isinstance(tr, C.RandomTransform) for n, tr in C.NAMED_CORRUPTIONS.items() if n != "none")
    assert C.GaussianNoise(4.0, p=0.5).sigma_hu == 4.0
    with pytest.raises(TypeError):
        C.GaussianNoise(4.0, 0.5)
